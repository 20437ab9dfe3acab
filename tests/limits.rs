//! Rate and budget limits declared on permits, over the real gRPC server
//! with a clock the test moves: the N+1-th call in a window is denied and
//! allowed again once the window passes, budgets add up cost, concurrent
//! callers get exactly N, counts survive a reload that keeps the limit, and
//! malformed limits refuse the bundle.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use leash::audit::{AuditOptions, AuditTarget};
use leash::bench::collector::SpanCollector;
use leash::bundle::Snapshot;
use leash::engine::Clock;
use leash::proto::v1 as pb;
use leash::server::ServerOptions;
use leash::telemetry::{Protocol, TelemetryOptions, TraceOptions};

const SCHEMA: &str = "entity User;\nentity Agent;\nentity Mailbox;\n\
    action \"send\" appliesTo { principal: [Agent, User], resource: [Mailbox], \
    context: { amount?: Long } };\n\
    action \"buy\" appliesTo { principal: [Agent, User], resource: [Mailbox], \
    context: { price?: decimal, session_id?: String } };\n";

fn policies(rate: &str) -> String {
    format!(
        "@id(\"bot-send\")\n@rate(\"{rate}\")\n\
         permit (principal == Agent::\"bot\", action == Action::\"send\", resource);\n\
         @id(\"bot-spend\")\n@budget(\"100/day\")\n@cost(\"amount\")\n@limit_key(\"agent+user\")\n\
         permit (principal == Agent::\"payer\", action == Action::\"send\", resource);\n\
         @id(\"users-send\")\npermit (principal is User, action == Action::\"send\", resource);\n\
         @id(\"other-send\")\npermit (principal == Agent::\"other\", action == Action::\"send\", resource);\n\
         @id(\"shopper-buy\")\n@budget(\"20.00/hour\")\n@cost(\"price\")\n@limit_key(\"agent+session\")\n\
         permit (principal == Agent::\"shopper\", action == Action::\"buy\", resource);\n"
    )
}

fn write_bundle(dir: &Path, rate: &str) {
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    std::fs::create_dir_all(dir.join("schemas")).expect("mkdir");
    std::fs::write(dir.join("policies/send.cedar"), policies(rate)).expect("write");
    std::fs::write(dir.join("schemas/mail.cedarschema"), SCHEMA).expect("write");
}

fn start_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

async fn server(dir: &Path, rate: &str, clock: &Clock, audit: Option<&Path>) -> TestServer {
    let options = ServerOptions {
        clock: clock.clone(),
        audit: match audit {
            Some(path) => AuditOptions {
                target: AuditTarget::File(path.to_owned()),
                ..AuditOptions::default()
            },
            None => AuditOptions::default(),
        },
        ..ServerOptions::default()
    };
    server_with(dir, rate, options).await
}

async fn server_with(dir: &Path, rate: &str, options: ServerOptions) -> TestServer {
    write_bundle(dir, rate);
    let snapshot =
        Snapshot::load_dirs(&dir.join("policies"), &dir.join("schemas")).expect("bundle loads");
    TestServer::start(Some(snapshot), options, false).await
}

fn send(agent: &str, user: Option<&str>, amount: Option<i64>) -> pb::IsAuthorizedRequest {
    let req = request(
        &format!("Agent::\"{agent}\""),
        user.map(|u| format!("User::\"{u}\"")).as_deref(),
        "Action::\"send\"",
        "Mailbox::\"out\"",
    );
    match amount {
        Some(n) => with_context_json(req, &format!("{{\"amount\": {n}}}")),
        None => req,
    }
}

async fn ask(server: &TestServer, req: pb::IsAuthorizedRequest) -> pb::IsAuthorizedResponse {
    server.decide(req).await.expect("decides")
}

