//! What rate and budget limits cost a decision: the main bundle with a
//! `@rate` on every permit (never spent), its counters holding 10,000 live
//! keys, against the same bundle without limits; in-process on one thread,
//! in interleaved rounds (median), so the machine's drift hits both alike.

use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::EntityUid;
use serde::Serialize;

use super::driver::{self, Timing};
use super::{BenchError, RequestForms};
use crate::bundle::{BundleSources, Snapshot};
use crate::engine::{self, RequestTime};
use crate::quota::{self, Quota};
use crate::service::convert;

/// Live keys in the counters while measuring.
pub const ACTIVE_KEYS: usize = 10_000;

/// Interleaved rounds of each variant (the order alternates per round).
const ROUNDS: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct LimitsReport {
    pub active_keys: usize,
    pub rounds: usize,
    /// Median of the rounds' in-process p50, without limits and with them.
    pub p50_without_ns: u64,
    pub p50_with_ns: u64,
    /// `p50_with_ns / p50_without_ns`: noisy, since the two are separate
    /// runs on a shared machine.
    pub ratio: f64,
    /// Time spent counting, per decision, timed around the counting itself
    /// in the runs with limits (all decisions, allowed or not).
    pub counting_ns_per_decision: f64,
    /// `counting_ns_per_decision / p50_without_ns`.
    pub counting_share: f64,
}

/// `sources` with `@rate` and `@limit_key("agent+user")` on every permit,
/// high enough that no call of the bench is ever refused.
fn limited(sources: &BundleSources) -> BundleSources {
    let mut out = sources.clone();
    for file in &mut out.policies {
        file.text = file.text.replace(
            "\npermit (",
            "\n@rate(\"1000000000/second\")\n@limit_key(\"agent+user\")\npermit (",
        );
        if let Some(rest) = file.text.strip_prefix("permit (") {
            file.text =
                format!("@rate(\"1000000000/second\")\n@limit_key(\"agent+user\")\npermit ({rest}");
        }
    }
    out
}

/// A quota holding `ACTIVE_KEYS` live keys: allowed decisions of the mix,
/// charged for as many made-up agents.
fn filled(snapshot: &Snapshot, requests: &[RequestForms]) -> Result<Quota, BenchError> {
    let quota = Quota::default();
    let now = RequestTime::now();
    let allowed: Vec<_> = requests
        .iter()
        .filter_map(|r| {
            let req = convert::request(&r.json).ok()?;
            let d = engine::decide(snapshot, &req, &now).ok()?;
            d.allowed.then_some((req, d))
        })
        .collect();
    if allowed.is_empty() {
        return Err(BenchError::Task(
            "limits: the mix has no allowed request to count".to_owned(),
        ));
    }
    for i in 0..ACTIVE_KEYS {
        let (req, d) = &allowed[i % allowed.len()];
        let mut req = req.clone();
        req.agent = EntityUid::from_str(&format!("Agent::\"bench-{i}\""))
            .map_err(|e| BenchError::Task(format!("limits: {e}")))?;
        let mut d = d.clone();
        quota::apply(snapshot, &quota, &req, &mut d, SystemTime::now());
    }
    if quota.keys() < ACTIVE_KEYS {
        return Err(BenchError::Task(format!(
            "limits: {} live keys, expected at least {ACTIVE_KEYS}",
            quota.keys()
        )));
    }
    Ok(quota)
}

/// The p50 of conversion, decision and (with `quota`) counting; and the
/// mean time counting took per decision.
fn run(
    snapshot: &Snapshot,
    quota: Option<&Quota>,
    requests: &[RequestForms],
    timing: Timing,
    min_calls: u64,
) -> Result<(u64, f64), BenchError> {
    let counting = std::cell::Cell::new((0u128, 0u64));
    let stats = driver::time_sync(timing, min_calls, |i| {
        let r = &requests[i % requests.len()];
        let at = SystemTime::now();
        let now = RequestTime::of(at);
        let req = convert::request(&r.json).map_err(|e| BenchError::InvalidRequest {
            index: i % requests.len(),
            problem: e.to_string(),
        })?;
        let mut decision =
            engine::decide(snapshot, &req, &now).map_err(|e| BenchError::InvalidRequest {
                index: i % requests.len(),
                problem: e.to_string(),
            })?;
        if let Some(quota) = quota {
            let began = std::time::Instant::now();
            quota::apply(snapshot, quota, &req, &mut decision, at);
            let (ns, n) = counting.get();
            counting.set((ns + began.elapsed().as_nanos(), n + 1));
            if decision.limited.is_some() {
                return Err(BenchError::Task(
                    "limits: a call was limited; the bench's limits must never be spent".to_owned(),
                ));
            }
        }
        std::hint::black_box(decision);
        Ok(())
    })?;
    let (ns, n) = counting.get();
    Ok((stats.p50_ns, ns as f64 / n.max(1) as f64))
}

pub fn measure(
    sources: &BundleSources,
    plain: &Snapshot,
    requests: &[RequestForms],
    timing: Timing,
    min_calls: u64,
) -> Result<LimitsReport, BenchError> {
    let limited = Snapshot::build(&limited(sources))
        .map_err(|e| BenchError::Task(format!("limits: the limited bundle: {e:?}")))?;
    if limited.limits.is_empty() {
        return Err(BenchError::Task(
            "limits: no permit received a limit".to_owned(),
        ));
    }
    let quota = filled(&limited, requests)?;
    let (mut without, mut with, mut counting) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let plain_run = || run(plain, None, requests, timing, min_calls);
        let limited_run = || run(&limited, Some(&quota), requests, timing, min_calls);
        let (a, b) = if round % 2 == 0 {
            let a = plain_run()?;
            (a, limited_run()?)
        } else {
            let b = limited_run()?;
            (plain_run()?, b)
        };
        without.push(a.0);
        with.push(b.0);
        counting.push(b.1);
    }
    without.sort_unstable();
    with.sort_unstable();
    counting.sort_by(f64::total_cmp);
    let (a, b, c) = (without[ROUNDS / 2], with[ROUNDS / 2], counting[ROUNDS / 2]);
    Ok(LimitsReport {
        active_keys: quota.keys(),
        rounds: ROUNDS,
        p50_without_ns: a,
        p50_with_ns: b,
        ratio: b as f64 / a.max(1) as f64,
        counting_ns_per_decision: c,
        counting_share: c / a.max(1) as f64,
    })
}
