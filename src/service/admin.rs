//! The `leash.v1.Admin` gRPC service: what is being served and how the last
//! reload went.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::bundle::{Diagnostic, LiveBundle};
use crate::proto::v1 as pb;
use crate::reload::{Attempt, Outcome, ReloadStatus, Trigger};

/// Diagnostics and warnings in a status, each: a bundle that breaks every
/// one of 100,000 policies would otherwise make a response of tens of
/// megabytes, past what gRPC clients accept by default (4 MiB), just when
/// the status is needed.
pub const STATUS_LIST_LIMIT: usize = 100;

/// The first [`STATUS_LIST_LIMIT`] of `items`, converted, and how many were
/// left out.
fn first<T, U>(items: &[T], convert: impl Fn(&T) -> U) -> (Vec<U>, u32) {
    let kept = items.iter().take(STATUS_LIST_LIMIT).map(convert).collect();
    (
        kept,
        saturate(items.len().saturating_sub(STATUS_LIST_LIMIT)),
    )
}

#[derive(Clone)]
pub struct AdminService {
    live: Arc<LiveBundle>,
    status: Arc<ReloadStatus>,
}

impl AdminService {
    pub fn new(live: Arc<LiveBundle>, status: Arc<ReloadStatus>) -> Self {
        Self { live, status }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // Read together, so the version served and the attempt that loaded
        // it always agree.
        let (current, view) = self.status.view_with(&self.live);
        let serving = current.map(|s| {
            let (warnings, warnings_omitted) = first(&s.warnings, Clone::clone);
            pb::BundleInfo {
                version: s.version.clone(),
                origin: s.origin.clone(),
                loaded_at: Some(s.loaded_at.into()),
                files: s.files.clone(),
                policy_count: saturate(s.policy_count()),
                entity_count: saturate(s.entity_count()),
                warnings,
                warnings_omitted,
            }
        });
        Ok(Response::new(pb::StatusResponse {
            serving,
            last_attempt: view.last_attempt.as_ref().map(attempt),
            counters: Some(pb::ReloadCounters {
                loaded: view.counters.loaded,
                unchanged: view.counters.unchanged,
                refused: view.counters.refused,
            }),
            watch: view.watch,
        }))
    }
}

fn attempt(a: &Attempt) -> pb::ReloadAttempt {
    let (result, (diagnostics, diagnostics_omitted)) = match &a.outcome {
        Outcome::Loaded => (pb::ReloadResult::Loaded, (Vec::new(), 0)),
        Outcome::Unchanged => (pb::ReloadResult::Unchanged, (Vec::new(), 0)),
        Outcome::Refused(found) => (pb::ReloadResult::Refused, first(found, diagnostic)),
    };
    let trigger = match a.trigger {
        Trigger::Startup => pb::ReloadTrigger::Startup,
        Trigger::Watch => pb::ReloadTrigger::Watch,
        Trigger::Poll => pb::ReloadTrigger::Poll,
        Trigger::Signal => pb::ReloadTrigger::Signal,
    };
    pb::ReloadAttempt {
        trigger: trigger as i32,
        result: result as i32,
        started_at: Some(a.started_at.into()),
        finished_at: Some(a.finished_at.into()),
        version: a.version.clone().unwrap_or_default(),
        diagnostics,
        diagnostics_omitted,
    }
}

fn diagnostic(d: &Diagnostic) -> pb::BundleDiagnostic {
    pb::BundleDiagnostic {
        file: d.file.clone().unwrap_or_default(),
        line: d.line.map(saturate).unwrap_or(0),
        column: d.column.map(saturate).unwrap_or(0),
        message: d.message.clone(),
        rendered: d.rendered.clone(),
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
