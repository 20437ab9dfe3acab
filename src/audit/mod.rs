//! The audit trail: one hash-chained JSON line per decision (attempts
//! included), written before the decision is answered.
//!
//! - [`chain`]: sealing records into the chain, and verifying a trail.
//! - [`writer`]: the writer thread (group commit, `fsync` per batch,
//!   rotation, recovery).
//!
//! Fail closed: when records cannot be written, decisions become DENY with
//! an error saying the audit trail is unavailable, health turns
//! NOT_SERVING, and both recover on their own once writing works again —
//! unless the operator chose `--audit-fail-open`.

pub mod chain;
pub mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::bundle::uid_text;
use crate::engine::{AuthzRequest, Decision, GrantUse, RequestError, SideDecision};
use crate::proto::v1 as pb;

/// Requests (a batch is one) waiting for the writer at most, by default;
/// beyond, callers wait (`--audit-queue-size`).
pub const DEFAULT_QUEUE_SIZE: usize = 8192;

/// The largest `--audit-queue-size`: each place may hold a batch's records.
pub const MAX_QUEUE_SIZE: usize = 1 << 20;

/// How long a decision waits for its record to be synced before it is
/// refused and the trail counted unavailable.
pub const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Off,
    Stdout,
    File(PathBuf),
}

/// When a decision may be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Once its record is on disk (written and synced): a decision the
    /// caller saw is a record on disk.
    Disk,
    /// Once its record is queued for the writer: faster; a crash may lose
    /// the records of the last batch.
    Queued,
}

/// `Debug` prints `hash_key` as its length only (see the impl).
#[derive(Clone)]
pub struct AuditOptions {
    pub target: AuditTarget,
    pub sync: SyncMode,
    /// Rotate the file when it reaches this size.
    pub max_file_bytes: u64,
    /// Requests (a batch is one) queued for the writer at most; beyond,
    /// callers wait, for at most `WRITE_STALL`.
    pub queue_size: usize,
    /// Answer decisions even when their records cannot be written.
    pub fail_open: bool,
    /// Context attributes recorded in clear; all others are redacted.
    pub context_keys: Vec<String>,
    /// Context attributes recorded as a keyed hash (HMAC-SHA256).
    pub hash_context_keys: Vec<String>,
    /// The key of those hashes.
    pub hash_key: Vec<u8>,
}

/// The hash key is a secret: a debug print (of the server's options, say)
/// shows its length, not its bytes.
impl std::fmt::Debug for AuditOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditOptions")
            .field("target", &self.target)
            .field("sync", &self.sync)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("queue_size", &self.queue_size)
            .field("fail_open", &self.fail_open)
            .field("context_keys", &self.context_keys)
            .field("hash_context_keys", &self.hash_context_keys)
            .field("hash_key", &SecretBytes(&self.hash_key))
            .finish()
    }
}

/// The audit hash key, held by [`Audit`]; `Debug` shows its length only.
struct HashKey(Vec<u8>);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SecretBytes(&self.0).fmt(f)
    }
}

/// Prints a secret's length only.
struct SecretBytes<'a>(&'a [u8]);

impl std::fmt::Debug for SecretBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} secret bytes]", self.0.len())
    }
}

impl Default for AuditOptions {
    /// Off: servers built in tests and benchmarks opt in.
    fn default() -> Self {
        Self {
            target: AuditTarget::Off,
            sync: SyncMode::Disk,
            max_file_bytes: 100 * 1024 * 1024,
            queue_size: DEFAULT_QUEUE_SIZE,
            fail_open: false,
            context_keys: Vec::new(),
            hash_context_keys: Vec::new(),
            hash_key: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail: {0}")]
    Open(String),
    #[error("audit trail: cannot start the writer thread: {0}")]
    Thread(std::io::Error),
}

/// Why closing the trail (graceful shutdown) left it short of what was
/// decided: the process then exits with an error, so whatever restarts it
/// knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseError {
    #[error(
        "audit trail closed with {} unwritten: writes were failing",
        unwritten_words(.0)
    )]
    Unwritten(writer::Unwritten),
    #[error("the audit writer did not finish within {0:?}; records still queued may be lost")]
    TimedOut(std::time::Duration),
    #[error("the audit writer had stopped unexpectedly; records it held are lost")]
    WriterStopped,
}

