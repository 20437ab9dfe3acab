//! What telemetry costs: the same load against sidecars that differ only in
//! their telemetry settings, in interleaved rounds (so drift on a shared
//! machine touches every mode alike), the median round kept per mode.
//!
//! - `off`: no admin listener (so no metrics) and no spans;
//! - `metrics`: the default: metrics on, no spans;
//! - `traces-grpc` / `traces-http`: metrics and every decision a span
//!   (`always_on`), exported over OTLP/gRPC or OTLP/HTTP to a collector in
//!   the bench process that counts what arrives;
//! - `traces-stuck`: the same with a collector that accepts and never
//!   answers: spans are dropped, decisions must not notice;
//! - `audit-disk` / `audit-queued`: metrics and the audit trail in a file,
//!   each decision answered once its record is synced to disk, or once it
//!   is queued for the writer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::child::{self, ServerProcess};
use super::collector::SpanCollector;
use super::driver::{Stats, Timing};
use super::{leash_run_counted, progress, BenchError, Transport};
use crate::proto::v1 as pb;

/// In-flight requests of every run: enough to keep both cores busy.
pub const IN_FLIGHT: usize = 16;

/// One mode's median round.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryRun {
    pub mode: &'static str,
    pub stats: Stats,
    /// Throughput as a share of `off` (1.0 = no cost).
    pub vs_off: f64,
    /// The sidecar's own CPU time per decision (user + system, all its
    /// threads, over every call of the median round): what telemetry costs
    /// leash itself, apart from the client and collector on the same cores.
    pub sidecar_cpu_us_per_decision: f64,
    /// Spans the collector received during the mode's rounds.
    pub spans_received: u64,
    /// Spans the sidecar reported dropped (`leash_spans_dropped_total`).
    pub spans_dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TelemetryReport {
    pub in_flight: usize,
    pub rounds: usize,
    pub runs: Vec<TelemetryRun>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Metrics,
    TracesGrpc,
    TracesHttp,
    TracesStuck,
    AuditDisk,
    AuditQueued,
}

impl Mode {
    const ALL: [Mode; 7] = [
        Mode::Off,
        Mode::Metrics,
        Mode::TracesGrpc,
        Mode::TracesHttp,
        Mode::TracesStuck,
        Mode::AuditDisk,
        Mode::AuditQueued,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Metrics => "metrics",
            Mode::TracesGrpc => "traces-grpc",
            Mode::TracesHttp => "traces-http",
            Mode::TracesStuck => "traces-stuck",
            Mode::AuditDisk => "audit-disk",
            Mode::AuditQueued => "audit-queued",
        }
    }
}

/// Runs every mode `rounds` times over the Unix socket with the bundle in
/// `dirs` (or the built-in one).
pub async fn measure(
    server: &child::ServerCommand,
    scratch: &Path,
    dirs: Option<(&Path, &Path)>,
    rounds: usize,
    timing: Timing,
    requests: Arc<Vec<pb::IsAuthorizedRequest>>,
) -> Result<TelemetryReport, BenchError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| BenchError::Io { what, source }
    };
    let collector = SpanCollector::start(false)
        .await
        .map_err(io("starting the span collector"))?;
    let stuck = SpanCollector::start(false)
        .await
        .map_err(io("starting the stuck span collector"))?;
    stuck.hang();

    let mut samples: Vec<Vec<(Stats, f64)>> = vec![Vec::new(); Mode::ALL.len()];
    let mut received = vec![0u64; Mode::ALL.len()];
    let mut dropped = vec![0u64; Mode::ALL.len()];
    for round in 0..rounds {
        for (i, mode) in Mode::ALL.into_iter().enumerate() {
            progress(format!(
                "telemetry: {} (round {} of {rounds}), {IN_FLIGHT} in flight",
                mode.name(),
                round + 1
            ));
            let dir = scratch.join(format!("telemetry-{}-{round}", mode.name()));
            std::fs::create_dir_all(&dir).map_err(io("creating a scratch directory"))?;
            let extra = flags(mode, &collector, &stuck, &dir);
            let mut leash = child::spawn_leash(server, dirs, &dir, &extra)?;
            child::wait_serving(&mut leash, Duration::from_secs(600)).await?;
            let before = collector.span_count();
            let cpu_before = leash.cpu_time();
            let (stats, calls) =
                leash_run_counted(&leash, Transport::Uds, IN_FLIGHT, timing, requests.clone())
                    .await?;
            let cpu_us = leash.cpu_us_per_call(cpu_before, calls).unwrap_or(0.0);
            dropped[i] += spans_dropped(&leash).await;
            // SIGTERM: the sidecar drains and flushes its span queue.
            leash.terminate(Duration::from_secs(30)).await;
            if matches!(mode, Mode::TracesGrpc | Mode::TracesHttp) {
                // Spans still on their way after the sidecar's flush.
                collector
                    .wait_for(before + stats.calls, Duration::from_secs(5))
                    .await;
            }
            received[i] += collector.span_count() - before;
            samples[i].push((stats, cpu_us));
        }
    }
    // The median round by throughput, and the median CPU cost on its own.
    let medians: Vec<(Stats, f64)> = samples
        .into_iter()
        .map(|mut runs| {
            let mut cpu: Vec<f64> = runs.iter().map(|(_, c)| *c).collect();
            cpu.sort_by(f64::total_cmp);
            let cpu = cpu.get(cpu.len() / 2).copied().unwrap_or(0.0);
            runs.sort_by(|a, b| a.0.per_sec.total_cmp(&b.0.per_sec));
            (runs.swap_remove(runs.len() / 2).0, cpu)
        })
        .collect();
    let off = medians.first().map_or(0.0, |(s, _)| s.per_sec);
    let runs = Mode::ALL
        .into_iter()
        .zip(medians)
        .enumerate()
        .map(|(i, (mode, (stats, cpu)))| TelemetryRun {
            mode: mode.name(),
            vs_off: if off > 0.0 { stats.per_sec / off } else { 0.0 },
            sidecar_cpu_us_per_decision: cpu,
            stats,
            spans_received: received[i],
            spans_dropped: dropped[i],
        })
        .collect();
    Ok(TelemetryReport {
        in_flight: IN_FLIGHT,
        rounds,
        runs,
    })
}

