//! Closed-loop load: `concurrency` callers, each sending its next call as
//! soon as the last one answered, for a fixed time after a warm-up. Latency
//! goes into HDR histograms (one per caller, merged), so percentiles are
//! exact to three significant digits without keeping every sample.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::BenchError;

/// Latency and throughput of one measured run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Calls completed inside the measured window.
    pub calls: u64,
    /// Calls per second over the measured window.
    pub per_sec: f64,
    pub mean_ns: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl Stats {
    /// Summarises `hist` (nanoseconds) measured over `window`.
    pub fn from_histogram(hist: &Histogram<u64>, window: Duration) -> Self {
        let calls = hist.len();
        let secs = window.as_secs_f64();
        Self {
            calls,
            per_sec: if secs > 0.0 { calls as f64 / secs } else { 0.0 },
            mean_ns: hist.mean(),
            p50_ns: hist.value_at_quantile(0.50),
            p99_ns: hist.value_at_quantile(0.99),
            p999_ns: hist.value_at_quantile(0.999),
            max_ns: hist.max(),
        }
    }
}

/// A histogram for nanosecond latencies from 1 ns to one hour, three
/// significant digits.
pub fn histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| BenchError::Task(format!("cannot make a histogram: {e}")))
}

/// How long to warm up and measure.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
}

/// Runs `call(i)` from `concurrency` tasks: a warm-up of `timing.warmup`
/// (discarded), then calls are measured until `timing.measure` has passed
/// and at least `min_calls` were measured, so that slow calls (large
/// batches, huge bundles) still give figures. `i` counts calls across all
/// tasks, so callers walk a request mix in order. Throughput is measured
/// calls over the time from the end of the warm-up to the last measured
/// answer. The first failed call ends the run.
pub async fn drive<F, Fut>(
    concurrency: usize,
    timing: Timing,
    min_calls: u64,
    call: F,
) -> Result<Stats, BenchError>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let measured = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + timing.warmup;
    let stop_at = measure_from + timing.measure;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let call = call.clone();
        let next = next.clone();
        let measured = measured.clone();
        tasks.spawn(async move {
            let mut hist = histogram()?;
            let mut last_end = measure_from;
            loop {
                let began = Instant::now();
                if began >= stop_at && measured.load(Ordering::Relaxed) >= min_calls {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                call(i).await?;
                let ended = Instant::now();
                if began >= measure_from {
                    let ns = u64::try_from((ended - began).as_nanos()).unwrap_or(u64::MAX);
                    hist.saturating_record(ns.max(1));
                    measured.fetch_add(1, Ordering::Relaxed);
                    last_end = ended;
                }
            }
            Ok::<_, BenchError>((hist, last_end))
        });
    }
    let mut total = histogram()?;
    let mut window_end = measure_from;
    while let Some(joined) = tasks.join_next().await {
        let (hist, last_end) = joined.map_err(|e| BenchError::Task(e.to_string()))??;
        window_end = window_end.max(last_end);
        total
            .add(&hist)
            .map_err(|e| BenchError::Task(format!("merging histograms: {e}")))?;
    }
    Ok(Stats::from_histogram(
        &total,
        window_end.saturating_duration_since(measure_from),
    ))
}

/// Times `f` synchronously, call after call, on this thread: warm-up, then
/// until `timing.measure` has passed and at least `min_calls` were made.
pub fn time_sync<F>(timing: Timing, min_calls: u64, mut f: F) -> Result<Stats, BenchError>
where
    F: FnMut(usize) -> Result<(), BenchError>,
{
    let mut hist = histogram()?;
    let start = Instant::now();
    let mut i = 0usize;
    while start.elapsed() < timing.warmup {
        f(i)?;
        i += 1;
    }
    let measure_from = Instant::now();
    while measure_from.elapsed() < timing.measure || hist.len() < min_calls {
        let began = Instant::now();
        f(i)?;
        let ns = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
        hist.saturating_record(ns.max(1));
        i += 1;
    }
    Ok(Stats::from_histogram(&hist, measure_from.elapsed()))
}

/// Runs `call(i)` open-loop at `rate` calls per second: each call starts at
/// its scheduled instant whether or not earlier calls have answered, as
/// independent agents' tool calls arrive. A pacing thread keeps the
/// schedule (sleeping to each instant, so no timer-wheel granularity), and
/// latency is taken from the scheduled instant, so a client or server that
/// falls behind shows in the figures rather than hiding them (no coordinated
/// omission). Warm-up calls are made and discarded. The first failed call
/// ends the run.
pub async fn drive_rate<F, Fut>(rate: f64, timing: Timing, call: F) -> Result<Stats, BenchError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send + 'static,
{
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BenchError::Task(format!("cannot pace calls at {rate}/s")));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let start = Instant::now() + Duration::from_millis(10);
    let measure_from = start + timing.warmup;
    let stop_at = measure_from + timing.measure;
    let pacer = std::thread::Builder::new()
        .name("bench-pacer".to_owned())
        .spawn(move || {
            for i in 0usize.. {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                if at >= stop_at {
                    break;
                }
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if tx.send((i, at)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| BenchError::Task(format!("cannot start the pacing thread: {e}")))?;
    let call = Arc::new(call);
    let mut tasks = tokio::task::JoinSet::new();
    let mut total = histogram()?;
    let mut absorb = |joined: Result<Result<(Instant, Instant), BenchError>, _>| {
        let (at, ended) =
            joined.map_err(|e: tokio::task::JoinError| BenchError::Task(e.to_string()))??;
        if at >= measure_from {
            let ns = u64::try_from((ended - at).as_nanos()).unwrap_or(u64::MAX);
            total.saturating_record(ns.max(1));
        }
        Ok::<_, BenchError>(())
    };
    while let Some((i, at)) = rx.recv().await {
        let call = call.clone();
        tasks.spawn(async move {
            call(i).await?;
            Ok::<_, BenchError>((at, Instant::now()))
        });
        // Collect answers as they come, so the set stays small.
        while let Some(joined) = tasks.try_join_next() {
            absorb(joined)?;
        }
    }
    while let Some(joined) = tasks.join_next().await {
        absorb(joined)?;
    }
    let _ = pacer.join();
    // Calls per second are those scheduled in the window: the offered rate.
    Ok(Stats::from_histogram(&total, timing.measure))
}
