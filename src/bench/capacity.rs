//! Latency under load: a sidecar serving a large generated bundle is driven
//! closed-loop to find its maximum throughput, then open-loop at half of it
//! (calls scheduled at a fixed rate, latency from the scheduled instant), as
//! a sidecar is sized in production: with headroom. Measured with the scope
//! index and without it.
//!
//! The open-loop runs are rounds, each followed by the empty floor call at
//! the same rate, and the round with the median p99 is reported with every
//! round's p99 beside it: on a shared machine one disturbed second moves a
//! single run's tail by milliseconds, and the floor's round shows whether
//! the machine or the sidecar moved it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::child::{self, ServerProcess};
use super::driver::{self, Stats, Timing};
use super::machine::{self, Load};
use super::workload::{self, WorkloadSpec};
use super::{blocking, connect_uds, leash_run_counted, progress, BenchError, Transport};
use crate::proto::v1 as pb;
use crate::proto::v1::authorizer_client::AuthorizerClient;

/// Longest wait for a sidecar to load the bundle.
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Serialize)]
pub struct CapacityReport {
    /// Policies in the generated bundle.
    pub policies: usize,
    /// With the scope index, then without it.
    pub runs: Vec<CapacityRun>,
    /// The empty floor call, open-loop at the rate offered to the indexed
    /// sidecar, a round after each of its rounds: what the transport, the
    /// client and a shared machine cost alone at that load.
    pub floor_at_same_rate: Option<AtRate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CapacityRun {
    pub index: bool,
    /// Highest closed-loop throughput over the Unix socket, and the
    /// in-flight count it was reached at.
    pub max_per_sec: f64,
    pub max_concurrency: usize,
    /// The sidecar's CPU time per call at the maximum: many calls share
    /// each HTTP/2 read, write and wake-up there, so a call costs less than
    /// one arriving alone (compare `at_half.server_cpu_us_per_call`).
    pub max_cpu_us_per_call: Option<f64>,
    /// Open-loop at half of `max_per_sec`.
    pub at_half: AtRate,
}

/// Open-loop rounds at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct AtRate {
    /// The round with the median p99 (of an even count, the slower middle
    /// one): latency from each call's scheduled instant; `per_sec` is the
    /// rate offered.
    #[serde(flatten)]
    pub median: Stats,
    /// Each round's p99, in the order run.
    pub rounds_p99_ns: Vec<u64>,
    /// The server's CPU time (user + system) per call in the median round,
    /// warm-up included; `None` where `/proc` cannot be read.
    pub server_cpu_us_per_call: Option<f64>,
    /// What the machine did during each round, in the order run: how busy
    /// it was and who kept it busy (averages over the round, so a stall of a
    /// few milliseconds does not show).
    pub rounds_load: Vec<Load>,
    /// The sidecar's own decision times in each round, in the order run
    /// (`None` for the floor, which has no metrics, or where the sidecar's
    /// metrics could not be read).
    pub rounds_decisions: Vec<Option<DecisionTimes>>,
}

/// A sidecar's own time per decision over one round, from its
/// `leash_decision_duration_seconds` histogram: from the handler's start to
/// its answer, so without the transport, HTTP/2 and the wait for a worker.
/// Beside the round's p99 it says whether a slow tail was spent deciding.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DecisionTimes {
    /// Calls the bench made in the round, warm-up included, and decisions
    /// the histogram counted meanwhile: the same, as each call is one
    /// decision.
    pub calls: u64,
    pub decisions: u64,
    /// Share of them that took longer than 250 µs, and than 1 ms.
    pub over_250us: f64,
    pub over_1ms: f64,
}

impl DecisionTimes {
    /// From the histogram's cumulative buckets before and after a round.
    fn between(before: &[(f64, f64)], after: &[(f64, f64)], calls: u64) -> Option<Self> {
        // Bounds are read back from decimal text: equal within rounding.
        let same = |bound: f64, le: f64| {
            if le.is_infinite() {
                bound == le
            } else {
                (bound - le).abs() <= le * 1e-9
            }
        };
        let at = |buckets: &[(f64, f64)], le: f64| {
            buckets
                .iter()
                .find(|(bound, _)| same(*bound, le))
                .map(|(_, count)| *count)
        };
        let delta = |le: f64| Some(at(after, le)? - at(before, le)?);
        let total = delta(f64::INFINITY)?;
        if total <= 0.0 {
            return None;
        }
        let over = |le: f64| delta(le).map(|within| ((total - within) / total).max(0.0));
        Some(Self {
            calls,
            decisions: total as u64,
            over_250us: over(0.000_25)?,
            over_1ms: over(0.001)?,
        })
    }
}

