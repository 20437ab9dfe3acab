//! `leash bench`: leash measured against the physical floor, in one run, as
//! ratios.
//!
//! For one request mix it measures
//! - **in-process**: conversion and decision called directly, on one thread;
//! - **floor**: an empty unary gRPC call to a trivial server (`leash
//!   bench-floor`) on the same transport;
//! - **leash**: `IsAuthorized` to a real `leash serve` child process over
//!   loopback TCP and its Unix socket at several in-flight counts, then
//!   `BatchIsAuthorized`;
//! - pairwise ratios (floor and leash measured back to back at each point),
//!   the sidecar's resident memory and the bundle's load time;
//! - hot reload (write → decision) and telemetry's cost (metrics, spans);
//! - a policy-scale curve over generated bundles (10 … 100,000 policies).
//!
//! Client, floor and sidecar share the machine, as an agent and its sidecar
//! share a pod; the report says so. Machines are noisy, so the ratios, which
//! are taken minutes apart at most, mean more than absolute figures.

pub mod capacity;
pub mod child;
pub mod collector;
pub mod driver;
pub mod grants;
pub mod limits;
pub mod machine;
pub mod mix;
pub mod reload;
pub mod report;
pub mod telemetry;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::bundle::{BundleError, BundleSources, Snapshot};
use crate::engine::{self, RequestTime};
use crate::proto::v1 as pb;
use crate::proto::v1::authorizer_client::AuthorizerClient;
use crate::service::convert;
use child::ServerProcess;
use driver::{Stats, Timing};
use report::{
    BatchRun, BundleReport, FormRun, InProcess, MixReport, Pair, Ratios, Report, Run, ScalePoint,
};
use workload::{RequestForms, WorkloadSpec};

/// Fewest calls a point measures, however long they take: enough for a
/// median, and a bound on how long a huge bundle keeps a point running.
const MIN_CALLS: u64 = 20;
/// Fewest batches a batch point measures.
const MIN_BATCHES: u64 = 4;

/// The bundle to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchBundle {
    /// A generated agent deployment with this many policies.
    Generated { policies: usize },
    /// The example bundle built into the binary, with its built-in mix.
    Example,
    /// A bundle on disk, with a request mix from a JSON-lines file.
    Dirs {
        policies: PathBuf,
        schemas: PathBuf,
        requests: PathBuf,
    },
}

/// Everything `leash bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub bundle: BenchBundle,
    pub seed: u64,
    /// Smoke mode: fewer points, shorter runs; under a minute.
    pub quick: bool,
    /// In-flight requests per sweep point.
    pub concurrency: Vec<usize>,
    /// Warm-up and measuring time per point.
    pub timing: Timing,
    /// Requests per `BatchIsAuthorized` call.
    pub batch_size: usize,
    /// Policy counts of the scale curve (empty: no curve).
    pub scale: Vec<usize>,
    /// Measuring time per scale point (in-process and sidecar each).
    pub scale_timing: Timing,
    /// The `leash` executable to start as the sidecar and the floor, and
    /// flags for every sidecar.
    pub server: child::ServerCommand,
    /// Changes timed from file write to decision (0 skips the reload phase).
    pub reload_changes: usize,
    /// Generated bundle size for decisions under reload; `None` uses the
    /// main bundle.
    pub reload_policies: Option<usize>,
    /// Interleaved rounds of the telemetry-cost phase (0 skips it).
    pub telemetry_rounds: usize,
    /// Generated bundle size of the latency-at-half-load phase (`None`
    /// skips it).
    pub capacity_policies: Option<usize>,
    /// Open-loop rounds at half of the maximum, each followed by the floor.
    pub capacity_rounds: usize,
    /// Users added to the example bundle for the grant measurements, one
    /// point each (empty skips the phase).
    pub grant_entities: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{}", .0.render().trim_end())]
    Bundle(BundleError),
    #[error("{origin}{}: {problem}", if *.line > 0 { format!(":{line}") } else { String::new() })]
    Mix {
        origin: String,
        line: usize,
        problem: String,
    },
    #[error("request {index} of the mix is invalid for this bundle: {problem}")]
    InvalidRequest { index: usize, problem: String },
    #[error("cannot start the {name} server: {source}")]
    Spawn {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("the {name} server exited ({status}); its last output:\n{stderr}")]
    ServerExited {
        name: &'static str,
        status: String,
        stderr: String,
    },
    #[error("timed out waiting for {what}; last output:\n{stderr}")]
    Timeout { what: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] crate::check::CheckError),
    #[error("{what} failed: {status}")]
    Rpc { what: String, status: tonic::Status },
    #[error(
        "the sidecar decided request {index} differently from the in-process engine: {detail}"
    )]
    Mismatch { index: usize, detail: String },
    #[error("{0}")]
    Task(String),
}

