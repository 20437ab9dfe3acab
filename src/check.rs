//! `leash check` and `leash status`: one decision, or the reload status, from
//! a running sidecar, printed for people.

use std::path::PathBuf;
use std::str::FromStr;

use cedar_policy::EntityUid;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::{CheckArgs, StatusArgs};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;
use crate::proto::v1::authorizer_client::AuthorizerClient;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("--{flag}: `{value}` is not a Cedar entity reference such as `{example}`")]
    BadEntity {
        flag: &'static str,
        value: String,
        example: &'static str,
    },
    #[error("--addr: `{0}` is not an address such as `127.0.0.1:50051`")]
    BadAddress(String),
    #[error("--addr: `{0}` names a Unix socket; give its path with --uds PATH")]
    UnixAddress(String),
    #[error("--addr: `{0}` has no port; the sidecar listens on 127.0.0.1:50051 by default")]
    NoPort(String),
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("the sidecar refused the request: {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
}

/// Connects to a sidecar over TCP (`127.0.0.1:50051` or `http://...`).
pub async fn connect_tcp(addr: &str) -> Result<AuthorizerClient<Channel>, CheckError> {
    channel_tcp(addr).await.map(AuthorizerClient::new)
}

/// Connects to a sidecar over its Unix socket.
pub async fn connect_uds(path: PathBuf) -> Result<AuthorizerClient<Channel>, CheckError> {
    channel_uds(path).await.map(AuthorizerClient::new)
}

/// Longest wait to connect to the sidecar, for `check` and `status`: a
/// stopped or stuck one must not hang a script that asks it.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest wait for the sidecar's answer, for `check` and `status`.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A gRPC channel to `addr` over TCP, without time limits (the benchmark's
/// load and tests use it; `check` and `status` add theirs).
pub async fn channel_tcp(addr: &str) -> Result<Channel, CheckError> {
    connect(tcp_endpoint(addr)?, addr).await
}

/// A gRPC channel over the Unix socket at `path`, without time limits.
pub async fn channel_uds(path: PathBuf) -> Result<Channel, CheckError> {
    connect_unix(uds_endpoint(), path).await
}

/// The channel `check` and `status` ask over: the socket if given, else
/// the address, within [`CONNECT_TIMEOUT`] and [`CALL_TIMEOUT`].
async fn cli_channel(uds: Option<&PathBuf>, addr: &str) -> Result<Channel, CheckError> {
    let limited = |endpoint: Endpoint| {
        endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
    };
    match uds {
        Some(path) => connect_unix(limited(uds_endpoint()), path.clone()).await,
        None => connect(limited(tcp_endpoint(addr)?), addr).await,
    }
}

fn tcp_endpoint(addr: &str) -> Result<Endpoint, CheckError> {
    // What agents are given as `LEASH_ENDPOINT` for the socket.
    if addr.starts_with("unix:") {
        return Err(CheckError::UnixAddress(addr.to_owned()));
    }
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint =
        Endpoint::from_shared(uri).map_err(|_| CheckError::BadAddress(addr.to_owned()))?;
    // Without a port the URI means 80, which is never the sidecar.
    if endpoint.uri().port().is_none() {
        return Err(CheckError::NoPort(addr.to_owned()));
    }
    Ok(endpoint)
}

async fn connect(endpoint: Endpoint, addr: &str) -> Result<Channel, CheckError> {
    endpoint
        .connect()
        .await
        .map_err(|source| CheckError::Connect {
            target: addr.to_owned(),
            reason: causes(&source),
        })
}

/// The URI is required by the API but unused: the connector dials the
/// socket.
fn uds_endpoint() -> Endpoint {
    Endpoint::from_static("http://leash.sock")
}

async fn connect_unix(endpoint: Endpoint, path: PathBuf) -> Result<Channel, CheckError> {
    let target = format!("unix:{}", path.display());
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|source| CheckError::Connect {
            target,
            reason: causes(&source),
        })
}

