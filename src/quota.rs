//! Counters of the rate and budget limits declared on permits
//! ([`crate::bundle::limits`]): an otherwise ALLOW whose determining permits
//! carry limits is counted against them, and becomes a DENY with
//! `rate_limited` or `budget_exceeded` and a retry-after once one is spent.
//!
//! Each counter is a GCRA cell (a token bucket kept as one instant, the
//! "theoretical arrival time"): a call of cost `c` against `N` per window
//! `W` moves it `W·c/N` later, and is admitted while the cell stays within
//! one window of now. So exactly `N` calls fit in a burst, the next waits
//! `W/N`, and a cell idle for a window is as good as new. One instant per
//! key keeps memory small; a cell at or before now holds nothing and is
//! dropped when its shard needs room, so idle keys expire.
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

use crate::bundle::{Limit, LimitKey, Measure, Snapshot};
use crate::engine::{AuthzRequest, ContextInput, Decision, Limited};

const SHARDS: usize = 16;

/// Default most keys held (all limits together): about 30 MiB.
pub const DEFAULT_MAX_LIMIT_KEYS: usize = 262_144;

/// One counter: a limit, and whose allowances it counts (the agent, and
/// the user where the limit is kept per agent and user).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    limit: Arc<str>,
    agent: EntityUid,
    user: Option<EntityUid>,
}

/// The counters of one sidecar.
#[derive(Debug)]
pub struct Quota {
    shards: Box<[Mutex<HashMap<Key, u64>>]>,
    hasher: std::collections::hash_map::RandomState,
    per_shard: usize,
}

impl Default for Quota {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LIMIT_KEYS)
    }
}