fn flags(mode: Mode, collector: &SpanCollector, stuck: &SpanCollector, dir: &Path) -> Vec<String> {
    let audited = |sync: &str| {
        vec![
            "--audit-log".to_owned(),
            dir.join("audit.log").display().to_string(),
            "--audit-sync".to_owned(),
            sync.to_owned(),
        ]
    };
    let traced = |endpoint: String, protocol: &str| {
        vec![
            "--otlp-endpoint".to_owned(),
            endpoint,
            "--otlp-protocol".to_owned(),
            protocol.to_owned(),
            "--otel-traces-sampler".to_owned(),
            "always_on".to_owned(),
        ]
    };
    match mode {
        Mode::Off => vec!["--admin-listen".to_owned(), "none".to_owned()],
        Mode::Metrics => Vec::new(),
        Mode::TracesGrpc => traced(collector.grpc_endpoint(), "grpc"),
        Mode::TracesHttp => traced(collector.http_endpoint(), "http/protobuf"),
        Mode::TracesStuck => traced(stuck.grpc_endpoint(), "grpc"),
        Mode::AuditDisk => audited("disk"),
        Mode::AuditQueued => audited("queued"),
    }
}

/// `leash_spans_dropped_total` of a running sidecar, all reasons.
async fn spans_dropped(leash: &ServerProcess) -> u64 {
    let Some(addr) = leash.admin_addr() else {
        return 0;
    };
    match child::http_get(addr, "GET", "/metrics").await {
        Ok((200, text)) => ["queue_full", "export_failed", "shutdown"]
            .iter()
            .map(|reason| {
                child::metric(
                    &text,
                    &format!("leash_spans_dropped_total{{reason=\"{reason}\"}}"),
                )
                .unwrap_or(0.0) as u64
            })
            .sum(),
        _ => 0,
    }
}

/// The report's telemetry table.
pub fn render_into(t: &TelemetryReport, out: &mut String) -> std::fmt::Result {
    use std::fmt::Write as _;
    writeln!(
        out,
        "\ntelemetry and audit cost (Unix socket, {} in flight, median of {} interleaved rounds; traces sample every decision)",
        t.in_flight, t.rounds
    )?;
    writeln!(
        out,
        "  {:<13} {:>10} {:>7} {:>10} {:>10} {:>13} {:>14} {:>13}",
        "mode", "rate", "vs off", "p50", "p99", "sidecar CPU", "spans received", "spans dropped"
    )?;
    for run in &t.runs {
        writeln!(
            out,
            "  {:<13} {:>10} {:>6.0}% {:>10} {:>10} {:>8.1} µs/d {:>14} {:>13}",
            run.mode,
            super::report::rate(run.stats.per_sec),
            run.vs_off * 100.0,
            super::report::duration(run.stats.p50_ns as f64),
            super::report::duration(run.stats.p99_ns as f64),
            run.sidecar_cpu_us_per_decision,
            run.spans_received,
            run.spans_dropped
        )?;
    }
    Ok(())
}
