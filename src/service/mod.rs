//! The `leash.v1.Authorizer` gRPC service: converts requests, asks the engine,
//! records every decision in the audit trail before answering it, converts
//! decisions back, maps bad input to `INVALID_ARGUMENT`, and hands every
//! decision to telemetry.

pub mod admin;
pub mod convert;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tonic::{Request, Response, Status};

use crate::audit::{self, Audit};
use crate::bundle::{LiveBundle, Snapshot};
use crate::engine::{
    self, AuthzRequest, Clock, Decision, PolicyError, RequestError, RequestTime, SideDecision,
};
use crate::proto::v1 as pb;
use crate::quota::{self, Quota};
use crate::telemetry::{BatchCounts, DecisionView, Rpc, RpcScope, Telemetry};

/// Default largest batch of `BatchIsAuthorized`.
pub const DEFAULT_MAX_BATCH: usize = 100;

/// The gRPC `Authorizer` service.
#[derive(Clone)]
pub struct AuthorizerService {
    /// The snapshot every request reads; swapped whole on reload.
    live: Arc<LiveBundle>,
    /// Largest accepted batch; a larger one is refused whole.
    max_batch: usize,
    /// Where every decision is reported: span, metrics, log line.
    telemetry: Arc<Telemetry>,
    /// Where every decision is recorded before it is answered.
    audit: Arc<Audit>,
    limiting: Limiting,
}

/// What outlives a bundle on the decision path: the rate and budget
/// counters, the used grant ids, and the clock decisions are made at.
#[derive(Debug, Clone)]
pub struct Limiting {
    pub quota: Arc<Quota>,
    pub used_grants: Arc<crate::grants::UsedGrants>,
    /// Longest grant lifetimes accepted.
    pub lifetimes: crate::grants::Lifetimes,
    pub clock: Clock,
}

/// One request, decided but not yet recorded or answered.
struct Decided {
    request_id: String,
    parsed: Option<AuthzRequest>,
    result: Result<Decision, RequestError>,
    started: Instant,
}

impl AuthorizerService {
    pub fn new(
        live: Arc<LiveBundle>,
        max_batch: usize,
        telemetry: Arc<Telemetry>,
        audit: Arc<Audit>,
        limiting: Limiting,
    ) -> Self {
        Self {
            live,
            max_batch,
            telemetry,
            audit,
            limiting,
        }
    }

    fn snapshot(&self, scope: &RpcScope) -> Result<Arc<Snapshot>, Status> {
        self.live.current().ok_or_else(|| {
            let status = Status::unavailable("no valid policy bundle is loaded yet");
            self.telemetry.refused(scope, &status);
            status
        })
    }

    fn decide(
        &self,
        snapshot: &Snapshot,
        req: &pb::IsAuthorizedRequest,
        now: (SystemTime, &RequestTime),
        started: Instant,
    ) -> Decided {
        let request_id = request_id(&req.request_id);
        let (parsed, result) = match convert::request(req) {
            Ok(r) => {
                let limiting = &self.limiting;
                let decided =
                    engine::decide_with_grants(snapshot, &r, now.1, now.0, limiting.lifetimes).map(
                        |mut decision| {
                            crate::grants::apply(
                                snapshot,
                                &limiting.used_grants,
                                &r,
                                &mut decision,
                                now.0,
                                limiting.lifetimes,
                            );
                            quota::apply(snapshot, &limiting.quota, &r, &mut decision, now.0);
                            if decision.limited.is_some() {
                                // A limit refused the call the grant was used for:
                                // the grant stays good for the retry.
                                if let Some(grant) =
                                    decision.grant.as_mut().filter(|g| g.outcome == "used")
                                {
                                    limiting
                                        .used_grants
                                        .release(&grant.approver, &grant.grant_id);
                                    grant.outcome = "not_used";
                                }
                            }
                            decision
                        },
                    );
                (Some(r), decided)
            }
            Err(e) => (None, Err(e)),
        };
        Decided {
            request_id,
            parsed,
            result,
            started,
        }
    }

