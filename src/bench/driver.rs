//! Load drivers. Closed loop ([`drive`]): `concurrency` callers, each
//! sending its next call as soon as the last one answered, for a fixed time
//! after a warm-up. Open loop ([`drive_rate`]): calls at a fixed rate from
//! one timer-paced thread. Latency goes into HDR histograms (one per caller,
//! merged), so percentiles are exact to three significant digits without
//! keeping every sample.

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

/// Runs `call(&client, i)` open-loop at `rate` calls per second, as
/// independent agents' tool calls arrive: each call starts at its scheduled
/// instant whether or not earlier calls have answered, and latency is taken
/// from that instant, so a client or server that falls behind shows in the
/// figures rather than hiding them (no coordinated omission). Warm-up calls
/// are made and discarded. The first failed call ends the run. Returns the
/// figures and the number of calls made, warm-up included.
///
/// The load generator is one thread running its own single-threaded
/// runtime, woken by a kernel interval timer: pacing, calls, the client's
/// connection and the answers all run there, so the generator adds no
/// cross-thread wake-ups of its own to the latency it measures (on two
/// cores shared with the sidecar, the pacing thread and multi-threaded
/// runtime it replaces cost more than the calls they timed). `setup` makes
/// the client on that runtime.
pub async fn drive_rate<S, SFut, C, F, Fut>(
    rate: f64,
    timing: Timing,
    setup: S,
    call: F,
) -> Result<(Stats, u64), BenchError>
where
    S: FnOnce() -> SFut + Send + 'static,
    SFut: Future<Output = Result<C, BenchError>>,
    F: Fn(&C, usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send + 'static,
{
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BenchError::Task(format!("cannot pace calls at {rate}/s")));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-open-loop".to_owned())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| BenchError::Task(format!("cannot start the load generator: {e}")))
                .and_then(|rt| rt.block_on(open_loop(rate, timing, setup, call)));
            let _ = tx.send(result);
        })
        .map_err(|e| BenchError::Task(format!("cannot start the load generator: {e}")))?;
    rx.await
        .map_err(|_| BenchError::Task("the load generator stopped without a result".to_owned()))?
}

