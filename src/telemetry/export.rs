//! The span queue between decisions and the OTLP exporter.
//!
//! The SDK's own batch processor runs its exporter on a thread of its own
//! outside the async runtime, and counts the spans it drops only for a log
//! line. leash needs both the other way round: the OTLP clients (tonic, hyper)
//! run on the runtime, and dropped spans are a metric an SRE alerts on. So
//! this processor is small and leash's own:
//!
//! - `on_end` (on the decision path) only tries to put the span in a bounded
//!   queue; a full queue drops the span and counts it. It never waits.
//! - One task takes spans off the queue, exports a batch when it is full or
//!   the schedule delay has passed, one export at a time, each bounded by the
//!   export timeout. A failed or timed-out export drops its batch and counts it.
//! - [`SpanQueue::shutdown`] exports what is queued, within a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Batching settings, after the `OTEL_BSP_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Spans held while the exporter is busy; more are dropped.
    pub max_queue: usize,
    /// Longest a span waits in the queue before its batch is sent.
    pub schedule_delay: Duration,
    /// Spans per export request.
    pub max_batch: usize,
    /// Longest one export may take; then its spans are dropped.
    pub export_timeout: Duration,
}

impl Default for BatchOptions {
    /// The OpenTelemetry specification's defaults.
    fn default() -> Self {
        Self {
            max_queue: 2048,
            schedule_delay: Duration::from_secs(5),
            max_batch: 512,
            export_timeout: Duration::from_secs(30),
        }
    }
}

/// What happened to the spans leash made; read by `/metrics`.
#[derive(Debug, Default)]
pub struct SpanCounters {
    /// Accepted by the collector.
    pub exported: AtomicU64,
    /// Dropped because the queue was full (the collector is slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because their export failed or timed out.
    pub dropped_export_failed: AtomicU64,
    /// Dropped because they ended after shutdown began.
    pub dropped_shutdown: AtomicU64,
}

impl SpanCounters {
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full.load(Ordering::Relaxed)
            + self.dropped_export_failed.load(Ordering::Relaxed)
            + self.dropped_shutdown.load(Ordering::Relaxed)
    }
}

enum Command {
    /// Export everything queued, then answer.
    Flush(oneshot::Sender<()>),
    /// Export everything queued, shut the exporter down, answer, stop.
    Shutdown(oneshot::Sender<()>),
}

/// The producer side, given to the tracer provider as its span processor.
#[derive(Debug, Clone)]
pub struct SpanQueue {
    spans: mpsc::Sender<SpanData>,
    commands: mpsc::UnboundedSender<Command>,
    counters: Arc<SpanCounters>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Flush(_) => "Flush",
            Command::Shutdown(_) => "Shutdown",
        })
    }
}

impl SpanQueue {
    /// Starts the export task on the current runtime.
    pub fn start<E>(exporter: E, options: BatchOptions, counters: Arc<SpanCounters>) -> Self
    where
        E: SpanExporter + 'static,
    {
        let (spans, rx) = mpsc::channel(options.max_queue.max(1));
        let (commands, command_rx) = mpsc::unbounded_channel();
        tokio::spawn(export_loop(
            exporter,
            options,
            rx,
            command_rx,
            counters.clone(),
        ));
        Self {
            spans,
            commands,
            counters,
        }
    }

    /// Exports everything queued now; returns when done or after `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.ask(Command::Flush, timeout).await
    }

    /// Exports what is queued and stops; returns false if `timeout` passed
    /// first. The spans still queued then are lost, and counted as dropped
    /// at shutdown (a batch stuck in its export is not: it may yet arrive).
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        let done = self.ask(Command::Shutdown, timeout).await;
        if !done {
            let queued = self.spans.max_capacity() - self.spans.capacity();
            self.counters
                .dropped_shutdown
                .fetch_add(queued as u64, Ordering::Relaxed);
        }
        done
    }

    async fn ask(&self, command: fn(oneshot::Sender<()>) -> Command, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(command(tx)).is_err() {
            // The task has stopped: nothing left to export.
            return true;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.spans.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.counters
                    .dropped_shutdown
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Synchronous callers cannot wait on the runtime; leash flushes
        // through `SpanQueue::flush` instead.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Called by the provider when it is dropped, possibly on a runtime
        // thread, so it must not block: ask for a shutdown and go on.
        let (tx, _rx) = oneshot::channel();
        let _ = self.commands.send(Command::Shutdown(tx));
        Ok(())
    }
}

async fn export_loop<E: SpanExporter>(
    exporter: E,
    options: BatchOptions,
    mut spans: mpsc::Receiver<SpanData>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    counters: Arc<SpanCounters>,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(options.max_batch);
    let mut state = ExportState::default();
    let mut tick = tokio::time::interval(options.schedule_delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = spans.recv() => match received {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= options.max_batch {
                        export(&exporter, &mut batch, options, &counters, &mut state).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    export(&exporter, &mut batch, options, &counters, &mut state).await;
                }
            }
            command = commands.recv() => {
                let (reply, stop) = match command {
                    Some(Command::Flush(reply)) => (Some(reply), false),
                    Some(Command::Shutdown(reply)) => (Some(reply), true),
                    None => (None, true),
                };
                if stop {
                    // Nothing new is accepted from here on.
                    spans.close();
                }
                while let Ok(span) = spans.try_recv() {
                    batch.push(span);
                    if batch.len() >= options.max_batch {
                        export(&exporter, &mut batch, options, &counters, &mut state).await;
                    }
                }
                if !batch.is_empty() {
                    export(&exporter, &mut batch, options, &counters, &mut state).await;
                }
                if stop {
                    let _ = exporter.shutdown_with_timeout(options.export_timeout);
                }
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                if stop {
                    return;
                }
            }
        }
    }
    if !batch.is_empty() {
        export(&exporter, &mut batch, options, &counters, &mut state).await;
    }
    let _ = exporter.shutdown_with_timeout(options.export_timeout);
}

/// Whether the last export failed, so a collector outage is logged once
/// when it starts and once when it ends, not for every batch.
#[derive(Default)]
struct ExportState {
    failing: bool,
}

async fn export<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    options: BatchOptions,
    counters: &SpanCounters,
    state: &mut ExportState,
) {
    let spans = std::mem::replace(batch, Vec::with_capacity(options.max_batch));
    let count = spans.len() as u64;
    let result = tokio::time::timeout(options.export_timeout, exporter.export(spans)).await;
    let problem = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "no answer within {:?} (OTEL_BSP_EXPORT_TIMEOUT)",
            options.export_timeout
        )),
    };
    match problem {
        None => {
            counters.exported.fetch_add(count, Ordering::Relaxed);
            if state.failing {
                state.failing = false;
                info!("span export recovered");
            }
        }
        Some(problem) => {
            counters
                .dropped_export_failed
                .fetch_add(count, Ordering::Relaxed);
            if !state.failing {
                state.failing = true;
                warn!(
                    error = %problem,
                    spans = count,
                    "span export failed; spans are dropped until the collector answers \
                     (decisions are not affected; see leash_spans_dropped_total)"
                );
            }
        }
    }
}
