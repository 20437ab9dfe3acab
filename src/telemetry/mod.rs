//! What SREs see of each decision: an OpenTelemetry span in the caller's
//! trace, Prometheus metrics, and a structured log line for every deny.
//!
//! The service hands every decided (or refused) request to
//! [`Telemetry::decision`], which fans it out to all three; nothing here can
//! change or delay a decision. Spans leave through a bounded queue
//! ([`export`]); a slow or absent collector costs dropped spans (counted),
//! never a decision.
//!
//! - One RPC opens one server span, a child of the caller's W3C
//!   `traceparent`/`tracestate` (baggage is read too). For `IsAuthorized`
//!   that span is the decision's span. For `BatchIsAuthorized` it is the
//!   batch's span, and each item gets a child span of its own: items are
//!   decisions like any other, found by the same attributes.
//! - Attribute names: OpenTelemetry's RPC and GenAI conventions where they
//!   fit (`gen_ai.agent.id`, `gen_ai.tool.name`), the rest `leash.*`.
//!   Context values, entity attributes and error messages (which can quote
//!   values) are left out; context keys and baggage keys can be allowed in.

pub mod admin_http;
pub mod export;
pub mod log_writer;
pub mod metrics;
pub mod trace;

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::baggage::BaggageExt as _;
use opentelemetry::propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status as SpanStatus, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tonic::metadata::{KeyRef, MetadataMap};
use tracing::{debug, info};

pub use export::{BatchOptions, SpanCounters};
pub use metrics::{Metrics, Outcome};
pub use trace::{Protocol, SamplerChoice, TraceOptions};

use crate::bundle::{uid_text, LiveBundle, Snapshot};
use crate::engine::{AuthzRequest, Decision, RequestError, SideDecision};
use crate::proto::v1 as pb;
use crate::reload::ReloadStatus;

/// Telemetry settings of a server.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    /// Where and how spans are exported; `None`: no spans.
    pub traces: Option<TraceOptions>,
    /// Whether metrics are kept (they are served by the admin listener;
    /// without one nobody could read them).
    pub metrics: bool,
    /// Top-level context attributes recorded on spans as
    /// `leash.context.<key>`. Empty by default: context values can be
    /// personal data.
    pub context_keys: Vec<String>,
    /// Baggage entries recorded on spans as `leash.baggage.<key>`.
    pub baggage_keys: Vec<String>,
}

impl Default for TelemetryOptions {
    /// Metrics on, no spans, no context or baggage values.
    fn default() -> Self {
        Self {
            traces: None,
            metrics: true,
            context_keys: Vec::new(),
            baggage_keys: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the OTLP span exporter for `{endpoint}`: {problem}")]
    Exporter { endpoint: String, problem: String },
}

/// The gRPC methods that decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    IsAuthorized,
    BatchIsAuthorized,
}

impl Rpc {
    fn method(self) -> &'static str {
        match self {
            Rpc::IsAuthorized => "IsAuthorized",
            Rpc::BatchIsAuthorized => "BatchIsAuthorized",
        }
    }

    fn span_name(self) -> &'static str {
        match self {
            Rpc::IsAuthorized => "leash.v1.Authorizer/IsAuthorized",
            Rpc::BatchIsAuthorized => "leash.v1.Authorizer/BatchIsAuthorized",
        }
    }
}

/// Spans, metrics and decision logs of one server.
#[derive(Debug)]
pub struct Telemetry {
    metrics: Option<Arc<Metrics>>,
    traces: Option<trace::Traces>,
    propagator: TextMapCompositePropagator,
    context_keys: Vec<String>,
    baggage_keys: Vec<String>,
}