pub(crate) async fn connect_uds(path: &Path) -> Result<Channel, BenchError> {
    Ok(crate::check::channel_uds(path.to_owned()).await?)
}

/// Progress for people, on stderr; the table goes to stdout.
fn progress(message: impl AsRef<str>) {
    eprintln!("bench: {}", message.as_ref());
}

/// The bundle and mix, ready to measure.
struct Prepared {
    sources: BundleSources,
    requests: Vec<RequestForms>,
    shape: Option<workload::WorkloadShape>,
    /// Directories `leash serve` reads; `None` for the built-in example.
    dirs: Option<(PathBuf, PathBuf)>,
}

fn prepare(options: &BenchOptions, scratch: &Path) -> Result<Prepared, BenchError> {
    match &options.bundle {
        BenchBundle::Generated { policies } => {
            let workload = workload::generate(WorkloadSpec {
                policies: *policies,
                seed: options.seed,
            });
            let dir = scratch.join("bundle");
            workload.write_to(&dir).map_err(|source| BenchError::Io {
                what: format!("writing the generated bundle to `{}`", dir.display()),
                source,
            })?;
            Ok(Prepared {
                sources: workload.sources,
                requests: workload.requests,
                shape: Some(workload.shape),
                dirs: Some((dir.join("policies"), dir.join("schemas"))),
            })
        }
        BenchBundle::Example => Ok(Prepared {
            sources: BundleSources::embedded(),
            requests: mix::parse("built-in example mix", mix::EXAMPLE_MIX)?,
            shape: None,
            dirs: None,
        }),
        BenchBundle::Dirs {
            policies,
            schemas,
            requests,
        } => {
            let text = std::fs::read_to_string(requests).map_err(|source| BenchError::Io {
                what: format!("--requests: cannot read `{}`", requests.display()),
                source,
            })?;
            let sources = BundleSources::read_dirs(policies, schemas).map_err(|diagnostics| {
                BenchError::Bundle(BundleError {
                    origin: format!("{} + {}", policies.display(), schemas.display()),
                    diagnostics,
                })
            })?;
            Ok(Prepared {
                sources,
                requests: mix::parse(&requests.display().to_string(), &text)?,
                shape: None,
                dirs: Some((policies.clone(), schemas.clone())),
            })
        }
    }
}

/// Builds the snapshot `reps` times (at most, within about a second) and
/// returns it with the fastest build time: the cost of parsing and
/// validating, without the noise of a busy moment.
fn measure_load(sources: &BundleSources, reps: usize) -> Result<(Snapshot, Duration), BenchError> {
    let began = Instant::now();
    let mut snapshot = Snapshot::build(sources).map_err(BenchError::Bundle)?;
    let mut best = began.elapsed();
    let budget = Instant::now() + Duration::from_secs(1);
    for _ in 1..reps {
        if Instant::now() > budget {
            break;
        }
        let t = Instant::now();
        snapshot = Snapshot::build(sources).map_err(BenchError::Bundle)?;
        best = best.min(t.elapsed());
    }
    Ok((snapshot, best))
}

