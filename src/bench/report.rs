//! The benchmark's figures: one serialisable report (written as JSON with
//! `--json`) and its rendering as a table for people.

use std::fmt::Write as _;

use serde::Serialize;

use super::child::Memory;
use super::driver::Stats;
use super::reload::ReloadReport;
use super::workload::{RequestForms, WorkloadShape};
use super::{BenchOptions, Transport};
use crate::engine;

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub leash_version: &'static str,
    pub mode: &'static str,
    pub machine: Machine,
    /// The worker threads the main sidecar said it runs (`None` if it did
    /// not say), and whether the bench set them (`--worker-threads`) or
    /// they are the sidecar's default, one per usable CPU.
    pub sidecar_worker_threads: Option<usize>,
    pub sidecar_worker_threads_set: bool,
    pub note: &'static str,
    pub timing: TimingReport,
    pub bundle: BundleReport,
    pub mix: MixReport,
    pub in_process: InProcess,
    /// What rate and budget limits add to a decision.
    pub limits: super::limits::LimitsReport,
    /// What verifying grants and applying elevations cost.
    pub grants: Option<super::grants::GrantsReport>,
    /// Every sweep point, floor and leash.
    pub runs: Vec<Run>,
    /// leash against floor and in-process, point by point.
    pub pairs: Vec<Pair>,
    /// JSON and typed input over the Unix socket, one in flight.
    pub forms: Vec<FormRun>,
    pub batch: Vec<BatchRun>,
    /// The sidecar's memory once its bundle was loaded, before traffic.
    pub sidecar_memory_loaded: Option<Memory>,
    /// The sidecar's memory after the sweep (`peak_rss_kib` is its high-water mark).
    pub sidecar_memory_after: Option<Memory>,
    /// Hot reload: write → decision latency, decisions during a reload.
    pub reload: Option<ReloadReport>,
    /// Throughput with metrics and spans on and off.
    pub telemetry: Option<super::telemetry::TelemetryReport>,
    /// Latency at half of maximum throughput on a large bundle.
    pub capacity: Option<super::capacity::CapacityReport>,
    pub scale: Vec<ScalePoint>,
    pub ratios: Ratios,
}

/// Where the figures were taken.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub os: String,
    /// `release` or `debug`: debug figures are not representative.
    pub build: &'static str,
}