/// The cumulative buckets `(le, count)` of a sidecar's decision-time
/// histogram, read from its admin listener; `None` where it cannot be read.
async fn decision_buckets(leash: &ServerProcess) -> Option<Vec<(f64, f64)>> {
    let (status, text) = child::http_get(leash.admin_addr()?, "GET", "/metrics")
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("leash_decision_duration_seconds_bucket{le=\"")?;
            let (le, rest) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = rest.split_whitespace().next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    (!buckets.is_empty()).then_some(buckets)
}

/// One open-loop round: figures, the server's CPU per call and the
/// machine's load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Round {
    pub stats: Stats,
    pub server_cpu_us_per_call: Option<f64>,
    pub load: Load,
    pub decisions: Option<DecisionTimes>,
}

impl AtRate {
    fn of(rounds: Vec<Round>) -> Option<Self> {
        let rounds_p99_ns = rounds.iter().map(|r| r.stats.p99_ns).collect();
        let rounds_load = rounds.iter().map(|r| r.load).collect();
        let rounds_decisions = rounds.iter().map(|r| r.decisions).collect();
        let mut by_p99 = rounds;
        by_p99.sort_by_key(|r| r.stats.p99_ns);
        let median = by_p99.get(by_p99.len() / 2).copied()?;
        Some(Self {
            median: median.stats,
            rounds_p99_ns,
            server_cpu_us_per_call: median.server_cpu_us_per_call,
            rounds_load,
            rounds_decisions,
        })
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct CapacityPlan {
    pub policies: usize,
    pub seed: u64,
    pub timing: Timing,
    /// In-flight counts tried for the maximum.
    pub concurrency: Vec<usize>,
    /// Open-loop rounds at half of the maximum (at least one).
    pub rounds: usize,
}

pub async fn measure(
    server: &child::ServerCommand,
    scratch: &Path,
    plan: &CapacityPlan,
) -> Result<CapacityReport, BenchError> {
    let dir = scratch.join(format!("capacity-{}", plan.policies));
    let workload = {
        let (dir, spec) = (
            dir.clone(),
            WorkloadSpec {
                policies: plan.policies,
                seed: plan.seed,
            },
        );
        blocking(move || {
            let workload = workload::generate(spec);
            workload.write_to(&dir).map_err(|source| BenchError::Io {
                what: format!("writing `{}`", dir.display()),
                source,
            })?;
            Ok::<_, BenchError>(workload)
        })
        .await??
    };
    let requests: Arc<Vec<pb::IsAuthorizedRequest>> =
        Arc::new(workload.requests.iter().map(|r| r.json.clone()).collect());
    let mut runs = Vec::with_capacity(2);
    let mut floor_at_same_rate = None;
    for index in [true, false] {
        let label = if index { "on" } else { "off" };
        progress(format!(
            "capacity: {} policies, index {label}: loading",
            plan.policies
        ));
        let extra: Vec<String> = if index {
            Vec::new()
        } else {
            vec!["--policy-index".to_owned(), "off".to_owned()]
        };
        let run_dir = dir.join(format!("run-{label}"));
        std::fs::create_dir_all(&run_dir).map_err(|source| BenchError::Io {
            what: format!("creating `{}`", run_dir.display()),
            source,
        })?;
        let mut leash = child::spawn_leash(
            server,
            Some((&dir.join("policies"), &dir.join("schemas"))),
            &run_dir,
            &extra,
        )?;
        child::wait_serving(&mut leash, LOAD_TIMEOUT).await?;
        let mut max_per_sec = 0.0;
        let mut max_concurrency = 0;
        let mut max_cpu_us_per_call = None;
        for &concurrency in &plan.concurrency {
            progress(format!(
                "capacity: index {label}, {concurrency} in flight (closed loop)"
            ));
            let before = leash.cpu_time();
            let (stats, calls) = leash_run_counted(
                &leash,
                Transport::Uds,
                concurrency,
                plan.timing,
                requests.clone(),
            )
            .await?;
            if stats.per_sec > max_per_sec {
                max_per_sec = stats.per_sec;
                max_concurrency = concurrency;
                max_cpu_us_per_call = leash.cpu_us_per_call(before, calls);
            }
        }
        let rate = max_per_sec / 2.0;
        // The floor runs beside the indexed sidecar only: the goal is set
        // for it, and the unindexed one is two orders of magnitude slower.
        let floor = if index {
            Some(child::spawn_floor(&server.exe, &dir)?)
        } else {
            None
        };
        let mut rounds = Vec::new();
        let mut floor_rounds = Vec::new();
        let count = plan.rounds.max(1);
        for round in 1..=count {
            progress(format!(
                "capacity: index {label}, open loop at {rate:.0}/s (round {round} of {count})"
            ));
            rounds.push(leash_at(&leash, rate, plan.timing, requests.clone()).await?);
            if let Some(floor) = &floor {
                progress(format!(
                    "capacity: floor, open loop at {rate:.0}/s (round {round} of {count})"
                ));
                floor_rounds.push(floor_at(floor, rate, plan.timing).await?);
            }
        }
        drop(floor);
        drop(leash);
        let at_half = AtRate::of(rounds)
            .ok_or_else(|| BenchError::Task("no open-loop round was run".to_owned()))?;
        if index {
            floor_at_same_rate = AtRate::of(floor_rounds);
        }
        runs.push(CapacityRun {
            index,
            max_per_sec,
            max_concurrency,
            max_cpu_us_per_call,
            at_half,
        });
    }
    Ok(CapacityReport {
        policies: plan.policies,
        runs,
        floor_at_same_rate,
    })
}

/// One open-loop round of the request mix against `leash` at `rate`.
async fn leash_at(
    leash: &ServerProcess,
    rate: f64,
    timing: Timing,
    mix: Arc<Vec<pb::IsAuthorizedRequest>>,
) -> Result<Round, BenchError> {
    let uds = leash.uds.clone();
    let before = leash.cpu_time();
    let machine = machine::Before::read(leash.pid());
    let buckets = decision_buckets(leash).await;
    let (stats, calls) = driver::drive_rate(
        rate,
        timing,
        move || async move { Ok(AuthorizerClient::new(connect_uds(&uds).await?)) },
        move |client, i| {
            let mut client = client.clone();
            let request = mix[i % mix.len()].clone();
            async move {
                client
                    .is_authorized(request)
                    .await
                    .map(|r| drop(std::hint::black_box(r)))
                    .map_err(|status| BenchError::Rpc {
                        what: "IsAuthorized".to_owned(),
                        status,
                    })
            }
        },
    )
    .await?;
    Ok(Round {
        stats,
        server_cpu_us_per_call: leash.cpu_us_per_call(before, calls),
        load: machine.load_since(leash.pid(), calls),
        decisions: match (buckets, decision_buckets(leash).await) {
            (Some(before), Some(after)) => DecisionTimes::between(&before, &after, calls),
            _ => None,
        },
    })
}

/// One open-loop round of the empty floor call at `rate`.
async fn floor_at(floor: &ServerProcess, rate: f64, timing: Timing) -> Result<Round, BenchError> {
    let uds = floor.uds.clone();
    let before = floor.cpu_time();
    let machine = machine::Before::read(floor.pid());
    let (stats, calls) = driver::drive_rate(
        rate,
        timing,
        move || async move { Ok(child::floor_client(connect_uds(&uds).await?)) },
        move |client, _| {
            let mut client = client.clone();
            async move {
                client
                    .empty(crate::proto::bench::v1::EmptyRequest {})
                    .await
                    .map(|r| drop(std::hint::black_box(r)))
                    .map_err(|status| BenchError::Rpc {
                        what: "Floor/Empty".to_owned(),
                        status,
                    })
            }
        },
    )
    .await?;
    Ok(Round {
        stats,
        server_cpu_us_per_call: floor.cpu_us_per_call(before, calls),
        load: machine.load_since(floor.pid(), calls),
        decisions: None,
    })
}

/// The capacity section of the text report.
pub fn render_into(report: &CapacityReport, out: &mut String) -> std::fmt::Result {
    use std::fmt::Write as _;
    let rounds = report
        .runs
        .first()
        .map_or(0, |r| r.at_half.rounds_p99_ns.len());
    writeln!(
        out,
        "\nlatency at half of maximum throughput ({} policies, Unix socket; open loop, latency from each call's scheduled start; the round of median p99 of {rounds})",
        report.policies
    )?;
    writeln!(
        out,
        "  {:<6} {:>10} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  p99 by round",
        "index", "max", "(in)", "CPU/call", "offered", "p50", "p99", "p99.9", "CPU/call"
    )?;
    let cpu = |us: Option<f64>| {
        us.map(|us| super::report::duration(us * 1e3))
            .unwrap_or_else(|| "-".to_owned())
    };
    let line = |out: &mut String,
                name: &str,
                max: Option<&CapacityRun>,
                at: &AtRate|
     -> std::fmt::Result {
        let (max, inflight, max_cpu) = match max {
            Some(run) => (
                super::report::rate(run.max_per_sec),
                run.max_concurrency.to_string(),
                cpu(run.max_cpu_us_per_call),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        let rounds: Vec<String> = at
            .rounds_p99_ns
            .iter()
            .map(|ns| super::report::duration(*ns as f64))
            .collect();
        writeln!(
            out,
            "  {:<6} {:>10} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
            name,
            max,
            inflight,
            max_cpu,
            super::report::rate(at.median.per_sec),
            super::report::duration(at.median.p50_ns as f64),
            super::report::duration(at.median.p99_ns as f64),
            super::report::duration(at.median.p999_ns as f64),
            cpu(at.server_cpu_us_per_call),
            rounds.join(", "),
        )
    };
    for run in &report.runs {
        line(
            out,
            if run.index { "on" } else { "off" },
            Some(run),
            &run.at_half,
        )?;
    }
    if let Some(floor) = &report.floor_at_same_rate {
        line(out, "floor", None, floor)?;
    }
    writeln!(
        out,
        "  the machine in each round (cores busy, averaged over the round; waited: the server's threads ready to run without a CPU, per call; deciding: the sidecar's own time per decision, handler to answer, from its metrics):"
    )?;
    let cores = |c: Option<f64>| c.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"));
    let mut rounds_of = |name: &str, at: &AtRate| -> std::fmt::Result {
        for (i, (p99, load)) in at.rounds_p99_ns.iter().zip(&at.rounds_load).enumerate() {
            let decided = match at.rounds_decisions.get(i).copied().flatten() {
                Some(d) => format!(
                    "  deciding over 250 µs {:.2}%, over 1 ms {:.2}%",
                    d.over_250us * 100.0,
                    d.over_1ms * 100.0
                ),
                None => String::new(),
            };
            writeln!(
                out,
                "    {:<6} round {}  p99 {:>8}  machine {:>5} = server {:>5} + bench {:>5} + others {:>5} (steal {:>5})  waited {:>8}{decided}",
                name,
                i + 1,
                super::report::duration(*p99 as f64),
                cores(load.machine_cores),
                cores(load.server_cores),
                cores(load.bench_cores),
                cores(load.others_cores),
                cores(load.steal_cores),
                cpu(load.server_wait_us_per_call),
            )?;
        }
        Ok(())
    };
    for run in &report.runs {
        rounds_of(if run.index { "on" } else { "off" }, &run.at_half)?;
    }
    if let Some(floor) = &report.floor_at_same_rate {
        rounds_of("floor", floor)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_shares_come_from_the_buckets_difference() {
        let before = [(0.000_25, 90.0), (0.001, 95.0), (f64::INFINITY, 100.0)];
        // 1,000 more decisions: 900 within 250 µs, 990 within 1 ms.
        let after = [
            (0.000_25, 990.0),
            (0.001, 1_085.0),
            (f64::INFINITY, 1_100.0),
        ];
        let d = DecisionTimes::between(&before, &after, 1_000).expect("shares");
        assert_eq!((d.calls, d.decisions), (1_000, 1_000));
        assert!((d.over_250us - 0.1).abs() < 1e-12, "{d:?}");
        assert!((d.over_1ms - 0.01).abs() < 1e-12, "{d:?}");
        // The +Inf bucket is the total, not the first bucket below it.
        let first = [
            (0.000_025, 0.0),
            (0.000_25, 90.0),
            (0.001, 95.0),
            (f64::INFINITY, 100.0),
        ];
        let later = [
            (0.000_025, 0.0),
            (0.000_25, 990.0),
            (0.001, 1_085.0),
            (f64::INFINITY, 1_100.0),
        ];
        let d = DecisionTimes::between(&first, &later, 1_000).expect("shares");
        assert_eq!(d.decisions, 1_000, "{d:?}");
        // No decision in the round, or a bucket missing: no figures.
        assert!(DecisionTimes::between(&before, &before, 0).is_none());
        assert!(DecisionTimes::between(&before, &after[1..], 1_000).is_none());
    }
}
