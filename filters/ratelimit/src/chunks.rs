//! A key's rate and tokens served from chunks taken ahead on shared state, far from the
//! key's limit (see `gateway_filter::chunk`): the answers are the ones the server's scripts
//! give, so the rest of the limiter treats them alike (a request given back, a token
//! reservation settled with its usage).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_filter::chunk::{keep_taking, Chores, Chunk, ChunkSpec, Chunks, Draw};
use gateway_filter::state::{at, int, Arg};
use gateway_filter::SharedState;

use crate::shared;

/// The token window in ms.
const WINDOW_MS: i64 = (crate::MINUTE_NS / 1_000_000) as i64;

/// A request's rate in shared state: its key, interval µs and burst.
pub struct RateKey<'a> {
    pub key: &'a str,
    pub interval_us: u64,
    pub burst: u64,
}

/// A request's tokens in shared state: its key, the limit and its reservation.
pub struct TokensKey<'a> {
    pub key: &'a str,
    pub limit: u64,
    pub n: u64,
}

/// Tokens taken ahead, by key.
pub type TokenChunks = Arc<Chunks<Instant>>;

/// The answers of [`shared::GCRA`] and [`shared::TOKENS_RESERVE`], for those served.
pub type Served = (Option<Vec<i64>>, Option<Vec<i64>>);

#[derive(Default)]
pub struct LimiterChunks {
    /// Requests of a rate; `tag` the TAT µs after the taking, `base` the requests it left
    /// free, `extra` its reset µs.
    rate: Arc<Chunks<i64>>,
    /// Tokens of a window; `tag` the window's start ms, `base` the tokens used with the
    /// chunk, `extra` the window's end.
    tokens: TokenChunks,
}

impl LimiterChunks {
    pub fn tokens(&self) -> TokenChunks {
        self.tokens.clone()
    }

