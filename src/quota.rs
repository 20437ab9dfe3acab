//! Counters of the rate and budget limits declared on permits
//! ([`crate::bundle::limits`]): an otherwise ALLOW whose determining permits
//! carry limits is counted against them, and becomes a DENY with
//! `rate_limited` or `budget_exceeded` and a retry-after once one is spent.
//!
//! Each counter is a GCRA cell (a token bucket kept as one instant, the
//! "theoretical arrival time"): a call of cost `c` against `N` per window
//! `W` moves it `W·c/N` later, and is admitted while the cell stays within
//! one window of now. So exactly `N` calls fit in a burst, the next waits
//! `W/N`, and a cell idle for a window is as good as new. The instant is
//! kept in nanoseconds times `N`, so `W·c/N` never rounds: `7/minute`
//! admits 7, not 6. One instant per key keeps memory small; a cell at or
//! before now holds nothing and is dropped when its shard needs room, so
//! idle keys expire.
//!
//! Admission is exact under concurrency: the cells one decision touches are
//! checked and moved under their shards' locks (taken in order), all or
//! none. Counters live outside the bundle snapshot, keyed by the limit's
//! identity (permit id and limit as written), so a reload that leaves a
//! limit unchanged keeps its counts, and a changed one starts afresh.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use cedar_policy::EntityUid;

use crate::bundle::limits::{ten_thousandths, COST_SCALE, SESSION_ATTR};
use crate::bundle::{Limit, LimitKey, Measure, Snapshot};
use crate::engine::{AuthzRequest, ContextInput, Decision, Limited};

const SHARDS: usize = 16;

/// Default most keys held (all limits together): 48 bytes a key plus the
/// tables' slack, about 25 MiB when all are live.
pub const DEFAULT_MAX_LIMIT_KEYS: usize = 262_144;

/// What one counter counts: a limit, and whose allowances (the agent, and
/// the user or session where the limit is kept per agent and user or
/// session; the user alone where it is kept per user).
#[derive(Debug, Clone, Copy, Hash)]
struct Key<'a> {
    limit: &'a str,
    whose: &'a EntityUid,
    with: With<'a>,
}

/// Who else a key counts for, beside the agent.
#[derive(Debug, Clone, Copy, Hash)]
enum With<'a> {
    Nobody,
    User(&'a EntityUid),
    Session(&'a str),
}

/// A [`Key`] as the counters hold it: 128 bits of two independently, randomly
/// keyed SipHashes. Keeping uids (240 bytes a key) would cost six times the
/// memory; two keys share a digest with odds near 2^-92 at the default
/// capacity, and then only count together (stricter, never looser), which
/// no caller can arrange without the per-process keys.
type Digest = u128;

/// The counters of one sidecar.
#[derive(Debug)]
pub struct Quota {
    shards: Box<[Mutex<HashMap<Digest, Cell>>]>,
    hashers: [std::collections::hash_map::RandomState; 2],
    per_shard: usize,
}

impl Default for Quota {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LIMIT_KEYS)
    }
}

/// One counter's state.
#[derive(Debug, Clone, Copy)]
struct Cell {
    /// The theoretical arrival time: nanoseconds since the Unix epoch,
    /// times `n`.
    tat: u128,
    /// The limit's N, which scales `tat`.
    n: u64,
}

impl Cell {
    /// Holds nothing at `now`: as good as no cell.
    fn idle(&self, now: u128) -> bool {
        self.tat <= now.saturating_mul(u128::from(self.n))
    }
}

/// One limit to charge for one decision.
struct Charge {
    limit: Arc<Limit>,
    key: Digest,
    /// 1 for a call; ten-thousandths for a budget's cost.
    cost: u128,
}

/// Why a decision was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The limit is spent; `retry_after` is `None` when this call's cost is
    /// more than the whole budget and will never fit.
    Exceeded {
        limit: Arc<Limit>,
        retry_after: Option<Duration>,
    },
    /// Every counter slot holds a live key: fail closed.
    Full,
}

