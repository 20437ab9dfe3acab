//! Hot-reload figures: how long from a file written to the first decision
//! made with it, and what a reload in progress does to decision latency.
//!
//! Both run against a real `leash serve` child watching a copy of the bundle
//! in the scratch directory (never the user's own files). A change is one
//! file renamed over `policies/zz-leash-bench-reload.cedar` holding only a
//! comment: a new version, the same decisions.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::child::{self, ServerProcess};
use super::driver::{self, Stats, Timing};
use super::workload::{self, WorkloadSpec};
use super::{blocking, connect_uds, leash_run, progress, BenchError, Transport};
use crate::bundle::{BundleSources, SourceFile};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;
use crate::proto::v1::authorizer_client::AuthorizerClient;

/// The file each change replaces.
const CHANGE_FILE: &str = "policies/zz-leash-bench-reload.cedar";

/// Longest wait for one change to be served before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Policies in the bundle the changes were made to.
    pub policies: usize,
    pub changes: usize,
    /// File renamed into place → first IsAuthorized answered with the new
    /// version (one in flight, Unix socket). `calls` is the number of changes.
    pub write_to_decision: Stats,
    pub under_reload: UnderReload,
}

/// Decision latency while the sidecar rebuilds its bundle back to back,
/// against the same sidecar at rest.
#[derive(Debug, Clone, Serialize)]
pub struct UnderReload {
    pub policies: usize,
    /// IsAuthorized over the Unix socket, one in flight, no reload running.
    pub steady: Stats,
    /// The same while reloads run one after another.
    pub reloading: Stats,
    /// Reloads completed while `reloading` ran (warm-up included); with a
    /// bundle that takes longer to build than the run, 0: the whole run
    /// fell inside one reload.
    pub reloads_completed: u64,
    /// `reloading.p99 ÷ steady.p99`.
    pub p99_ratio: f64,
}

/// What the reload phase is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct ReloadPlan {
    /// Changes timed from write to decision.
    pub changes: usize,
    /// Generated bundle size for the under-reload measurement; `None` uses
    /// the main bundle.
    pub under_reload_policies: Option<usize>,
    pub timing: Timing,
    pub seed: u64,
}

/// Runs both measurements. `sources` (with `policies` policies) and
/// `requests` are the main bundle and its mix.
pub async fn measure(
    exe: &Path,
    scratch: &Path,
    plan: ReloadPlan,
    sources: &BundleSources,
    policies: usize,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
) -> Result<ReloadReport, BenchError> {
    let dir = scratch.join("reload-main");
    write_sources(sources, &dir)?;
    let mut leash = spawn_in(exe, &dir)?;
    child::wait_serving(&mut leash, CHANGE_TIMEOUT).await?;
    progress(format!(
        "hot reload: {} changes, file written → first decision on the new version",
        plan.changes
    ));
    let base = read_back(&dir)?;
    let write_to_decision =
        time_changes(&leash, &dir, &base, plan.changes, requests.clone()).await?;

    let under_reload = match plan.under_reload_policies {
        None => under_reload(&leash, &dir, &base, plan.timing, requests, policies).await?,
        Some(n) => {
            drop(leash);
            let big = scratch.join(format!("reload-{n}"));
            let seed = plan.seed;
            let generated = {
                let target = big.clone();
                blocking(move || {
                    let w = workload::generate(WorkloadSpec { policies: n, seed });
                    w.write_to(&target).map(|()| w)
                })
                .await?
                .map_err(|source| BenchError::Io {
                    what: format!("writing `{}`", big.display()),
                    source,
                })?
            };
            let requests: Arc<Vec<_>> =
                Arc::new(generated.requests.iter().map(|r| r.json.clone()).collect());
            progress(format!(
                "hot reload: decisions while a {n}-policy bundle reloads, against at rest"
            ));
            leash = spawn_in(exe, &big)?;
            child::wait_serving(&mut leash, CHANGE_TIMEOUT).await?;
            let base = read_back(&big)?;
            under_reload(&leash, &big, &base, plan.timing, requests, n).await?
        }
    };
    drop(leash);
    Ok(ReloadReport {
        policies,
        changes: plan.changes,
        write_to_decision,
        under_reload,
    })
}

/// Starts a watching sidecar on `dir/policies` + `dir/schemas`, with its
/// socket in `dir`.
fn spawn_in(exe: &Path, dir: &Path) -> Result<ServerProcess, BenchError> {
    child::spawn_leash(
        exe,
        Some((&dir.join("policies"), &dir.join("schemas"))),
        dir,
    )
}

