//! Hot-reload figures: how long from a file written to the first decision
//! made with it, and what a reload in progress does to decision latency.
//!
//! Both run against a real `leash serve` child watching a copy of the bundle
//! in the scratch directory (never the user's own files). Changes are
//! renamed into place and hold only comments: a new version, the same
//! decisions. Write → decision times a one-file policy change (the common
//! case: leash validates only that file); the under-reload run changes the
//! schema, which makes every policy be validated again (the costliest case).

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

/// Decision latency while the sidecar rebuilds its bundle back to back
/// (schema changes: full validation), against the same sidecar at rest.
#[derive(Debug, Clone, Serialize)]
pub struct UnderReload {
    pub policies: usize,
    /// One schema change at rest: file renamed into place → served.
    pub schema_reload_ms: f64,
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
    server: &child::ServerCommand,
    scratch: &Path,
    plan: ReloadPlan,
    sources: &BundleSources,
    policies: usize,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
) -> Result<ReloadReport, BenchError> {
    let dir = scratch.join("reload-main");
    write_sources(sources, &dir)?;
    let mut leash = spawn_in(server, &dir)?;
    child::wait_serving(&mut leash, CHANGE_TIMEOUT).await?;
    progress(format!(
        "hot reload: {} changes, file written → first decision on the new version",
        plan.changes
    ));
    let base = read_back(&dir)?;
    let write_to_decision =
        time_changes(&leash, &dir, &base, plan.changes, requests.clone()).await?;

    let under_reload = match plan.under_reload_policies {
        None => under_reload(&leash, &dir, plan.timing, requests, policies).await?,
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
            leash = spawn_in(server, &big)?;
            child::wait_serving(&mut leash, CHANGE_TIMEOUT).await?;
            under_reload(&leash, &big, plan.timing, requests, n).await?
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
fn spawn_in(server: &child::ServerCommand, dir: &Path) -> Result<ServerProcess, BenchError> {
    child::spawn_leash(
        server,
        Some((&dir.join("policies"), &dir.join("schemas"))),
        dir,
        &[],
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

/// What a change touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A comment-only policy file: the typical one-file policy change.
    Policy,
    /// A comment appended to the first schema file: a schema change, which
    /// makes leash validate every policy again (the most expensive reload).
    Schema,
}

/// Renames change `n` into place and returns the version it makes.
fn apply_change(
    dir: &Path,
    base: &BundleSources,
    n: u64,
    change: Change,
) -> Result<String, BenchError> {
    let mut next = base.clone();
    let (rel, text) = match change {
        Change::Policy => {
            let text = format!("// leash bench: reload {n}\n");
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
            (CHANGE_FILE.to_owned(), text)
        }
        Change::Schema => {
            let Some((_, schema)) = next.schemas.first_mut() else {
                return Err(BenchError::Task("the bundle has no schema file".to_owned()));
            };
            schema.text = format!("{}\n// leash bench: reload {n}\n", schema.text);
            (schema.path.clone(), schema.text.clone())
        }
    };
    let target = dir.join(&rel);
    let tmp = target.with_file_name(".leash-bench-reload.tmp");
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
        let version = apply_change(dir, base, n as u64, Change::Policy)?;
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
    timing: Timing,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
    policies: usize,
) -> Result<UnderReload, BenchError> {
    let steady = leash_run(leash, Transport::Uds, 1, timing, requests.clone()).await?;
    let admin = AdminClient::new(connect_uds(&leash.uds).await?);
    // The files as they are now (earlier changes included).
    let base = &read_back(dir)?;

    // One schema reload at rest sets how long the loaded run lasts: at least
    // two reloads' worth, so that it covers whole reloads, start to end.
    let before = served(&admin).await?;
    let began = Instant::now();
    let version = apply_change(dir, base, 999_999, Change::Schema)?;
    wait_served(&admin, &before, &version, &AtomicBool::new(false)).await?;
    let mut before = version;
    let schema_reload = began.elapsed();

    let stop = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(AtomicU64::new(0));
    let reloader = {
        let (stop, reloads, dir, base) =
            (stop.clone(), reloads.clone(), dir.to_owned(), base.clone());
        tokio::spawn(async move {
            let mut n = 1_000_000u64;
            while !stop.load(Ordering::SeqCst) {
                let version = apply_change(&dir, &base, n, Change::Schema)?;
                n += 1;
                if wait_served(&admin, &before, &version, &stop).await? {
                    reloads.fetch_add(1, Ordering::SeqCst);
                }
                before = version;
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
            measure: timing.measure.max(schema_reload * 2),
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
        schema_reload_ms: schema_reload.as_secs_f64() * 1e3,
        p99_ratio: reloading.p99_ns as f64 / steady.p99_ns.max(1) as f64,
        steady,
        reloading,
        reloads_completed: completed,
    })
}

/// The version a sidecar serves.
async fn served(admin: &AdminClient<tonic::transport::Channel>) -> Result<String, BenchError> {
    Ok(admin
        .clone()
        .status(pb::StatusRequest {})
        .await
        .map_err(|status| BenchError::Rpc {
            what: "Admin/Status".to_owned(),
            status,
        })?
        .into_inner()
        .serving
        .map(|b| b.version)
        .unwrap_or_default())
}

/// Polls `Admin/Status` until `version` is served (true), or `stop` is set
/// (false). `before` is the version served before the change: any third
/// version means the expected one was computed wrong, which is an error
/// rather than a long wait.
async fn wait_served(
    admin: &AdminClient<tonic::transport::Channel>,
    before: &str,
    version: &str,
    stop: &AtomicBool,
) -> Result<bool, BenchError> {
    let began = Instant::now();
    loop {
        let served = served(admin).await?;
        if served == version {
            return Ok(true);
        }
        if served != before {
            return Err(BenchError::Task(format!(
                "the sidecar loaded version {served}, not the expected {version}"
            )));
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if began.elapsed() > CHANGE_TIMEOUT {
            return Err(BenchError::Task(format!(
                "the reload to version {version} did not finish within {} s",
                CHANGE_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
