//! stderr that never holds up a decision.
//!
//! A deny is logged on the decision path. Writing to stderr directly would
//! block the runtime thread whenever the reader (the container runtime's
//! log shim) falls behind, and a burst of denies (an agent under prompt
//! injection) would then stall every decision. So log lines go into a
//! bounded queue that one thread writes out; when the queue is full a line
//! is dropped and counted (`leash_log_lines_dropped_total`), never waited
//! for. Records that must not be lost belong in the audit trail, not here.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines that fit in the queue; beyond, lines are dropped.
pub const QUEUE_LINES: usize = 8192;

/// How long exit waits for queued lines to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because stderr could not keep up, since start.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Message {
    Line(Vec<u8>),
    /// Everything before this is written; answer.
    Flush(SyncSender<()>),
}

/// The `MakeWriter` for the log subscriber.
#[derive(Debug, Clone)]
pub struct QueuedStderr {
    queue: SyncSender<Message>,
}

/// The queue, when log lines are JSON: the deny line is then written
/// directly (see [`DecisionLine`]) rather than through the subscriber.
static JSON_LINES: OnceLock<QueuedStderr> = OnceLock::new();

/// Called by the binary once its subscriber writes JSON into `queue`.
pub fn set_json_lines(queue: &QueuedStderr) {
    let _ = JSON_LINES.set(queue.clone());
}

/// One JSON log line built by hand, in the layout of the subscriber's JSON
/// lines (`timestamp`, `level`, `message`, the fields, `target`), for the
/// one event logged per denied call. Formatting it through the subscriber
/// (a visitor per field, a map, then serialization) cost about 20,000
/// instructions per deny, a tenth of the call; this costs a few thousand.
pub struct DecisionLine {
    line: Vec<u8>,
}

impl DecisionLine {
    /// A line at `level` with `message`, or `None` when lines are not JSON
    /// into the queue (text logs, tests): then use the subscriber.
    pub fn start(level: &str, message: &str) -> Option<Self> {
        JSON_LINES.get()?;
        let mut line = Vec::with_capacity(512);
        line.extend_from_slice(b"{\"timestamp\":\"");
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        line.extend_from_slice(now.as_bytes());
        line.extend_from_slice(b"\",\"level\":");
        let mut this = Self { line };
        this.string(level);
        this.field("message", message);
        Some(this)
    }

    /// A string field; the subscriber leaves out absent ones, so do `None`s.
    pub fn field<'a>(&mut self, name: &str, value: impl Into<Option<&'a str>>) -> &mut Self {
        if let Some(value) = value.into() {
            self.line.push(b',');
            self.string(name);
            self.line.push(b':');
            self.string(value);
        }
        self
    }

    fn string(&mut self, text: &str) {
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.line, text);
    }

    /// Ends the line with its target and queues it (or drops and counts it
    /// when the queue is full, as for every line).
    pub fn send(mut self, target: &str) {
        self.field("target", target);
        self.line.extend_from_slice(b"}\n");
        if let Some(queue) = JSON_LINES.get() {
            drop(QueuedLine {
                queue: &queue.queue,
                line: self.line,
            });
        }
    }
}

/// Held by `main` until exit: dropping it writes out what is queued.
#[derive(Debug)]
pub struct FlushOnExit {
    queue: SyncSender<Message>,
}

impl QueuedStderr {
    /// Starts the writer thread.
    pub fn start() -> std::io::Result<(Self, FlushOnExit)> {
        let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("leash-log".to_owned())
            .spawn(move || write_lines(&lines))?;
        Ok((
            Self {
                queue: queue.clone(),
            },
            FlushOnExit { queue },
        ))
    }
}

/// How long the writer lets lines gather after the first of a burst: under
/// a stream of denies it wakes and writes a few hundred times a second, not
/// once per line, and each wake-up it saves is CPU the decisions keep.
const GATHER: Duration = Duration::from_millis(2);

/// Bytes gathered before they are written whatever else is queued.
const WRITE_AT: usize = 64 << 10;

fn write_lines(lines: &Receiver<Message>) {
    let stderr = std::io::stderr();
    let mut batch: Vec<u8> = Vec::new();
    while let Ok(first) = lines.recv() {
        if matches!(first, Message::Line(_)) {
            std::thread::sleep(GATHER);
        }
        let mut next = Some(first);
        while let Some(message) = next.take().or_else(|| lines.try_recv().ok()) {
            match message {
                Message::Line(line) => {
                    batch.extend_from_slice(&line);
                    // Lines arriving as fast as they are drained are still
                    // written as they go, in bounded pieces.
                    if batch.len() >= WRITE_AT {
                        write_out(&stderr, &mut batch);
                    }
                }
                Message::Flush(done) => {
                    write_out(&stderr, &mut batch);
                    let _ = stderr.lock().flush();
                    let _ = done.send(());
                }
            }
        }
        write_out(&stderr, &mut batch);
    }
}

/// Writes whole lines with one call; nothing to do if stderr is gone:
/// there is nowhere to say so.
fn write_out(stderr: &std::io::Stderr, batch: &mut Vec<u8>) {
    if !batch.is_empty() {
        let _ = stderr.lock().write_all(batch);
        batch.clear();
    }
}

impl Drop for FlushOnExit {
    fn drop(&mut self) {
        let (done, written) = mpsc::sync_channel(1);
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let mut flush = Message::Flush(done);
        // The queue may be full; keep trying until the deadline.
        loop {
            match self.queue.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    flush = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// One log event: buffered, then queued whole when the subscriber is done
/// with it, so lines never interleave.
pub struct QueuedLine<'a> {
    queue: &'a SyncSender<Message>,
    line: Vec<u8>,
}

impl std::io::Write for QueuedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine<'_> {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.line);
        if self.queue.try_send(Message::Line(line)).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedStderr {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine {
            queue: &self.queue,
            line: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_line_has_the_subscribers_layout() {
        // Sets the process-wide queue for this test binary; no other unit
        // test logs a decision line.
        let (queue, lines) = mpsc::sync_channel(4);
        set_json_lines(&QueuedStderr { queue });
        let mut line = DecisionLine::start("INFO", "decision").expect("json lines are on");
        line.field("agent", "Agent::\"a\"")
            .field("on_behalf_of", None)
            .field("reason", "line\nbreak");
        line.send("leash::telemetry");
        let Ok(Message::Line(bytes)) = lines.try_recv() else {
            panic!("a line is queued");
        };
        assert!(bytes.ends_with(b"}\n"));
        let text = String::from_utf8(bytes).expect("utf-8");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
        let keys: Vec<&str> = parsed
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["timestamp", "level", "message", "agent", "reason", "target"]
        );
        assert_eq!(parsed["agent"], "Agent::\"a\"");
        assert_eq!(parsed["reason"], "line\nbreak");
        let timestamp = parsed["timestamp"].as_str().expect("timestamp");
        assert!(
            chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
            "{timestamp}"
        );
        assert_eq!(timestamp.len(), "2026-01-31T12:00:00.000000Z".len());
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        // A queue nobody reads: the second line cannot wait for room.
        let (queue, _lines) = mpsc::sync_channel(1);
        let before = dropped_lines();
        for _ in 0..3 {
            let mut line = QueuedLine {
                queue: &queue,
                line: Vec::new(),
            };
            line.write_all(b"{\"message\":\"decision\"}\n")
                .expect("buffered");
        }
        assert_eq!(dropped_lines() - before, 2);
    }
}
