//! Human approval gates over the real gRPC server with the example bundle:
//! a gated permit turns an ALLOW into APPROVAL_REQUIRED with a fingerprint
//! that names exactly the request (whatever form its context came in), the
//! audit trail and metrics say so, and a typo in a leash annotation refuses
//! the bundle.

mod common;

use std::collections::BTreeMap;

use common::*;
use leash::audit::{AuditOptions, AuditTarget};
use leash::proto::v1 as pb;
use leash::server::ServerOptions;

const APPROVAL_REQUIRED: i32 = pb::Decision::ApprovalRequired as i32;

fn refund(user: Option<&str>, account: &str, context_json: &str) -> pb::IsAuthorizedRequest {
    with_context_json(
        example(
            "billing-agent",
            user,
            "payments:refund",
            &format!("BillingAccount::\"{account}\""),
        ),
        context_json,
    )
}

fn typed(mut req: pb::IsAuthorizedRequest, amount: i64, started: &str) -> pb::IsAuthorizedRequest {
    let mut fields = BTreeMap::new();
    fields.insert(
        "session_started".to_owned(),
        pb::Value {
            kind: Some(pb::value::Kind::Extension(pb::ExtensionValue {
                r#fn: "datetime".to_owned(),
                arg: started.to_owned(),
            })),
        },
    );
    fields.insert(
        "amount_cents".to_owned(),
        pb::Value {
            kind: Some(pb::value::Kind::Long(amount)),
        },
    );
    req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
        pb::Record { fields },
    ));
    req
}

