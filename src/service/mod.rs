//! The `leash.v1.Authorizer` gRPC service: converts requests, asks the engine,
//! converts decisions back, and maps bad input to `INVALID_ARGUMENT`.

pub mod admin;
pub mod convert;

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::bundle::{LiveBundle, Snapshot};
use crate::engine::{self, Decision, PolicyError, RequestError, RequestTime, SideDecision};
use crate::proto::v1 as pb;

/// Default largest batch of `BatchIsAuthorized`.
pub const DEFAULT_MAX_BATCH: usize = 100;

/// The gRPC `Authorizer` service.
#[derive(Clone)]
pub struct AuthorizerService {
    /// The snapshot every request reads; swapped whole on reload.
    live: Arc<LiveBundle>,
    /// Largest accepted batch; a larger one is refused whole.
    max_batch: usize,
}

impl AuthorizerService {
    pub fn new(live: Arc<LiveBundle>, max_batch: usize) -> Self {
        Self { live, max_batch }
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>, Status> {
        self.live
            .current()
            .ok_or_else(|| Status::unavailable("no valid policy bundle is loaded yet"))
    }
}

#[tonic::async_trait]
impl pb::authorizer_server::Authorizer for AuthorizerService {
    async fn is_authorized(
        &self,
        request: Request<pb::IsAuthorizedRequest>,
    ) -> Result<Response<pb::IsAuthorizedResponse>, Status> {
        let snapshot = self.snapshot()?;
        let now = RequestTime::now();
        let req = request.get_ref();
        let request_id = request_id(&req.request_id);
        match decide(&snapshot, req, &now, &request_id) {
            Ok(response) => Ok(Response::new(response)),
            Err(err) => Err(Status::invalid_argument(err.to_string())),
        }
    }

    async fn batch_is_authorized(
        &self,
        request: Request<pb::BatchIsAuthorizedRequest>,
    ) -> Result<Response<pb::BatchIsAuthorizedResponse>, Status> {
        let requests = &request.get_ref().requests;
        if requests.len() > self.max_batch {
            return Err(Status::invalid_argument(format!(
                "requests: a batch of {} exceeds the maximum of {} (--max-batch)",
                requests.len(),
                self.max_batch
            )));
        }
        // One snapshot and one clock reading for the whole batch.
        let snapshot = self.snapshot()?;
        let now = RequestTime::now();
        let results = requests
            .iter()
            .enumerate()
            .map(|(i, req)| {
                let request_id = request_id(&req.request_id);
                decide(&snapshot, req, &now, &request_id).unwrap_or_else(|err| {
                    // Fail closed: an item that cannot be decided is a DENY
                    // that says why.
                    pb::IsAuthorizedResponse {
                        request_id,
                        decision: pb::Decision::Deny as i32,
                        policy_version: snapshot.version.clone(),
                        error: Some(pb::RequestError {
                            code: tonic::Code::InvalidArgument as i32,
                            message: format!("requests[{i}].{err}"),
                        }),
                        ..Default::default()
                    }
                })
            })
            .collect();
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

fn decide(
    snapshot: &Snapshot,
    req: &pb::IsAuthorizedRequest,
    now: &RequestTime,
    request_id: &str,
) -> Result<pb::IsAuthorizedResponse, RequestError> {
    let result =
        convert::request(req).and_then(|r| engine::decide(snapshot, &r, now).map(|d| (r, d)));
    match result {
        Ok((r, decision)) => {
            log_decision(request_id, &r, &decision, &snapshot.version);
            Ok(response(request_id, &decision, &snapshot.version))
        }
        Err(err) => {
            // The problem text may quote context values, so it is only
            // logged at debug level.
            info!(request_id, field = %err.field, policy_version = %snapshot.version, "invalid request");
            debug!(request_id, problem = %err.problem, "invalid request detail");
            Err(err)
        }
    }
}

fn log_decision(request_id: &str, r: &engine::AuthzRequest, d: &Decision, version: &str) {
    let user = r.on_behalf_of.as_ref().map(ToString::to_string);
    let determining = d.determining.join(",");
    if d.allowed {
        debug!(
            request_id,
            agent = %r.agent,
            on_behalf_of = user.as_deref(),
            action = %r.action,
            resource = %r.resource,
            decision = "allow",
            determining_policies = %determining,
            policy_version = version,
            "decision"
        );
    } else {
        info!(
            request_id,
            agent = %r.agent,
            on_behalf_of = user.as_deref(),
            action = %r.action,
            resource = %r.resource,
            decision = "deny",
            determining_policies = %determining,
            errors = d.errors.len(),
            policy_version = version,
            "decision"
        );
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