/// The body of [`drive_rate`], on the generator's own runtime.
async fn open_loop<S, SFut, C, F, Fut>(
    rate: f64,
    timing: Timing,
    setup: S,
    call: F,
) -> Result<(Stats, u64), BenchError>
where
    S: FnOnce() -> SFut,
    SFut: Future<Output = Result<C, BenchError>>,
    F: Fn(&C, usize) -> Fut,
    Fut: Future<Output = Result<(), BenchError>> + Send + 'static,
{
    let client = setup().await?;
    // Whole nanoseconds, so the kernel's expirations and the instants
    // latency is taken from are the same arithmetic.
    let period_ns = ((1e9 / rate).round() as u64).max(1);
    let period = Duration::from_nanos(period_ns);
    let first = Duration::from_millis(10);
    // Read before the timer is armed, so each call's instant is at or
    // before its expiration: latency errs long, never short.
    let start = Instant::now() + first;
    let ticker = ticker::Ticker::start(first, period)
        .map_err(|e| BenchError::Task(format!("cannot start the load generator's timer: {e}")))?;
    let measure_from = start + timing.warmup;
    let stop_at = measure_from + timing.measure;
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
    let mut next = 0u64;
    'pacing: loop {
        tokio::select! {
            // Answers first: an answer that is ready is timed before the
            // next call is sent.
            biased;
            Some(joined) = tasks.join_next() => absorb(joined)?,
            expired = ticker.wait() => {
                let expired = expired.map_err(|e| {
                    BenchError::Task(format!("the load generator's timer failed: {e}"))
                })?;
                // More than one expiration: the generator fell behind; the
                // late calls go now, timed from when they were due.
                for _ in 0..expired {
                    let at = start + Duration::from_nanos(next.saturating_mul(period_ns));
                    if at >= stop_at {
                        break 'pacing;
                    }
                    let i = usize::try_from(next).unwrap_or(usize::MAX);
                    // Boxed: a gRPC call's future is kilobytes, and the
                    // generator's profile showed a tenth of its time
                    // copying it into the task.
                    let pending = Box::pin(call(&client, i));
                    tasks.spawn(async move {
                        pending.await?;
                        Ok::<_, BenchError>((at, Instant::now()))
                    });
                    next += 1;
                }
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        absorb(joined)?;
    }
    // Calls per second are those scheduled in the window: the offered rate.
    Ok((Stats::from_histogram(&total, timing.measure), next))
}

/// A periodic timer the generator's runtime waits on.
mod ticker {
    use std::time::Duration;

    /// On Linux, a `timerfd`: the kernel counts expirations at the exact
    /// period and wakes the runtime's own poller, with no other thread.
    #[cfg(target_os = "linux")]
    pub struct Ticker {
        fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    }

    #[cfg(target_os = "linux")]
    impl Ticker {
        /// First expiration after `first`, then every `period`.
        pub fn start(first: Duration, period: Duration) -> std::io::Result<Self> {
            use std::os::fd::FromRawFd as _;
            // SAFETY: timerfd_create has no memory effects; the result is
            // checked before it is used as a descriptor.
            let raw = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `raw` is a descriptor we just opened and own alone.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
            let spec = libc::itimerspec {
                it_interval: timespec(period),
                it_value: timespec(first),
            };
            // SAFETY: `spec` is a valid itimerspec on the stack; the old
            // value is not asked for.
            let set = unsafe {
                libc::timerfd_settime(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    0,
                    &spec,
                    std::ptr::null_mut(),
                )
            };
            if set < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: an `OwnedFd` always returns its own descriptor, which
            // stays open until the `AsyncFd` (its owner) drops.
            let fd = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }?;
            Ok(Self { fd })
        }

        /// Waits for the next expiration; returns how many have passed
        /// since the last call (more than one if the caller was late).
        pub async fn wait(&self) -> std::io::Result<u64> {
            loop {
                let mut ready = self.fd.readable().await?;
                let read = ready.try_io(|fd| {
                    let mut count = 0u64;
                    // SAFETY: reads eight bytes into `count`, which is eight
                    // bytes long.
                    let n = unsafe {
                        libc::read(
                            std::os::fd::AsRawFd::as_raw_fd(fd.get_ref()),
                            (&raw mut count).cast(),
                            std::mem::size_of::<u64>(),
                        )
                    };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(count)
                    }
                });
                match read {
                    Ok(result) => {
                        // Read to the end: wait for the next expiration
                        // rather than reading again to learn there is none.
                        ready.clear_ready();
                        return result;
                    }
                    Err(_would_block) => continue,
                }
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn timespec(d: Duration) -> libc::timespec {
        libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 10^9: fits any `c_long`.
            tv_nsec: d.subsec_nanos() as libc::c_long,
        }
    }

    /// Elsewhere, a pacing thread that sleeps to each expiration and
    /// counts them into a channel.
    #[cfg(not(target_os = "linux"))]
    pub struct Ticker {
        rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>,
    }

    #[cfg(not(target_os = "linux"))]
    impl Ticker {
        pub fn start(first: Duration, period: Duration) -> std::io::Result<Self> {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let start = std::time::Instant::now() + first;
            std::thread::Builder::new()
                .name("bench-pacer".to_owned())
                .spawn(move || {
                    let period_ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
                    for k in 0u64.. {
                        let at = start + Duration::from_nanos(period_ns.saturating_mul(k));
                        let now = std::time::Instant::now();
                        if at > now {
                            std::thread::sleep(at - now);
                        }
                        if tx.send(()).is_err() {
                            break;
                        }
                    }
                })?;
            Ok(Self {
                rx: tokio::sync::Mutex::new(rx),
            })
        }

        pub async fn wait(&self) -> std::io::Result<u64> {
            let mut rx = self.rx.lock().await;
            match rx.recv().await {
                Some(()) => {
                    let mut n = 1;
                    while rx.try_recv().is_ok() {
                        n += 1;
                    }
                    Ok(n)
                }
                None => Err(std::io::Error::other("the pacing thread stopped")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(warmup_ms: u64, measure_ms: u64) -> Timing {
        Timing {
            warmup: Duration::from_millis(warmup_ms),
            measure: Duration::from_millis(measure_ms),
        }
    }

    #[tokio::test]
    async fn the_open_loop_makes_every_scheduled_call_and_times_those_in_the_window() {
        // One call per millisecond from the start: 50 in the warm-up, 200
        // in the window, whatever the machine's speed (a late call is
        // still made, and timed from when it was due).
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let (stats, calls) = drive_rate(
            1000.0,
            timing(50, 200),
            || async { Ok(()) },
            move |(), i| {
                if let Ok(mut seen) = log.lock() {
                    seen.push(i);
                }
                async { Ok(()) }
            },
        )
        .await
        .expect("the run completes");
        assert_eq!(calls, 250);
        assert_eq!(stats.calls, 200);
        assert!((stats.per_sec - 1000.0).abs() < 1e-6, "{stats:?}");
        assert!(
            stats.p50_ns > 0 && stats.p50_ns <= stats.max_ns,
            "{stats:?}"
        );
        let seen = seen.lock().expect("not poisoned").clone();
        assert_eq!(
            seen,
            (0..250).collect::<Vec<_>>(),
            "each call once, in order"
        );
    }

    #[tokio::test]
    async fn a_failed_call_ends_the_open_loop_with_its_error() {
        let result = drive_rate(
            1000.0,
            timing(0, 100),
            || async { Ok(()) },
            |(), i| async move {
                if i == 10 {
                    Err(BenchError::Task("call 10 failed".to_owned()))
                } else {
                    Ok(())
                }
            },
        )
        .await;
        match result {
            Err(BenchError::Task(message)) => assert_eq!(message, "call 10 failed"),
            other => panic!("expected the call's error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_rate_that_cannot_be_paced_is_refused() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let result = drive_rate(
                rate,
                timing(0, 10),
                || async { Ok(()) },
                |(), _| async { Ok(()) },
            )
            .await;
            assert!(result.is_err(), "{rate}");
        }
    }
}