/// An error and its causes, each said once: the transport's errors wrap
/// one another with the same words (`transport error: transport error:
/// tcp connect error: tcp connect error: Connection refused`).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !said.iter().any(|s| s.contains(&text)) {
            said.retain(|s| !text.contains(s.as_str()));
            said.push(text);
        }
        next = e.source();
    }
    said.join(": ")
}

fn entity(flag: &'static str, value: &str) -> Result<pb::EntityUid, CheckError> {
    let uid = EntityUid::from_str(value).map_err(|_| CheckError::BadEntity {
        flag,
        value: value.to_owned(),
        example: match flag {
            "agent" => "Agent::\"support-bot\"",
            "action" => "Action::\"tickets:read\"",
            "resource" => "Ticket::\"T-100\"",
            _ => "User::\"alice\"",
        },
    })?;
    Ok(pb::EntityUid {
        r#type: uid.type_name().to_string(),
        id: uid.id().unescaped().to_owned(),
    })
}

/// The request `args` describe.
pub fn request(args: &CheckArgs) -> Result<pb::IsAuthorizedRequest, CheckError> {
    use pb::is_authorized_request::{ContextInput, EntitiesInput};
    Ok(pb::IsAuthorizedRequest {
        request_id: args.request_id.clone().unwrap_or_default(),
        principal: Some(pb::Principal {
            agent: Some(entity("agent", &args.agent)?),
            on_behalf_of: args
                .user
                .as_deref()
                .map(|u| entity("user", u))
                .transpose()?,
        }),
        action: Some(entity("action", &args.action)?),
        resource: Some(entity("resource", &args.resource)?),
        context_input: args.context.clone().map(ContextInput::ContextJson),
        entities_input: args.entities.clone().map(EntitiesInput::EntitiesJson),
        grants: args.grants.clone(),
    })
}

/// Sends the request of `args` and returns the response.
pub async fn run(args: &CheckArgs) -> Result<pb::IsAuthorizedResponse, CheckError> {
    let request = request(args)?;
    let mut client = AuthorizerClient::new(cli_channel(args.uds.as_ref(), &args.addr).await?);
    client
        .is_authorized(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| CheckError::Status {
            code: s.code(),
            message: s.message().to_owned(),
        })
}

fn decision_name(code: i32) -> &'static str {
    match pb::Decision::try_from(code) {
        Ok(pb::Decision::Allow) => "ALLOW",
        Ok(pb::Decision::Deny) => "DENY",
        Ok(pb::Decision::ApprovalRequired) => "APPROVAL_REQUIRED",
        _ => "UNSPECIFIED",
    }
}

