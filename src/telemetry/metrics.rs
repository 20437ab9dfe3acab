//! Prometheus metrics, served as OpenMetrics text at `/metrics`.
//!
//! Decision counters and histograms are updated on the request path (a few
//! atomic adds and one label lookup). Everything about the bundle and the
//! reloads is read when scraped, from the same state `Admin/Status` reads, so
//! it costs nothing between scrapes and cannot disagree with the status RPC.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use cedar_policy::EntityUid;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tracing::warn;

use super::export::SpanCounters;
use crate::audit::AuditStatus;
use crate::bundle::{LiveBundle, Snapshot};
use crate::reload::ReloadStatus;

/// Most distinct `action` label values: a schema can declare any number of
/// actions and reloads can change them, but a time series per action must
/// stay bounded. Actions past the limit are counted as `other`.
pub const MAX_ACTION_LABELS: usize = 256;

/// The label value for requests whose action is not in the schema, and for
/// actions past [`MAX_ACTION_LABELS`].
pub const OTHER_ACTION: &str = "other";

/// Content type of the `/metrics` answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Decision latency buckets, in seconds: 25 µs to 2.5 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];

/// Batch size buckets: up to the largest `--max-batch` anyone should need.
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// How a decision came out, as the `decision` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allow,
    Deny,
    /// The policies allow, a gated permit waits for a human's approval.
    ApprovalRequired,
    /// Bad input: answered with `INVALID_ARGUMENT` (or a DENY item in a batch).
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::ApprovalRequired => "approval_required",
            Outcome::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    action: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GrantLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitedLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    code: &'static str,
}

/// The metrics of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    limited: Family<LimitedLabels, Counter>,
    grants: Family<GrantLabels, Counter>,
    decision_seconds: Histogram,
    batch_size: Histogram,
    grpc_requests: Family<GrpcLabels, Counter>,
    /// Action label values handed out so far (bounded).
    actions: RwLock<HashSet<String>>,
    /// Whether the "too many actions" warning was logged.
    actions_capped: AtomicBool,
}

impl Metrics {
    /// Metrics over the served bundle (`live`), the reload history
    /// (`status`), the span counters, the limit counters and, when it is
    /// on, the audit trail.
    pub fn new(
        live: Arc<LiveBundle>,
        status: Arc<ReloadStatus>,
        spans: Arc<SpanCounters>,
        audit: Option<Arc<AuditStatus>>,
        quota: Arc<crate::quota::Quota>,
    ) -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "leash_decisions",
            "Decisions by outcome (allow, deny, approval_required, invalid) and action",
            decisions.clone(),
        );
        let grants = Family::<GrantLabels, Counter>::default();
        registry.register(
            "leash_grants",
            "Signed grants presented, by outcome (used, or why refused)",
            grants.clone(),
        );
        let limited = Family::<LimitedLabels, Counter>::default();
        registry.register(
            "leash_limited",
            "Decisions the policies allowed that a rate or budget limit turned into DENY, by reason",
            limited.clone(),
        );
        let decision_seconds = Histogram::new(LATENCY_BUCKETS);
        registry.register_with_unit(
            "leash_decision_duration",
            "Time to decide one request, from conversion to answer",
            Unit::Seconds,
            decision_seconds.clone(),
        );
        let batch_size = Histogram::new(BATCH_BUCKETS);
        registry.register(
            "leash_batch_size",
            "Requests per BatchIsAuthorized call",
            batch_size.clone(),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "leash_grpc_requests",
            "gRPC calls answered, by method and status code (OK or the error)",
            grpc_requests.clone(),
        );
        registry.register_collector(Box::new(StateCollector {
            live,
            status,
            spans,
            audit,
            quota,
        }));
        Self {
            registry,
            decisions,
            limited,
            grants,
            decision_seconds,
            batch_size,
            grpc_requests,
            actions: RwLock::new(HashSet::new()),
            actions_capped: AtomicBool::new(false),
        }
    }

    /// Counts one decision and its latency. `action` is labelled only if the
    /// served schema declares it (anything else is `other`), so callers
    /// cannot create series at will.
    pub fn decision(
        &self,
        outcome: Outcome,
        action: Option<&EntityUid>,
        snapshot: &Snapshot,
        elapsed: Duration,
    ) {
        let action = match action {
            Some(uid) if snapshot.actions.contains(uid) => self.action_label(uid),
            _ => OTHER_ACTION.to_owned(),
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: outcome.as_str(),
                action,
            })
            .inc();
        self.decision_seconds.observe(elapsed.as_secs_f64());
    }

    /// Counts a decision a limit turned into DENY.
    pub fn limited(&self, reason: &'static str) {
        self.limited.get_or_create(&LimitedLabels { reason }).inc();
    }

    /// Counts a grant presented with a request.
    pub fn grant(&self, outcome: &'static str) {
        self.grants.get_or_create(&GrantLabels { outcome }).inc();
    }

    pub fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    /// Counts one answered gRPC call.
    pub fn grpc_request(&self, method: &'static str, code: tonic::Code) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn action_label(&self, uid: &EntityUid) -> String {
        let label = action_label(uid);
        let known = self
            .actions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&label);
        if known {
            return label;
        }
        let mut actions = self.actions.write().unwrap_or_else(PoisonError::into_inner);
        if actions.len() < MAX_ACTION_LABELS || actions.contains(&label) {
            actions.insert(label.clone());
            return label;
        }
        if !self.actions_capped.swap(true, Ordering::Relaxed) {
            warn!(
                limit = MAX_ACTION_LABELS,
                "more distinct actions than the metrics label limit; the rest are counted as `other`"
            );
        }
        OTHER_ACTION.to_owned()
    }
}