/// What the in-process engine decides for each request of the mix, for
/// the mix summary and to check the sidecar against.
fn decide_all(
    snapshot: &Snapshot,
    requests: &[RequestForms],
) -> Result<Vec<engine::Decision>, BenchError> {
    let now = RequestTime::now();
    requests
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let json = convert::request(&r.json)
                .and_then(|req| engine::decide(snapshot, &req, &now))
                .map_err(|e| BenchError::InvalidRequest {
                    index,
                    problem: e.to_string(),
                })?;
            let typed = convert::request(&r.typed)
                .and_then(|req| engine::decide(snapshot, &req, &now))
                .map_err(|e| BenchError::InvalidRequest {
                    index,
                    problem: format!("(typed form) {e}"),
                })?;
            if json.allowed != typed.allowed || json.determining != typed.determining {
                return Err(BenchError::Mismatch {
                    index,
                    detail: "its JSON and typed forms decide differently".to_owned(),
                });
            }
            Ok(json)
        })
        .collect()
}

/// Conversion plus decision, on this thread, for one input form.
fn in_process(
    snapshot: &Snapshot,
    requests: &[RequestForms],
    typed: bool,
    timing: Timing,
    min_calls: u64,
) -> Result<Stats, BenchError> {
    driver::time_sync(timing, min_calls, |i| {
        let r = &requests[i % requests.len()];
        let req = if typed { &r.typed } else { &r.json };
        let now = RequestTime::now();
        let decision = convert::request(req)
            .and_then(|req| engine::decide(snapshot, &req, &now))
            .map_err(|e| BenchError::InvalidRequest {
                index: i % requests.len(),
                problem: e.to_string(),
            })?;
        std::hint::black_box(decision);
        Ok(())
    })
}

/// The two transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Uds,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Uds => "uds",
        }
    }
}

async fn channel(process: &ServerProcess, transport: Transport) -> Result<Channel, BenchError> {
    match transport {
        Transport::Tcp => Ok(crate::check::channel_tcp(&process.tcp.to_string()).await?),
        Transport::Uds => connect_uds(&process.uds).await,
    }
}

async fn floor_run(
    process: &ServerProcess,
    transport: Transport,
    concurrency: usize,
    timing: Timing,
) -> Result<Stats, BenchError> {
    let client = child::floor_client(channel(process, transport).await?);
    driver::drive(concurrency, timing, MIN_CALLS, move |_| {
        let mut client = client.clone();
        async move {
            client
                .empty(crate::proto::bench::v1::EmptyRequest {})
                .await
                .map(|_| ())
                .map_err(|status| BenchError::Rpc {
                    what: "Floor/Empty".to_owned(),
                    status,
                })
        }
    })
    .await
}

async fn leash_run(
    process: &ServerProcess,
    transport: Transport,
    concurrency: usize,
    timing: Timing,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
) -> Result<Stats, BenchError> {
    leash_run_counted(process, transport, concurrency, timing, requests)
        .await
        .map(|(stats, _)| stats)
}

/// [`leash_run`], also returning every call made, warm-up included.
pub(crate) async fn leash_run_counted(
    process: &ServerProcess,
    transport: Transport,
    concurrency: usize,
    timing: Timing,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
) -> Result<(Stats, u64), BenchError> {
    let client = AuthorizerClient::new(channel(process, transport).await?);
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = calls.clone();
    let stats = driver::drive(concurrency, timing, MIN_CALLS, move |i| {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut client = client.clone();
        let request = requests[i % requests.len()].clone();
        async move {
            let response =
                client
                    .is_authorized(request)
                    .await
                    .map_err(|status| BenchError::Rpc {
                        what: "IsAuthorized".to_owned(),
                        status,
                    })?;
            std::hint::black_box(response);
            Ok(())
        }
    })
    .await?;
    Ok((stats, calls.load(std::sync::atomic::Ordering::Relaxed)))
}