fn unwritten_words(u: &writer::Unwritten) -> String {
    let records = (u.records > 0).then(|| {
        format!(
            "the records of {} answered decision{}",
            u.records,
            if u.records == 1 { "" } else { "s" }
        )
    });
    let outage = u.outage_refused.map(|n| match n {
        0 => "the record of its outage".to_owned(),
        1 => "the record of its outage (1 decision refused)".to_owned(),
        n => format!("the record of its outage ({n} decisions refused)"),
    });
    match (records, outage) {
        (Some(r), Some(o)) => format!("{r} and {o}"),
        (Some(one), None) | (None, Some(one)) => one,
        (None, None) => "nothing".to_owned(),
    }
}

/// Whether records can be written, and counts for metrics. Shared by the
/// writer thread and the request path.
#[derive(Debug)]
pub struct AuditStatus {
    available: AtomicBool,
    last_error: Mutex<Option<String>>,
    records: AtomicU64,
    write_errors: AtomicU64,
    /// What the request path refused since the writer last looked, and
    /// the first failure behind it, for the outage record. The request path
    /// may refuse records while the writer is stuck in a write; by the time
    /// the writer writes the outage record the trail has recovered, so it
    /// cannot ask `last_error` why, nor tell since when. One lock, so the
    /// writer never takes a count without its failure.
    pending: Mutex<Pending>,
    next_seq: AtomicU64,
    /// When the write in progress started (milliseconds on a monotonic
    /// clock), 0 when none is: a queued-mode caller does not wait for
    /// writes, so this is how it learns the disk has stalled.
    write_started_ms: AtomicU64,
    /// Tells the server to flip health when availability changes.
    changes: watch::Sender<bool>,
}

impl AuditStatus {
    fn new() -> Self {
        let (changes, _) = watch::channel(true);
        Self {
            available: AtomicBool::new(true),
            last_error: Mutex::new(None),
            records: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            next_seq: AtomicU64::new(0),
            write_started_ms: AtomicU64::new(0),
            changes,
        }
    }

    /// Marks a write started (`true`) or finished.
    fn writing(&self, started: bool) {
        let now = if started {
            monotonic_millis().max(1)
        } else {
            0
        };
        self.write_started_ms.store(now, Ordering::SeqCst);
    }

    /// Whether the write in progress has taken longer than `WRITE_STALL`.
    fn stalled(&self) -> bool {
        let started = self.write_started_ms.load(Ordering::SeqCst);
        let limit = u64::try_from(WRITE_STALL.as_millis()).unwrap_or(u64::MAX);
        started != 0 && monotonic_millis().saturating_sub(started) > limit
    }

    pub fn available(&self) -> bool {
        self.available.load(Ordering::SeqCst)
    }

    /// Why the trail is unavailable, if it is.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// The `seq` the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Availability changes, for health.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Notes records refused on the request path, and the failure behind
    /// them. (A disk-mode caller that gave up on a job already queued
    /// marks the job instead: the writer counts it when it finds it.)
    fn refused(&self, records: u64, error: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.refused += records;
        pending.first.get_or_insert_with(|| Failure {
            since: writer::now(),
            error: error.to_owned(),
        });
    }