/// `Action::"tickets:read"` → `tickets:read`; an action of a namespace keeps
/// it: `Billing::Action::"refund"` → `Billing::Action::refund`.
pub fn action_label(uid: &EntityUid) -> String {
    let type_name = uid.type_name();
    let id = uid.id().unescaped();
    if type_name.basename() == "Action" && type_name.namespace_components().next().is_none() {
        id.to_owned()
    } else {
        format!("{type_name}::{id}")
    }
}

/// gRPC status codes by their canonical names.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Bundle, reload and span figures, read at scrape time.
#[derive(Debug)]
struct StateCollector {
    live: Arc<LiveBundle>,
    status: Arc<ReloadStatus>,
    spans: Arc<SpanCounters>,
    /// `None` when the audit trail is off.
    audit: Option<Arc<AuditStatus>>,
    quota: Arc<crate::quota::Quota>,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (serving, view) = self.status.view_with(&self.live);

        let loaded = ConstGauge::new(i64::from(serving.is_some()));
        loaded.encode(encoder.encode_descriptor(
            "leash_policy_bundle_loaded",
            "1 when a valid policy bundle is served (what /readyz reports), else 0.",
            None,
            MetricType::Gauge,
        )?)?;

        if let Some(snapshot) = &serving {
            let info = Info::new(vec![
                ("version".to_owned(), snapshot.version.clone()),
                ("origin".to_owned(), snapshot.origin.clone()),
            ]);
            info.encode(encoder.encode_descriptor(
                "leash_policy_bundle",
                "The served policy bundle: its content-hash version and where it was read from.",
                None,
                MetricType::Info,
            )?)?;
            let policies = ConstGauge::new(clamp_i64(snapshot.policy_count()));
            policies.encode(encoder.encode_descriptor(
                "leash_policies",
                "Policies in the served bundle.",
                None,
                MetricType::Gauge,
            )?)?;
            if let Some(index) = &snapshot.index {
                let cache = index.cache_size();
                ConstGauge::new(clamp_i64(cache.subsets)).encode(encoder.encode_descriptor(
                    "leash_index_subsets",
                    "Policy subsets the scope index keeps assembled for the served bundle (at most 4096).",
                    None,
                    MetricType::Gauge,
                )?)?;
                ConstGauge::new(clamp_i64(cache.bytes)).encode(encoder.encode_descriptor(
                    "leash_index_subset_bytes",
                    "Estimated weight of the kept subsets' policies (source text plus 1 KiB each; at most 32 MiB).",
                    None,
                    MetricType::Gauge,
                )?)?;
            }
        }
        ConstCounter::new(crate::bundle::index_fallbacks()).encode(encoder.encode_descriptor(
            "leash_index_fallbacks",
            "Requests the scope index could not narrow, decided on the whole policy set (the same answer, slower); \
             expected to stay 0.",
            None,
            MetricType::Counter,
        )?)?;