/// One limit to charge for one decision.
struct Charge {
    limit: Arc<Limit>,
    key: Key,
    cost: u64,
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
            hasher: std::collections::hash_map::RandomState::new(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// Live keys now held, for metrics and tests.
    pub fn keys(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn shard_of(&self, key: &Key) -> usize {
        // Modulo of a hash: the remainder is below SHARDS, so it fits.
        usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0)
    }

    /// Admits `charges` at `now` (nanoseconds since the Unix epoch), all or
    /// none.
    fn admit(&self, now: u64, charges: &[Charge]) -> Result<(), Refusal> {
        let mut shard_ids: Vec<usize> = charges.iter().map(|c| self.shard_of(&c.key)).collect();
        let order = {
            let mut o = shard_ids.clone();
            o.sort_unstable();
            o.dedup();
            o
        };
        // In shard order, so two decisions never wait on each other.
        let mut guards: Vec<(usize, MutexGuard<'_, HashMap<Key, u64>>)> = order
            .iter()
            .filter_map(|&i| self.shards.get(i).map(|s| (i, lock(s))))
            .collect();
        let mut moved = Vec::with_capacity(charges.len());
        for (charge, shard) in charges.iter().zip(shard_ids.iter_mut()) {
            let Some((_, map)) = guards.iter_mut().find(|(i, _)| i == shard) else {
                return Err(Refusal::Full);
            };
            let window = nanos(charge.limit.window);
            let step = (u128::from(window) * u128::from(charge.cost))
                .div_ceil(u128::from(charge.limit.amount.max(1)));
            let tat = map.get(&charge.key).copied().unwrap_or(0).max(now);
            let next = u128::from(tat) + step;
            let limit = u128::from(now) + u128::from(window);
            if next > limit {
                let retry_after = (step <= u128::from(window))
                    .then(|| Duration::from_nanos(u64::try_from(next - limit).unwrap_or(u64::MAX)));
                return Err(Refusal::Exceeded {
                    limit: charge.limit.clone(),
                    retry_after,
                });
            }
            if !map.contains_key(&charge.key) && map.len() >= self.per_shard {
                // Cells at or before now hold nothing: make room with them.
                map.retain(|_, tat| *tat > now);
                if map.len() >= self.per_shard {
                    return Err(Refusal::Full);
                }
            }
            moved.push((*shard, u64::try_from(next).unwrap_or(u64::MAX)));
        }
        for (charge, (shard, next)) in charges.iter().zip(moved) {
            if let Some((_, map)) = guards.iter_mut().find(|(i, _)| *i == shard) {
                map.insert(charge.key.clone(), next);
            }
        }
        Ok(())
    }
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
    for id in &decision.determining {
        for limit in snapshot.limits.of(id) {
            let cost = match &limit.measure {
                Measure::Calls => 1,
                Measure::Cost(attr) => match cost_of(&request.context, attr) {
                    Some(cost) => cost,
                    None => {
                        deny(
                            decision,
                            Limited {
                                reason: "budget_cost_missing",
                                policy_id: limit.policy_id.clone(),
                                limit: limit.text.clone(),
                                retry_after: None,
                                detail: format!(
                                    "`@cost(\"{attr}\")`: the request's context has no \
                                     non-negative whole number `{attr}`"
                                ),
                            },
                        );
                        return;
                    }
                },
            };
            let user = match limit.key {
                LimitKey::AgentAndUser => request.on_behalf_of.clone(),
                LimitKey::Agent => None,
            };
            charges.push(Charge {
                limit: limit.clone(),
                key: Key {
                    limit: limit.identity().clone(),
                    agent: request.agent.clone(),
                    user,
                },
                cost,
            });
        }
    }
    if charges.is_empty() {
        return;
    }
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, nanos);
    match quota.admit(now, &charges) {
        Ok(()) => {}
        Err(Refusal::Exceeded { limit, retry_after }) => {
            let detail = match retry_after {
                Some(after) => format!(
                    "{} by {} ({}); retry after {} ms",
                    limit.reason(),
                    limit.policy_id,
                    limit.text,
                    after.as_millis().max(1)
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

/// The cost a request declares in its context: a top-level whole number.
fn cost_of(context: &ContextInput, attr: &str) -> Option<u64> {
    match context {
        ContextInput::Json(map) => map.get(attr)?.as_u64(),
        ContextInput::Typed(pairs) => pairs.iter().find(|(k, _)| k == attr).and_then(|(_, v)| {
            // Evaluated through a one-attribute context: the public way
            // to read a typed value back.
            let one = cedar_policy::Context::from_pairs([(attr.to_owned(), v.clone())]).ok()?;
            match one.get(attr)? {
                cedar_policy::EvalResult::Long(n) => u64::try_from(n).ok(),
                _ => None,
            }
        }),
        ContextInput::Empty => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn limit(amount: u64, window: Duration, measure: Measure) -> Arc<Limit> {
        Arc::new(Limit::for_test(amount, window, measure))
    }

    fn charge(limit: &Arc<Limit>, who: &str, cost: u64) -> Charge {
        Charge {
            limit: limit.clone(),
            key: Key {
                limit: limit.identity().clone(),
                agent: EntityUid::from_str(&format!("Agent::\"{who}\"")).expect("uid"),
                user: None,
            },
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
            assert_eq!(q.admit(t0, &[charge(&l, "a", 1)]), Ok(()));
        }
        match q.admit(t0, &[charge(&l, "a", 1)]) {
            Err(Refusal::Exceeded { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(20)));
            }
            other => panic!("{other:?}"),
        }
        // Another key is counted apart.
        assert_eq!(q.admit(t0, &[charge(&l, "b", 1)]), Ok(()));
        // One slot back after W/N, a full burst after W.
        assert!(q.admit(t0 + 20 * SEC - 1, &[charge(&l, "a", 1)]).is_err());
        assert_eq!(q.admit(t0 + 20 * SEC, &[charge(&l, "a", 1)]), Ok(()));
        let later = t0 + 200 * SEC;
        for _ in 0..3 {
            assert_eq!(q.admit(later, &[charge(&l, "a", 1)]), Ok(()));
        }
        assert!(q.admit(later, &[charge(&l, "a", 1)]).is_err());
    }

    #[test]
    fn budgets_accumulate_cost_and_a_refusal_charges_nothing() {
        let q = Quota::default();
        let budget = limit(100, Duration::from_secs(100), Measure::Cost("c".into()));
        let rate = limit(10, Duration::from_secs(100), Measure::Calls);
        let t = 5 * SEC;
        assert_eq!(
            q.admit(t, &[charge(&budget, "a", 60), charge(&rate, "a", 1)]),
            Ok(())
        );
        // 60 + 50 > 100: refused, and neither cell moves.
        assert!(q
            .admit(t, &[charge(&rate, "a", 1), charge(&budget, "a", 50)])
            .is_err());
        assert_eq!(q.admit(t, &[charge(&budget, "a", 40)]), Ok(()));
        assert!(matches!(
            q.admit(t, &[charge(&budget, "a", 101)]),
            Err(Refusal::Exceeded {
                retry_after: None,
                ..
            })
        ));
        // The rate saw one call only: nine more fit.
        for _ in 0..9 {
            assert_eq!(q.admit(t, &[charge(&rate, "a", 1)]), Ok(()));
        }
        assert!(q.admit(t, &[charge(&rate, "a", 1)]).is_err());
    }

    #[test]
    fn memory_is_bounded_and_idle_keys_make_room() {
        let q = Quota::new(SHARDS); // one key per shard
        let l = limit(1, Duration::from_secs(1), Measure::Calls);
        let mut refused = 0;
        for i in 0..200 {
            if q.admit(10 * SEC, &[charge(&l, &format!("k{i}"), 1)]) == Err(Refusal::Full) {
                refused += 1;
            }
        }
        assert!(refused > 0 && q.keys() <= SHARDS, "{refused} {}", q.keys());
        // A second later every cell is idle, so a new key finds room in
        // its (full) shard, and the count stays bounded.
        assert_eq!(q.admit(11 * SEC, &[charge(&l, "new", 1)]), Ok(()));
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
                        if q.admit(SEC, &[charge(&l, "a", 1)]).is_ok() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 500);
    }
}
