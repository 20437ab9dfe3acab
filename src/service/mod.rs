//! The `leash.v1.Authorizer` gRPC service: converts requests, asks the engine,
//! converts decisions back, maps bad input to `INVALID_ARGUMENT`, and hands
//! every decision to telemetry.

pub mod admin;
pub mod convert;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::bundle::{LiveBundle, Snapshot};
use crate::engine::{self, Decision, PolicyError, RequestError, RequestTime, SideDecision};
use crate::proto::v1 as pb;
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
}

impl AuthorizerService {
    pub fn new(live: Arc<LiveBundle>, max_batch: usize, telemetry: Arc<Telemetry>) -> Self {
        Self {
            live,
            max_batch,
            telemetry,
        }
    }

    fn snapshot(&self, scope: &RpcScope) -> Result<Arc<Snapshot>, Status> {
        self.live.current().ok_or_else(|| {
            let status = Status::unavailable("no valid policy bundle is loaded yet");
            self.telemetry.refused(scope, &status);
            status
        })
    }

    /// Decides one request and reports it; `item` is its index in a batch.
    fn decide(
        &self,
        scope: &RpcScope,
        item: Option<usize>,
        snapshot: &Snapshot,
        req: &pb::IsAuthorizedRequest,
        now: &RequestTime,
    ) -> (String, Result<Decision, RequestError>) {
        let started = if item.is_some() {
            Instant::now()
        } else {
            scope.started()
        };
        let request_id = request_id(&req.request_id);
        let converted = convert::request(req);
        let (parsed, result) = match converted {
            Ok(r) => {
                let decided = engine::decide(snapshot, &r, now);
                (Some(r), decided)
            }
            Err(e) => (None, Err(e)),
        };
        self.telemetry.decision(
            scope,
            item,
            &DecisionView {
                request_id: &request_id,
                wire: req,
                request: parsed.as_ref(),
                result: &result,
                snapshot,
                started,
            },
        );
        (request_id, result)
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
        let now = RequestTime::now();
        let (request_id, result) = self.decide(&scope, None, &snapshot, request.get_ref(), &now);
        match result {
            Ok(decision) => Ok(Response::new(response(
                &request_id,
                &decision,
                &snapshot.version,
            ))),
            Err(err) => Err(Status::invalid_argument(err.to_string())),
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
        let now = RequestTime::now();
        let mut counts = BatchCounts::default();
        let results = requests
            .iter()
            .enumerate()
            .map(|(i, req)| {
                let (request_id, result) = self.decide(&scope, Some(i), &snapshot, req, &now);
                counts.add(&result);
                match result {
                    Ok(decision) => response(&request_id, &decision, &snapshot.version),
                    // Fail closed: an item that cannot be decided is a DENY
                    // that says why.
                    Err(err) => pb::IsAuthorizedResponse {
                        request_id,
                        decision: pb::Decision::Deny as i32,
                        policy_version: snapshot.version.clone(),
                        error: Some(pb::RequestError {
                            code: tonic::Code::InvalidArgument as i32,
                            message: format!("requests[{i}].{err}"),
                        }),
                        ..Default::default()
                    },
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
        given.to_owned()
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

fn response(request_id: &str, d: &Decision, version: &str) -> pb::IsAuthorizedResponse {
    pb::IsAuthorizedResponse {
        request_id: request_id.to_owned(),
        decision: decision_code(d.allowed),
        determining_policies: d.determining.clone(),
        errors: errors(&d.errors),
        agent: Some(side(&d.agent)),
        on_behalf_of: d.on_behalf_of.as_ref().map(side),
        policy_version: version.to_owned(),
        error: None,
    }
}