        // A server published to directly (not through the reloader) counts
        // from its snapshot's load.
        let last_success = view
            .last_success
            .or_else(|| serving.as_ref().map(|s| s.loaded_at));
        if let Some(at) = last_success {
            let age = SystemTime::now()
                .duration_since(at)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64();
            ConstGauge::new(age).encode(encoder.encode_descriptor(
                "leash_seconds_since_last_successful_reload",
                "Seconds since the bundle files were last read and accepted (loaded, or found unchanged), \
                 the startup load included.",
                None,
                MetricType::Gauge,
            )?)?;
        }

        let mut reloads = encoder.encode_descriptor(
            "leash_reloads",
            "Reload attempts by result: loaded (a new version is served), unchanged, refused (invalid \
             files; the previous version serves on).",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [
            ("loaded", view.counters.loaded),
            ("unchanged", view.counters.unchanged),
            ("refused", view.counters.refused),
        ] {
            let labels = [("result", result)];
            ConstCounter::new(count).encode(reloads.encode_family(&labels)?)?;
        }

        ConstCounter::new(self.spans.exported.load(Ordering::Relaxed)).encode(
            encoder.encode_descriptor(
                "leash_spans_exported",
                "Decision spans accepted by the OTLP collector.",
                None,
                MetricType::Counter,
            )?,
        )?;
        let mut dropped = encoder.encode_descriptor(
            "leash_spans_dropped",
            "Decision spans dropped, by reason: queue_full (the collector is slow or down), \
             export_failed (rejected or timed out), shutdown.",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in [
            ("queue_full", &self.spans.dropped_queue_full),
            ("export_failed", &self.spans.dropped_export_failed),
            ("shutdown", &self.spans.dropped_shutdown),
        ] {
            let labels = [("reason", reason)];
            ConstCounter::new(count.load(Ordering::Relaxed))
                .encode(dropped.encode_family(&labels)?)?;
        }
        if let Some(audit) = &self.audit {
            ConstGauge::new(i64::from(audit.available())).encode(encoder.encode_descriptor(
                "leash_audit_available",
                "1 while audit records can be written; 0 while they cannot (decisions are DENY unless fail-open).",
                None,
                MetricType::Gauge,
            )?)?;
            ConstCounter::new(audit.records()).encode(encoder.encode_descriptor(
                "leash_audit_records",
                "Audit records written (and synced, for a file).",
                None,
                MetricType::Counter,
            )?)?;
            ConstCounter::new(audit.write_errors()).encode(encoder.encode_descriptor(
                "leash_audit_write_errors",
                "Batches of audit records that could not be written.",
                None,
                MetricType::Counter,
            )?)?;
            ConstGauge::new(i64::try_from(audit.next_seq()).unwrap_or(i64::MAX)).encode(
                encoder.encode_descriptor(
                    "leash_audit_next_seq",
                    "The seq the next audit record gets (records in the chain so far).",
                    None,
                    MetricType::Gauge,
                )?,
            )?;
        }
        ConstGauge::new(clamp_i64(self.quota.keys())).encode(encoder.encode_descriptor(
            "leash_limit_keys",
            "Rate and budget counter keys held (at most --max-limit-keys; when all are live, limited permits are denied).",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(super::log_writer::dropped_lines())
            .encode(encoder.encode_descriptor(
            "leash_log_lines_dropped",
            "Log lines dropped because stderr could not keep up (decisions never wait for logs).",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

fn clamp_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