async fn batch_run(
    process: &ServerProcess,
    concurrency: usize,
    timing: Timing,
    batches: Arc<Vec<pb::BatchIsAuthorizedRequest>>,
) -> Result<Stats, BenchError> {
    let client = AuthorizerClient::new(channel(process, Transport::Uds).await?);
    driver::drive(concurrency, timing, MIN_BATCHES, move |i| {
        let mut client = client.clone();
        let batch = batches[i % batches.len()].clone();
        async move {
            let response =
                client
                    .batch_is_authorized(batch)
                    .await
                    .map_err(|status| BenchError::Rpc {
                        what: "BatchIsAuthorized".to_owned(),
                        status,
                    })?;
            std::hint::black_box(response);
            Ok(())
        }
    })
    .await
}

/// Sends every request once over the Unix socket and checks the sidecar
/// decides as the in-process engine does: the figures are of real decisions.
/// The engine decides each request just before and just after the sidecar
/// does, and the sidecar must agree with one of the two: a policy on
/// `context.leash.now` may change its answer while the call is in flight,
/// and each side reads its own clock.
async fn check_sidecar(
    process: &ServerProcess,
    snapshot: &Snapshot,
    requests: &[RequestForms],
) -> Result<(), BenchError> {
    let mut client = AuthorizerClient::new(connect_uds(&process.uds).await?);
    let in_process = |index: usize, r: &RequestForms| {
        convert::request(&r.json)
            .and_then(|req| engine::decide(snapshot, &req, &RequestTime::now()))
            .map_err(|e| BenchError::InvalidRequest {
                index,
                problem: e.to_string(),
            })
    };
    for (index, r) in requests.iter().enumerate() {
        let before = in_process(index, r)?;
        let got = client
            .is_authorized(r.json.clone())
            .await
            .map_err(|status| BenchError::Rpc {
                what: format!("IsAuthorized (request {index})"),
                status,
            })?
            .into_inner();
        let after = in_process(index, r)?;
        let agrees = |want: &engine::Decision| {
            let code = if want.allowed {
                pb::Decision::Allow
            } else {
                pb::Decision::Deny
            };
            got.decision == code as i32 && got.determining_policies == want.determining
        };
        if !agrees(&before) && !agrees(&after) {
            return Err(BenchError::Mismatch {
                index,
                detail: format!(
                    "sidecar {:?} {:?}, in-process allowed={} {:?}",
                    got.decision, got.determining_policies, after.allowed, after.determining
                ),
            });
        }
    }
    Ok(())
}