#[tokio::test]
async fn the_call_past_the_rate_is_denied_with_a_retry_after_until_the_window_passes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Clock::manual(start_time());
    let trail = dir.path().join("audit.log");
    let server = server(dir.path(), "3/minute", &clock, Some(&trail)).await;
    for _ in 0..3 {
        let r = ask(&server, send("bot", None, None)).await;
        assert_eq!(r.decision, ALLOW);
        assert_eq!(r.limited, None);
    }
    let denied = ask(&server, send("bot", None, None)).await;
    assert_eq!(denied.decision, DENY);
    let limited = denied.limited.expect("says which limit");
    assert_eq!(limited.reason, "rate_limited");
    assert_eq!(limited.policy_id, "bot-send");
    assert_eq!(limited.limit, "3/minute");
    assert_eq!(limited.retry_after_ms, Some(20_000));
    assert!(denied.determining_policies.is_empty());
    // Another agent is counted apart; denials are not counted.
    assert_eq!(
        ask(&server, send("other", None, None)).await.decision,
        ALLOW
    );

    clock.advance(Duration::from_millis(19_999));
    assert_eq!(ask(&server, send("bot", None, None)).await.decision, DENY);
    clock.advance(Duration::from_millis(1));
    assert_eq!(ask(&server, send("bot", None, None)).await.decision, ALLOW);
    assert_eq!(ask(&server, send("bot", None, None)).await.decision, DENY);
    // A whole window later the full rate is back.
    clock.advance(Duration::from_secs(60));
    for _ in 0..3 {
        assert_eq!(ask(&server, send("bot", None, None)).await.decision, ALLOW);
    }
    assert_eq!(ask(&server, send("bot", None, None)).await.decision, DENY);

    // The metric and the audit trail say so too.
    let (_, metrics) = http_get(server.admin_addr, "GET", "/metrics").await;
    assert_eq!(
        metric(&metrics, "leash_limited_total{reason=\"rate_limited\"}"),
        4.0
    );
    // One counter live: the bot's (`other-send` has no limit).
    assert_eq!(metric(&metrics, "leash_limit_keys"), 1.0, "{metrics}");
    server.shutdown().await;
    let limited: Vec<serde_json::Value> = verified_audit_records(&trail)
        .into_iter()
        .filter(|r| !r["limited"].is_null())
        .collect();
    assert_eq!(limited.len(), 4);
    assert_eq!(limited[0]["decision"], "deny");
    assert_eq!(limited[0]["limited"]["reason"], "rate_limited");
    assert_eq!(limited[0]["limited"]["retry_after_ms"], 20_000);
}