impl Quota {
    /// Counters for at most `max_keys` live keys.
    pub fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hashers: [
                std::collections::hash_map::RandomState::new(),
                std::collections::hash_map::RandomState::new(),
            ],
            per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// Live keys now held, for metrics and tests.
    pub fn keys(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn digest(&self, key: &Key<'_>) -> Digest {
        let [a, b] = &self.hashers;
        (u128::from(a.hash_one(key)) << 64) | u128::from(b.hash_one(key))
    }

    fn shard_of(key: Digest) -> usize {
        // The remainder is below SHARDS, so it fits.
        usize::try_from(key % SHARDS as u128).unwrap_or(0)
    }

    /// Admits `charges` at `now` (nanoseconds since the Unix epoch), all or
    /// none.
    fn admit(&self, now: u64, charges: &[Charge]) -> Result<(), Refusal> {
        let mut shard_ids: Vec<usize> = charges.iter().map(|c| Self::shard_of(c.key)).collect();
        let order = {
            let mut o = shard_ids.clone();
            o.sort_unstable();
            o.dedup();
            o
        };
        // In shard order, so two decisions never wait on each other.
        let mut guards: Vec<(usize, MutexGuard<'_, HashMap<Digest, Cell>>)> = order
            .iter()
            .filter_map(|&i| self.shards.get(i).map(|s| (i, lock(s))))
            .collect();
        let now = u128::from(now);
        let mut moved = Vec::with_capacity(charges.len());
        // Every charge is looked at, so the answer's wait is the longest
        // (or none, if one can never fit): a retry after it finds every
        // limit with room, not the next one spent.
        let mut exceeded: Option<Refusal> = None;
        for (charge, shard) in charges.iter().zip(shard_ids.iter_mut()) {
            let Some((_, map)) = guards.iter_mut().find(|(i, _)| i == shard) else {
                return Err(Refusal::Full);
            };
            // Everything in nanoseconds times N: a call moves the cell by
            // W·c exactly, and the cell may reach (now + W)·N. N is at most
            // 10^15 and the clock below 2^64, so nothing here overflows
            // u128; saturating keeps that true for any input anyway.
            let n = u128::from(charge.limit.amount.max(1));
            let window = u128::from(nanos(charge.limit.window));
            let now_n = now.saturating_mul(n);
            let step = window.saturating_mul(charge.cost);
            let tat = map.get(&charge.key).map_or(0, |c| c.tat).max(now_n);
            let next = tat.saturating_add(step);
            let limit = now.saturating_add(window).saturating_mul(n);
            if next > limit {
                let retry_after = (step <= window.saturating_mul(n)).then(|| {
                    let wait = (next - limit).div_ceil(n);
                    Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX))
                });
                let worse = match &exceeded {
                    None => true,
                    Some(Refusal::Exceeded {
                        retry_after: Some(before),
                        ..
                    }) => retry_after.is_none_or(|after| after > *before),
                    Some(_) => false,
                };
                if worse {
                    exceeded = Some(Refusal::Exceeded {
                        limit: charge.limit.clone(),
                        retry_after,
                    });
                }
                continue;
            }
            if exceeded.is_some() {
                continue;
            }
            if !map.contains_key(&charge.key) && map.len() >= self.per_shard {
                // Cells at or before now hold nothing: make room with them.
                map.retain(|_, cell| !cell.idle(now));
                if map.len() >= self.per_shard {
                    return Err(Refusal::Full);
                }
            }
            moved.push((
                *shard,
                Cell {
                    tat: next,
                    n: charge.limit.amount.max(1),
                },
            ));
        }
        if let Some(refusal) = exceeded {
            return Err(refusal);
        }
        for (charge, (shard, cell)) in charges.iter().zip(moved) {
            if let Some((_, map)) = guards.iter_mut().find(|(i, _)| *i == shard) {
                map.insert(charge.key, cell);
            }
        }
        Ok(())
    }
}

/// A wait in whole milliseconds, rounded up: a client that waits exactly
/// this long is not refused again for a fraction of a millisecond. The
/// answer, the audit record and the span all say this number.
pub fn retry_after_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under this lock cannot leave a cell half-written (one insert),
    // so the counts stay valid.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Counts an allowed `decision` against the limits of its determining
