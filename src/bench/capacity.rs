//! Latency under load: a sidecar serving a large generated bundle is driven
//! closed-loop to find its maximum throughput, then open-loop at half of it
//! (calls scheduled at a fixed rate, latency from the scheduled instant), as
//! a sidecar is sized in production: with headroom. Measured with the scope
//! index and without it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::child;
use super::driver::{self, Stats, Timing};
use super::workload::{self, WorkloadSpec};
use super::{blocking, connect_uds, leash_run, progress, BenchError, Transport};
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
    /// sidecar: what the transport, the client and a shared machine cost
    /// alone at that load.
    pub floor_at_same_rate: Option<Stats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CapacityRun {
    pub index: bool,
    /// Highest closed-loop throughput over the Unix socket, and the
    /// in-flight count it was reached at.
    pub max_per_sec: f64,
    pub max_concurrency: usize,
    /// Open-loop at half of `max_per_sec`: latency from each call's
    /// scheduled instant; `per_sec` is the rate offered.
    pub at_half: Stats,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct CapacityPlan {
    pub policies: usize,
    pub seed: u64,
    pub timing: Timing,
    /// In-flight counts tried for the maximum.
    pub concurrency: Vec<usize>,
}

pub async fn measure(
    exe: &Path,
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
            exe,
            Some((&dir.join("policies"), &dir.join("schemas"))),
            &run_dir,
            &extra,
        )?;
        child::wait_serving(&mut leash, LOAD_TIMEOUT).await?;
        let mut max_per_sec = 0.0;
        let mut max_concurrency = 0;
        for &concurrency in &plan.concurrency {
            progress(format!(
                "capacity: index {label}, {concurrency} in flight (closed loop)"
            ));
            let stats = leash_run(
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
            }
        }
        let rate = max_per_sec / 2.0;
        progress(format!("capacity: index {label}, open loop at {rate:.0}/s"));
        let client = AuthorizerClient::new(connect_uds(&leash.uds).await?);
        let mix = requests.clone();
        let at_half = driver::drive_rate(rate, plan.timing, move |i| {
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
        })
        .await?;
        drop(leash);
        runs.push(CapacityRun {
            index,
            max_per_sec,
            max_concurrency,
            at_half,
        });
    }
    let floor_at_same_rate = match runs.first() {
        Some(indexed) => Some(floor_at(exe, &dir, indexed.max_per_sec / 2.0, plan.timing).await?),
        None => None,
    };
    Ok(CapacityReport {
        policies: plan.policies,
        runs,
        floor_at_same_rate,
    })
}

/// The empty floor call, open-loop at `rate`.
async fn floor_at(exe: &Path, dir: &Path, rate: f64, timing: Timing) -> Result<Stats, BenchError> {
    progress(format!("capacity: floor, open loop at {rate:.0}/s"));
    let floor = child::spawn_floor(exe, dir)?;
    let client = child::floor_client(connect_uds(&floor.uds).await?);
    let stats = driver::drive_rate(rate, timing, move |_| {
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
    })
    .await?;
    drop(floor);
    Ok(stats)
}

/// The capacity section of the text report.
pub fn render_into(report: &CapacityReport, out: &mut String) -> std::fmt::Result {
    use std::fmt::Write as _;
    writeln!(
        out,
        "\nlatency at half of maximum throughput ({} policies, Unix socket; open loop, latency from each call's scheduled start)",
        report.policies
    )?;
    writeln!(
        out,
        "  {:<6} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "index", "max", "(in flight)", "offered", "p50", "p99", "p99.9"
    )?;
    for run in &report.runs {
        writeln!(
            out,
            "  {:<6} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10}",
            if run.index { "on" } else { "off" },
            super::report::rate(run.max_per_sec),
            run.max_concurrency,
            super::report::rate(run.at_half.per_sec),
            super::report::duration(run.at_half.p50_ns as f64),
            super::report::duration(run.at_half.p99_ns as f64),
            super::report::duration(run.at_half.p999_ns as f64),
        )?;
    }
    if let Some(floor) = &report.floor_at_same_rate {
        writeln!(
            out,
            "  {:<6} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10}",
            "floor",
            "",
            "",
            super::report::rate(floor.per_sec),
            super::report::duration(floor.p50_ns as f64),
            super::report::duration(floor.p99_ns as f64),
            super::report::duration(floor.p999_ns as f64),
        )?;
    }
    Ok(())
}