/// Writes every file of `sources` under `dir` (paths are `policies/...`,
/// `schemas/...`).
fn write_sources(sources: &BundleSources, dir: &Path) -> Result<(), BenchError> {
    for file in sources.files() {
        let path = dir.join(&file.path);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, &file.text));
        written.map_err(|source| BenchError::Io {
            what: format!("writing `{}`", path.display()),
            source,
        })?;
    }
    Ok(())
}

fn read_back(dir: &Path) -> Result<BundleSources, BenchError> {
    BundleSources::read_dirs(&dir.join("policies"), &dir.join("schemas")).map_err(|diagnostics| {
        BenchError::Bundle(crate::bundle::BundleError {
            origin: dir.display().to_string(),
            diagnostics,
        })
    })
}

/// Renames change `n` into place and returns the version it makes.
fn apply_change(dir: &Path, base: &BundleSources, n: u64) -> Result<String, BenchError> {
    let text = format!("// leash bench: reload {n}\n");
    let mut next = base.clone();
    next.policies.retain(|f| f.path != CHANGE_FILE);
    let at = next
        .policies
        .partition_point(|f| f.path.as_str() < CHANGE_FILE);
    next.policies.insert(
        at,
        SourceFile {
            path: CHANGE_FILE.to_owned(),
            text: text.clone(),
        },
    );
    let target = dir.join(CHANGE_FILE);
    let tmp = dir.join("policies/.zz-leash-bench-reload.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &target))
        .map_err(|source| BenchError::Io {
            what: format!("writing `{}`", target.display()),
            source,
        })?;
    Ok(next.version())
}

/// Times `changes` changes from the rename to the first decision that
/// reports the new version.
async fn time_changes(
    leash: &ServerProcess,
    dir: &Path,
    base: &BundleSources,
    changes: usize,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
) -> Result<Stats, BenchError> {
    let mut client = AuthorizerClient::new(connect_uds(&leash.uds).await?);
    let mut hist = driver::histogram()?;
    let mut k = 0usize;
    let began = Instant::now();
    for n in 0..changes {
        let version = apply_change(dir, base, n as u64)?;
        let written = Instant::now();
        loop {
            let response = client
                .is_authorized(requests[k % requests.len()].clone())
                .await
                .map_err(|status| BenchError::Rpc {
                    what: "IsAuthorized".to_owned(),
                    status,
                })?
                .into_inner();
            k += 1;
            if response.policy_version == version {
                break;
            }
            if written.elapsed() > CHANGE_TIMEOUT {
                return Err(BenchError::Timeout {
                    what: format!("change {n} (version {version}) to be served"),
                    stderr: leash.tail(),
                });
            }
        }
        let ns = u64::try_from(written.elapsed().as_nanos()).unwrap_or(u64::MAX);
        hist.saturating_record(ns.max(1));
    }
    Ok(Stats::from_histogram(&hist, began.elapsed()))
}

/// Decision latency at rest, then while reloads run back to back.
async fn under_reload(
    leash: &ServerProcess,
    dir: &Path,
    base: &BundleSources,
    timing: Timing,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
    policies: usize,
) -> Result<UnderReload, BenchError> {
    let steady = leash_run(leash, Transport::Uds, 1, timing, requests.clone()).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(AtomicU64::new(0));
    let admin = AdminClient::new(connect_uds(&leash.uds).await?);
    let reloader = {
        let (stop, reloads, dir, base) =
            (stop.clone(), reloads.clone(), dir.to_owned(), base.clone());
        tokio::spawn(async move {
            let mut n = 1_000_000u64;
            while !stop.load(Ordering::SeqCst) {
                let version = apply_change(&dir, &base, n)?;
                n += 1;
                let written = Instant::now();
                loop {
                    let served = admin
                        .clone()
                        .status(pb::StatusRequest {})
                        .await
                        .map_err(|status| BenchError::Rpc {
                            what: "Admin/Status".to_owned(),
                            status,
                        })?
                        .into_inner()
                        .serving
                        .map(|b| b.version);
                    if served.as_deref() == Some(version.as_str()) {
                        reloads.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if written.elapsed() > CHANGE_TIMEOUT {
                        return Err(BenchError::Task(format!(
                            "reload to version {version} did not finish"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok::<_, BenchError>(())
        })
    };
    // Let the first reload get under way before measuring.
    let reloading = leash_run(
        leash,
        Transport::Uds,
        1,
        Timing {
            warmup: timing.warmup.max(Duration::from_millis(100)),
            measure: timing.measure,
        },
        requests,
    )
    .await;
    let completed = reloads.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    reloader
        .await
        .map_err(|e| BenchError::Task(format!("the reload driver failed: {e}")))??;
    let reloading = reloading?;
    Ok(UnderReload {
        policies,
        p99_ratio: reloading.p99_ns as f64 / steady.p99_ns.max(1) as f64,
        steady,
        reloading,
        reloads_completed: completed,
    })
}