impl Machine {
    pub fn read() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim().to_owned())
            .unwrap_or_default();
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            os: format!("{} {kernel}", std::env::consts::OS)
                .trim()
                .to_owned(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TimingReport {
    pub warmup_s: f64,
    pub measure_s: f64,
    pub concurrency: Vec<usize>,
    pub batch_size: usize,
    pub seed: u64,
}

impl TimingReport {
    pub fn of(options: &BenchOptions) -> Self {
        Self {
            warmup_s: options.timing.warmup.as_secs_f64(),
            measure_s: options.timing.measure.as_secs_f64(),
            concurrency: options.concurrency.clone(),
            batch_size: options.batch_size,
            seed: options.seed,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BundleReport {
    pub source: String,
    pub policies: usize,
    pub entities: usize,
    pub files: usize,
    pub version: String,
    /// Parse and validate, in memory (fastest of a few builds).
    pub load_ms: f64,
    /// From starting `leash serve` to health SERVING: process start, file
    /// reads, parse, validation.
    pub sidecar_ready_ms: f64,
    pub shape: Option<WorkloadShape>,
}

/// What the request mix is made of.
#[derive(Debug, Clone, Serialize)]
pub struct MixReport {
    pub requests: usize,
    pub delegated: usize,
    pub allowed: usize,
    pub denied: usize,
}

impl MixReport {
    pub fn of(requests: &[RequestForms], decisions: &[engine::Decision]) -> Self {
        let allowed = decisions.iter().filter(|d| d.allowed).count();
        Self {
            requests: requests.len(),
            delegated: requests
                .iter()
                .filter(|r| {
                    r.json
                        .principal
                        .as_ref()
                        .is_some_and(|p| p.on_behalf_of.is_some())
                })
                .count(),
            allowed,
            denied: decisions.len() - allowed,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InProcess {
    pub json: Stats,
    pub typed: Stats,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub transport: Transport,
    /// `floor` or `leash`.
    pub target: &'static str,
    pub concurrency: usize,
    #[serde(flatten)]
    pub stats: Stats,
}

impl Run {
    pub fn new(
        transport: Transport,
        target: &'static str,
        concurrency: usize,
        stats: Stats,
    ) -> Self {
        Self {
            transport,
            target,
            concurrency,
            stats,
        }
    }
}

/// leash against the floor at one point, and against in-process.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub transport: Transport,
    pub concurrency: usize,
    /// leash calls/s ÷ floor calls/s (1.0 would be free).
    pub throughput_vs_floor: f64,
    /// leash p50 ÷ floor p50.
    pub p50_vs_floor: f64,
    /// leash p50 ÷ in-process p50 (JSON form).
    pub p50_vs_in_process: f64,
    /// leash calls/s ÷ in-process decisions/s on one thread.
    pub throughput_vs_in_process: f64,
}

impl Pair {
    pub fn new(
        transport: Transport,
        concurrency: usize,
        floor: &Stats,
        leash: &Stats,
        in_process: &Stats,
    ) -> Self {
        Self {
            transport,
            concurrency,
            throughput_vs_floor: ratio(leash.per_sec, floor.per_sec),
            p50_vs_floor: ratio(leash.p50_ns as f64, floor.p50_ns as f64),
            p50_vs_in_process: ratio(leash.p50_ns as f64, in_process.p50_ns as f64),
            throughput_vs_in_process: ratio(leash.per_sec, in_process.per_sec),
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FormRun {
    pub form: &'static str,
    #[serde(flatten)]
    pub stats: Stats,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchRun {
    pub transport: Transport,
    pub batch_size: usize,
    pub concurrency: usize,
    /// Decisions per second (batches/s × batch size).
    pub decisions_per_sec: f64,
    /// Latency of whole batches.
    #[serde(flatten)]
    pub stats: Stats,
}

impl BatchRun {
    pub fn new(batch_size: usize, concurrency: usize, stats: Stats) -> Self {
        Self {
            transport: Transport::Uds,
            batch_size,
            concurrency,
            decisions_per_sec: stats.per_sec * batch_size as f64,
            stats,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    pub policies: usize,
    pub entities: usize,
    /// The whole build: parse, validate, entities, index.
    pub load_ms: f64,
    /// Parsing the policy files, and building the scope index, within it.
    pub parse_ms: f64,
    pub index_build_ms: f64,
    pub index: Option<crate::bundle::IndexStats>,
    /// Mean policies Cedar evaluated per side with the index.
    pub evaluated_per_side: f64,
    pub sidecar_ready_ms: f64,
    /// With the scope index (the default).
    pub in_process: Stats,
    /// Without it: every policy evaluated.
    pub in_process_full: Stats,
    /// `IsAuthorized` over the Unix socket, one in flight, with the index.
    pub sidecar_uds_1: Stats,
    /// The same with `--policy-index off`.
    pub sidecar_uds_1_full: Stats,
    /// After load, before traffic, with and without the index.
    pub sidecar_memory: Option<Memory>,
    pub sidecar_memory_full: Option<Memory>,
}

/// How flat the scale curve is: in-process p50 at the largest point over
/// the point nearest 100 policies, with and without the index.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ScaleSummary {
    pub base: usize,
    pub largest: usize,
    pub indexed_ratio: f64,
    pub full_ratio: f64,
    /// Index build time ÷ parse time at the largest point.
    pub index_vs_parse: f64,
}

impl ScaleSummary {
    pub fn of(points: &[ScalePoint]) -> Option<Self> {
        let base = points.iter().min_by_key(|p| p.policies.abs_diff(100))?;
        let largest = points.iter().max_by_key(|p| p.policies)?;
        if largest.policies <= base.policies {
            return None;
        }
        let ratio = |a: &Stats, b: &Stats| a.p50_ns as f64 / (b.p50_ns.max(1)) as f64;
        Some(Self {
            base: base.policies,
            largest: largest.policies,
            indexed_ratio: ratio(&largest.in_process, &base.in_process),
            full_ratio: ratio(&largest.in_process_full, &base.in_process_full),
            index_vs_parse: largest.index_build_ms / largest.parse_ms.max(f64::MIN_POSITIVE),
        })
    }
}

/// The headline figures.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// leash ÷ floor throughput over TCP, at the in-flight count where leash
    /// peaked.
    pub tcp_vs_floor: f64,
    pub tcp_peak_concurrency: usize,
    /// The same over the Unix socket.
    pub uds_vs_floor: f64,
    pub uds_peak_concurrency: usize,
    /// In-process conversion + decision, JSON form, median.
    pub in_process_ns_p50: u64,
    /// In-process, typed form, median.
    pub in_process_typed_ns_p50: u64,
    /// Sidecar p50 over the Unix socket at one in flight ÷ in-process p50.
    pub uds_p50_vs_in_process: f64,
    /// Sidecar p50 over TCP at one in flight ÷ in-process p50.
    pub tcp_p50_vs_in_process: f64,
}

impl Ratios {
    pub fn of(pairs: &[Pair], runs: &[Run], in_process: &InProcess) -> Self {
        let peak = |t: Transport| {
            runs.iter()
                .filter(|r| r.transport == t && r.target == "leash")
                .max_by(|a, b| a.stats.per_sec.total_cmp(&b.stats.per_sec))
                .map(|r| r.concurrency)
        };
        let pair_at = |t: Transport, c: Option<usize>| {
            pairs
                .iter()
                .find(|p| p.transport == t && Some(p.concurrency) == c)
        };
        let lowest = |t: Transport| {
            pairs
                .iter()
                .filter(|p| p.transport == t)
                .min_by_key(|p| p.concurrency)
                .map_or(0.0, |p| p.p50_vs_in_process)
        };
        let tcp_peak = peak(Transport::Tcp);
        let uds_peak = peak(Transport::Uds);
        Self {
            tcp_vs_floor: pair_at(Transport::Tcp, tcp_peak).map_or(0.0, |p| p.throughput_vs_floor),
            tcp_peak_concurrency: tcp_peak.unwrap_or(0),
            uds_vs_floor: pair_at(Transport::Uds, uds_peak).map_or(0.0, |p| p.throughput_vs_floor),
            uds_peak_concurrency: uds_peak.unwrap_or(0),
            in_process_ns_p50: in_process.json.p50_ns,
            in_process_typed_ns_p50: in_process.typed.p50_ns,
            uds_p50_vs_in_process: lowest(Transport::Uds),
            tcp_p50_vs_in_process: lowest(Transport::Tcp),
        }
    }
}

/// A duration in nanoseconds, shown in the unit that suits it.
pub fn duration(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

pub(crate) fn rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1}k/s", per_sec / 1e3)
    } else {
        format!("{per_sec:.1}/s")
    }
}

fn mib(memory: Option<Memory>, peak: bool) -> String {
    memory.map_or_else(
        || "n/a".to_owned(),
        |m| {
            let kib = if peak { m.peak_rss_kib } else { m.rss_kib };
            format!("{:.1} MiB", kib as f64 / 1024.0)
        },
    )
}

/// The report as a table for a terminal or a README.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = render_into(report, &mut out);
    out
}

fn render_into(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(
        out,
        "leash bench {} ({} mode, {} build)",
        r.leash_version, r.mode, r.machine.build
    )?;
    writeln!(
        out,
        "machine: {}, {} cores, {}; {}",
        r.machine.cpu, r.machine.cores, r.machine.os, r.note
    )?;
    if let Some(n) = r.sidecar_worker_threads {
        writeln!(
            out,
            "sidecar: {n} worker thread{} ({})",
            if n == 1 { "" } else { "s" },
            if r.sidecar_worker_threads_set {
                "--worker-threads"
            } else {
                "its default, one per usable CPU"
            }
        )?;
    }
    if r.machine.build == "debug" {
        writeln!(
            out,
            "warning: a debug build; figures are not representative (use --release)"
        )?;
    }
    writeln!(
        out,
        "bundle: {}: {} policies, {} entities, {} files; built in {:.1} ms, sidecar serving after {:.0} ms",
        r.bundle.source, r.bundle.policies, r.bundle.entities, r.bundle.files, r.bundle.load_ms, r.bundle.sidecar_ready_ms
    )?;
    writeln!(
        out,
        "mix: {} requests, {} delegated, {} allowed, {} denied; {:.1} s per point after {:.1} s warm-up",
        r.mix.requests, r.mix.delegated, r.mix.allowed, r.mix.denied, r.timing.measure_s, r.timing.warmup_s
    )?;

    writeln!(out, "\nin-process (conversion + decision, one thread)")?;
    writeln!(
        out,
        "  {:<6} {:>10} {:>10} {:>10} {:>12}",
        "form", "p50", "p99", "p99.9", "decisions"
    )?;
    for (form, s) in [("json", &r.in_process.json), ("typed", &r.in_process.typed)] {
        writeln!(
            out,
            "  {:<6} {:>10} {:>10} {:>10} {:>12}",
            form,
            duration(s.p50_ns as f64),
            duration(s.p99_ns as f64),
            duration(s.p999_ns as f64),
            rate(s.per_sec)
        )?;
    }

    writeln!(
        out,
        "\nIsAuthorized (context as JSON) against the empty floor call, same transport"
    )?;
    writeln!(
        out,
        "  {:<4} {:>9} {:>11} {:>11} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "via",
        "in flight",
        "floor",
        "leash",
        "ratio",
        "floor p50",
        "leash p50",
        "leash p99",
        "p99.9",
        "p50 ÷ ip"
    )?;
    for pair in &r.pairs {
        let find = |target: &str| {
            r.runs.iter().find(|run| {
                run.transport == pair.transport
                    && run.concurrency == pair.concurrency
                    && run.target == target
            })
        };
        let (Some(floor), Some(leash)) = (find("floor"), find("leash")) else {
            continue;
        };
        writeln!(
            out,
            "  {:<4} {:>9} {:>11} {:>11} {:>7.2} {:>10} {:>10} {:>10} {:>10} {:>9.1}",
            pair.transport.name(),
            pair.concurrency,
            rate(floor.stats.per_sec),
            rate(leash.stats.per_sec),
            pair.throughput_vs_floor,
            duration(floor.stats.p50_ns as f64),
            duration(leash.stats.p50_ns as f64),
            duration(leash.stats.p99_ns as f64),
            duration(leash.stats.p999_ns as f64),
            pair.p50_vs_in_process
        )?;
    }

    writeln!(out, "\ninput forms over the Unix socket, one in flight")?;
    for f in &r.forms {
        writeln!(
            out,
            "  {:<6} p50 {:>10}  p99 {:>10}  {:>10}",
            f.form,
            duration(f.stats.p50_ns as f64),
            duration(f.stats.p99_ns as f64),
            rate(f.stats.per_sec)
        )?;
    }

    writeln!(out, "\nBatchIsAuthorized over the Unix socket")?;
    for b in &r.batch {
        writeln!(
            out,
            "  batch {:>4}, {:>2} in flight: {:>11} decisions, batch p50 {:>10}, p99 {:>10}",
            b.batch_size,
            b.concurrency,
            rate(b.decisions_per_sec),
            duration(b.stats.p50_ns as f64),
            duration(b.stats.p99_ns as f64)
        )?;
    }
    writeln!(
        out,
        "\nsidecar memory: RSS {} after load, {} after the sweep (peak {})",
        mib(r.sidecar_memory_loaded, false),
        mib(r.sidecar_memory_after, false),
        mib(r.sidecar_memory_after, true)
    )?;

    if let Some(reload) = &r.reload {
        let w = &reload.write_to_decision;
        writeln!(
            out,
            "\nhot reload ({} policies): policy file renamed into place → first decision on the new version, {} changes",
            reload.policies, reload.changes
        )?;
        writeln!(
            out,
            "  p50 {:>10}  p99 {:>10}  max {:>10}",
            duration(w.p50_ns as f64),
            duration(w.p99_ns as f64),
            duration(w.max_ns as f64)
        )?;
        let u = &reload.under_reload;
        writeln!(
            out,
            "decisions while a {}-policy bundle reloads back to back after schema changes (Unix socket, one in flight; {} reloads completed)",
            u.policies, u.reloads_completed
        )?;
        for (label, s) in [("at rest", &u.steady), ("reloading", &u.reloading)] {
            writeln!(
                out,
                "  {:<9} p50 {:>10}  p99 {:>10}  p99.9 {:>10}  {:>10}",
                label,
                duration(s.p50_ns as f64),
                duration(s.p99_ns as f64),
                duration(s.p999_ns as f64),
                rate(s.per_sec)
            )?;
        }
        writeln!(
            out,
            "  p99 reloading ÷ at rest: {:.2}; one schema reload at rest: {}",
            u.p99_ratio,
            duration(u.schema_reload_ms * 1e6)
        )?;
    }

    if let Some(telemetry) = &r.telemetry {
        super::telemetry::render_into(telemetry, out)?;
    }

    if !r.scale.is_empty() {
        writeln!(
            out,
            "\npolicy-scale curve (generated bundles; in-process on one thread; sidecar over the Unix socket, one in flight)"
        )?;
        writeln!(
            out,
            "  {:>8} {:>8} {:>10} {:>9} {:>9} {:>6} | {:>11} {:>11} {:>11} | {:>11} {:>11} {:>11} | {:>8} {:>8}",
            "policies",
            "entities",
            "load",
            "parse",
            "index",
            "eval",
            "in-proc p50",
            "sidecar p50",
            "sidecar p99",
            "full p50",
            "full sc p50",
            "full sc p99",
            "RSS",
            "full RSS"
        )?;
        for p in &r.scale {
            writeln!(
                out,
                "  {:>8} {:>8} {:>10} {:>9} {:>9} {:>6.1} | {:>11} {:>11} {:>11} | {:>11} {:>11} {:>11} | {:>8} {:>8}",
                p.policies,
                p.entities,
                duration(p.load_ms * 1e6),
                duration(p.parse_ms * 1e6),
                duration(p.index_build_ms * 1e6),
                p.evaluated_per_side,
                duration(p.in_process.p50_ns as f64),
                duration(p.sidecar_uds_1.p50_ns as f64),
                duration(p.sidecar_uds_1.p99_ns as f64),
                duration(p.in_process_full.p50_ns as f64),
                duration(p.sidecar_uds_1_full.p50_ns as f64),
                duration(p.sidecar_uds_1_full.p99_ns as f64),
                mib(p.sidecar_memory, false),
                mib(p.sidecar_memory_full, false)
            )?;
        }
        writeln!(
            out,
            "  (eval: policies Cedar evaluates per side with the index; full: --policy-index off)"
        )?;
        if let Some(flat) = ScaleSummary::of(&r.scale) {
            writeln!(
                out,
                "  in-process p50 at {} ÷ at {} policies: {:.2}× with the index, {:.0}× without; \
                 index build ÷ parse at {}: {:.2}",
                flat.largest,
                flat.base,
                flat.indexed_ratio,
                flat.full_ratio,
                flat.largest,
                flat.index_vs_parse
            )?;
        }
    }

    if let Some(capacity) = &r.capacity {
        super::capacity::render_into(capacity, out)?;
    }

    writeln!(
        out,
        "\nlimits (in-process, a @rate on every permit, {} live counter keys; median of {} rounds): \
         p50 {} without, {} with: {:.3}x; counting itself {} per decision, {:.1}% of the p50",
        r.limits.active_keys,
        r.limits.rounds,
        duration(r.limits.p50_without_ns as f64),
        duration(r.limits.p50_with_ns as f64),
        r.limits.ratio,
        duration(r.limits.counting_ns_per_decision),
        r.limits.counting_share * 100.0
    )?;

    if let Some(g) = &r.grants {
        writeln!(
            out,
            "\ngrants (in-process; the example bundle with more users): verifying a grant {}, \
             an elevation whose signature the bundle remembers {}",
            duration(g.verify_ns),
            duration(g.verify_remembered_ns)
        )?;
        for p in &g.points {
            writeln!(
                out,
                "  {:>7} entities: an elevation's first use {} (builds the elevated entity set); \
                 after that p50 {} elevated vs {} without ({:.2}x); a request bringing an entity p50 {} \
                 ({} on a full copy)",
                p.entities,
                duration(p.first_use_ns as f64),
                duration(p.p50_elevated_ns as f64),
                duration(p.p50_without_ns as f64),
                p.p50_elevated_ns as f64 / p.p50_without_ns.max(1) as f64,
                duration(p.p50_request_entity_ns as f64),
                duration(p.p50_request_entity_full_copy_ns as f64)
            )?;
        }
    }

    writeln!(
        out,
        "\nratios: tcp_vs_floor {:.2} (at {} in flight), uds_vs_floor {:.2} (at {} in flight), \
         in_process_ns_p50 {} (typed {}); one in flight, leash p50 is {:.1}× in-process over tcp, {:.1}× over uds",
        r.ratios.tcp_vs_floor,
        r.ratios.tcp_peak_concurrency,
        r.ratios.uds_vs_floor,
        r.ratios.uds_peak_concurrency,
        r.ratios.in_process_ns_p50,
        r.ratios.in_process_typed_ns_p50,
        r.ratios.tcp_p50_vs_in_process,
        r.ratios.uds_p50_vs_in_process
    )?;
    Ok(())
}
