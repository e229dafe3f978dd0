//! Quota a replica takes from shared state ahead of a key's requests, far from the key's
//! limit.
//!
//! On shared state every request of a key would cost a round trip to the server (its rate,
//! its tokens, its budget). While a key is far from its limit, the replica instead takes a
//! chunk of the limit (`state.chunk` requests' worth) in one atomic call made beside the
//! requests, and serves the next requests from it without a call. A chunk is taken only
//! while at least 15 times its size stays free for the other replicas (a rate's chunk may be
//! smaller, down to 16 requests: a burst of 1,000 gives chunks of 62), so a limit that
//! matters (a few hundred requests or fewer, a budget near its end) is still checked
//! exactly, request by request. What a chunk held and did not use is given back when it ends (`state.chunk_life`
//! after it was taken, or its window's end): until then the other replicas see it as used,
//! which errs on the safe side.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How chunks are taken (`state.chunk`, `state.chunk_life`).
#[derive(Debug, Clone, Copy)]
pub struct ChunkSpec {
    /// Requests' worth taken at once.
    pub requests: u64,
    /// How long a chunk serves before what it has left is given back.
    pub life: Duration,
}

impl ChunkSpec {
    /// A chunk is taken only when at least this many times its size would still be free
    /// after it.
    pub const SPARE: u64 = 15;
}

/// A chunk: what is left of it, until when it serves, and what the server answered when it
/// was taken (`tag`, `base`: the limiter's own meaning) with `extra` the limiter's own.
#[derive(Debug)]
pub struct Chunk<P> {
    pub left: u64,
    pub size: u64,
    /// The limits it was taken under (a fingerprint): a request under other limits (a keys
    /// file reloaded with a lower one) ends it instead of drawing from it.
    pub limits: u64,
    pub until: Instant,
    pub tag: i64,
    pub base: i64,
    pub extra: P,
}

/// What a request found.
#[derive(Debug)]
pub enum Draw<P> {
    /// Served from the chunk: what was left after it, and the chunk's answer.
    Took {
        left: u64,
        tag: i64,
        base: i64,
        extra: P,
    },
    /// Ask the server as usual.
    Ask,
}

struct Entry<P> {
    chunk: Option<Chunk<P>>,
    /// The last request that found no chunk, and how many found none within a chunk's life
    /// of each other: the [`BUSY`]th starts taking chunks (a key seen once a minute, or a
    /// client that moves on to a new address every few requests, is never given one).
    missed: Instant,
    misses: u32,
    /// A chunk is being taken.
    taking: bool,
    /// A request was served from a chunk since one was last taken: the key is busy, and a
    /// chunk that ends is followed by the next one.
    drawn: u32,
    /// The server gave none (too near the limit): not asked again before this.
    refused_until: Option<Instant>,
    /// The task that takes this key's chunks one after another ([`Chunks::lead`]).
    leader: Option<u64>,
}

/// Requests of a key, each within a chunk's life of the last, that find no chunk before one
/// is taken.
pub const BUSY: u32 = 4;

/// The chunks of one limiter, by shared key.
pub struct Chunks<P> {
    map: Mutex<HashMap<String, Entry<P>>>,
    /// Keys followed at most (the address limiter sees one per client address).
    max_keys: usize,
    /// When the full map was last pruned: at most once a chunk's life, so that a flood of
    /// new addresses does not walk the whole map with every request.
    pruned: Mutex<Option<Instant>>,
}

impl<P> std::fmt::Debug for Chunks<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunks").finish_non_exhaustive()
    }
}

impl<P> Default for Chunks<P> {
    fn default() -> Self {
        Chunks {
            map: Mutex::new(HashMap::new()),
            max_keys: 4096,
            pruned: Mutex::new(None),
        }
    }
}

/// What [`Chunks::end`] found.
#[derive(Debug)]
pub enum Ending<P> {
    /// No chunk.
    Gone,
    /// The chunk serves until then.
    NotYet(Instant),
    /// Ended: what it had left, and whether to take the next one now.
    Ended(Vec<Chunk<P>>, bool),
}

/// What a call to [`Chunks::draw`] asks of the caller besides its answer.
#[derive(Debug, Default)]
pub struct Chores<P> {
    /// Take a chunk for this key now (beside the request).
    pub take: bool,
    /// Chunks that ended with something left: give it back.
    pub ended: Vec<Chunk<P>>,
}