fn uid_text(uid: Option<&pb::EntityUid>) -> String {
    uid.map(|u| format!("{}::{:?}", u.r#type, u.id))
        .unwrap_or_default()
}

/// The response as people read it.
pub fn render(args: &CheckArgs, response: &pb::IsAuthorizedResponse) -> String {
    let mut out = String::new();
    let who = match &args.user {
        Some(user) => format!("{} for {user}", args.agent),
        None => format!("{} (autonomous)", args.agent),
    };
    out.push_str(&format!(
        "{}: {who} -> {} on {}\n",
        decision_name(response.decision),
        args.action,
        args.resource
    ));
    let sides = [
        ("agent", response.agent.as_ref()),
        ("user", response.on_behalf_of.as_ref()),
    ];
    for (label, side) in sides {
        let Some(side) = side else { continue };
        let reason = if side.determining_policies.is_empty() {
            if side.decision == pb::Decision::Allow as i32 {
                String::new()
            } else if side.errors.is_empty() {
                "no policy permits".to_owned()
            } else {
                "denied because policies raised errors".to_owned()
            }
        } else {
            let by = if side.decision == pb::Decision::Allow as i32 {
                "permitted by"
            } else {
                "forbidden by"
            };
            format!("{by} {}", side.determining_policies.join(", "))
        };
        out.push_str(&format!(
            "  {label:<5} {:<28} {:<5}  {reason}\n",
            uid_text(side.principal.as_ref()),
            decision_name(side.decision)
        ));
        for err in &side.errors {
            out.push_str(&format!(
                "        error in `{}`: {}\n",
                err.policy_id, err.message
            ));
        }
    }
    if let Some(approval) = &response.approval {
        out.push_str(&format!(
            "  approval required by {}\n  fingerprint {}\n",
            approval.policies.join(", "),
            approval.fingerprint
        ));
    }
    if let Some(grant) = &response.grant {
        out.push_str(&format!("  grant {}: {}\n", grant.outcome, grant.detail));
    }
    // The first elevation is `grant` itself unless an approval decided.
    for e in &response.elevated_by {
        if response.grant.as_ref() != Some(e) {
            out.push_str(&format!("  grant {}: {}\n", e.outcome, e.detail));
        }
    }
    if let Some(limited) = &response.limited {
        out.push_str(&format!("  limited: {}\n", limited.detail));
    }
    out.push_str(&format!(
        "policy version {}  request {}\n",
        response.policy_version, response.request_id
    ));
    out
}

/// Largest `Admin/Status` response `leash status` reads.
const STATUS_MAX_BYTES: usize = 64 << 20;

/// Asks a running sidecar for its `Admin/Status`.
pub async fn status(args: &StatusArgs) -> Result<pb::StatusResponse, CheckError> {
    let channel = cli_channel(args.uds.as_ref(), &args.addr).await?;
    AdminClient::new(channel)
        // The file list is not cut short: a bundle of many files makes a
        // large status.
        .max_decoding_message_size(STATUS_MAX_BYTES)
        .status(pb::StatusRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| CheckError::Status {
            code: s.code(),
            message: s.message().to_owned(),
        })
}

/// Whether the sidecar's last reload attempt refused the files.
pub fn last_refused(status: &pb::StatusResponse) -> bool {
    status
        .last_attempt
        .as_ref()
        .is_some_and(|a| a.result == pb::ReloadResult::Refused as i32)
}

/// The status, for people.
pub fn render_status(status: &pb::StatusResponse) -> String {
    let mut out = String::new();
    match &status.serving {
        Some(b) => {
            out.push_str(&format!(
                "serving   version {}  ({} policies, {} entities, {} files)\n",
                b.version,
                b.policy_count,
                b.entity_count,
                b.files.len()
            ));
            out.push_str(&format!("          from {}\n", b.origin));
            out.push_str(&format!(
                "          loaded {}\n",
                timestamp(b.loaded_at.as_ref())
            ));
            for warning in &b.warnings {
                out.push_str(&format!("          warning: {warning}\n"));
            }
            if b.warnings_omitted > 0 {
                out.push_str(&format!(
                    "          ... and {} more warnings (the log has every one)\n",
                    b.warnings_omitted
                ));
            }
        }
        None => out.push_str("serving   nothing yet (no valid bundle loaded)\n"),
    }
    out.push_str(&format!("watch     {}\n", status.watch));
    if let Some(c) = &status.counters {
        out.push_str(&format!(
            "reloads   {} loaded, {} unchanged, {} refused\n",
            c.loaded, c.unchanged, c.refused
        ));
    }
    if let Some(a) = &status.last_attempt {
        let result = pb::ReloadResult::try_from(a.result)
            .map(|r| r.as_str_name().trim_start_matches("RELOAD_RESULT_"))
            .unwrap_or("UNKNOWN");
        let trigger = pb::ReloadTrigger::try_from(a.trigger)
            .map(|t| {
                t.as_str_name()
                    .trim_start_matches("RELOAD_TRIGGER_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let version = if a.version.is_empty() {
            String::new()
        } else {
            format!(" version {}", a.version)
        };
        out.push_str(&format!(
            "last      {result}{version} ({trigger}, {})\n",
            timestamp(a.finished_at.as_ref())
        ));
        for d in &a.diagnostics {
            for line in d.rendered.trim_end().lines() {
                out.push_str(&format!("          {line}\n"));
            }
        }
        if a.diagnostics_omitted > 0 {
            out.push_str(&format!(
                "          ... and {} more problems (`leash validate` or the log has every one)\n",
                a.diagnostics_omitted
            ));
        }
    }
    out
}

/// The status as JSON, with the field names of the `Admin/Status` response.
pub fn status_json(status: &pb::StatusResponse) -> String {
    let serving = status.serving.as_ref().map(|b| {
        serde_json::json!({
            "version": b.version,
            "origin": b.origin,
            "loaded_at": timestamp(b.loaded_at.as_ref()),
            "files": b.files,
            "policy_count": b.policy_count,
            "entity_count": b.entity_count,
            "warnings": b.warnings,
            "warnings_omitted": b.warnings_omitted,
        })
    });
    let last_attempt = status.last_attempt.as_ref().map(|a| {
        serde_json::json!({
            "trigger": pb::ReloadTrigger::try_from(a.trigger).map(|t| t.as_str_name()).unwrap_or("RELOAD_TRIGGER_UNSPECIFIED"),
            "result": pb::ReloadResult::try_from(a.result).map(|r| r.as_str_name()).unwrap_or("RELOAD_RESULT_UNSPECIFIED"),
            "started_at": timestamp(a.started_at.as_ref()),
            "finished_at": timestamp(a.finished_at.as_ref()),
            "version": a.version,
            "diagnostics": a.diagnostics.iter().map(|d| serde_json::json!({
                "file": d.file,
                "line": d.line,
                "column": d.column,
                "message": d.message,
                "rendered": d.rendered,
            })).collect::<Vec<_>>(),
            "diagnostics_omitted": a.diagnostics_omitted,
        })
    });
    let counters = status.counters.as_ref().map(
        |c| serde_json::json!({"loaded": c.loaded, "unchanged": c.unchanged, "refused": c.refused}),
    );
    serde_json::json!({
        "serving": serving,
        "last_attempt": last_attempt,
        "counters": counters,
        "watch": status.watch,
    })
    .to_string()
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, outcome: &str, detail: &str) -> pb::GrantResult {
        pb::GrantResult {
            outcome: outcome.to_owned(),
            grant_id: id.to_owned(),
            approver: "eve".to_owned(),
            expires_at: 1,
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn every_grant_is_shown_once() {
        let args = CheckArgs {
            addr: "127.0.0.1:9557".to_owned(),
            uds: None,
            agent: "Agent::\"billing-agent\"".to_owned(),
            user: None,
            action: "Action::\"payments:refund\"".to_owned(),
            resource: "BillingAccount::\"BA-100\"".to_owned(),
            context: None,
            entities: None,
            request_id: None,
            grants: Vec::new(),
        };
        let lift = grant("e-1", "elevated", "lifted into escalation");
        let mut response = pb::IsAuthorizedResponse {
            grant: Some(lift.clone()),
            elevated_by: vec![lift.clone()],
            ..Default::default()
        };
        let shown = render(&args, &response);
        assert_eq!(shown.matches("  grant ").count(), 1, "{shown}");
        assert!(shown.contains("  grant elevated: lifted into escalation\n"));

        response.grant = Some(grant("a-1", "used", "approved by dana"));
        response
            .elevated_by
            .push(grant("e-2", "elevated", "lifted again"));
        let shown = render(&args, &response);
        let lines: Vec<&str> = shown
            .lines()
            .filter(|l| l.starts_with("  grant "))
            .collect();
        assert_eq!(
            lines,
            [
                "  grant used: approved by dana",
                "  grant elevated: lifted into escalation",
                "  grant elevated: lifted again"
            ],
            "{shown}"
        );
    }
}