#[tokio::test]
async fn a_limited_decision_says_so_in_its_span() {
    let collector = SpanCollector::start(true).await.expect("collector");
    let mut trace = TraceOptions::new(collector.grpc_endpoint(), Protocol::Grpc);
    trace.batch.schedule_delay = Duration::from_millis(20);
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Clock::manual(start_time());
    let options = ServerOptions {
        clock: clock.clone(),
        telemetry: TelemetryOptions {
            traces: Some(trace),
            ..TelemetryOptions::default()
        },
        ..ServerOptions::default()
    };
    let server = server_with(dir.path(), "1/minute", options).await;
    assert_eq!(ask(&server, send("bot", None, None)).await.decision, ALLOW);
    assert_eq!(ask(&server, send("bot", None, None)).await.decision, DENY);
    let spans = flushed_spans(&server.server, &collector, 2).await;
    let allowed = spans
        .iter()
        .find(|s| s.attribute("leash.decision").as_deref() == Some("allow"))
        .expect("the allowed decision's span");
    assert_eq!(allowed.attribute("leash.limit.reason"), None);
    let limited = spans
        .iter()
        .find(|s| s.attribute("leash.decision").as_deref() == Some("deny"))
        .expect("the limited decision's span");
    for (key, want) in [
        ("leash.limit.reason", "rate_limited"),
        ("leash.limit.policy", "bot-send"),
        ("leash.limit", "1/minute"),
        ("leash.limit.retry_after_ms", "60000"),
    ] {
        assert_eq!(limited.attribute(key).as_deref(), Some(want), "{key}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn budgets_add_up_cost_per_agent_and_user_and_reset_after_the_window() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Clock::manual(start_time());
    let server = server(dir.path(), "3/minute", &clock, None).await;
    let pay = |user: &str, amount: Option<i64>| send("payer", Some(user), amount);
    assert_eq!(ask(&server, pay("ann", Some(60))).await.decision, ALLOW);
    let over = ask(&server, pay("ann", Some(50))).await;
    assert_eq!(over.decision, DENY);
    let limited = over.limited.expect("limited");
    assert_eq!(limited.reason, "budget_exceeded");
    assert_eq!(limited.policy_id, "bot-spend");
    // 60 + 50 is 10 over 100 per day: 10 free up in 10 / 100 of a day.
    assert_eq!(limited.retry_after_ms, Some(8_640_000));
    assert_eq!(ask(&server, pay("ann", Some(40))).await.decision, ALLOW);
    // Another user of the same agent has a budget of its own.
    assert_eq!(ask(&server, pay("bob", Some(100))).await.decision, ALLOW);
    // More than the whole budget never fits; a missing cost fails closed.
    let never = ask(&server, pay("cy", Some(101)))
        .await
        .limited
        .expect("limited");
    assert_eq!(
        (never.reason.as_str(), never.retry_after_ms),
        ("budget_exceeded", None)
    );
    let missing = ask(&server, pay("cy", None)).await;
    assert_eq!(missing.decision, DENY);
    let missing = missing.limited.expect("limited");
    assert_eq!(missing.reason, "budget_cost_missing");
    // The detail says which forms of a cost are read.
    assert!(
        missing
            .detail
            .contains(r#"a Long, or a decimal as `"12.50"` or `{"__extn": {"fn": "decimal", "arg": "12.50"}}`"#),
        "{}",
        missing.detail
    );
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(ask(&server, pay("ann", Some(100))).await.decision, ALLOW);
    server.shutdown().await;
}

/// A purchase in session `session` at `price`, in each of the three ways
/// a decimal can arrive: JSON text, JSON `__extn` escape, typed value.
fn buy(session: Option<&str>, price: &str, form: usize) -> pb::IsAuthorizedRequest {
    let mut req = request(
        "Agent::\"shopper\"",
        None,
        "Action::\"buy\"",
        "Mailbox::\"out\"",
    );
    let session_json = session.map_or(String::new(), |s| format!(", \"session_id\": \"{s}\""));
    match form % 3 {
        0 => with_context_json(req, &format!("{{\"price\": \"{price}\"{session_json}}}")),
        1 => with_context_json(
            req,
            &format!(
                "{{\"price\": {{\"__extn\": {{\"fn\": \"decimal\", \"arg\": \"{price}\"}}}}{session_json}}}"
            ),
        ),
        _ => {
            let mut fields = std::collections::BTreeMap::new();
            fields.insert(
                "price".to_owned(),
                pb::Value {
                    kind: Some(pb::value::Kind::Extension(pb::ExtensionValue {
                        r#fn: "decimal".to_owned(),
                        arg: price.to_owned(),
                    })),
                },
            );
            if let Some(s) = session {
                fields.insert(
                    "session_id".to_owned(),
                    pb::Value {
                        kind: Some(pb::value::Kind::String(s.to_owned())),
                    },
                );
            }
            req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
                pb::Record { fields },
            ));
            req
        }
    }
}

#[tokio::test]
async fn decimal_budgets_count_exactly_per_agent_and_session_in_every_input_form() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Clock::manual(start_time());
    let server = server(dir.path(), "3/minute", &clock, None).await;
    // 20.00 an hour per session: 7.25 + 7.25 + 5.50 is exactly 20.00,
    // whichever form each price arrives in.
    for (form, price) in ["7.25", "7.25", "5.5"].into_iter().enumerate() {
        let r = ask(&server, buy(Some("s1"), price, form)).await;
        assert_eq!((r.decision, r.limited), (ALLOW, None), "form {form}");
    }
    for form in 0..3 {
        let over = ask(&server, buy(Some("s1"), "0.0001", form)).await;
        let limited = over.limited.expect("limited");
        assert_eq!(
            (over.decision, limited.reason.as_str()),
            (DENY, "budget_exceeded")
        );
        // 0.0001 of 20.00 an hour frees up in 3600 s / 200,000 = 18 ms.
        assert_eq!(limited.retry_after_ms, Some(18));
    }
    // Another session of the same agent has its own budget.
    assert_eq!(
        ask(&server, buy(Some("s2"), "20.0", 2)).await.decision,
        ALLOW
    );
    // No session to count against: denied rather than counted as nobody's.
    for form in 0..3 {
        let r = ask(&server, buy(None, "1.00", form)).await;
        assert_eq!(r.decision, DENY);
        let limited = r.limited.expect("limited");
        assert_eq!(limited.reason, "limit_session_missing", "form {form}");
        assert!(limited.detail.contains("session_id"), "{}", limited.detail);
    }
    clock.advance(Duration::from_millis(18));
    assert_eq!(
        ask(&server, buy(Some("s1"), "0.0001", 1)).await.decision,
        ALLOW
    );
    server.shutdown().await;
}