    /// Records the decisions before they are answered. `Some` when they
    /// could not be recorded and leash fails closed.
    async fn record(
        &self,
        scope: &RpcScope,
        caller: &str,
        snapshot: &Snapshot,
        items: &[(&pb::IsAuthorizedRequest, &Decided)],
    ) -> Option<Unrecorded> {
        // An empty batch decides nothing: nothing to record.
        if !self.audit.enabled() || items.is_empty() {
            return None;
        }
        let trace_id = scope.trace_id();
        let records = items
            .iter()
            .map(|(wire, d)| {
                self.audit.record(&audit::Entry {
                    request_id: &d.request_id,
                    trace_id: trace_id.as_deref(),
                    caller,
                    wire,
                    request: d.parsed.as_ref(),
                    result: &d.result,
                    policy_version: &snapshot.version,
                    latency_us: u64::try_from(d.started.elapsed().as_micros()).unwrap_or(u64::MAX),
                })
            })
            .collect();
        let used: Vec<(String, String)> = items.iter().filter_map(|(_, d)| used_grant(d)).collect();
        let appended = if used.is_empty() {
            self.audit.append(records).await
        } else {
            // A decision that used a single-use grant is recorded in a task
            // of its own: should the caller go away (a deadline, a reset)
            // while its record waits for room in the queue, the record is
            // still written or, failing that, the grant given back; never
            // held used with no record saying so.
            let (audit, grants) = (self.audit.clone(), self.limiting.used_grants.clone());
            let recorded = tokio::spawn(async move {
                let appended = audit.append(records).await;
                if appended.is_err() && !audit.fail_open() {
                    for (approver, id) in &used {
                        grants.release(approver, id);
                    }
                }
                appended
            })
            .await;
            match recorded {
                Ok(appended) => appended,
                // The task did not finish (a panic, or the runtime shutting
                // down): whether its record was written is unknown, so the
                // grant stays used, and the answer says so.
                Err(e) => {
                    return Some(Unrecorded {
                        error: format!("recording failed: {e}"),
                        grants_given_back: false,
                    })
                }
            }
        };
        match appended {
            Ok(()) => None,
            Err(e) if self.audit.fail_open() => {
                tracing::error!(
                    error = %e,
                    "audit trail unavailable; answering anyway (--audit-fail-open): these decisions are not recorded"
                );
                None
            }
            Err(error) => Some(Unrecorded {
                error,
                grants_given_back: true,
            }),
        }
    }

    fn report(
        &self,
        scope: &RpcScope,
        item: Option<usize>,
        wire: &pb::IsAuthorizedRequest,
        d: &Decided,
        snapshot: &Snapshot,
        audit_error: Option<&str>,
    ) {
        self.telemetry.decision(
            scope,
            item,
            &DecisionView {
                request_id: &d.request_id,
                wire,
                request: d.parsed.as_ref(),
                result: &d.result,
                snapshot,
                started: d.started,
                audit_error,
            },
        );
    }
}

impl AuthorizerService {
    /// Who called, for the audit trail (empty when the trail is off).
    fn caller<T>(&self, request: &Request<T>) -> String {
        if self.audit.enabled() {
            caller(request)
        } else {
            String::new()
        }
    }
}

/// Who called, for the audit trail: `tcp:ADDR` or `unix:pid=P,uid=U`.
fn caller<T>(request: &Request<T>) -> String {
    if let Some(addr) = request.remote_addr() {
        return format!("tcp:{addr}");
    }
    match request
        .extensions()
        .get::<Option<crate::server::uds::UnixPeer>>()
        .copied()
        .flatten()
    {
        Some(peer) => match peer.pid {
            Some(pid) => format!("unix:pid={pid},uid={}", peer.uid),
            None => format!("unix:uid={}", peer.uid),
        },
        None => "unknown".to_owned(),
    }
}

/// Decisions whose records could not be written: why, and whether the
/// single-use grants they used were given back.
struct Unrecorded {
    error: String,
    grants_given_back: bool,
}