    /// What the request path refused since the last call.
    fn take_pending(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn written(&self, records: u64, next_seq: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.next_seq.store(next_seq, Ordering::Relaxed);
        self.recovered();
    }

    /// `available` and `last_error` change together under the error's
    /// lock (here and in `failed`), so a trail marked unavailable always
    /// has its error, and health follows in the same order.
    fn recovered(&self) {
        let mut error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !self.available.swap(true, Ordering::SeqCst) {
            *error = None;
            self.changes.send_replace(true);
            // Logged after the lock is released: with logs unqueued
            // (their thread failed to start) this writes to stderr.
            drop(error);
            tracing::warn!("audit trail writable again; decisions resume");
        }
    }

    fn failed(&self, error: String) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last = Some(error);
        if self.available.swap(false, Ordering::SeqCst) {
            self.changes.send_replace(false);
        }
    }
}

/// When the trail failed, and why, for the outage record.
#[derive(Debug, Clone)]
pub struct Failure {
    since: String,
    error: String,
}

/// Records refused on the request path, and the first failure behind them.
#[derive(Debug, Default)]
struct Pending {
    refused: u64,
    first: Option<Failure>,
}

/// The request path's handle on the trail.
#[derive(Debug)]
pub struct Audit {
    /// Taken at shutdown, which ends the writer once the queue is written.
    jobs: Mutex<Option<mpsc::Sender<writer::Job>>>,
    enabled: bool,
    sync: SyncMode,
    fail_open: bool,
    status: Arc<AuditStatus>,
    context_keys: Vec<String>,
    hash_context_keys: Vec<String>,
    hash_key: HashKey,
    /// The writer thread, joined at shutdown so the last batch is written.
    thread: Mutex<Option<std::thread::JoinHandle<writer::Unwritten>>>,
}