/// permits, and turns it into a DENY saying which limit and when to retry
/// when one is spent. Denials are not counted.
pub fn apply(
    snapshot: &Snapshot,
    quota: &Quota,
    request: &AuthzRequest,
    decision: &mut Decision,
    now: SystemTime,
) {
    if !decision.allowed || snapshot.limits.is_empty() {
        return;
    }
    let mut charges = Vec::new();
    // Read only when a limit is kept per session.
    let session = std::cell::OnceCell::new();
    for id in &decision.determining {
        for limit in snapshot.limits.of(id) {
            let cost = match &limit.measure {
                Measure::Calls => 1,
                Measure::Cost(attr) => match cost_of(&request.context, attr) {
                    Some(cost) => cost,
                    None => {
                        let detail = format!(
                            "`@cost(\"{attr}\")`: the request's context has no non-negative \
                             `{attr}` (a Long, or a decimal as `\"12.50\"` or \
                             `{{\"__extn\": {{\"fn\": \"decimal\", \"arg\": \"12.50\"}}}}`)"
                        );
                        deny(decision, refused("budget_cost_missing", limit, detail));
                        return;
                    }
                },
            };
            // Whose allowance: the agent, or for a per-user limit the user
            // (an autonomous agent's own calls count as its own).
            let whose = match (limit.key, &request.on_behalf_of) {
                (LimitKey::User, Some(user)) => user,
                _ => &request.agent,
            };
            let with = match limit.key {
                LimitKey::Agent | LimitKey::User => With::Nobody,
                LimitKey::AgentAndUser => request
                    .on_behalf_of
                    .as_ref()
                    .map_or(With::Nobody, With::User),
                LimitKey::AgentAndSession => {
                    match session.get_or_init(|| session_of(&request.context)) {
                        Some(session) => With::Session(session),
                        None => {
                            let detail = format!(
                                "`@limit_key(\"agent+session\")`: the request's context has no \
                             String `{SESSION_ATTR}`"
                            );
                            deny(decision, refused("limit_session_missing", limit, detail));
                            return;
                        }
                    }
                }
            };
            charges.push(Charge {
                limit: limit.clone(),
                key: quota.digest(&Key {
                    limit: limit.identity(),
                    whose,
                    with,
                }),
                cost,
            });
        }
    }
    if charges.is_empty() {
        return;
    }
    let now = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, nanos);
    match quota.admit(now, &charges) {
        Ok(()) => {}
        Err(Refusal::Exceeded { limit, retry_after }) => {
            let detail = match retry_after {
                Some(after) => format!(
                    "{} by {} ({}); retry after {} ms",
                    limit.reason(),
                    limit.policy_id,
                    limit.text,
                    retry_after_ms(after)
                ),
                None => format!(
                    "{} by {} ({}): this call's cost is more than the whole budget",
                    limit.reason(),
                    limit.policy_id,
                    limit.text
                ),
            };
            deny(
                decision,
                Limited {
                    reason: limit.reason(),
                    policy_id: limit.policy_id.clone(),
                    limit: limit.text.clone(),
                    retry_after,
                    detail,
                },
            );
        }
        Err(Refusal::Full) => deny(
            decision,
            Limited {
                reason: "limit_capacity",
                policy_id: String::new(),
                limit: String::new(),
                retry_after: None,
                detail: "every limit counter holds a live key; denied rather than uncounted"
                    .to_owned(),
            },
        ),
    }
}

fn deny(decision: &mut Decision, limited: Limited) {
    decision.allowed = false;
    decision.determining.clear();
    decision.limited = Some(limited);
}

/// A `Limited` for a call that could not be counted against `limit`.
fn refused(reason: &'static str, limit: &Limit, detail: String) -> Limited {
    Limited {
        reason,
        policy_id: limit.policy_id.clone(),
        limit: limit.text.clone(),
        retry_after: None,
        detail,
    }
}

/// The cost a request declares in its context, in ten-thousandths: a
/// top-level non-negative Long or decimal.
fn cost_of(context: &ContextInput, attr: &str) -> Option<u128> {
    let scaled = |whole: u64| u128::from(whole) * u128::from(COST_SCALE);
    match context {
        ContextInput::Json(map) => match map.get(attr)? {
            serde_json::Value::Number(n) => n.as_u64().map(scaled),
            // A decimal, in either of Cedar's JSON forms: the bare string
            // (typed by the schema) or the `__extn` escape.
            serde_json::Value::String(text) => ten_thousandths(text).map(u128::from),
            serde_json::Value::Object(escape) => {
                let extn = escape.get("__extn")?;
                (extn.get("fn")?.as_str()? == "decimal")
                    .then(|| extn.get("arg")?.as_str().and_then(ten_thousandths))?
                    .map(u128::from)
            }
            _ => None,
        },
        ContextInput::Typed(..) => match typed(context, attr)? {
            cedar_policy::EvalResult::Long(n) => u64::try_from(n).ok().map(scaled),
            cedar_policy::EvalResult::ExtensionValue(text) => text
                .strip_prefix("decimal(\"")
                .and_then(|t| t.strip_suffix("\")"))
                .and_then(ten_thousandths)
                .map(u128::from),
            _ => None,
        },
        ContextInput::Empty => None,
    }
}