/// With every counter slot held by a live key, a limited permit is denied
/// (`limit_capacity`), never let through uncounted; once keys go idle,
/// there is room again.
#[tokio::test]
async fn a_full_counter_table_denies_rather_than_uncounted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Clock::manual(start_time());
    let options = ServerOptions {
        clock: clock.clone(),
        max_limit_keys: 16,
        ..ServerOptions::default()
    };
    let server = server_with(dir.path(), "3/minute", options).await;
    let (mut allowed, mut full) = (0, 0);
    for i in 0..200 {
        let r = ask(&server, buy(Some(&format!("s-{i}")), "1.00", i)).await;
        match r.limited {
            None => {
                assert_eq!(r.decision, ALLOW, "{r:?}");
                allowed += 1;
            }
            Some(limited) => {
                assert_eq!(r.decision, DENY, "{limited:?}");
                assert_eq!(limited.reason, "limit_capacity", "{limited:?}");
                assert!(limited.detail.contains("denied rather than uncounted"));
                full += 1;
            }
        }
    }
    // 16 slots in all: each session's counter holds one until it goes idle.
    assert!(
        (1..=16).contains(&allowed),
        "{allowed} sessions counted in 16 slots"
    );
    assert_eq!(allowed + full, 200);
    // An hour on, every budget has refilled: the idle keys make room.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(
        ask(&server, buy(Some("s-new"), "1.00", 0)).await.decision,
        ALLOW
    );
    server.shutdown().await;
}

// Two worker threads and a connection per client, so decisions really run at
// the same time: on one thread the handler's synchronous count could not race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_clients_get_exactly_the_rate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Clock::manual(start_time());
    let server = server(dir.path(), "50/hour", &clock, None).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = leash::check::connect_tcp(&server.addr.to_string())
            .await
            .expect("connect");
        tasks.spawn(async move {
            let mut allowed = 0;
            for _ in 0..20 {
                let r = decide_with(&client, send("bot", None, None))
                    .await
                    .expect("decides");
                allowed += usize::from(r.decision == ALLOW);
            }
            allowed
        });
    }
    let mut allowed = 0;
    while let Some(n) = tasks.join_next().await {
        allowed += n.expect("task");
    }
    assert_eq!(allowed, 50);
    server.shutdown().await;
}

#[tokio::test]
async fn a_reload_keeps_the_counts_of_an_unchanged_limit_and_applies_a_changed_one_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Clock::manual(start_time());
    write_bundle(dir.path(), "3/minute");
    let (policies, schemas) = (dir.path().join("policies"), dir.path().join("schemas"));
    let server = ReloadingServer::start_with(
        &policies,
        &schemas,
        leash::reload::ReloadOptions::default(),
        ServerOptions {
            clock: clock.clone(),
            ..ServerOptions::default()
        },
    )
    .await;
    let allowed = |r: pb::IsAuthorizedResponse| r.decision == ALLOW;
    for _ in 0..2 {
        assert!(allowed(
            server
                .decide(send("bot", None, None))
                .await
                .expect("decides")
        ));
    }
    // Another file changes: the limit is the same, so are its counts.
    std::fs::write(
        policies.join("extra.cedar"),
        "@id(\"extra\")\npermit (principal == Agent::\"extra\", action, resource);\n",
    )
    .expect("write");
    server.wait_version(&version_of(&policies, &schemas)).await;
    assert!(allowed(
        server
            .decide(send("bot", None, None))
            .await
            .expect("decides")
    ));
    assert!(!allowed(
        server
            .decide(send("bot", None, None))
            .await
            .expect("decides")
    ));
    // The limit changes: it applies from the next decision.
    std::fs::write(policies.join("send.cedar"), policies_text("5/minute")).expect("write");
    server.wait_version(&version_of(&policies, &schemas)).await;
    for _ in 0..5 {
        assert!(allowed(
            server
                .decide(send("bot", None, None))
                .await
                .expect("decides")
        ));
    }
    let denied = server
        .decide(send("bot", None, None))
        .await
        .expect("decides");
    assert_eq!(denied.limited.expect("limited").limit, "5/minute");
    server.shutdown().await;
}

fn policies_text(rate: &str) -> String {
    policies(rate)
}