impl Audit {
    /// Opens the trail (continuing an existing chain) and starts the writer.
    pub fn start(options: &AuditOptions) -> Result<Self, AuditError> {
        let status = Arc::new(AuditStatus::new());
        let (jobs, thread) = match &options.target {
            AuditTarget::Off => (None, None),
            target => {
                let (sink, head) =
                    writer::open(target, options.max_file_bytes).map_err(AuditError::Open)?;
                status.next_seq.store(head.next_seq, Ordering::Relaxed);
                let (tx, rx) = mpsc::channel(options.queue_size.clamp(1, MAX_QUEUE_SIZE));
                let for_writer = status.clone();
                let fail_open = options.fail_open;
                let linger = match options.sync {
                    SyncMode::Disk => std::time::Duration::ZERO,
                    SyncMode::Queued => writer::QUEUED_LINGER,
                };
                let thread = std::thread::Builder::new()
                    .name("leash-audit".to_owned())
                    .spawn(move || writer::run(sink, head, rx, for_writer, linger, fail_open))
                    .map_err(AuditError::Thread)?;
                (Some(tx), Some(thread))
            }
        };
        Ok(Self {
            enabled: jobs.is_some(),
            jobs: Mutex::new(jobs),
            sync: options.sync,
            fail_open: options.fail_open,
            status,
            context_keys: options.context_keys.clone(),
            hash_context_keys: options.hash_context_keys.clone(),
            hash_key: HashKey(options.hash_key.clone()),
            thread: Mutex::new(thread),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    pub fn status(&self) -> Arc<AuditStatus> {
        self.status.clone()
    }

    /// Appends `records`; returns once they are on disk (or queued, in the
    /// queued mode). An error means they were not recorded.
    pub async fn append(&self, records: Vec<Record>) -> Result<(), String> {
        let jobs = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(jobs) = jobs else {
            return if self.enabled {
                Err("the audit trail is closed (shutting down)".to_owned())
            } else {
                Ok(())
            };
        };
        match self.sync {
            SyncMode::Disk => {
                let (done, written) = oneshot::channel();
                let settled: Arc<std::sync::OnceLock<writer::Settled>> = Arc::default();
                let count = records.len() as u64;
                let sent = AtomicBool::new(false);
                // Queueing counts against the same bound as the write: a
                // full queue behind a stalled disk refuses, it does not hang.
                let queued_and_written = async {
                    jobs.send(writer::Job {
                        records,
                        done: Some(done),
                        settled: settled.clone(),
                    })
                    .await
                    .map_err(|_| "the audit writer has stopped".to_owned())?;
                    sent.store(true, Ordering::SeqCst);
                    written
                        .await
                        .map_err(|_| "the audit writer has stopped".to_owned())
                };
                match tokio::time::timeout(WRITE_STALL, queued_and_written).await {
                    Ok(answer) => answer?,
                    Err(_) => {
                        // A disk that does not answer (a hung network
                        // volume): refuse, and say so in health, until the
                        // writer gets through again.
                        let problem = format!(
                            "the audit write has not completed in {}s (a stalled disk?)",
                            WRITE_STALL.as_secs()
                        );
                        if sent.load(Ordering::SeqCst) {
                            // The decision is answered DENY: its records
                            // must not be written saying otherwise, and the
                            // writer counts them from this, dated now.
                            // (Fail-open answers it anyway: then they are
                            // written late.) Unless the write got there
                            // first: then they are in the chain, and the
                            // decision stands.
                            let written = if self.fail_open() {
                                matches!(settled.get(), Some(writer::Settled::Written))
                            } else {
                                settled
                                    .set(writer::Settled::GaveUp(Failure {
                                        since: writer::now(),
                                        error: problem.clone(),
                                    }))
                                    .is_err()
                            };
                            if written {
                                return Ok(());
                            }
                        } else {
                            // Never queued: the writer will not count it.
                            self.status.refused(count, &problem);
                        }
                        self.status.failed(problem.clone());
                        // The write may have completed just before this
                        // (the writer then waits for a job, the trail
                        // marked unavailable after its success): an empty
                        // job wakes the writer, to record the outage or to
                        // find nothing owed and recover. Behind a stalled
                        // write it just waits its turn.
                        let _ = jobs.try_send(writer::Job::wake_up());
                        Err(problem)
                    }
                }
            }
            SyncMode::Queued => {
                self.check_stall();
                // Records queued while writes fail would be lost: refuse.
                // An unavailable trail without an error has recovered
                // since (they change together): queue as usual.
                if let Some(error) = (!self.status.available())
                    .then(|| self.status.last_error())
                    .flatten()
                {
                    self.status.refused(records.len() as u64, &error);
                    // The writer may be idle, waiting for a job, and would
                    // never learn of the refusal (nor probe its way back):
                    // an empty job wakes it to write the outage record.
                    let _ = jobs.try_send(writer::Job::wake_up());
                    return Err(error);
                }
                // A full queue behind a stalled disk refuses, it does not
                // hang (the records are then not answered, so not lost).
                let count = records.len() as u64;
                let queued = jobs.send(writer::Job {
                    records,
                    done: None,
                    settled: Arc::default(),
                });
                match tokio::time::timeout(WRITE_STALL, queued).await {
                    Ok(sent) => sent.map_err(|_| "the audit writer has stopped".to_owned()),
                    Err(_) => {
                        let problem = format!(
                            "the audit queue has been full for {}s (a stalled disk?)",
                            WRITE_STALL.as_secs()
                        );
                        self.status.refused(count, &problem);
                        self.status.failed(problem.clone());
                        Err(problem)
                    }
                }
            }
        }
    }

    /// Marks the trail unavailable once a write has been in progress for
    /// longer than [`WRITE_STALL`] (a hung disk). Called on the request
    /// path and by the server's timer, so health says so without traffic.
    pub fn check_stall(&self) {
        if self.status.stalled() && self.status.available() {
            self.status.failed(format!(
                "an audit write has not completed in {}s (a stalled disk?)",
                WRITE_STALL.as_secs()
            ));
            // The write may have completed between the two readings, its
            // success (a recovery that changed nothing) gone before this:
            // a job without records reaches the writer after that write,
            // and it says whether the trail is fine (nothing owed) or not.
            let jobs = self
                .jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(jobs) = jobs {
                let _ = jobs.try_send(writer::Job::wake_up());
            }
        }
    }

    /// Writes what is queued and stops the writer (graceful shutdown, after
    /// the last decision): waits for it up to `timeout`. An error says what
    /// the trail is missing (for the caller to log; the writer logs the
    /// details of what it could not write).
    pub fn shutdown(&self, timeout: std::time::Duration) -> Result<(), CloseError> {
        drop(
            self.jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(thread) = thread else { return Ok(()) };
        let deadline = std::time::Instant::now() + timeout;
        while !thread.is_finished() {
            if std::time::Instant::now() >= deadline {
                return Err(CloseError::TimedOut(timeout));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        match thread.join() {
            Ok(unwritten) if unwritten.is_empty() => Ok(()),
            // The writer logged what it could not write.
            Ok(unwritten) => Err(CloseError::Unwritten(unwritten)),
            Err(_) => Err(CloseError::WriterStopped),
        }
    }

    /// The record of one decision (or attempt), not yet sealed.
    pub fn record(&self, entry: &Entry<'_>) -> Record {
        // Conversion may have failed for a reference's length: cut as sent.
        let uid = |field: &Option<pb::EntityUid>| {
            field.as_ref().map(|u| {
                let max = crate::service::convert::MAX_ENTITY_ID_LEN;
                let shown = crate::service::convert::shown;
                format!("{}::{:?}", shown(&u.r#type, max), shown(&u.id, max))
            })
        };
        let (agent, on_behalf_of, action, resource) = match entry.request {
            Some(req) => (
                Some(uid_text(&req.agent)),
                req.on_behalf_of.as_ref().map(uid_text),
                Some(uid_text(&req.action)),
                Some(uid_text(&req.resource)),
            ),
            // Conversion failed: the references as sent.
            None => (
                entry.wire.principal.as_ref().and_then(|p| uid(&p.agent)),
                entry
                    .wire
                    .principal
                    .as_ref()
                    .and_then(|p| uid(&p.on_behalf_of)),
                uid(&entry.wire.action),
                uid(&entry.wire.resource),
            ),
        };
        let mut record = Record {
            action,
            agent,
            agent_side: None,
            approval: None,
            grant: None,
            caller: entry.caller.to_owned(),
            context: self.context(entry.wire),
            decision: "invalid",
            determining_policies: None,
            elevated_by: None,
            invalid: None,
            latency_us: entry.latency_us,
            limited: None,
            on_behalf_of,
            on_behalf_of_side: None,
            policy_version: entry.policy_version.to_owned(),
            prev_hash: String::new(),
            request_id: entry.request_id.to_owned(),
            resource,
            seq: 0,
            time: now(),
            trace_id: entry.trace_id.map(str::to_owned),
            v: 1,
        };
        match entry.result {
            Ok(d) => {
                record.decision = if d.allowed {
                    "allow"
                } else if d.approval.is_some() {
                    "approval_required"
                } else {
                    "deny"
                };
                record.grant = d.grant.as_ref().map(GrantRecord::of);
                record.elevated_by = (!d.elevated_by.is_empty())
                    .then(|| d.elevated_by.iter().map(GrantRecord::of).collect());
                record.approval = d.approval.as_ref().map(|a| ApprovalRecord {
                    fingerprint: self.recorded_fingerprint(
                        &a.fingerprint,
                        entry.wire,
                        record.context.as_ref(),
                    ),
                    policies: a.policies.clone(),
                });
                record.determining_policies = Some(d.determining.clone());
                record.agent_side = Some(Side::of(&d.agent));
                record.on_behalf_of_side = d.on_behalf_of.as_ref().map(Side::of);
                record.limited = d.limited.as_ref().map(|l| LimitedRecord {
                    reason: l.reason,
                    policy_id: l.policy_id.clone(),
                    limit: l.limit.clone(),
                    retry_after_ms: l.retry_after.map(crate::quota::retry_after_ms),
                });
            }
            Err(e) => {
                // A problem in the context or entities may quote their
                // values, which are redacted here as everywhere.
                let quotes_values =
                    e.field.starts_with("context") || e.field.starts_with("entities");
                record.invalid = Some(Invalid {
                    field: e.field_for_records().into_owned(),
                    problem: if quotes_values {
                        "(redacted: may quote request values)".to_owned()
                    } else {
                        e.problem.clone()
                    },
                });
            }
        }
        record
    }

    /// The context as recorded: allowed keys in clear, hashed keys as
    /// `hmac-sha256:<hex>`, every other key present with its value redacted.
    fn context(&self, wire: &pb::IsAuthorizedRequest) -> Option<Value> {
        use pb::is_authorized_request::ContextInput as C;
        let mut keys: Vec<String> = match &wire.context_input {
            None => return None,
            Some(C::ContextJson(text)) => {
                // Parsed only when some value is kept; otherwise the keys
                // alone are enough.
                if self.context_keys.is_empty() && self.hash_context_keys.is_empty() {
                    serde_json::from_str::<Map<String, Value>>(text)
                        .ok()?
                        .into_iter()
                        .map(|(k, _)| k)
                        .collect()
                } else {
                    return Some(
                        self.context_values(
                            serde_json::from_str::<Map<String, Value>>(text)
                                .ok()?
                                .into_iter()
                                .collect(),
                        ),
                    );
                }
            }
            Some(C::Context(record)) => {
                if self.context_keys.is_empty() && self.hash_context_keys.is_empty() {
                    record.fields.keys().cloned().collect()
                } else {
                    return Some(
                        self.context_values(
                            record
                                .fields
                                .iter()
                                .map(|(k, v)| (k.clone(), crate::telemetry::wire_json(v)))
                                .collect(),
                        ),
                    );
                }
            }
        };
        keys.sort();
        Some(Value::Object(
            keys.into_iter()
                .map(|k| (k, Value::from(REDACTED)))
                .collect(),
        ))
    }

    /// The approval fingerprint as recorded. It is an unkeyed hash over the
    /// request's context values and the entities it brings, so with it
    /// anyone could confirm a guess of a value the record redacts (an
    /// amount, an email). It is recorded as is only when the record shows
    /// everything it covers (`recorded` is the record's context); else
    /// keyed with the audit hash key when one is set, so equal approvals
    /// still match; else redacted.
    fn recorded_fingerprint(
        &self,
        fingerprint: &str,
        wire: &pb::IsAuthorizedRequest,
        recorded: Option<&Value>,
    ) -> String {
        let hidden_context = wire.context_input.is_some()
            && match recorded {
                Some(Value::Object(map)) => map.keys().any(|k| !self.context_keys.contains(k)),
                _ => true,
            };
        if !hidden_context && wire.entities_input.is_none() {
            fingerprint.to_owned()
        } else if !self.hash_key.0.is_empty() {
            format!(
                "hmac-sha256:{}",
                chain::hex(&hmac_sha256(&self.hash_key.0, fingerprint.as_bytes()))
            )
        } else {
            REDACTED.to_owned()
        }
    }

    fn context_values(&self, mut fields: Vec<(String, Value)>) -> Value {
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| {
                    let recorded = if self.context_keys.contains(&key) {
                        chain::sorted(value)
                    } else if self.hash_context_keys.contains(&key) {
                        Value::from(format!(
                            "hmac-sha256:{}",
                            chain::hex(&hmac_sha256(
                                &self.hash_key.0,
                                chain::canonical_text(&value).as_bytes()
                            ))
                        ))
                    } else {
                        Value::from(REDACTED)
                    };
                    (key, recorded)
                })
                .collect(),
        )
    }
}

/// What a context value not configured in is recorded as.
const REDACTED: &str = "[redacted]";

/// Milliseconds since the first call, on a clock that does not jump.
fn monotonic_millis() -> u64 {
    static START: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// One audit record. Fields are declared in alphabetical order, as are
/// those of [`Side`] and [`Invalid`]: serialized, they are the chain's
/// canonical encoding (see [`chain::Link`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_side: Option<Side>,
    /// With `approval_required`: what a human is asked to approve.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRecord>,
    /// Who asked: `tcp:ADDR` or `unix:pid=P,uid=U`.
    pub caller: String,
    /// Context keys; values only where configured in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    /// `allow`, `deny`, `approval_required` or `invalid`.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub determining_policies: Option<Vec<String>>,
    /// Every elevation grant applied, also when `grant` is the approval
    /// that decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elevated_by: Option<Vec<GrantRecord>>,
    /// A grant the request presented: used, or why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<Invalid>,
    pub latency_us: u64,
    /// Set when a rate or budget limit turned an ALLOW into this DENY.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limited: Option<LimitedRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_behalf_of_side: Option<Side>,
    pub policy_version: String,
    pub prev_hash: String,
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub seq: u64,
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub v: u8,
}

/// A grant presented with a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GrantRecord {
    // Alphabetical: the canonical encoding the chain hashes (see `chain`).
    pub approver: String,
    pub detail: String,
    pub expires_at: u64,
    pub grant_id: String,
    pub outcome: &'static str,
}

impl GrantRecord {
    fn of(g: &GrantUse) -> Self {
        Self {
            approver: g.approver.clone(),
            detail: g.detail.clone(),
            expires_at: g.expires_at,
            grant_id: g.grant_id.clone(),
            outcome: g.outcome,
        }
    }
}

/// The approval a gated permit asks for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApprovalRecord {
    // Alphabetical: the canonical encoding the chain hashes (see `chain`).
    pub fingerprint: String,
    pub policies: Vec<String>,
}

/// The limit that turned an ALLOW into a DENY.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LimitedRecord {
    // Alphabetical: the canonical encoding the chain hashes (see `chain`).
    pub limit: String,
    pub policy_id: String,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl chain::Link for Record {
    fn link(&mut self, seq: u64, prev_hash: String) {
        self.seq = seq;
        self.prev_hash = prev_hash;
    }
}

/// One side of a decision.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Side {
    pub decision: &'static str,
    pub determining_policies: Vec<String>,
    /// Policies whose evaluation failed (ids only: messages can quote values).
    pub error_policies: Vec<String>,
}

impl Side {
    fn of(s: &SideDecision) -> Self {
        Self {
            decision: if s.allowed { "allow" } else { "deny" },
            determining_policies: s.determining.clone(),
            error_policies: s.errors.iter().map(|e| e.policy_id.clone()).collect(),
        }
    }
}

/// Why a request could not be decided.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Invalid {
    pub field: String,
    pub problem: String,
}

/// HMAC-SHA256 (RFC 2104): a keyed hash, so equal values can be matched
/// across records without the values being readable.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| -> [u8; BLOCK] {
        let mut padded = [0u8; BLOCK];
        for (p, k) in padded.iter_mut().zip(block_key.iter()) {
            *p = k ^ byte;
        }
        padded
    };
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// One decision as the audit trail records it.
#[derive(Debug)]
pub struct Entry<'a> {
    /// As answered: the service has cut an overlong one already
    /// ([`crate::service::convert::shown_request_id`]).
    pub request_id: &'a str,
    pub trace_id: Option<&'a str>,
    /// Who asked: `tcp:ADDR` or `unix:pid=P,uid=U`.
    pub caller: &'a str,
    pub wire: &'a pb::IsAuthorizedRequest,
    pub request: Option<&'a AuthzRequest>,
    pub result: &'a Result<Decision, RequestError>,
    pub policy_version: &'a str,
    pub latency_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_key_is_not_printed_by_debug() {
        let options = AuditOptions {
            hash_key: b"a very secret key".to_vec(),
            ..AuditOptions::default()
        };
        let printed = format!("{options:?}");
        assert!(!printed.contains("secret key") && !printed.contains("97, 32"));
        assert!(printed.contains("[17 secret bytes]"), "{printed}");
        assert_eq!(
            format!("{:?}", HashKey(b"a very secret key".to_vec())),
            "[17 secret bytes]"
        );
    }