impl<P: Clone> Chunks<P> {
    #[cfg(any(test, feature = "testing"))]
    pub fn with_max_keys(max_keys: usize) -> Self {
        Chunks {
            map: Mutex::new(HashMap::new()),
            max_keys,
            pruned: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<P>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `n` units from `key`'s chunk taken under `limits` (a fingerprint of the
    /// request's limits), or says to ask the server.
    pub fn draw(
        &self,
        key: &str,
        n: u64,
        limits: u64,
        spec: ChunkSpec,
        now: Instant,
    ) -> (Draw<P>, Chores<P>) {
        let mut chores = Chores {
            take: false,
            ended: Vec::new(),
        };
        let mut map = self.lock();
        let Some(e) = map.get_mut(key) else {
            if map.len() >= self.max_keys {
                let mut pruned = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
                if pruned.is_none_or(|t| now.saturating_duration_since(t) >= spec.life) {
                    *pruned = Some(now);
                    prune(&mut map, spec.life, now, &mut chores.ended);
                }
            }
            if map.len() < self.max_keys {
                map.insert(
                    key.to_string(),
                    Entry {
                        chunk: None,
                        missed: now,
                        misses: 1,
                        taking: false,
                        drawn: 0,
                        refused_until: None,
                        leader: None,
                    },
                );
            }
            return (Draw::Ask, chores);
        };
        // Ended by the taking's own timer as a rule; by a request only when that timer is
        // late (a busy thread), and then the request starts the next taking in its place.
        if e.chunk
            .as_ref()
            .is_some_and(|c| now >= c.until + spec.life / 8)
        {
            chores.ended.extend(e.chunk.take().filter(|c| c.left > 0));
            if e.drawn > 0 && !e.taking {
                e.taking = true;
                chores.take = true;
            }
            e.drawn = 0;
        }
        // Taken under other limits: it serves nothing more, and its leader stops (nothing
        // is drawn from it); the key asks, and takes under its new limits.
        if e.chunk.as_ref().is_some_and(|c| c.limits != limits) {
            chores.ended.extend(e.chunk.take().filter(|c| c.left > 0));
            e.drawn = 0;
            e.refused_until = None;
        }
        let may_take = !e.taking && e.refused_until.is_none_or(|t| now >= t);
        if let Some(c) = e.chunk.as_mut().filter(|c| c.left >= n) {
            c.left -= n;
            e.drawn = e.drawn.saturating_add(1);
            let draw = Draw::Took {
                left: c.left,
                tag: c.tag,
                base: c.base,
                extra: c.extra.clone(),
            };
            // Taken again at half, so the next one is there before this one runs out.
            if may_take && c.left < c.size / 2 {
                e.taking = true;
                chores.take = true;
            }
            return (draw, chores);
        }
        e.misses = if now.saturating_duration_since(e.missed) < spec.life {
            e.misses.saturating_add(1)
        } else {
            1
        };
        e.missed = now;
        if may_take && e.misses >= BUSY {
            e.taking = true;
            chores.take = true;
        }
        (Draw::Ask, chores)
    }

    /// Gives `n` units back to `key`'s chunk of `tag` (tokens a request reserved and did not
    /// use). False when that chunk is gone.
    pub fn put_back(&self, key: &str, tag: i64, n: u64) -> bool {
        let mut map = self.lock();
        match map.get_mut(key).and_then(|e| e.chunk.as_mut()) {
            Some(c) if c.tag == tag => {
                c.left += n;
                true
            }
            _ => false,
        }
    }

    /// Whether `key`'s chunk can serve `n` units under `limits` now (nothing changes). A
    /// request that needs several chunks (a rate and its tokens, a key's budget and the
    /// global one) draws from them only when all can serve it: a chunk is busy only with
    /// requests it serves, so one whose partner is too near its limit for a chunk stops
    /// being taken again.
    pub fn can_serve(&self, key: &str, n: u64, limits: u64, spec: ChunkSpec, now: Instant) -> bool {
        self.lock()
            .get(key)
            .and_then(|e| e.chunk.as_ref())
            .is_some_and(|c| c.limits == limits && c.left >= n && now < c.until + spec.life / 8)
    }

    /// Takes back a draw of `n` units from `key`'s chunk drawn with `tag`: the request was not
    /// served (another of its checks, or another of its budgets, asks the server). It does
    /// not count as a request served from the chunk (a key whose requests all ask is not
    /// busy for its chunk). False when that chunk is gone.
    pub fn undraw(&self, key: &str, tag: i64, n: u64) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(key) else {
            return false;
        };
        match e.chunk.as_mut() {
            Some(c) if c.tag == tag => {
                c.left += n;
                e.drawn = e.drawn.saturating_sub(1);
                true
            }
            _ => false,
        }
    }

    /// The answer of a taking: `Some` chunk, or `None` when the server gave none (or did not
    /// answer). `join` merges a new chunk into a live one of the same key, or answers it back
    /// when they cannot be joined (the new one then replaces the old one, which ends).
    /// Answers the chunks that ended with something left.
    pub fn taken(
        &self,
        key: &str,
        chunk: Option<Chunk<P>>,
        refused_for: Duration,
        now: Instant,
        join: impl FnOnce(&mut Chunk<P>, Chunk<P>) -> Option<Chunk<P>>,
    ) -> Vec<Chunk<P>> {
        let mut ended = Vec::new();
        let mut map = self.lock();
        let Some(e) = map.get_mut(key) else {
            // Pruned meanwhile: nothing serves from it.
            ended.extend(chunk.filter(|c| c.left > 0));
            return ended;
        };
        e.taking = false;
        let Some(new) = chunk else {
            e.refused_until = Some(now + refused_for);
            return ended;
        };
        e.refused_until = None;
        e.drawn = 0;
        match e.chunk.as_mut().filter(|c| now < c.until) {
            Some(old) => {
                if let Some(new) = join(old, new) {
                    let old = std::mem::replace(old, new);
                    ended.extend(Some(old).filter(|c| c.left > 0));
                }
            }
            None => {
                ended.extend(e.chunk.replace(new).filter(|c| c.left > 0));
            }
        }
        ended
    }

    /// Makes the task `id` the one that takes `key`'s chunks one after another, unless
    /// another is: a taking a request started while one is doing so is a single one, or the
    /// key would gather a task per taking. Answers whether `id` leads.
    pub fn lead(&self, key: &str, id: u64) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(key) else {
            return false;
        };
        match e.leader {
            Some(l) if l != id => false,
            _ => {
                e.leader = Some(id);
                true
            }
        }
    }