#[test]
fn malformed_limits_refuse_the_bundle_naming_the_file_and_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_bundle(dir.path(), "20/minutes");
    let refused = Snapshot::load_dirs(&dir.path().join("policies"), &dir.path().join("schemas"))
        .expect_err("refused");
    let text = format!("{refused:?}");
    assert!(
        text.contains("send.cedar")
            && text.contains("bot-send")
            && text.contains("unknown unit `minutes`"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
        .arg("validate")
        .arg("--policies")
        .arg(dir.path().join("policies"))
        .arg("--schemas")
        .arg(dir.path().join("schemas"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit `minutes`"));
}

#[tokio::test]
async fn a_per_user_limit_counts_a_users_calls_through_every_agent_together() {
    // The user side's permit carries the limit: two calls an hour per user,
    // whichever agent acts for them. A permit both sides match counts an
    // autonomous agent's calls as its own.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("policies")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("schemas")).expect("mkdir");
    std::fs::write(
        dir.path().join("policies/call.cedar"),
        "@id(\"agents-send\")\npermit (principal is Agent, action == Action::\"send\", resource);\n\
         @id(\"users-send\")\n@rate(\"2/hour\")\n@limit_key(\"user\")\n\
         permit (principal is User, action == Action::\"send\", resource);\n\
         @id(\"anyone-buy\")\n@rate(\"2/hour\")\n@limit_key(\"user\")\n\
         permit (principal, action == Action::\"buy\", resource);\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("schemas/mail.cedarschema"), SCHEMA).expect("write");
    let clock = Clock::manual(start_time());
    let snapshot = Snapshot::load_dirs(&dir.path().join("policies"), &dir.path().join("schemas"))
        .expect("bundle loads");
    let server = TestServer::start(
        Some(snapshot),
        ServerOptions {
            clock: clock.clone(),
            ..ServerOptions::default()
        },
        false,
    )
    .await;
    let decision =
        |r: pb::IsAuthorizedResponse| (r.decision, r.limited.map(|l| (l.reason, l.policy_id)));
    let limited = |policy: &str| (DENY, Some(("rate_limited".to_owned(), policy.to_owned())));
    // ann's two calls an hour, through two agents: the third, through
    // either, is over.
    assert_eq!(
        decision(ask(&server, send("a1", Some("ann"), None)).await),
        (ALLOW, None)
    );
    assert_eq!(
        decision(ask(&server, send("a2", Some("ann"), None)).await),
        (ALLOW, None)
    );
    assert_eq!(
        decision(ask(&server, send("a1", Some("ann"), None)).await),
        limited("users-send")
    );
    assert_eq!(
        decision(ask(&server, send("a3", Some("ann"), None)).await),
        limited("users-send")
    );
    // Bob has two of his own through the same agents.
    assert_eq!(
        decision(ask(&server, send("a1", Some("bob"), None)).await),
        (ALLOW, None)
    );
    assert_eq!(
        decision(ask(&server, send("a2", Some("bob"), None)).await),
        (ALLOW, None)
    );
    // Agents alone are not limited by the users' permit.
    for _ in 0..3 {
        assert_eq!(
            decision(ask(&server, send("a1", None, None)).await),
            (ALLOW, None)
        );
    }
    // A permit for anyone: an autonomous agent's calls are its own, apart
    // from the users it acts for.
    let buy = |agent: &str, user: Option<&str>| {
        request(
            &format!("Agent::\"{agent}\""),
            user.map(|u| format!("User::\"{u}\"")).as_deref(),
            "Action::\"buy\"",
            "Mailbox::\"out\"",
        )
    };
    assert_eq!(decision(ask(&server, buy("a1", None)).await), (ALLOW, None));
    assert_eq!(
        decision(ask(&server, buy("a1", Some("ann"))).await),
        (ALLOW, None)
    );
    assert_eq!(decision(ask(&server, buy("a1", None)).await), (ALLOW, None));
    assert_eq!(
        decision(ask(&server, buy("a1", None)).await),
        limited("anyone-buy")
    );
    // Both sides match one permit, counted once: ann's second call is good.
    assert_eq!(
        decision(ask(&server, buy("a2", Some("ann"))).await),
        (ALLOW, None)
    );
    assert_eq!(
        decision(ask(&server, buy("a1", Some("ann"))).await),
        limited("anyone-buy")
    );
    // An hour later, ann's allowance is back.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(
        decision(ask(&server, send("a3", Some("ann"), None)).await),
        (ALLOW, None)
    );
    server.shutdown().await;
}