/// Runs the whole benchmark and returns its report.
pub async fn run(options: &BenchOptions) -> Result<Report, BenchError> {
    let scratch = tempfile::Builder::new()
        .prefix("leash-bench-")
        .tempdir()
        .map_err(|source| BenchError::Io {
            what: "creating a scratch directory".to_owned(),
            source,
        })?;
    let machine = report::Machine::read();
    progress(format!(
        "{} mode, {} build, on {} ({} cores); client, floor and sidecar share this machine",
        if options.quick { "quick" } else { "full" },
        machine.build,
        machine.cpu,
        machine.cores
    ));

    // The bundle, its load time, and what the engine decides for the mix.
    let prepared = {
        let options = options.clone();
        let dir = scratch.path().to_owned();
        blocking(move || prepare(&options, &dir)).await??
    };
    let prepared = Arc::new(prepared);
    let (snapshot, load) = {
        let p = prepared.clone();
        let reps = if options.quick { 1 } else { 5 };
        blocking(move || measure_load(&p.sources, reps)).await??
    };
    let snapshot = Arc::new(snapshot);
    progress(format!(
        "bundle: {} ({} policies, {} entities) built in {:.1} ms",
        prepared.sources.origin,
        snapshot.policy_count(),
        snapshot.entity_count(),
        load.as_secs_f64() * 1e3
    ));
    let expected = {
        let (s, p) = (snapshot.clone(), prepared.clone());
        blocking(move || decide_all(&s, &p.requests)).await??
    };
    let mix = MixReport::of(&prepared.requests, &expected);

    progress("in-process: conversion + decision, one thread");
    let (in_json, in_typed) = {
        let (s, p, t) = (snapshot.clone(), prepared.clone(), options.timing);
        blocking(move || {
            Ok::<_, BenchError>((
                in_process(&s, &p.requests, false, t, MIN_CALLS)?,
                in_process(&s, &p.requests, true, t, MIN_CALLS)?,
            ))
        })
        .await??
    };
    let in_process_report = InProcess {
        json: in_json,
        typed: in_typed,
    };

    progress(format!(
        "limits: in-process with a limit on every permit and {} live counter keys, against none",
        limits::ACTIVE_KEYS
    ));
    let limits_report = {
        let (s, p, t) = (snapshot.clone(), prepared.clone(), options.timing);
        blocking(move || limits::measure(&p.sources, &s, &p.requests, t, MIN_CALLS)).await??
    };

    let grants_report = if options.grant_entities.is_empty() {
        None
    } else {
        progress(format!(
            "grants: verifying a grant; an elevation's first use and later ones, the example bundle with {} more users",
            options
                .grant_entities
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let (sizes, t) = (options.grant_entities.clone(), options.scale_timing);
        Some(blocking(move || grants::measure(&sizes, t, MIN_CALLS)).await??)
    };

    // The servers under test.
    let floor = child::spawn_floor(&options.server.exe, scratch.path())?;
    let dirs = prepared
        .dirs
        .as_ref()
        .map(|(p, s)| (p.as_path(), s.as_path()));
    let mut leash = child::spawn_leash(&options.server, dirs, scratch.path(), &[])?;
    let ready = child::wait_serving(&mut leash, Duration::from_secs(600)).await?;
    let workers = leash.worker_threads();
    let memory_loaded = leash.memory();
    check_sidecar(&leash, &snapshot, &prepared.requests).await?;
    progress(format!(
        "sidecar pid {} serving after {:.0} ms; decisions match the in-process engine",
        leash.pid(),
        ready.as_secs_f64() * 1e3
    ));

    let json_requests: Arc<Vec<_>> =
        Arc::new(prepared.requests.iter().map(|r| r.json.clone()).collect());
    let typed_requests: Arc<Vec<_>> =
        Arc::new(prepared.requests.iter().map(|r| r.typed.clone()).collect());

    // The sweep: floor and leash back to back at each point, so each ratio
    // compares two runs taken seconds apart.
    let mut runs = Vec::new();
    let mut pairs = Vec::new();
    for transport in [Transport::Tcp, Transport::Uds] {
        for &c in &options.concurrency {
            progress(format!(
                "{} with {c} in flight: floor, then leash",
                transport.name()
            ));
            let f = floor_run(&floor, transport, c, options.timing).await?;
            let l = leash_run(&leash, transport, c, options.timing, json_requests.clone()).await?;
            runs.push(Run::new(transport, "floor", c, f));
            runs.push(Run::new(transport, "leash", c, l));
            pairs.push(Pair::new(transport, c, &f, &l, &in_process_report.json));
        }
    }

    // Input forms over the wire, one in flight on the Unix socket.
    progress("input forms over the Unix socket");
    let forms = vec![
        FormRun {
            form: "json",
            stats: leash_run(
                &leash,
                Transport::Uds,
                1,
                options.timing,
                json_requests.clone(),
            )
            .await?,
        },
        FormRun {
            form: "typed",
            stats: leash_run(
                &leash,
                Transport::Uds,
                1,
                options.timing,
                typed_requests.clone(),
            )
            .await?,
        },
    ];

    // Batches.
    let batch_size = options.batch_size.max(1);
    let batches: Arc<Vec<pb::BatchIsAuthorizedRequest>> = Arc::new(
        (0..prepared.requests.len().max(1))
            .step_by(batch_size.min(prepared.requests.len().max(1)))
            .map(|start| pb::BatchIsAuthorizedRequest {
                requests: (0..batch_size)
                    .map(|k| json_requests[(start + k) % json_requests.len()].clone())
                    .collect(),
            })
            .collect(),
    );
    let mut batch = Vec::new();
    for c in [1usize, 4] {
        progress(format!("BatchIsAuthorized of {batch_size}, {c} in flight"));
        let stats = batch_run(&leash, c, options.timing, batches.clone()).await?;
        batch.push(BatchRun::new(batch_size, c, stats));
    }
    let memory_after = leash.memory();
    drop(leash);
    drop(floor);

    // Telemetry's cost, on sidecars of its own.
    let telemetry = if options.telemetry_rounds > 0 {
        Some(
            telemetry::measure(
                &options.server,
                scratch.path(),
                dirs,
                options.telemetry_rounds,
                options.timing,
                json_requests.clone(),
            )
            .await?,
        )
    } else {
        None
    };

    // Hot reload, on its own sidecars watching copies of the bundle.
    let reload = if options.reload_changes > 0 {
        Some(
            reload::measure(
                &options.server,
                scratch.path(),
                reload::ReloadPlan {
                    changes: options.reload_changes,
                    under_reload_policies: options.reload_policies,
                    timing: options.timing,
                    seed: options.seed,
                },
                &prepared.sources,
                snapshot.policy_count(),
                json_requests.clone(),
            )
            .await?,
        )
    } else {
        None
    };

    // The policy-scale curve, on generated bundles.
    let mut scale = Vec::new();
    for &policies in &options.scale {
        scale.push(scale_point(options, policies, scratch.path()).await?);
    }

    // Latency at half of maximum throughput on a large bundle.
    let capacity = match options.capacity_policies {
        Some(policies) => Some(
            capacity::measure(
                &options.server,
                scratch.path(),
                &capacity::CapacityPlan {
                    policies,
                    seed: options.seed,
                    timing: options.timing,
                    concurrency: if options.quick {
                        vec![16]
                    } else {
                        vec![4, 16, 64]
                    },
                    rounds: options.capacity_rounds,
                },
            )
            .await?,
        ),
        None => None,
    };

    let ratios = Ratios::of(&pairs, &runs, &in_process_report);
    Ok(Report {
        leash_version: env!("CARGO_PKG_VERSION"),
        mode: if options.quick { "quick" } else { "full" },
        machine,
        sidecar_worker_threads: workers,
        sidecar_worker_threads_set: options.server.worker_threads.is_some(),
        note: "client, floor server and sidecar run on the same machine and share its cores",
        timing: report::TimingReport::of(options),
        bundle: BundleReport {
            source: prepared.sources.origin.clone(),
            policies: snapshot.policy_count(),
            entities: snapshot.entity_count(),
            files: snapshot.files.len(),
            version: snapshot.version.clone(),
            load_ms: load.as_secs_f64() * 1e3,
            sidecar_ready_ms: ready.as_secs_f64() * 1e3,
            shape: prepared.shape,
        },
        mix,
        in_process: in_process_report,
        limits: limits_report,
        grants: grants_report,
        runs,
        pairs,
        forms,
        batch,
        sidecar_memory_loaded: memory_loaded,
        sidecar_memory_after: memory_after,
        reload,
        telemetry,
        scale,
        capacity,
        ratios,
    })
}

/// One point of the policy-scale curve: build times, in-process and sidecar
/// latency, and sidecar memory, for a generated bundle of `policies`, each
/// with the scope index and without it.
async fn scale_point(
    options: &BenchOptions,
    policies: usize,
    scratch: &Path,
) -> Result<ScalePoint, BenchError> {
    progress(format!("scale: {policies} policies"));
    let seed = options.seed;
    let dir = scratch.join(format!("scale-{policies}"));
    let built = {
        let dir = dir.clone();
        blocking(move || {
            let workload = workload::generate(WorkloadSpec { policies, seed });
            workload.write_to(&dir).map_err(|source| BenchError::Io {
                what: format!("writing `{}`", dir.display()),
                source,
            })?;
            let (snapshot, load) = measure_load(&workload.sources, 1)?;
            Ok::<_, BenchError>((workload, snapshot, load))
        })
        .await??
    };
    let (workload, snapshot, load) = built;
    let workload = Arc::new(workload);
    let (timings, index) = (snapshot.timings, snapshot.index.as_ref().map(|i| i.stats()));
    let (indexed, full, evaluated_per_side) = {
        let (w, t) = (workload.clone(), options.scale_timing);
        blocking(move || {
            let mut snapshot = snapshot;
            let evaluated = evaluated_per_side(&snapshot, &w.requests);
            let indexed = in_process(&snapshot, &w.requests, false, t, 3)?;
            snapshot.index = None;
            let full = in_process(&snapshot, &w.requests, false, t, 3)?;
            Ok::<_, BenchError>((indexed, full, evaluated))
        })
        .await??
    };
    let requests: Arc<Vec<_>> =
        Arc::new(workload.requests.iter().map(|r| r.json.clone()).collect());
    let mut sidecar = Vec::with_capacity(2);
    for extra in [
        &[][..],
        &["--policy-index".to_owned(), "off".to_owned()][..],
    ] {
        let mut leash = child::spawn_leash(
            &options.server,
            Some((&dir.join("policies"), &dir.join("schemas"))),
            scratch,
            extra,
        )?;
        let ready = child::wait_serving(&mut leash, Duration::from_secs(900)).await?;
        let memory = leash.memory();
        let stats = leash_run(
            &leash,
            Transport::Uds,
            1,
            options.scale_timing,
            requests.clone(),
        )
        .await?;
        sidecar.push((ready, memory, stats));
    }
    let [(ready, memory, on), (_, memory_full, off)] = <[_; 2]>::try_from(sidecar)
        .map_err(|_| BenchError::Task("a scale point lost a sidecar run".to_owned()))?;
    Ok(ScalePoint {
        policies,
        entities: workload.shape.agents
            + workload.shape.users
            + workload.shape.roles
            + workload.shape.tenants
            + workload.shape.records,
        load_ms: load.as_secs_f64() * 1e3,
        parse_ms: timings.parse.as_secs_f64() * 1e3,
        index_build_ms: timings.index.as_secs_f64() * 1e3,
        index,
        evaluated_per_side,
        sidecar_ready_ms: ready.as_secs_f64() * 1e3,
        in_process: indexed,
        in_process_full: full,
        sidecar_uds_1: on,
        sidecar_uds_1_full: off,
        sidecar_memory: memory,
        sidecar_memory_full: memory_full,
    })
}

/// Mean number of policies the index leaves Cedar to evaluate per side of
/// the mix's requests (0 without an index).
fn evaluated_per_side(snapshot: &Snapshot, requests: &[RequestForms]) -> f64 {
    let Some(index) = &snapshot.index else {
        return 0.0;
    };
    let (mut policies, mut sides) = (0usize, 0usize);
    for r in requests {
        let Ok(req) = convert::request(&r.json) else {
            continue;
        };
        for principal in std::iter::once(&req.agent).chain(req.on_behalf_of.as_ref()) {
            if let Some(set) =
                index.narrow(principal, &req.action, &req.resource, &snapshot.entities)
            {
                policies += set.policies().count();
                sides += 1;
            }
        }
    }
    policies as f64 / sides.max(1) as f64
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BenchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BenchError::Task(format!("a benchmark step failed: {e}")))
}