impl Telemetry {
    /// Sets up exporting (on the current runtime) and the metrics registry.
    pub fn start(
        options: &TelemetryOptions,
        live: Arc<LiveBundle>,
        status: Arc<ReloadStatus>,
        audit: Option<Arc<crate::audit::AuditStatus>>,
        quota: Arc<crate::quota::Quota>,
    ) -> Result<Self, TelemetryError> {
        let spans = Arc::new(SpanCounters::default());
        let traces = match &options.traces {
            Some(trace_options) => Some(trace::Traces::start(trace_options, spans.clone())?),
            None => None,
        };
        let metrics = options
            .metrics
            .then(|| Arc::new(Metrics::new(live, status, spans.clone(), audit, quota)));
        Ok(Self {
            metrics,
            traces,
            propagator: TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ]),
            context_keys: options.context_keys.clone(),
            baggage_keys: options.baggage_keys.clone(),
        })
    }

    /// The metrics registry, when metrics are on.
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
    }

    /// Opens the span of one RPC, parented by the caller's trace context.
    pub fn start_rpc(&self, metadata: &MetadataMap, rpc: Rpc) -> RpcScope {
        let started = Instant::now();
        let parent = if metadata.contains_key("traceparent") || metadata.contains_key("baggage") {
            self.propagator.extract(&MetadataExtractor(metadata))
        } else {
            Context::new()
        };
        let Some(traces) = &self.traces else {
            return RpcScope {
                cx: parent,
                traced: false,
                started,
                rpc,
            };
        };
        let mut attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", "leash.v1.Authorizer"),
            KeyValue::new("rpc.method", rpc.method()),
        ];
        for key in &self.baggage_keys {
            if let Some(value) = parent.baggage().get(key.as_str()) {
                attributes.push(KeyValue::new(
                    format!("leash.baggage.{key}"),
                    value.as_str().to_owned(),
                ));
            }
        }
        let span = traces
            .tracer
            .span_builder(rpc.span_name())
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&traces.tracer, &parent);
        RpcScope {
            cx: parent.with_span(span),
            traced: true,
            started,
            rpc,
        }
    }

    /// Records one decision: metrics, span attributes (the RPC's span, or a
    /// child span for a batch item), and a log line.
    pub fn decision(&self, scope: &RpcScope, item: Option<usize>, view: &DecisionView<'_>) {
        let elapsed = view.started.elapsed();
        let outcome = match &view.result {
            Ok(_) if view.audit_error.is_some() => Outcome::Deny,
            Ok(d) if d.allowed => Outcome::Allow,
            Ok(d) if d.approval.is_some() => Outcome::ApprovalRequired,
            Ok(_) => Outcome::Deny,
            Err(_) => Outcome::Invalid,
        };
        if let Some(metrics) = &self.metrics {
            let action = view.request.map(|r| &r.action);
            metrics.decision(outcome, action, view.snapshot, elapsed);
            if let Ok(Decision {
                limited: Some(limited),
                ..
            }) = &view.result
            {
                metrics.limited(limited.reason);
            }
            if let Ok(d) = &view.result {
                if let Some(grant) = &d.grant {
                    metrics.grant(grant.outcome);
                }
                // Each grant once: the first elevation may be `grant` itself.
                for e in &d.elevated_by {
                    if d.grant.as_ref() != Some(e) {
                        metrics.grant(e.outcome);
                    }
                }
            }
        }
        log_decision(view, outcome, scope);
        if !scope.traced {
            return;
        }
        match (item, &self.traces) {
            (None, _) => {
                let span = scope.cx.span();
                if span.is_recording() {
                    let mut attributes = self.attributes(view, outcome);
                    // OK, or INVALID_ARGUMENT: the caller's mistake, which by
                    // the RPC conventions leaves the span status unset.
                    let code = if view.result.is_ok() {
                        tonic::Code::Ok
                    } else {
                        tonic::Code::InvalidArgument
                    };
                    attributes.push(KeyValue::new("rpc.grpc.status_code", code as i64));
                    span.set_attributes(attributes);
                    // The call itself is answered (OK, with the error in
                    // its body), but not recording it is leash's failure.
                    if let Some(e) = view.audit_error {
                        span.set_status(SpanStatus::error(e.to_owned()));
                    }
                }
            }
            (Some(index), Some(traces)) => {
                if !scope.cx.span().is_recording() {
                    return;
                }
                let mut attributes = self.attributes(view, outcome);
                attributes.push(KeyValue::new("leash.batch.index", index as i64));
                let mut span = traces
                    .tracer
                    .span_builder("leash.decision")
                    .with_kind(SpanKind::Internal)
                    .with_start_time(
                        std::time::SystemTime::now()
                            .checked_sub(elapsed)
                            .unwrap_or_else(std::time::SystemTime::now),
                    )
                    .with_attributes(attributes)
                    .start_with_context(&traces.tracer, &scope.cx);
                if let Some(e) = view.audit_error {
                    span.set_status(SpanStatus::error(e.to_owned()));
                }
                span.end();
            }
            (Some(_), None) => {}
        }
    }

    /// Records the end of a batch on its span.
    pub fn batch(&self, scope: &RpcScope, size: usize, counts: BatchCounts) {
        if let Some(metrics) = &self.metrics {
            metrics.batch(size);
        }
        let span = scope.cx.span();
        if scope.traced && span.is_recording() {
            span.set_attributes([
                KeyValue::new("rpc.grpc.status_code", tonic::Code::Ok as i64),
                KeyValue::new("leash.batch.size", size as i64),
                KeyValue::new("leash.batch.allowed", counts.allowed as i64),
                KeyValue::new("leash.batch.denied", counts.denied as i64),
                KeyValue::new("leash.batch.invalid", counts.invalid as i64),
            ]);
        }
    }

    /// Records an RPC refused as a whole (no bundle, batch too large).
    pub fn refused(&self, scope: &RpcScope, status: &tonic::Status) {
        let span = scope.cx.span();
        if scope.traced && span.is_recording() {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", status.code() as i64));
            // The RPC conventions: a server span is an error only for codes
            // that are the server's fault, not for the caller's mistakes.
            if server_fault(status.code()) {
                span.set_status(SpanStatus::error(status.message().to_owned()));
            }
        }
        debug!(
            rpc = scope.rpc.method(),
            code = ?status.code(),
            error = status.message(),
            "request refused"
        );
    }

    /// Exports the spans still queued; for graceful shutdown.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some(traces) = &self.traces {
            if traces.queue.shutdown(timeout).await {
                info!("spans flushed");
            } else {
                tracing::warn!(
                    timeout_secs = timeout.as_secs_f64(),
                    "span flush timed out; the spans still queued are lost"
                );
            }
        }
    }

    /// Exports the spans queued so far (tests and benchmarks).
    pub async fn flush(&self, timeout: Duration) -> bool {
        match &self.traces {
            Some(traces) => traces.queue.flush(timeout).await,
            None => true,
        }
    }

    fn attributes(&self, view: &DecisionView<'_>, outcome: Outcome) -> Vec<KeyValue> {
        let mut a = Vec::with_capacity(16);
        a.push(KeyValue::new(
            "leash.request_id",
            view.request_id.to_owned(),
        ));
        a.push(KeyValue::new("leash.decision", outcome.as_str()));
        a.push(KeyValue::new(
            "leash.policy_version",
            view.snapshot.version.clone(),
        ));
        if let Some(r) = view.request {
            a.push(KeyValue::new("gen_ai.agent.id", uid_text(&r.agent)));
            if let Some(user) = &r.on_behalf_of {
                a.push(KeyValue::new("leash.on_behalf_of", uid_text(user)));
            }
            a.push(KeyValue::new("leash.action", uid_text(&r.action)));
            a.push(KeyValue::new(
                "gen_ai.tool.name",
                r.action.id().unescaped().to_owned(),
            ));
            a.push(KeyValue::new("leash.resource", uid_text(&r.resource)));
            self.context_attributes(view.wire, &mut a);
        }
        if let Some(e) = view.audit_error {
            a.push(KeyValue::new("leash.audit.error", e.to_owned()));
        }
        match &view.result {
            Ok(d) => {
                a.push(KeyValue::new(
                    "leash.determining_policies",
                    string_array(&d.determining),
                ));
                a.push(KeyValue::new("leash.error_count", d.errors.len() as i64));
                if let Some(grant) = &d.grant {
                    a.push(KeyValue::new("leash.grant.outcome", grant.outcome));
                    a.push(KeyValue::new("leash.grant.id", grant.grant_id.clone()));
                    a.push(KeyValue::new(
                        "leash.grant.approver",
                        grant.approver.clone(),
                    ));
                    a.push(KeyValue::new(
                        "leash.grant.expires_at",
                        i64::try_from(grant.expires_at).unwrap_or(i64::MAX),
                    ));
                }
                if !d.elevated_by.is_empty() {
                    let ids: Vec<String> =
                        d.elevated_by.iter().map(|e| e.grant_id.clone()).collect();
                    a.push(KeyValue::new("leash.elevated_by", string_array(&ids)));
                }
                // Not the fingerprint: an unkeyed hash of the request's
                // values, it would let a reader of traces confirm guesses
                // of values spans leave out.
                if let Some(approval) = &d.approval {
                    a.push(KeyValue::new(
                        "leash.approval.policies",
                        approval.policies.join(","),
                    ));
                }
                if let Some(limited) = &d.limited {
                    a.push(KeyValue::new("leash.limit.reason", limited.reason));
                    a.push(KeyValue::new(
                        "leash.limit.policy",
                        limited.policy_id.clone(),
                    ));
                    a.push(KeyValue::new("leash.limit", limited.limit.clone()));
                    if let Some(after) = limited.retry_after {
                        a.push(KeyValue::new(
                            "leash.limit.retry_after_ms",
                            i64::try_from(crate::quota::retry_after_ms(after)).unwrap_or(i64::MAX),
                        ));
                    }
                }
                side_attributes(&AGENT_KEYS, &d.agent, &mut a);
                if let Some(user) = &d.on_behalf_of {
                    side_attributes(&USER_KEYS, user, &mut a);
                }
            }
            Err(e) => {
                a.push(KeyValue::new(
                    "leash.invalid.field",
                    e.field_for_records().into_owned(),
                ));
            }
        }
        a
    }

    fn context_attributes(&self, wire: &pb::IsAuthorizedRequest, a: &mut Vec<KeyValue>) {
        use pb::is_authorized_request::ContextInput as C;
        if self.context_keys.is_empty() {
            return;
        }
        // Read from the wire form, so both context inputs are rendered the
        // same way: as Cedar JSON.
        let parsed;
        let fields = match &wire.context_input {
            None => return,
            Some(C::ContextJson(text)) => {
                parsed = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                    .unwrap_or_default();
                ContextFields::Json(&parsed)
            }
            Some(C::Context(record)) => ContextFields::Typed(record),
        };
        for key in &self.context_keys {
            let value = match fields {
                ContextFields::Json(map) => map.get(key).map(|v| v.to_string()),
                ContextFields::Typed(record) => {
                    record.fields.get(key).map(|v| wire_json(v).to_string())
                }
            };
            if let Some(value) = value {
                a.push(KeyValue::new(format!("leash.context.{key}"), value));
            }
        }
    }
}