/// The grant `decided` used, if any, as (approver, id).
fn used_grant(decided: &Decided) -> Option<(String, String)> {
    let grant = decided.result.as_ref().ok()?.grant.as_ref()?;
    (grant.outcome == "used").then(|| (grant.approver.clone(), grant.grant_id.clone()))
}

/// A decision that could not be recorded is answered DENY, so the
/// single-use approval grant it used stays good for the retry (`record`
/// gave it back). Limit counters it moved are not given back: they
/// over-count, which fails closed, and the trail is out only until the disk
/// takes writes again. Done before the decision is reported, so metrics and
/// the span say `not_used` for a grant that was given back.
fn grant_not_used(decided: &mut Decided) {
    if let Ok(decision) = &mut decided.result {
        if let Some(grant) = decision.grant.as_mut().filter(|g| g.outcome == "used") {
            grant.outcome = "not_used";
        }
    }
}

/// The answer for a decision that could not be recorded: DENY, saying why.
fn unrecorded(request_id: &str, version: &str, error: &str) -> pb::IsAuthorizedResponse {
    pb::IsAuthorizedResponse {
        request_id: request_id.to_owned(),
        decision: pb::Decision::Deny as i32,
        policy_version: version.to_owned(),
        error: Some(pb::RequestError {
            code: tonic::Code::Unavailable as i32,
            message: format!("audit trail unavailable, so the decision is DENY: {error}"),
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::authorizer_server::Authorizer for AuthorizerService {
    async fn is_authorized(
        &self,
        request: Request<pb::IsAuthorizedRequest>,
    ) -> Result<Response<pb::IsAuthorizedResponse>, Status> {
        let scope = self
            .telemetry
            .start_rpc(request.metadata(), Rpc::IsAuthorized);
        let snapshot = self.snapshot(&scope)?;
        let at = self.limiting.clock.now();
        let now = RequestTime::of(at);
        let wire = request.get_ref();
        let mut d = self.decide(&snapshot, wire, (at, &now), scope.started());
        let failed = self
            .record(&scope, &self.caller(&request), &snapshot, &[(wire, &d)])
            .await;
        if failed.as_ref().is_some_and(|u| u.grants_given_back) {
            grant_not_used(&mut d);
        }
        let audit_error = failed.map(|u| u.error);
        self.report(&scope, None, wire, &d, &snapshot, audit_error.as_deref());
        match (&d.result, audit_error) {
            (Err(err), _) => Err(Status::invalid_argument(err.to_string())),
            (Ok(_), Some(e)) => Ok(Response::new(unrecorded(
                &d.request_id,
                &snapshot.version,
                &e,
            ))),
            (Ok(decision), None) => Ok(Response::new(response(
                &d.request_id,
                decision,
                &snapshot.version,
                self.limiting.lifetimes.approval,
            ))),
        }
    }

    async fn batch_is_authorized(
        &self,
        request: Request<pb::BatchIsAuthorizedRequest>,
    ) -> Result<Response<pb::BatchIsAuthorizedResponse>, Status> {
        let scope = self
            .telemetry
            .start_rpc(request.metadata(), Rpc::BatchIsAuthorized);
        let requests = &request.get_ref().requests;
        if requests.len() > self.max_batch {
            let status = Status::invalid_argument(format!(
                "requests: a batch of {} exceeds the maximum of {} (--max-batch)",
                requests.len(),
                self.max_batch
            ));
            self.telemetry.refused(&scope, &status);
            return Err(status);
        }
        // One snapshot and one clock reading for the whole batch.
        let snapshot = self.snapshot(&scope)?;
        let at = self.limiting.clock.now();
        let now = RequestTime::of(at);
        let mut decided: Vec<Decided> = requests
            .iter()
            .map(|req| self.decide(&snapshot, req, (at, &now), Instant::now()))
            .collect();
        // One group of records, written together.
        let items: Vec<(&pb::IsAuthorizedRequest, &Decided)> =
            requests.iter().zip(decided.iter()).collect();
        let failed = self
            .record(&scope, &self.caller(&request), &snapshot, &items)
            .await;
        if failed.as_ref().is_some_and(|u| u.grants_given_back) {
            decided.iter_mut().for_each(grant_not_used);
        }
        let audit_error = failed.map(|u| u.error);
        let mut counts = BatchCounts::default();
        let results = requests
            .iter()
            .zip(decided)
            .enumerate()
            .map(|(i, (wire, d))| {
                self.report(&scope, Some(i), wire, &d, &snapshot, audit_error.as_deref());
                counts.add(&d.result, audit_error.is_some());
                match (d.result, &audit_error) {
                    // Fail closed: an item that cannot be decided is a DENY
                    // that says why.
                    (Err(err), _) => pb::IsAuthorizedResponse {
                        request_id: d.request_id,
                        decision: pb::Decision::Deny as i32,
                        policy_version: snapshot.version.clone(),
                        error: Some(pb::RequestError {
                            code: tonic::Code::InvalidArgument as i32,
                            message: format!("requests[{i}].{err}"),
                        }),
                        ..Default::default()
                    },
                    (Ok(_), Some(e)) => unrecorded(&d.request_id, &snapshot.version, e),
                    (Ok(decision), None) => response(
                        &d.request_id,
                        &decision,
                        &snapshot.version,
                        self.limiting.lifetimes.approval,
                    ),
                }
            })
            .collect();
        self.telemetry.batch(&scope, requests.len(), counts);
        Ok(Response::new(pb::BatchIsAuthorizedResponse {
            results,
            policy_version: snapshot.version.clone(),
        }))
    }
}

fn request_id(given: &str) -> String {
    if given.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        convert::shown_request_id(given)
    }
}

fn decision_code(allowed: bool) -> i32 {
    if allowed {
        pb::Decision::Allow as i32
    } else {
        pb::Decision::Deny as i32
    }
}

fn errors(errors: &[PolicyError]) -> Vec<pb::PolicyError> {
    errors
        .iter()
        .map(|e| pb::PolicyError {
            policy_id: e.policy_id.clone(),
            message: e.message.clone(),
        })
        .collect()
}

fn side(s: &SideDecision) -> pb::SideResult {
    pb::SideResult {
        principal: Some(pb::EntityUid {
            r#type: s.principal.type_name().to_string(),
            id: s.principal.id().unescaped().to_owned(),
        }),
        decision: decision_code(s.allowed),
        determining_policies: s.determining.clone(),
        errors: errors(&s.errors),
    }
}

fn limited(l: &engine::Limited) -> pb::Limited {
    pb::Limited {
        reason: l.reason.to_owned(),
        policy_id: l.policy_id.clone(),
        limit: l.limit.clone(),
        retry_after_ms: l.retry_after.map(crate::quota::retry_after_ms),
        detail: l.detail.clone(),
    }
}

fn response(
    request_id: &str,
    d: &Decision,
    version: &str,
    max_ttl: std::time::Duration,
) -> pb::IsAuthorizedResponse {
    pb::IsAuthorizedResponse {
        request_id: request_id.to_owned(),
        decision: if d.approval.is_some() {
            pb::Decision::ApprovalRequired as i32
        } else {
            decision_code(d.allowed)
        },
        determining_policies: d.determining.clone(),
        errors: errors(&d.errors),
        agent: Some(side(&d.agent)),
        on_behalf_of: d.on_behalf_of.as_ref().map(side),
        policy_version: version.to_owned(),
        error: None,
        limited: d.limited.as_ref().map(limited),
        approval: d.approval.as_ref().map(|a| pb::ApprovalRequest {
            fingerprint: a.fingerprint.clone(),
            policies: a.policies.clone(),
            max_grant_ttl_seconds: max_ttl.as_secs(),
        }),
        grant: d.grant.as_ref().map(grant_result),
        elevated_by: d.elevated_by.iter().map(grant_result).collect(),
    }
}

fn grant_result(g: &crate::engine::GrantUse) -> pb::GrantResult {
    pb::GrantResult {
        outcome: g.outcome.to_owned(),
        grant_id: g.grant_id.clone(),
        approver: g.approver.clone(),
        expires_at: g.expires_at,
        detail: g.detail.clone(),
    }
}