    /// Whether `key` is busy (requests were served from its chunk since it was taken, and no
    /// taking is on its way): its next chunk is then taken now, while this one still serves
    /// (marked as on its way).
    pub fn take_next(&self, key: &str) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(key) else {
            return false;
        };
        let next = e.drawn > 0
            && !e.taking
            && e.chunk.is_some()
            && e.refused_until.is_none_or(|t| Instant::now() >= t);
        e.taking |= next;
        next
    }

    /// The leading task `id` ends `key`'s chunk if its life is over: what it had left, to
    /// give back, and whether to take the next one now (`go_on` allows it; requests were
    /// served from it, and no taking is on its way: it is then marked as on its way). A
    /// chunk that still serves (one that replaced the chunk a timer was set for) says until
    /// when. Whenever the task is to stop (no chunk, or none to take), it stops leading in
    /// the same step, so a chunk a taking puts in place afterwards finds no leader and its
    /// own task leads ([`Chunks::lead`]): no chunk is left without a task to end it.
    pub fn end(&self, key: &str, now: Instant, id: u64, go_on: bool) -> Ending<P> {
        let mut map = self.lock();
        let Some(e) = map.get_mut(key) else {
            return Ending::Gone;
        };
        let ending = match e.chunk.as_ref() {
            None => Ending::Gone,
            Some(c) if now < c.until => return Ending::NotYet(c.until),
            Some(_) => {
                let ended = e.chunk.take().filter(|c| c.left > 0);
                let next = go_on && e.drawn > 0 && !e.taking;
                e.drawn = 0;
                e.taking |= next;
                Ending::Ended(ended.into_iter().collect(), next)
            }
        };
        if !matches!(ending, Ending::Ended(_, true)) && e.leader == Some(id) {
            e.leader = None;
        }
        ending
    }

    /// The server gave `key` no chunk (or could not be asked): not asked again for `for_`.
    pub fn refused(&self, key: &str, for_: Duration, now: Instant) {
        drop(self.taken(key, None, for_, now, |_, n| Some(n)));
    }

    /// Runs `task`, a key's takings, on the caller's runtime; without one (a plain thread)
    /// the taking is given up, so the key is not left with one marked as on its way.
    pub fn spawn_taking(
        &self,
        key: &str,
        spec: ChunkSpec,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(task)),
            Err(_) => self.refused(key, spec.life, Instant::now()),
        }
    }

    /// Ends every chunk (at exit): what they have left, to give back.
    pub fn end_all(&self) -> Vec<Chunk<P>> {
        self.lock()
            .values_mut()
            .filter_map(|e| e.chunk.take())
            .filter(|c| c.left > 0)
            .collect()
    }
}