/// The context of a request, in either wire form.
#[derive(Clone, Copy)]
enum ContextFields<'a> {
    Json(&'a serde_json::Map<String, serde_json::Value>),
    Typed(&'a pb::Record),
}

/// A typed wire value as Cedar JSON, for recording configured context keys.
pub fn wire_json(v: &pb::Value) -> serde_json::Value {
    use pb::value::Kind;
    use serde_json::{json, Value as J};
    match &v.kind {
        None => J::Null,
        Some(Kind::Bool(b)) => J::Bool(*b),
        Some(Kind::Long(n)) => J::from(*n),
        Some(Kind::String(s)) => J::String(s.clone()),
        Some(Kind::Entity(e)) => json!({"__entity": {"type": e.r#type, "id": e.id}}),
        Some(Kind::Set(set)) => J::Array(set.values.iter().map(wire_json).collect()),
        Some(Kind::Record(r)) => J::Object(
            r.fields
                .iter()
                .map(|(k, v)| (k.clone(), wire_json(v)))
                .collect(),
        ),
        Some(Kind::Extension(x)) => json!({"__extn": {"fn": x.r#fn, "arg": x.arg}}),
    }
}

fn server_fault(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Attribute names of one side: decision, determining policies, errors.
type SideKeys = [&'static str; 3];

const AGENT_KEYS: SideKeys = [
    "leash.agent.decision",
    "leash.agent.determining_policies",
    "leash.agent.error_policies",
];
const USER_KEYS: SideKeys = [
    "leash.on_behalf_of.decision",
    "leash.on_behalf_of.determining_policies",
    "leash.on_behalf_of.error_policies",
];

fn side_attributes(keys: &SideKeys, side: &SideDecision, a: &mut Vec<KeyValue>) {
    let [decision, determining, errors] = *keys;
    a.push(KeyValue::new(
        decision,
        if side.allowed { "allow" } else { "deny" },
    ));
    a.push(KeyValue::new(determining, string_array(&side.determining)));
    if !side.errors.is_empty() {
        let ids: Vec<String> = side.errors.iter().map(|e| e.policy_id.clone()).collect();
        a.push(KeyValue::new(errors, string_array(&ids)));
    }
}

fn string_array(items: &[String]) -> Value {
    Value::Array(opentelemetry::Array::String(
        items.iter().cloned().map(StringValue::from).collect(),
    ))
}

/// Allowed, denied and invalid items of a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchCounts {
    pub allowed: usize,
    pub denied: usize,
    pub invalid: usize,
}

impl BatchCounts {
    /// Counts what the caller was answered: an item whose record the trail
    /// refused was answered DENY, and `approval_required` is a DENY.
    pub fn add(&mut self, result: &Result<Decision, RequestError>, unrecorded: bool) {
        match result {
            Ok(d) if d.allowed && !unrecorded => self.allowed += 1,
            Ok(_) => self.denied += 1,
            Err(_) => self.invalid += 1,
        }
    }
}

/// One RPC in flight: its span (if traced) and the caller's context.
#[derive(Debug)]
pub struct RpcScope {
    /// The caller's context, with leash's span in it when traced.
    cx: Context,
    traced: bool,
    started: Instant,
    rpc: Rpc,
}

impl RpcScope {
    /// When the RPC reached the service.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The trace id to log: leash's span's, or the caller's when leash does
    /// not export spans (so logs still join the caller's trace).
    pub fn trace_id(&self) -> Option<String> {
        let span = self.cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.trace_id().to_string())
    }
}

impl Drop for RpcScope {
    fn drop(&mut self) {
        // The span ends when the RPC's work is done, whichever way it ended.
        if self.traced {
            self.cx.span().end();
        }
    }
}

/// One decision as telemetry sees it.
#[derive(Debug)]
pub struct DecisionView<'a> {
    pub request_id: &'a str,
    /// The request as received.
    pub wire: &'a pb::IsAuthorizedRequest,
    /// The converted request; `None` when conversion itself failed.
    pub request: Option<&'a AuthzRequest>,
    pub result: &'a Result<Decision, RequestError>,
    pub snapshot: &'a Snapshot,
    /// When deciding this request began.
    pub started: Instant,
    /// Set when the decision could not be recorded in the audit trail and
    /// was answered DENY for that reason.
    pub audit_error: Option<&'a str>,
}

/// One line per decision: DENY and invalid requests at info, ALLOW at
/// debug. Never context values. Caller text is recorded as strings, not
/// with `%` (Display): the text format quotes and escapes strings, so a
/// newline in a field path or a grant's key id cannot forge a log line.
fn log_decision(view: &DecisionView<'_>, outcome: Outcome, scope: &RpcScope) {
    // The fields cost allocations: build them only for a line that is on.
    // Level and target filters apply to the hand-written deny line below as
    // to the macros (same target); it carries no span keys, and leash enters
    // no tracing span around a decision.
    let on = if outcome == Outcome::Allow {
        tracing::enabled!(tracing::Level::DEBUG)
    } else {
        tracing::enabled!(tracing::Level::INFO)
    };
    if !on {
        return;
    }
    let trace_id = scope.trace_id();
    let trace_id = trace_id.as_deref();
    let agent = view.request.map(|r| uid_text(&r.agent));
    let user = view
        .request
        .and_then(|r| r.on_behalf_of.as_ref())
        .map(uid_text);
    let action = view.request.map(|r| uid_text(&r.action));
    let resource = view.request.map(|r| uid_text(&r.resource));
    let version = view.snapshot.version.as_str();
    match (&view.result, outcome) {
        (Ok(d), Outcome::Allow) => debug!(
            request_id = view.request_id,
            trace_id,
            agent = agent.as_deref(),
            on_behalf_of = user.as_deref(),
            action = action.as_deref(),
            resource = resource.as_deref(),
            decision = "allow",
            determining_policies = d.determining.join(",").as_str(),
            policy_version = version,
            "decision"
        ),
        (Ok(d), _) => {
            let reason = view.audit_error.map_or_else(
                || d.deny_reason(),
                |e| format!("audit trail unavailable: {e}"),
            );
            let determining = d.determining.join(",");
            let errors = d
                .errors
                .iter()
                .map(|e| e.policy_id.as_str())
                .collect::<Vec<_>>()
                .join(",");
            match log_writer::DecisionLine::start("INFO", "decision") {
                Some(mut line) => {
                    line.field("request_id", view.request_id)
                        .field("trace_id", trace_id)
                        .field("agent", agent.as_deref())
                        .field("on_behalf_of", user.as_deref())
                        .field("action", action.as_deref())
                        .field("resource", resource.as_deref())
                        .field("decision", outcome.as_str())
                        .field("reason", reason.as_str())
                        .field("determining_policies", determining.as_str())
                        .field("error_policies", errors.as_str())
                        .field("policy_version", version);
                    line.send(module_path!());
                }
                None => info!(
                    request_id = view.request_id,
                    trace_id,
                    agent = agent.as_deref(),
                    on_behalf_of = user.as_deref(),
                    action = action.as_deref(),
                    resource = resource.as_deref(),
                    decision = outcome.as_str(),
                    reason = reason.as_str(),
                    determining_policies = determining.as_str(),
                    error_policies = errors.as_str(),
                    policy_version = version,
                    "decision"
                ),
            }
        }
        (Err(e), _) => {
            // The problem text may quote context values: debug only.
            info!(
                request_id = view.request_id,
                trace_id,
                agent = agent.as_deref(),
                on_behalf_of = user.as_deref(),
                action = action.as_deref(),
                resource = resource.as_deref(),
                decision = "invalid",
                field = &*e.field_for_records(),
                policy_version = version,
                "invalid request"
            );
            debug!(
                request_id = view.request_id,
                problem = e.problem.as_str(),
                "invalid request detail"
            );
        }
    }
}

/// Reads W3C trace context and baggage from gRPC metadata.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}