    #[test]
    fn a_trail_marked_unavailable_after_its_write_completed_recovers_when_woken() {
        let dir = tempfile::tempdir().expect("temp dir");
        let audit = Audit::start(&AuditOptions {
            target: AuditTarget::File(dir.path().join("audit.log")),
            ..AuditOptions::default()
        })
        .expect("starts");
        // What a disk-mode caller that gave up just as its write completed
        // does: the trail is marked unavailable after the writer's success,
        // with nothing owed, and the writer is woken with an empty job.
        audit
            .status
            .failed("the audit write has not completed in 10s".to_owned());
        assert!(!audit.status.available());
        let jobs = audit.jobs.lock().expect("lock").clone().expect("writer");
        jobs.try_send(writer::Job::wake_up()).expect("queued");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !audit.status.available() {
            assert!(
                std::time::Instant::now() < deadline,
                "the trail never recovered"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Nothing was owed, so nothing was written: no outage record.
        drop(jobs);
        assert_eq!(audit.shutdown(std::time::Duration::from_secs(5)), Ok(()));
        let trail = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
        assert!(!trail.contains("audit_unavailable"), "{trail}");
    }

    #[test]
    fn a_second_writer_on_the_same_trail_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = AuditOptions {
            target: AuditTarget::File(dir.path().join("audit.log")),
            ..AuditOptions::default()
        };
        let first = Audit::start(&options).expect("starts");
        let error = match Audit::start(&options) {
            Ok(_) => panic!("a second writer is refused"),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains("is being written by another process"),
            "{error}"
        );
        assert_eq!(first.shutdown(std::time::Duration::from_secs(5)), Ok(()));
        // Closed, the trail can be taken over (a restart).
        let next = Audit::start(&options).expect("starts once the first has closed");
        assert_eq!(next.shutdown(std::time::Duration::from_secs(5)), Ok(()));
    }

    #[tokio::test]
    async fn refusals_not_yet_recorded_are_recorded_at_shutdown() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.log");
        let audit = Audit::start(&AuditOptions {
            target: AuditTarget::File(path.clone()),
            sync: SyncMode::Queued,
            ..AuditOptions::default()
        })
        .expect("starts");
        // Refused on the request path just before the shutdown, with the
        // writer idle (its own writes fine): only a pass at closing time
        // can record the outage.
        audit
            .status
            .refused(1, "the audit queue has been full for 10s (a stalled disk?)");
        assert_eq!(audit.shutdown(std::time::Duration::from_secs(5)), Ok(()));
        let trail = std::fs::read_to_string(&path).expect("trail");
        let records: Vec<serde_json::Value> = trail
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(records.len(), 1, "{trail}");
        assert_eq!(records[0]["event"], "audit_unavailable");
        assert_eq!(records[0]["refused_records"], 1);
    }

    #[tokio::test]
    async fn an_empty_group_of_records_is_answered_in_the_disk_mode() {
        let dir = tempfile::tempdir().expect("temp dir");
        let audit = Audit::start(&AuditOptions {
            target: AuditTarget::File(dir.path().join("audit.log")),
            sync: SyncMode::Disk,
            ..AuditOptions::default()
        })
        .expect("starts");
        // An empty batch: nothing to write, but its caller waits for an
        // answer (before, it got "the audit writer has stopped").
        assert_eq!(audit.append(Vec::new()).await, Ok(()));
        assert!(audit.status.available());
        assert_eq!(audit.shutdown(std::time::Duration::from_secs(5)), Ok(()));
        let trail = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
        assert!(trail.is_empty(), "{trail}");
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            chain::hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