/// Names the tasks that take chunks.
static TASKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Takes `key`'s chunks (`take` answers whether it took one) for as long as the key is busy:
/// the task a request started leads, unless another task does already (then it takes one).
pub async fn keep_taking<P: Clone, F: std::future::Future<Output = bool>>(
    chunks: &Chunks<P>,
    key: &str,
    spec: ChunkSpec,
    mut take: impl FnMut() -> F,
    mut give_back: impl FnMut(Chunk<P>),
) {
    let id = TASKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut led = false;
    while take().await {
        if !chunks.lead(key, id) {
            // The leading task ends what this one took (joined or in its place).
            return;
        }
        led = true;
        if !next_or_end(chunks, key, spec, id, &mut give_back).await {
            return;
        }
    }
    if led {
        // Its taking refused: what is still there (taken by a request's taking) ends too.
        end_when_over(chunks, key, id, false, &mut give_back).await;
    }
}

/// The leading task `id` ends `key`'s chunk when its life is over (waiting for a chunk that
/// replaced it, too): answers whether to take the next one now (never unless `go_on`).
async fn end_when_over<P: Clone>(
    chunks: &Chunks<P>,
    key: &str,
    id: u64,
    go_on: bool,
    mut give_back: impl FnMut(Chunk<P>),
) -> bool {
    loop {
        match chunks.end(key, Instant::now(), id, go_on) {
            Ending::Gone => return false,
            Ending::NotYet(until) => tokio::time::sleep_until(until.into()).await,
            Ending::Ended(ended, next) => {
                ended.into_iter().for_each(&mut give_back);
                return next;
            }
        }
    }
}

/// After a chunk of `key` was taken: at three quarters of its life, answers true when the
/// key is busy (its next chunk is taken then, while this one still serves); otherwise waits
/// out the life, ends the chunk (`give_back` what it had left) and answers whether a request
/// drew from it meanwhile (take the next one then).
async fn next_or_end<P: Clone>(
    chunks: &Chunks<P>,
    key: &str,
    spec: ChunkSpec,
    id: u64,
    give_back: impl FnMut(Chunk<P>),
) -> bool {
    tokio::time::sleep(spec.life * 3 / 4).await;
    if chunks.take_next(key) {
        return true;
    }
    end_when_over(chunks, key, id, true, give_back).await
}