/// The request's `context.session_id`.
fn session_of(context: &ContextInput) -> Option<String> {
    match context {
        ContextInput::Json(map) => map.get(SESSION_ATTR)?.as_str().map(str::to_owned),
        ContextInput::Typed(..) => match typed(context, SESSION_ATTR)? {
            cedar_policy::EvalResult::String(s) => Some(s),
            _ => None,
        },
        ContextInput::Empty => None,
    }
}

/// A typed context attribute's value, read back through a one-attribute
/// context: the public way to evaluate a restricted expression.
fn typed(context: &ContextInput, attr: &str) -> Option<cedar_policy::EvalResult> {
    let ContextInput::Typed(pairs, _) = context else {
        return None;
    };
    let (_, value) = pairs.iter().find(|(k, _)| k == attr)?;
    let one = cedar_policy::Context::from_pairs([(attr.to_owned(), value.clone())]).ok()?;
    one.get(attr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn limit(amount: u64, window: Duration, measure: Measure) -> Arc<Limit> {
        Arc::new(Limit::for_test(amount, window, measure))
    }

    fn charge(q: &Quota, limit: &Arc<Limit>, who: &str, cost: u128) -> Charge {
        let agent = EntityUid::from_str(&format!("Agent::\"{who}\"")).expect("uid");
        Charge {
            limit: limit.clone(),
            key: q.digest(&Key {
                limit: limit.identity(),
                whose: &agent,
                with: With::Nobody,
            }),
            cost,
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn n_calls_fit_in_a_window_then_one_per_window_over_n() {
        let q = Quota::default();
        let l = limit(3, Duration::from_secs(60), Measure::Calls);
        let t0 = 1_000 * SEC;
        for _ in 0..3 {
            assert_eq!(q.admit(t0, &[charge(&q, &l, "a", 1)]), Ok(()));
        }
        match q.admit(t0, &[charge(&q, &l, "a", 1)]) {
            Err(Refusal::Exceeded { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(20)));
            }
            other => panic!("{other:?}"),
        }
        // Another key is counted apart.
        assert_eq!(q.admit(t0, &[charge(&q, &l, "b", 1)]), Ok(()));
        // One slot back after W/N, a full burst after W.
        assert!(q
            .admit(t0 + 20 * SEC - 1, &[charge(&q, &l, "a", 1)])
            .is_err());
        assert_eq!(q.admit(t0 + 20 * SEC, &[charge(&q, &l, "a", 1)]), Ok(()));
        let later = t0 + 200 * SEC;
        for _ in 0..3 {
            assert_eq!(q.admit(later, &[charge(&q, &l, "a", 1)]), Ok(()));
        }
        assert!(q.admit(later, &[charge(&q, &l, "a", 1)]).is_err());
    }

    #[test]
    fn a_window_that_n_does_not_divide_still_admits_exactly_n() {
        let q = Quota::default();
        // 60 s / 7 is not a whole number of nanoseconds.
        let l = limit(7, Duration::from_secs(60), Measure::Calls);
        let t0 = 1_000 * SEC;
        for i in 0..7 {
            assert_eq!(q.admit(t0, &[charge(&q, &l, "a", 1)]), Ok(()), "call {i}");
        }
        let Err(Refusal::Exceeded {
            retry_after: Some(wait),
            ..
        }) = q.admit(t0, &[charge(&q, &l, "a", 1)])
        else {
            panic!("the 8th call is refused with a wait");
        };
        // W/N rounded up to the nanosecond: waiting that long is enough,
        // one nanosecond less is not.
        assert_eq!(wait, Duration::from_nanos(8_571_428_572));
        let wait = u64::try_from(wait.as_nanos()).expect("fits");
        assert!(q.admit(t0 + wait - 1, &[charge(&q, &l, "a", 1)]).is_err());
        assert_eq!(q.admit(t0 + wait, &[charge(&q, &l, "a", 1)]), Ok(()));
        // Over many windows the rate stays N per window exactly: a week of
        // calls one nanosecond apart admits 7 × (windows + 1).
        let q = Quota::default();
        let (mut t, end, mut admitted) = (t0, t0 + 7 * 86_400 * SEC, 0u64);
        while t <= end {
            match q.admit(t, &[charge(&q, &l, "a", 1)]) {
                Ok(()) => admitted += 1,
                Err(Refusal::Exceeded {
                    retry_after: Some(w),
                    ..
                }) => t += u64::try_from(w.as_nanos()).expect("fits"),
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(admitted, 7 * (7 * 24 * 60 + 1));
    }

    #[test]
    fn budgets_accumulate_cost_and_a_refusal_charges_nothing() {
        let q = Quota::default();
        let budget = limit(100, Duration::from_secs(100), Measure::Cost("c".into()));
        let rate = limit(10, Duration::from_secs(100), Measure::Calls);
        let t = 5 * SEC;
        assert_eq!(
            q.admit(
                t,
                &[charge(&q, &budget, "a", 60), charge(&q, &rate, "a", 1)]
            ),
            Ok(())
        );
        // 60 + 50 > 100: refused, and neither cell moves.
        assert!(q
            .admit(
                t,
                &[charge(&q, &rate, "a", 1), charge(&q, &budget, "a", 50)]
            )
            .is_err());
        assert_eq!(q.admit(t, &[charge(&q, &budget, "a", 40)]), Ok(()));
        assert!(matches!(
            q.admit(t, &[charge(&q, &budget, "a", 101)]),
            Err(Refusal::Exceeded {
                retry_after: None,
                ..
            })
        ));
        // The rate saw one call only: nine more fit.
        for _ in 0..9 {
            assert_eq!(q.admit(t, &[charge(&q, &rate, "a", 1)]), Ok(()));
        }
        assert!(q.admit(t, &[charge(&q, &rate, "a", 1)]).is_err());
    }

    /// With several limits spent, the wait is the longest, whatever their
    /// order; with one that can never fit, there is no wait to give. The
    /// answer's milliseconds are rounded up.
    #[test]
    fn the_wait_is_that_of_the_last_limit_to_free() {
        let q = Quota::default();
        let rate = limit(1, Duration::from_secs(10), Measure::Calls);
        // A unit of budget comes back every 20 s, a call every 10 s.
        let budget = limit(100, Duration::from_secs(2000), Measure::Cost("c".into()));
        let t = 5 * SEC;
        let both = |cost| [charge(&q, &rate, "a", 1), charge(&q, &budget, "a", cost)];
        assert_eq!(q.admit(t, &both(100)), Ok(()));
        for order in [both(1), {
            let [r, b] = both(1);
            [b, r]
        }] {
            match q.admit(t, &order) {
                Err(Refusal::Exceeded {
                    limit,
                    retry_after: Some(wait),
                }) => {
                    assert_eq!(limit, budget);
                    assert_eq!(wait, Duration::from_secs(20));
                }
                other => panic!("{other:?}"),
            }
        }
        // Rate spent, and a cost over the whole budget: no wait helps.
        for order in [both(101), {
            let [r, b] = both(101);
            [b, r]
        }] {
            assert!(matches!(
                q.admit(t, &order),
                Err(Refusal::Exceeded {
                    retry_after: None,
                    ..
                })
            ));
        }
        assert_eq!(retry_after_ms(Duration::from_nanos(8_571_428_572)), 8572);
        assert_eq!(retry_after_ms(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_ms(Duration::from_millis(20)), 20);
    }

    #[test]
    fn memory_is_bounded_and_idle_keys_make_room() {
        let q = Quota::new(SHARDS); // one key per shard
        let l = limit(1, Duration::from_secs(1), Measure::Calls);
        let mut refused = 0;
        for i in 0..200 {
            if q.admit(10 * SEC, &[charge(&q, &l, &format!("k{i}"), 1)]) == Err(Refusal::Full) {
                refused += 1;
            }
        }
        assert!(refused > 0 && q.keys() <= SHARDS, "{refused} {}", q.keys());
        // A second later every cell is idle, so a new key finds room in
        // its (full) shard, and the count stays bounded.
        assert_eq!(q.admit(11 * SEC, &[charge(&q, &l, "new", 1)]), Ok(()));
        assert!(q.keys() <= SHARDS);
    }

    #[test]
    fn concurrent_callers_get_exactly_n() {
        let q = Arc::new(Quota::default());
        let l = limit(500, Duration::from_secs(3600), Measure::Calls);
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        if q.admit(SEC, &[charge(&q, &l, "a", 1)]).is_ok() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 500);
    }
}
