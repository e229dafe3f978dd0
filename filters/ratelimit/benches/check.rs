//! Cost of one limiter check (rate + in-flight + tokens) against the local store.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use filter_ratelimit::{LimitStore, LocalStore};

fn bench(c: &mut Criterion) {
    let store = LocalStore::new(100_000);
    let t = 1_000; // far above any rate the bench reaches: every check is allowed
    let mut now = 1_000_000u64;
    c.bench_function("gcra check, 1k keys", |b| {
        let mut k = 0u64;
        b.iter(|| {
            k = (k + 1) % 1_000;
            now += 1_000;
            black_box(store.check_rate(
                black_box(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                now,
                t,
                10,
            ))
        })
    });
    c.bench_function("in-flight acquire + release", |b| {
        b.iter(|| {
            let ok = store.acquire(black_box(42), 8);
            store.release(42);
            black_box(ok)
        })
    });
    c.bench_function("tokens reserve + settle", |b| {
        b.iter(|| {
            let r = store.reserve_tokens(black_box(7), 5_000, 60_000_000_000, 100, u64::MAX);
            store.settle_tokens(7, 6_000, 60_000_000_000, r.start_ns, 100, 100);
            black_box(r)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