/// Forgets keys with no live chunk, no taking on its way and no recent request.
fn prune<P>(
    map: &mut HashMap<String, Entry<P>>,
    life: Duration,
    now: Instant,
    ended: &mut Vec<Chunk<P>>,
) {
    map.retain(|_, e| {
        if e.chunk.as_ref().is_some_and(|c| now >= c.until) {
            ended.extend(e.chunk.take().filter(|c| c.left > 0));
        }
        e.chunk.is_some()
            || e.taking
            || e.leader.is_some()
            || now.saturating_duration_since(e.missed) < life
            || e.refused_until.is_some_and(|t| now < t)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: ChunkSpec = ChunkSpec {
        requests: 8,
        life: Duration::from_millis(50),
    };

    /// The limits the tests' chunks are taken under.
    const L: u64 = 7;

    /// Requests of `key` at `t` until the next one would start a taking.
    fn busy(c: &Chunks<()>, key: &str, spec: ChunkSpec, t: Instant) {
        for _ in 1..BUSY {
            assert!(!c.draw(key, 1, L, spec, t).1.take);
        }
    }

    fn chunk(left: u64, tag: i64, until: Instant) -> Chunk<()> {
        Chunk {
            left,
            size: left,
            limits: L,
            until,
            tag,
            base: 100,
            extra: (),
        }
    }

    fn join_same_tag(old: &mut Chunk<()>, new: Chunk<()>) -> Option<Chunk<()>> {
        if old.tag == new.tag {
            old.left += new.left;
            old.size = new.size;
            old.until = new.until;
            None
        } else {
            Some(new)
        }
    }

    #[test]
    fn a_busy_key_asks_for_a_chunk_then_draws_from_it() {
        let c = Chunks::<()>::default();
        let t0 = Instant::now();
        let (d, ch) = c.draw("k", 1, L, SPEC, t0);
        assert!(matches!(d, Draw::Ask) && !ch.take);
        // Requests spread wider than a life never start one.
        for i in 1..=BUSY {
            let t = t0 + SPEC.life * i;
            assert!(!c.draw("k", 1, L, SPEC, t).1.take);
        }
        let t0 = t0 + SPEC.life * (BUSY + 2);
        busy(&c, "k", SPEC, t0);
        let (d, ch) = c.draw("k", 1, L, SPEC, t0 + Duration::from_millis(10));
        assert!(matches!(d, Draw::Ask) && ch.take);
        // Only one taking at a time.
        let (_, ch) = c.draw("k", 1, L, SPEC, t0 + Duration::from_millis(11));
        assert!(!ch.take);
        let ended = c.taken(
            "k",
            Some(chunk(8, 1, t0 + Duration::from_millis(60))),
            SPEC.life,
            t0,
            join_same_tag,
        );
        assert!(ended.is_empty());
        for left in (0..8).rev() {
            let (d, ch) = c.draw("k", 1, L, SPEC, t0 + Duration::from_millis(20));
            assert!(matches!(d, Draw::Took { left: l, tag: 1, .. } if l == left));
            // A new chunk is asked for once half is used, once.
            assert_eq!(ch.take, left == 3, "left {left}");
        }
        let (d, _) = c.draw("k", 1, L, SPEC, t0 + Duration::from_millis(20));
        assert!(matches!(d, Draw::Ask));
    }

    #[test]
    fn a_chunk_ends_after_its_life_and_what_it_has_left_is_given_back() {
        let c = Chunks::<()>::default();
        let t0 = Instant::now();
        c.draw("k", 1, L, SPEC, t0);
        c.taken("k", Some(chunk(8, 1, t0)), SPEC.life, t0, join_same_tag);
        // Its taking's timer ends it; a request only when that timer is late.
        let (d, _) = c.draw("k", 1, L, SPEC, t0 + Duration::from_millis(1));
        assert!(matches!(d, Draw::Took { left: 7, .. }));
        let (d, ch) = c.draw("k", 3, L, SPEC, t0 + Duration::from_millis(10));
        assert!(matches!(d, Draw::Ask));
        assert_eq!(ch.ended.len(), 1);
        assert_eq!(ch.ended[0].left, 7);
        // The key was busy: the request starts the next taking.
        assert!(ch.take);
    }

    #[tokio::test]
    async fn a_chunk_a_requests_taking_put_in_place_is_ended_and_given_back() {
        // The leading task takes a chunk; a request's taking (half of it used) joins a
        // second one, which serves longer than the first's timer. Nobody draws afterwards:
        // what is left must still be given back once the joined chunk's life is over.
        let spec = ChunkSpec {
            requests: 8,
            life: Duration::from_millis(30),
        };
        let c = std::sync::Arc::new(Chunks::<()>::default());
        let given = std::sync::Arc::new(std::sync::Mutex::new(0u64));
        let t0 = Instant::now();
        busy(&c, "k", spec, t0);
        assert!(c.draw("k", 1, L, spec, t0).1.take);
        let spawn_taking = |first: bool| {
            let (c, given) = (c.clone(), given.clone());
            tokio::spawn(async move {
                let mut once = Some(());
                keep_taking(
                    &c,
                    "k",
                    spec,
                    || {
                        let took = once.take().is_some();
                        let c = c.clone();
                        async move {
                            let now = Instant::now();
                            let new = took.then(|| Chunk {
                                left: 8,
                                size: 8,
                                limits: L,
                                until: now + spec.life,
                                tag: 1,
                                base: 0,
                                extra: (),
                            });
                            let join = |old: &mut Chunk<()>, new: Chunk<()>| {
                                old.left += new.left;
                                old.until = new.until;
                                None
                            };
                            assert!(c.taken("k", new, spec.life, now, join).is_empty());
                            took
                        }
                    },
                    |ended| *given.lock().unwrap() += ended.left,
                )
                .await;
                first
            })
        };
        let leader = spawn_taking(true);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut drawn = 0;
        loop {
            let (d, chores) = c.draw("k", 1, L, spec, Instant::now());
            assert!(matches!(d, Draw::Took { .. }));
            drawn += 1;
            if chores.take {
                break;
            }
        }
        let one_off = spawn_taking(false);
        assert!(!one_off.await.unwrap() && leader.await.unwrap());
        assert_eq!(*given.lock().unwrap(), 16 - drawn, "given back");
        assert!(matches!(c.end("k", Instant::now(), 0, false), Ending::Gone));
    }

    #[test]
    fn a_request_under_other_limits_ends_the_chunk() {
        // A keys file reloaded with a lower limit: what was taken under the old one serves
        // nothing more and goes back.
        let c = Chunks::<()>::default();
        let t0 = Instant::now();
        c.draw("k", 1, L, SPEC, t0);
        c.taken(
            "k",
            Some(chunk(8, 1, t0 + SPEC.life)),
            SPEC.life,
            t0,
            join_same_tag,
        );
        assert!(matches!(
            c.draw("k", 1, L, SPEC, t0).0,
            Draw::Took { left: 7, .. }
        ));
        let (d, ch) = c.draw("k", 1, L + 1, SPEC, t0);
        assert!(matches!(d, Draw::Ask));
        assert_eq!(ch.ended.iter().map(|c| c.left).sum::<u64>(), 7);
        // Nothing drawn since: its leader stops at three quarters of the life.
        assert!(!c.take_next("k"));
    }

    #[test]
    fn a_draw_taken_back_does_not_make_the_key_busy() {
        // Attacker review: a key's budget chunk drawn and taken back with every request (its
        // global budget, too near its limit for a chunk, asked the server) kept taking new
        // chunks it never served from.
        let c = Chunks::<()>::default();
        let t0 = Instant::now();
        c.draw("k", 1, L, SPEC, t0);
        c.taken(
            "k",
            Some(chunk(8, 1, t0 + SPEC.life)),
            SPEC.life,
            t0,
            join_same_tag,
        );
        for _ in 0..5 {
            assert!(matches!(
                c.draw("k", 1, L, SPEC, t0).0,
                Draw::Took { left: 7, .. }
            ));
            assert!(c.undraw("k", 1, 1));
        }
        assert!(!c.take_next("k"));
        assert!(matches!(
            c.draw("k", 1, L, SPEC, t0).0,
            Draw::Took { left: 7, .. }
        ));
        assert!(c.take_next("k"));
    }

    #[test]
    fn one_task_leads_a_key() {
        let c = Chunks::<()>::default();
        c.draw("k", 1, L, SPEC, Instant::now());
        assert!(c.lead("k", 1));
        assert!(c.lead("k", 1));
        assert!(!c.lead("k", 2));
        assert!(!c.lead("unknown", 3));
        // The leader stops leading as it finds nothing to end: in the same step, so a chunk
        // put in place afterwards is led by the task that took it.
        assert!(matches!(c.end("k", Instant::now(), 2, true), Ending::Gone));
        assert!(!c.lead("k", 2));
        assert!(matches!(c.end("k", Instant::now(), 1, true), Ending::Gone));
        assert!(c.lead("k", 2));
    }

    #[test]
    fn a_busy_key_takes_its_next_chunk_as_the_last_one_ends() {
        let c = Chunks::<()>::default();
        let t0 = Instant::now();
        let until = t0 + Duration::from_millis(50);
        c.draw("k", 1, L, SPEC, t0);
        c.taken("k", Some(chunk(8, 1, until)), SPEC.life, t0, join_same_tag);
        // Not over yet: nothing ends.
        assert!(matches!(c.end("k", t0, 0, true), Ending::NotYet(u) if u == until));
        assert!(matches!(
            c.draw("k", 1, L, SPEC, t0).0,
            Draw::Took { left: 7, .. }
        ));
        let Ending::Ended(ended, next) = c.end("k", until, 0, true) else {
            panic!("not ended")
        };
        assert_eq!((ended.len(), ended[0].left, next), (1, 7, true));
        // That taking is on its way: no request starts another.
        assert!(!c.draw("k", 1, L, SPEC, until).1.take);
        // A chunk nobody drew from ends without a next one.
        c.taken("k", Some(chunk(8, 2, until)), SPEC.life, t0, join_same_tag);
        assert!(matches!(c.end("k", until, 0, true), Ending::Ended(v, false) if v.len() == 1));
        assert!(matches!(c.end("k", until, 0, true), Ending::Gone));
        // A leader whose taking was refused ends what is there without asking for more.
        c.draw("k", 1, L, SPEC, t0);
        c.taken("k", Some(chunk(8, 3, until)), SPEC.life, t0, join_same_tag);
        c.draw("k", 1, L, SPEC, t0);
        assert!(matches!(c.end("k", until, 0, false), Ending::Ended(v, false) if v.len() == 1));
        // ...and leaves no taking marked as on its way: the next requests start one.
        busy(&c, "k", SPEC, until);
        assert!(c.draw("k", 1, L, SPEC, until).1.take);
    }

    #[test]
    fn a_refused_taking_is_not_asked_again_within_a_life() {
        let c = Chunks::<()>::default();
        let t0 = Instant::now();
        busy(&c, "k", SPEC, t0);
        assert!(c.draw("k", 1, L, SPEC, t0).1.take);
        c.taken("k", None, SPEC.life, t0, join_same_tag);
        assert!(
            !c.draw("k", 1, L, SPEC, t0 + Duration::from_millis(49))
                .1
                .take
        );
        assert!(
            c.draw("k", 1, L, SPEC, t0 + Duration::from_millis(51))
                .1
                .take
        );
    }

    #[test]
    fn a_chunk_that_cannot_be_joined_replaces_the_old_one() {
        let c = Chunks::<()>::default();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        c.draw("k", 1, L, SPEC, t0);
        c.taken("k", Some(chunk(8, 1, later)), SPEC.life, t0, join_same_tag);
        let ended = c.taken("k", Some(chunk(8, 1, later)), SPEC.life, t0, join_same_tag);
        assert!(ended.is_empty());
        assert!(matches!(
            c.draw("k", 16, L, SPEC, t0).0,
            Draw::Took { left: 0, .. }
        ));
        c.taken("k", Some(chunk(8, 1, later)), SPEC.life, t0, join_same_tag);
        let ended = c.taken("k", Some(chunk(8, 2, later)), SPEC.life, t0, join_same_tag);
        assert_eq!(ended.len(), 1);
        assert!(matches!(
            c.draw("k", 1, L, SPEC, t0).0,
            Draw::Took { tag: 2, .. }
        ));
        // Given back to the chunk it was drawn from only.
        assert!(!c.put_back("k", 1, 1));
        assert!(c.put_back("k", 2, 1));
        assert!(matches!(
            c.draw("k", 8, L, SPEC, t0).0,
            Draw::Took { left: 0, .. }
        ));
    }

    #[test]
    fn keys_beyond_the_bound_are_not_followed_and_stale_ones_are_pruned() {
        let c = Chunks::<()>::with_max_keys(2);
        let t0 = Instant::now();
        c.draw("a", 1, L, SPEC, t0);
        c.draw("b", 1, L, SPEC, t0);
        c.draw("c", 1, L, SPEC, t0);
        // `c` was not followed: a second request does not start a chunk.
        assert!(!c.draw("c", 1, L, SPEC, t0).1.take);
        // Pruned at most once a life: `a` and `b` were still fresh at the first try.
        // Once they are stale, `c` takes their place.
        let later = t0 + Duration::from_millis(100);
        busy(&c, "c", SPEC, later);
        assert!(c.draw("c", 1, L, SPEC, later).1.take);
        assert_eq!(c.lock().len(), 1);
    }
}