#[tokio::test]
async fn a_gated_permit_asks_for_approval_with_a_fingerprint_of_exactly_that_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    // leash's clock is held half an hour into the session the requests
    // name, so the example's session-length rule never interferes.
    let clock = leash::engine::Clock::manual(
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_426_200),
    );
    let options = ServerOptions {
        clock,
        audit: AuditOptions {
            target: AuditTarget::File(trail.clone()),
            ..AuditOptions::default()
        },
        ..ServerOptions::default()
    };
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    let ask = |req| async { server.decide(req).await.expect("decides") };

    // Small refunds are the agent's to make; large ones wait for a person;
    // above the gate's range nothing permits.
    let small = ask(refund(Some("bob"), "BA-100", r#"{"amount_cents": 5000}"#)).await;
    assert_eq!((small.decision, small.approval), (ALLOW, None));
    let started = "2026-11-23T09:00:00Z";
    let json = format!(r#"{{"amount_cents": 50000, "session_started": "{started}"}}"#);
    let large = ask(refund(Some("bob"), "BA-100", &json)).await;
    assert_eq!(large.decision, APPROVAL_REQUIRED);
    let approval = large.approval.clone().expect("an approval request");
    assert_eq!(approval.policies, ["billing-agent-refunds-approved"]);
    assert!(
        approval.fingerprint.starts_with("sha256:")
            && approval.fingerprint.len() == 7 + 64
            && approval.fingerprint[7..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit()),
        "{}",
        approval.fingerprint
    );
    assert_eq!(
        large.determining_policies,
        ["billing-agent-refunds-approved", "role-billing"]
    );
    assert!(large.limited.is_none());
    let huge = ask(refund(Some("bob"), "BA-100", r#"{"amount_cents": 500000}"#)).await;
    assert_eq!((huge.decision, huge.approval), (DENY, None));
    // A negative amount is no small refund (the example's bounds have a
    // floor, as `Long` bounds should).
    let negative = ask(refund(Some("bob"), "BA-100", r#"{"amount_cents": -50000}"#)).await;
    assert_eq!((negative.decision, negative.approval), (DENY, None));

    // Deleting a knowledge-base article waits for a person too; writing
    // one does not; and a support user, who may not delete, is not asked.
    let kb = |user: &str, action: &str| {
        example(
            "onboarding-agent",
            Some(user),
            action,
            "KbArticle::\"refund-runbook\"",
        )
    };
    let delete = ask(kb("carol", "kb:delete")).await;
    assert_eq!(delete.decision, APPROVAL_REQUIRED, "{delete:?}");
    assert_eq!(
        delete.approval.expect("approval").policies,
        ["onboarding-agent-kb-delete"]
    );
    assert_eq!(ask(kb("carol", "kb:write")).await.decision, ALLOW);
    let not_hers = ask(kb("alice", "kb:delete")).await;
    assert_eq!((not_hers.decision, not_hers.approval), (DENY, None));

    // The same request, with keys in another order, escapes spelled out,
    // or typed values, has the same fingerprint: it is a request's, not a
    // spelling's.
    let fingerprint = |r: pb::IsAuthorizedResponse| {
        assert_eq!(r.decision, APPROVAL_REQUIRED, "{r:?}");
        r.approval.expect("approval").fingerprint
    };
    let reordered = format!(r#"{{"session_started": "{started}", "amount_cents": 50000}}"#);
    let escaped = format!(
        r#"{{"amount_cents": 50000, "session_started": {{"__extn": {{"fn": "datetime", "arg": "{started}"}}}}}}"#
    );
    for same in [
        refund(Some("bob"), "BA-100", &reordered),
        refund(Some("bob"), "BA-100", &escaped),
        typed(refund(Some("bob"), "BA-100", "{}"), 50000, started),
    ] {
        assert_eq!(fingerprint(ask(same).await), approval.fingerprint);
    }
    // Any other request has another: a context attribute dropped, the
    // amount, the resource, the user. (The agent acting alone is denied
    // outright: a consequential action needs a user; checked below.)
    let mut others = vec![
        fingerprint(ask(refund(Some("omar"), "BA-100", &json)).await),
        fingerprint(ask(refund(Some("bob"), "BA-100", r#"{"amount_cents": 50000}"#)).await),
        fingerprint(
            ask(refund(
                Some("bob"),
                "BA-100",
                &json.replace("50000", "50001"),
            ))
            .await,
        ),
        fingerprint(ask(refund(Some("bob"), "BA-200", &json)).await),
    ];
    others.push(approval.fingerprint.clone());
    let distinct: std::collections::HashSet<_> = others.iter().collect();
    assert_eq!(distinct.len(), others.len(), "{others:?}");
    // An account the request brings is part of what is approved: the same
    // data in another spelling has the same fingerprint, other data under
    // the same id another.
    let brought = |attrs: &str| {
        with_entities_json(
            refund(Some("bob"), "BA-900", &json),
            &format!(
                r#"[{{"uid": {{"type": "BillingAccount", "id": "BA-900"}}, "attrs": {attrs}, "parents": []}}]"#
            ),
        )
    };
    let account = |customer: &str, region: &str, reordered: bool| {
        let customer =
            format!(r#""customer": {{"__entity": {{"type": "Customer", "id": "{customer}"}}}}"#);
        let region = format!(r#""region": "{region}""#);
        if reordered {
            format!("{{{region}, {customer}}}")
        } else {
            format!("{{{customer}, {region}}}")
        }
    };
    let mut brought_fps = Vec::new();
    for (customer, region, reordered) in [
        ("C-100", "EMEA", false),
        ("C-100", "EMEA", true),
        ("C-100", "NA", false),
        ("C-200", "EMEA", false),
    ] {
        let attrs = account(customer, region, reordered);
        brought_fps.push(fingerprint(ask(brought(&attrs)).await));
    }
    let [emea, emea_reordered, na, other_customer] = &brought_fps[..] else {
        panic!("four fingerprints");
    };
    let bare = fingerprint(ask(refund(Some("bob"), "BA-900", &json)).await);
    assert_eq!(emea, emea_reordered);
    let brought_ones = [emea, na, other_customer, &bare];
    let distinct: std::collections::HashSet<_> = brought_ones.iter().collect();
    assert_eq!(distinct.len(), brought_ones.len(), "{brought_ones:?}");
    let alone = ask(refund(None, "BA-100", &json)).await;
    assert_eq!((alone.decision, alone.approval), (DENY, None));

    let (_, metrics) = http_get(server.admin_addr, "GET", "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "leash_decisions_total{decision=\"approval_required\",action=\"payments:refund\"}"
        ),
        13.0,
        "{metrics}"
    );
    server.shutdown().await;

    // The audit trail records what was asked, and still verifies.
    let records = verified_audit_records(&trail);
    let asked: Vec<_> = records
        .iter()
        .filter(|r| r["decision"] == "approval_required")
        .collect();
    // Thirteen refunds and one deletion.
    assert_eq!(asked.len(), 14);
    // Not as is: its context is not recorded in clear (tests/audit.rs has
    // the cases).
    assert_eq!(asked[0]["approval"]["fingerprint"], "[redacted]");
    assert_eq!(
        asked[0]["approval"]["policies"],
        serde_json::json!(["billing-agent-refunds-approved"])
    );
    assert!(records
        .iter()
        .filter(|r| r["decision"] != "approval_required")
        .all(|r| r.get("approval").is_none()));
}

#[test]
fn a_typo_in_a_leash_annotation_refuses_the_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = empty_bundle_dirs(dir.path());
    std::fs::write(
        schemas.join("s.cedarschema"),
        "entity Agent;\nentity Account;\naction \"refund\" appliesTo { principal: Agent, resource: Account };\n",
    )
    .expect("write");
    for (annotations, expected) in [
        ("@aproval(\"required\")", "did you mean `@approval`"),
        (
            "@approval(\"requried\")",
            "expected `@approval(\"required\")`",
        ),
    ] {
        std::fs::write(
            policies.join("refunds.cedar"),
            format!("@id(\"refunds\")\n{annotations}\npermit (principal, action, resource);\n"),
        )
        .expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
            .arg("validate")
            .arg("--policies")
            .arg(&policies)
            .arg("--schemas")
            .arg(&schemas)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("refunds.cedar")
                && stderr.contains("policy `refunds`")
                && stderr.contains(expected),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn an_approval_request_is_in_the_decisions_span() {
    use leash::bench::collector::SpanCollector;
    use leash::telemetry::{Protocol, TelemetryOptions, TraceOptions};
    use std::time::Duration;

    let collector = SpanCollector::start(true).await.expect("collector");
    let mut trace = TraceOptions::new(collector.grpc_endpoint(), Protocol::Grpc);
    trace.batch.schedule_delay = Duration::from_millis(20);
    let options = ServerOptions {
        telemetry: TelemetryOptions {
            traces: Some(trace),
            ..TelemetryOptions::default()
        },
        ..ServerOptions::default()
    };
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    let answer = server
        .decide(refund(Some("bob"), "BA-100", r#"{"amount_cents": 20000}"#))
        .await
        .expect("decides");
    let fingerprint = answer.approval.expect("approval").fingerprint;
    let spans = flushed_spans(&server.server, &collector, 1).await;
    let span = spans.first().expect("a span");
    for (key, want) in [
        ("leash.decision", "approval_required"),
        ("leash.approval.policies", "billing-agent-refunds-approved"),
    ] {
        assert_eq!(span.attribute(key).as_deref(), Some(want), "{key}");
    }
    // The fingerprint, a hash of the request's values, is the caller's
    // alone: no attribute carries it.
    assert!(fingerprint.starts_with("sha256:"));
    assert_eq!(span.attribute("leash.approval.fingerprint"), None);
    for key in span.attribute_keys() {
        let value = span.attribute(&key).unwrap_or_default();
        assert!(!value.contains(&fingerprint["sha256:".len()..]), "{key}");
    }
    server.shutdown().await;
}