    /// Serves the request's rate and tokens from chunks, both or neither; `None`: ask the
    /// server. Starts the takings and gives back the ends the draws call for.
    pub fn serve(
        &self,
        st: &Arc<dyn SharedState>,
        rate: Option<RateKey<'_>>,
        tokens: Option<TokensKey<'_>>,
    ) -> Option<Served> {
        let spec = st.chunk()?;
        // Degraded: the fallback decides, as for a request asking.
        if st.degraded() || (rate.is_none() && tokens.is_none()) {
            return None;
        }
        let now = Instant::now();
        // Both or neither. A part that cannot serve sees the request as one that found no
        // chunk (to take one once the key is busy); a part that could is left alone.
        let rate_ok = rate
            .as_ref()
            .is_none_or(|r| self.rate.can_serve(r.key, 1, rate_limits(r), spec, now));
        let tokens_ok = tokens
            .as_ref()
            .is_none_or(|k| self.tokens.can_serve(k.key, k.n, k.limit, spec, now));
        if !(rate_ok && tokens_ok) {
            // A part filled meanwhile served nothing for this request: taken back.
            if let (false, Some(r)) = (rate_ok, &rate) {
                if let Draw::Took { tag, .. } = self.draw_rate(st, r, spec, now) {
                    self.undraw_rate(st, r, tag);
                }
            }
            if let (false, Some(k)) = (tokens_ok, &tokens) {
                if let Draw::Took { tag, .. } = self.draw_tokens(st, k, spec, now) {
                    if !self.tokens.undraw(k.key, tag, k.n) {
                        give_back_tokens(st.as_ref(), k.key, k.n, tag);
                    }
                }
            }
            return None;
        }
        let mut out: Served = (None, None);
        if let Some(r) = &rate {
            match self.draw_rate(st, r, spec, now) {
                Draw::Took {
                    left,
                    tag,
                    base,
                    extra,
                } => {
                    let remaining = (base.max(0) as u64).saturating_add(left).min(r.burst);
                    out.0 = Some(vec![1, 0, i(remaining), extra, tag]);
                }
                Draw::Ask => return None,
            }
        }
        if let Some(k) = &tokens {
            match self.draw_tokens(st, k, spec, now) {
                Draw::Took {
                    left,
                    tag,
                    base,
                    extra,
                } => {
                    let used = (base.max(0) as u64).saturating_sub(left);
                    let left_ms = extra.saturating_duration_since(now).as_millis() as i64;
                    out.1 = Some(vec![1, i(used), tag, left_ms]);
                }
                Draw::Ask => {
                    // Both or neither: the request asks the server for its rate too.
                    if let (Some(r), Some(a)) = (&rate, &out.0) {
                        self.undraw_rate(st, r, at(a, 4));
                    }
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Draws a request from its rate's chunk, and does what the draw calls for.
    fn draw_rate(
        &self,
        st: &Arc<dyn SharedState>,
        r: &RateKey<'_>,
        spec: ChunkSpec,
        now: Instant,
    ) -> Draw<i64> {
        let (draw, chores) = self.rate.draw(r.key, 1, rate_limits(r), spec, now);
        self.rate_chores(st, r, spec, chores);
        draw
    }

    /// Takes back a request drawn from the chunk of `tag` (given back to the server when
    /// that chunk has ended meanwhile).
    fn undraw_rate(&self, st: &Arc<dyn SharedState>, r: &RateKey<'_>, tag: i64) {
        if !self.rate.undraw(r.key, tag, 1) {
            give_back_rate(st, r.key, r.interval_us, 1, tag);
        }
    }

    /// Draws a request's tokens from their chunk, and does what the draw calls for.
    fn draw_tokens(
        &self,
        st: &Arc<dyn SharedState>,
        k: &TokensKey<'_>,
        spec: ChunkSpec,
        now: Instant,
    ) -> Draw<Instant> {
        let (draw, chores) = self.tokens.draw(k.key, k.n, k.limit, spec, now);
        self.token_chores(st, k, spec, chores);
        draw
    }

    fn rate_chores(
        &self,
        st: &Arc<dyn SharedState>,
        r: &RateKey<'_>,
        spec: ChunkSpec,
        chores: Chores<i64>,
    ) {
        for c in chores.ended {
            give_back_rate(st, r.key, r.interval_us, c.left, c.tag);
        }
        if !chores.take {
            return;
        }
        let (st, chunks) = (st.clone(), self.rate.clone());
        let (key, interval_us, burst) = (r.key.to_string(), r.interval_us, r.burst);
        self.rate.spawn_taking(r.key, spec, async move {
            keep_taking(
                &chunks,
                &key,
                spec,
                || take_rate(&st, &chunks, &key, interval_us, burst, spec),
                |c| give_back_rate(&st, &key, interval_us, c.left, c.tag),
            )
            .await;
        });
    }

    fn token_chores(
        &self,
        st: &Arc<dyn SharedState>,
        k: &TokensKey<'_>,
        spec: ChunkSpec,
        chores: Chores<Instant>,
    ) {
        for c in chores.ended {
            give_back_tokens(st.as_ref(), k.key, c.left, c.tag);
        }
        if !chores.take {
            return;
        }
        let want = spec.requests.saturating_mul(k.n);
        let spare = want.saturating_mul(ChunkSpec::SPARE);
        let Some(limit) = k.limit.checked_sub(spare).filter(|l| *l >= want) else {
            // Too near (or too small) a limit for a chunk: asked again after a life.
            self.tokens.refused(k.key, spec.life, Instant::now());
            return;
        };
        let (st, chunks, key, key_limit) =
            (st.clone(), self.tokens.clone(), k.key.to_string(), k.limit);
        self.tokens.spawn_taking(k.key, spec, async move {
            keep_taking(
                &chunks,
                &key,
                spec,
                || take_tokens(&st, &chunks, &key, (want, limit, key_limit), spec),
                |c| give_back_tokens(st.as_ref(), &key, c.left, c.tag),
            )
            .await;
        });
    }
}

/// Takes a chunk of `key`'s rate; answers whether one was taken.
async fn take_rate(
    st: &Arc<dyn SharedState>,
    chunks: &Chunks<i64>,
    key: &str,
    interval_us: u64,
    burst: u64,
    spec: ChunkSpec,
) -> bool {
    let n = spec.requests;
    let answer = st
        .run(
            &shared::GCRA_TAKE,
            &[key],
            &[
                int(interval_us),
                int(burst),
                int(n),
                int(ChunkSpec::SPARE),
                // A rate's chunk may be smaller than asked (a burst of 1,000 gives 62), but
                // not so small that taking it costs about what asking per request does.
                int(n.min(16)),
            ],
        )
        .await;
    let now = Instant::now();
    let chunk = match answer {
        Ok(a) if at(&a, 0) > 0 => Some(Chunk {
            left: at(&a, 0) as u64,
            size: at(&a, 0) as u64,
            limits: rate_limits(&RateKey {
                key,
                interval_us,
                burst,
            }),
            until: now + spec.life,
            tag: at(&a, 3),
            base: at(&a, 1),
            extra: at(&a, 2),
        }),
        // A call that may have run and gave no answer took nothing that would not pass by
        // itself: the rate refills with time.
        _ => None,
    };
    let took = chunk.is_some();
    let join = |old: &mut Chunk<i64>, new: Chunk<i64>| {
        // Joined when the old one is nearly used (requests of one rate are alike: the new
        // one's TAT is the later); a slow key's next chunk replaces its last.
        if old.left > new.size / 2 {
            return Some(new);
        }
        old.left += new.left;
        old.size = new.size;
        old.until = new.until;
        old.tag = new.tag;
        old.base = new.base;
        old.extra = new.extra;
        None
    };
    for c in chunks.taken(key, chunk, spec.life, now, join) {
        give_back_rate(st, key, interval_us, c.left, c.tag);
    }
    took
}

/// Takes a chunk of `want` of `key`'s tokens, only under `limit` (`key_limit`, the key's,
/// less what must stay free for the others); answers whether one was taken.
async fn take_tokens(
    st: &Arc<dyn SharedState>,
    chunks: &Chunks<Instant>,
    key: &str,
    (want, limit, key_limit): (u64, u64, u64),
    spec: ChunkSpec,
) -> bool {
    let answer = st
        .run(
            &shared::TOKENS_RESERVE,
            &[key],
            &[Arg::Int(WINDOW_MS), int(want), int(limit)],
        )
        .await;
    let now = Instant::now();
    let chunk = match &answer {
        Ok(a) if at(a, 0) == 1 => {
            let window_end = now + Duration::from_millis(at(a, 3).max(0) as u64);
            Some(Chunk {
                left: want,
                size: want,
                limits: key_limit,
                until: (now + spec.life).min(window_end),
                tag: at(a, 2),
                base: at(a, 1),
                extra: window_end,
            })
        }
        // No answer: had it run, its tokens stay counted until their window ends (the window
        // it took them in is not known), which errs on the safe side.
        _ => None,
    };
    let took = chunk.is_some();
    let join = |old: &mut Chunk<Instant>, new: Chunk<Instant>| {
        if old.tag != new.tag || old.left > new.size / 2 {
            return Some(new);
        }
        old.left += new.left;
        old.size = new.size;
        old.until = new.until;
        old.base = new.base;
        None
    };
    for c in chunks.taken(key, chunk, spec.life, now, join) {
        give_back_tokens(st.as_ref(), key, c.left, c.tag);
    }
    took
}

/// Gives back `n` requests of a rate taken ahead and not used (once the chunk's TAT has
/// passed they weigh on nothing any more: the script then leaves the bucket alone).
fn give_back_rate(st: &Arc<dyn SharedState>, key: &str, interval_us: u64, n: u64, tat: i64) {
    if n == 0 {
        return;
    }
    st.run_detached(
        &shared::GCRA_UNDO,
        vec![key.to_string()],
        vec![interval_us.saturating_mul(n).to_string(), tat.to_string()],
    );
}

/// Gives back `n` tokens taken ahead in the window that started at `start_ms`.
fn give_back_tokens(st: &dyn SharedState, key: &str, n: u64, start_ms: i64) {
    if n == 0 {
        return;
    }
    st.run_batched(
        &shared::TOKENS_SETTLE,
        vec![key.to_string()],
        vec![
            WINDOW_MS.to_string(),
            start_ms.to_string(),
            n.to_string(),
            "0".into(),
        ],
    );
}

/// What a rate's chunk is taken under: a request under another rate or burst (a reloaded
/// keys file) does not draw from it.
fn rate_limits(r: &RateKey<'_>) -> u64 {
    r.interval_us.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ r.burst
}

fn i(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
