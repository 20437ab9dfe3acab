//! Telemetry against real parts: a real server exporting real OTLP (gRPC and
//! HTTP) to an in-process collector, and `/metrics` scraped over HTTP.

mod common;

use std::time::Duration;

use common::*;
use leash::bench::collector::{ReceivedSpan, SpanCollector};
use leash::proto::v1 as pb;
use leash::server::ServerOptions;
use leash::telemetry::{BatchOptions, Protocol, TelemetryOptions, TraceOptions};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// Bound on waiting for spans that have been flushed.
const SPAN_WAIT: Duration = Duration::from_secs(30);

fn traced(endpoint: String, protocol: Protocol) -> ServerOptions {
    let mut trace = TraceOptions::new(endpoint, protocol);
    // Spans leave as soon as there are any; the tests flush explicitly too.
    trace.batch.schedule_delay = Duration::from_millis(20);
    ServerOptions {
        telemetry: TelemetryOptions {
            traces: Some(trace),
            ..TelemetryOptions::default()
        },
        ..ServerOptions::default()
    }
}

fn http_endpoint(collector: &SpanCollector) -> String {
    format!("{}/v1/traces", collector.http_endpoint())
}

fn with_trace<T>(message: T, sampled: bool) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    let flags = if sampled { "01" } else { "00" };
    let md = req.metadata_mut();
    md.insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-{flags}")
            .parse()
            .expect("ascii"),
    );
    md.insert("tracestate", "vendor=opaque".parse().expect("ascii"));
    md.insert(
        "baggage",
        "tenant=acme,session=s-42".parse().expect("ascii"),
    );
    req
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_decision_is_a_span_in_the_callers_trace() {
    let collector = SpanCollector::start(true).await.expect("collector");
    let server = TestServer::start(
        Some(example_snapshot()),
        traced(collector.grpc_endpoint(), Protocol::Grpc),
        false,
    )
    .await;
    let mut req = with_context_json(
        example(
            "billing-agent",
            Some("bob"),
            "invoices:create",
            "BillingAccount::\"BA-100\"",
        ),
        r#"{"amount_cents": 123457}"#,
    );
    req.request_id = "req-span-1".to_owned();
    let resp = server
        .client
        .clone()
        .is_authorized(with_trace(req, true))
        .await
        .expect("decides")
        .into_inner();

    let spans = flushed_spans(&server.server, &collector, 1).await;
    assert_eq!(spans.len(), 1, "one span per decision");
    let s = &spans[0];
    assert_eq!(hex(&s.span.trace_id), TRACE_ID, "joins the caller's trace");
    assert_eq!(
        hex(&s.span.parent_span_id),
        PARENT_SPAN_ID,
        "child of the caller's span"
    );
    assert_eq!(s.span.trace_state, "vendor=opaque");
    assert_eq!(s.span.name, "leash.v1.Authorizer/IsAuthorized");
    assert_eq!(s.span.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(
        s.resource_attribute("service.name").as_deref(),
        Some("leash")
    );

    // What the example decides, written out: a wrong decision must not
    // show up in the answer and the span alike and pass.
    for (key, want) in [
        ("leash.request_id", "req-span-1".to_owned()),
        ("leash.decision", "allow".to_owned()),
        ("gen_ai.agent.id", "Agent::\"billing-agent\"".to_owned()),
        ("leash.on_behalf_of", "User::\"bob\"".to_owned()),
        ("leash.action", "Action::\"invoices:create\"".to_owned()),
        ("gen_ai.tool.name", "invoices:create".to_owned()),
        ("leash.resource", "BillingAccount::\"BA-100\"".to_owned()),
        ("leash.policy_version", resp.policy_version.clone()),
        (
            "leash.determining_policies",
            "billing-agent-invoices-create,role-billing".to_owned(),
        ),
        ("leash.error_count", "0".to_owned()),
        ("leash.agent.decision", "allow".to_owned()),
        (
            "leash.agent.determining_policies",
            "billing-agent-invoices-create".to_owned(),
        ),
        ("leash.on_behalf_of.decision", "allow".to_owned()),
        (
            "leash.on_behalf_of.determining_policies",
            "role-billing".to_owned(),
        ),
        ("rpc.system", "grpc".to_owned()),
        ("rpc.method", "IsAuthorized".to_owned()),
        ("rpc.grpc.status_code", "0".to_owned()),
    ] {
        assert_eq!(s.attribute(key), Some(want), "attribute {key}");
    }
    assert_eq!(
        resp.decision, ALLOW,
        "the example lets the billing agent invoice for Bob"
    );
    // Context values and baggage stay out unless configured in.
    let keys = s.attribute_keys();
    assert!(
        keys.iter()
            .all(|k| !k.starts_with("leash.context.") && !k.starts_with("leash.baggage.")),
        "{keys:?}"
    );
    assert!(
        s.span
            .attributes
            .iter()
            .all(|kv| !format!("{kv:?}").contains("123457")),
        "a context value leaked into the span"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_batch_is_a_span_with_one_child_per_item_over_http() {
    let collector = SpanCollector::start(true).await.expect("collector");
    let server = TestServer::start(
        Some(example_snapshot()),
        traced(http_endpoint(&collector), Protocol::HttpProtobuf),
        false,
    )
    .await;
    let mut bad = example("support-bot", None, "tickets:read", "Ticket::\"T-1\"");
    bad.action = None;
    let batch = pb::BatchIsAuthorizedRequest {
        requests: vec![
            example(
                "support-bot",
                Some("omar"),
                "tickets:read",
                "Ticket::\"T-1\"",
            ),
            example(
                "support-bot",
                Some("omar"),
                "secrets:read",
                "SystemResource::\"vault\"",
            ),
            bad,
        ],
    };
    let resp = server
        .client
        .clone()
        .batch_is_authorized(with_trace(batch, true))
        .await
        .expect("batch decides")
        .into_inner();
    assert_eq!(resp.results.len(), 3);

    let spans = flushed_spans(&server.server, &collector, 4).await;
    assert_eq!(spans.len(), 4, "a batch span and three item spans");
    let batch_span = spans
        .iter()
        .find(|s| s.span.name == "leash.v1.Authorizer/BatchIsAuthorized")
        .expect("batch span");
    assert_eq!(hex(&batch_span.span.trace_id), TRACE_ID);
    assert_eq!(hex(&batch_span.span.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(
        batch_span.attribute("leash.batch.size").as_deref(),
        Some("3")
    );
    assert_eq!(
        batch_span.attribute("leash.batch.invalid").as_deref(),
        Some("1")
    );
    let mut items: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.span.name == "leash.decision")
        .collect();
    items.sort_by_key(|s| s.attribute("leash.batch.index"));
    assert_eq!(items.len(), 3);
    for (i, item) in items.iter().enumerate() {
        assert_eq!(hex(&item.span.trace_id), TRACE_ID);
        assert_eq!(
            item.span.parent_span_id, batch_span.span.span_id,
            "item {i}"
        );
        assert_eq!(item.attribute("leash.batch.index"), Some(i.to_string()));
        assert_eq!(
            item.attribute("leash.request_id"),
            Some(resp.results[i].request_id.clone())
        );
    }
    for (item, result) in items.iter().zip(&resp.results).take(2) {
        let want = if result.decision == ALLOW {
            "allow"
        } else {
            "deny"
        };
        assert_eq!(item.attribute("leash.decision").as_deref(), Some(want));
        assert_eq!(
            item.attribute("leash.determining_policies"),
            Some(result.determining_policies.join(","))
        );
    }
    assert_eq!(
        items[2].attribute("leash.decision").as_deref(),
        Some("invalid")
    );
    assert_eq!(
        items[2].attribute("leash.invalid.field").as_deref(),
        Some("action")
    );
    assert_eq!(
        items[2].span.status.as_ref().map_or(0, |s| s.code),
        0,
        "the caller's mistake leaves the status unset (RPC conventions)"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn configured_context_and_baggage_keys_are_recorded_and_sampling_follows_the_caller() {
    let collector = SpanCollector::start(true).await.expect("collector");
    let mut options = traced(collector.grpc_endpoint(), Protocol::Grpc);
    options.telemetry.context_keys = vec!["amount_cents".to_owned()];
    options.telemetry.baggage_keys = vec!["tenant".to_owned()];
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    let invoice = || {
        with_context_json(
            example(
                "billing-agent",
                Some("bob"),
                "invoices:create",
                "BillingAccount::\"BA-100\"",
            ),
            r#"{"amount_cents": 1200}"#,
        )
    };
    // The caller did not sample its trace: leash follows (parent-based).
    let mut unsampled = invoice();
    unsampled.request_id = "unsampled".to_owned();
    server
        .client
        .clone()
        .is_authorized(with_trace(unsampled, false))
        .await
        .expect("decides");
    let mut sampled = invoice();
    sampled.request_id = "sampled".to_owned();
    server
        .client
        .clone()
        .is_authorized(with_trace(sampled, true))
        .await
        .expect("decides");

    let spans = flushed_spans(&server.server, &collector, 1).await;
    let ids: Vec<Option<String>> = spans
        .iter()
        .map(|s| s.attribute("leash.request_id"))
        .collect();
    assert_eq!(
        ids,
        vec![Some("sampled".to_owned())],
        "only the sampled decision is exported"
    );
    let s = &spans[0];
    assert_eq!(
        s.attribute("leash.context.amount_cents").as_deref(),
        Some("1200")
    );
    assert_eq!(s.attribute("leash.baggage.tenant").as_deref(), Some("acme"));
    assert_eq!(
        s.attribute("leash.baggage.session"),
        None,
        "not configured in"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn queued_spans_are_sent_at_shutdown() {
    let collector = SpanCollector::start(true).await.expect("collector");
    let mut options = traced(collector.grpc_endpoint(), Protocol::Grpc);
    // Nothing would leave for a minute on its own.
    if let Some(trace) = options.telemetry.traces.as_mut() {
        trace.batch.schedule_delay = Duration::from_secs(60);
    }
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    for _ in 0..3 {
        server
            .decide(example(
                "support-bot",
                Some("omar"),
                "tickets:read",
                "Ticket::\"T-1\"",
            ))
            .await
            .expect("decides");
    }
    assert_eq!(
        collector.span_count(),
        0,
        "nothing is sent before the schedule delay"
    );
    server.shutdown().await;
    assert_eq!(
        collector.wait_for(3, SPAN_WAIT).await,
        3,
        "flushed on shutdown"
    );
}

#[tokio::test]
async fn decisions_go_on_when_the_collector_is_absent() {
    // A port bound but not listening: every connection is refused, and no
    // other test can take the port meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().expect("socket");
    reserved
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = reserved.local_addr().expect("addr");
    let server = TestServer::start(
        Some(example_snapshot()),
        traced(format!("http://{addr}"), Protocol::Grpc),
        false,
    )
    .await;
    for _ in 0..20 {
        let resp = server
            .decide(example(
                "support-bot",
                Some("omar"),
                "tickets:read",
                "Ticket::\"T-1\"",
            ))
            .await
            .expect("decides without a collector");
        assert!(resp.decision == ALLOW || resp.decision == DENY);
    }
    assert!(server.server.telemetry().flush(SPAN_WAIT).await);
    let (_, text) = http_get(server.admin_addr, "GET", "/metrics").await;
    assert_eq!(
        metric(&text, "leash_spans_dropped_total{reason=\"export_failed\"}"),
        20.0,
        "{text}"
    );
    assert_eq!(metric(&text, "leash_spans_exported_total"), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn decisions_go_on_when_the_collector_hangs() {
    let collector = SpanCollector::start(false).await.expect("collector");
    collector.hang();
    let mut trace = TraceOptions::new(collector.grpc_endpoint(), Protocol::Grpc);
    // An export may hang for a minute; a queue of 4 fills long before.
    trace.timeout = Duration::from_secs(60);
    trace.batch = BatchOptions {
        max_queue: 4,
        schedule_delay: Duration::from_millis(20),
        max_batch: 2,
        export_timeout: Duration::from_secs(60),
    };
    let options = ServerOptions {
        telemetry: TelemetryOptions {
            traces: Some(trace),
            ..TelemetryOptions::default()
        },
        // Shutdown gives up on the stuck collector after this.
        drain_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    };
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    // Far shorter than the export timeout: decisions cannot be waiting on it.
    let all = tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..40 {
            server
                .decide(example(
                    "support-bot",
                    Some("omar"),
                    "tickets:read",
                    "Ticket::\"T-1\"",
                ))
                .await
                .expect("decides with a stuck collector");
        }
    })
    .await;
    assert!(all.is_ok(), "decisions waited on the stuck collector");
    assert!(
        collector.request_count() >= 1,
        "the exporter did reach the collector"
    );
    let (_, text) = http_get(server.admin_addr, "GET", "/metrics").await;
    let dropped = metric(&text, "leash_spans_dropped_total{reason=\"queue_full\"}");
    // At most one batch in the stuck export, one being gathered and a full
    // queue are held; the rest are dropped.
    assert!(
        dropped >= 40.0 - 2.0 - 2.0 - 4.0,
        "dropped {dropped}\n{text}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_move_with_decisions_and_readiness_follows_the_bundle() {
    let server = TestServer::start(None, ServerOptions::default(), false).await;
    let admin = server.admin_addr;
    let (code, body) = http_get(admin, "GET", "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: no valid policy bundle is loaded yet\n")
    );
    assert_eq!(http_get(admin, "GET", "/healthz").await.0, 200);
    let (_, before) = http_get(admin, "GET", "/metrics").await;
    assert_eq!(metric(&before, "leash_policy_bundle_loaded"), 0.0);
    // Without a bundle a decision is UNAVAILABLE, and counted as such.
    let refused = server
        .decide(example(
            "support-bot",
            None,
            "tickets:read",
            "Ticket::\"T-1\"",
        ))
        .await
        .expect_err("no bundle");
    assert_eq!(refused.code(), tonic::Code::Unavailable);

    let snapshot = example_snapshot();
    let version = snapshot.version.clone();
    server.server.publish(snapshot).await;
    let (code, body) = http_get(admin, "GET", "/readyz").await;
    assert_eq!(code, 200);
    assert!(body.contains(&version), "{body}");

    let allow = server
        .decide(example(
            "support-bot",
            Some("omar"),
            "tickets:read",
            "Ticket::\"T-1\"",
        ))
        .await
        .expect("decides");
    let deny = server
        .decide(example(
            "support-bot",
            Some("omar"),
            "secrets:read",
            "SystemResource::\"vault\"",
        ))
        .await
        .expect("decides");
    assert_eq!((allow.decision, deny.decision), (ALLOW, DENY));
    let unknown_action = server
        .decide(example("support-bot", None, "rm:rf", "Ticket::\"T-1\""))
        .await
        .expect_err("invalid");
    assert_eq!(unknown_action.code(), tonic::Code::InvalidArgument);
    server
        .client
        .clone()
        .batch_is_authorized(pb::BatchIsAuthorizedRequest {
            requests: vec![
                example(
                    "support-bot",
                    Some("omar"),
                    "tickets:read",
                    "Ticket::\"T-1\""
                );
                3
            ],
        })
        .await
        .expect("batch");

    let (code, text) = http_get(admin, "GET", "/metrics").await;
    assert_eq!(code, 200);
    let m = |series: &str| metric(&text, series) - metric_or_zero(&before, series);
    assert_eq!(
        m("leash_decisions_total{decision=\"allow\",action=\"tickets:read\"}"),
        4.0
    );
    assert_eq!(
        m("leash_decisions_total{decision=\"deny\",action=\"secrets:read\"}"),
        1.0
    );
    assert_eq!(
        m("leash_decisions_total{decision=\"invalid\",action=\"other\"}"),
        1.0,
        "an action outside the schema gets no series of its own"
    );
    assert!(!text.contains("rm:rf"));
    assert_eq!(m("leash_decision_duration_seconds_count"), 6.0);
    assert!(m("leash_decision_duration_seconds_sum") > 0.0);
    assert_eq!(m("leash_batch_size_count"), 1.0);
    assert_eq!(m("leash_batch_size_sum"), 3.0);
    let grpc = |method: &str, code: &str| {
        m(&format!(
            "leash_grpc_requests_total{{method=\"leash.v1.Authorizer/{method}\",code=\"{code}\"}}"
        ))
    };
    assert_eq!(grpc("IsAuthorized", "OK"), 2.0);
    assert_eq!(grpc("IsAuthorized", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(grpc("IsAuthorized", "UNAVAILABLE"), 1.0);
    assert_eq!(grpc("BatchIsAuthorized", "OK"), 1.0);
    assert_eq!(metric(&text, "leash_policy_bundle_loaded"), 1.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("leash_policy_bundle_info{version=\"")
                && l.contains(&version)
                && l.ends_with(" 1")),
        "{text}"
    );
    assert!(metric(&text, "leash_seconds_since_last_successful_reload") >= 0.0);
    // The decisions above were narrowed by the scope index: their subsets
    // are kept, and no request fell back to the whole set.
    assert!(metric(&text, "leash_index_subsets") >= 2.0, "{text}");
    assert!(metric(&text, "leash_index_subset_bytes") > 1024.0, "{text}");
    assert_eq!(m("leash_index_fallbacks_total"), 0.0);
    // Logging is not set up in tests; the series is there all the same.
    metric(&text, "leash_log_lines_dropped_total");
    metric(&text, "leash_spans_dropped_total{reason=\"queue_full\"}");
    assert!(text.contains("# TYPE leash_seconds_since_last_successful_reload gauge"));
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );

    // Only the three paths, GET only.
    assert_eq!(http_get(admin, "GET", "/nope").await.0, 404);
    assert_eq!(http_get(admin, "POST", "/metrics").await.0, 405);
    server.shutdown().await;
}

#[tokio::test]
async fn reload_metrics_follow_refused_and_loaded_bundles() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = empty_bundle_dirs(dir.path());
    std::fs::write(
        schemas.join("s.cedarschema"),
        "entity User; entity Doc; action read appliesTo { principal: User, resource: Doc };",
    )
    .expect("write");
    std::fs::write(
        policies.join("p.cedar"),
        "@id(\"p\") permit(principal, action, resource);",
    )
    .expect("write");
    let server = ReloadingServer::start(
        &policies,
        &schemas,
        leash::reload::ReloadOptions {
            watch: leash::reload::WatchMode::Events,
            settle: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await;
    let scrape = || http_get(server.admin_addr, "GET", "/metrics");
    // Whole files renamed into place, so no reload sees half a file.
    let replace = |text: &str| {
        let staged = dir.path().join("p.cedar.staged");
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, policies.join("p.cedar")).expect("rename");
    };
    let (_, text) = scrape().await;
    assert_eq!(
        metric(&text, "leash_reloads_total{result=\"loaded\"}"),
        1.0,
        "the startup load"
    );
    assert_eq!(
        metric(&text, "leash_reloads_total{result=\"refused\"}"),
        0.0
    );

    std::fs::write(
        policies.join("p.cedar"),
        "@id(\"p\") permit(principal, action",
    )
    .expect("write");
    server.wait_refused(0).await;
    let (_, text) = scrape().await;
    assert_eq!(
        metric(&text, "leash_reloads_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(
        http_get(server.admin_addr, "GET", "/readyz").await.0,
        200,
        "a refused change leaves the last good bundle serving, and leash ready"
    );

    replace("@id(\"p2\") permit(principal, action, resource);");
    let version = version_of(&policies, &schemas);
    server.wait_version(&version).await;
    let (_, text) = scrape().await;
    assert_eq!(metric(&text, "leash_reloads_total{result=\"loaded\"}"), 2.0);
    assert!(text.contains(&format!("version=\"{version}\"")), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn spans_count_what_callers_were_answered_and_keep_caller_text_small() {
    let collector = SpanCollector::start(true).await.expect("collector");
    let dir = tempfile::tempdir().expect("temp dir");
    // The audit trail reaches its file through a link to a device that is
    // always full: every record is refused, so every decision is a DENY.
    let link = dir.path().join("audit.log");
    std::os::unix::fs::symlink("/dev/full", &link).expect("symlink");
    let mut options = traced(http_endpoint(&collector), Protocol::HttpProtobuf);
    options.audit = leash::audit::AuditOptions {
        target: leash::audit::AuditTarget::File(link),
        ..leash::audit::AuditOptions::default()
    };
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    let allowed = || {
        example(
            "support-bot",
            Some("omar"),
            "tickets:read",
            "Ticket::\"T-1\"",
        )
    };
    let mut long_id = allowed();
    long_id.request_id = format!("{}😀{}", "r".repeat(253), "r".repeat(10_000));
    let mut long_resource = allowed();
    long_resource.resource = Some(uid(&format!("Ticket::\"{}\"", "t".repeat(5_000))));
    // One alone first: its RPC span is the decision's.
    let alone = server
        .client
        .clone()
        .is_authorized(with_trace(allowed(), true))
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(alone.decision, DENY, "{alone:?}");
    let batch = pb::BatchIsAuthorizedRequest {
        requests: vec![allowed(), allowed(), long_id, long_resource],
    };
    let resp = server
        .client
        .clone()
        .batch_is_authorized(with_trace(batch, true))
        .await
        .expect("batch answers")
        .into_inner();
    let decisions: Vec<i32> = resp.results.iter().map(|r| r.decision).collect();
    assert_eq!(decisions, vec![DENY; 4], "{resp:?}");
    let problem = |i: usize| resp.results[i].error.as_ref().map(|e| e.message.clone());
    assert!(
        problem(0).is_some_and(|m| m.contains("audit trail unavailable")),
        "{resp:?}"
    );
    assert!(
        problem(3).is_some_and(|m| m.contains("resource.id: 5000 bytes; at most 4096")),
        "{:?}",
        problem(3)
    );

    let spans = flushed_spans(&server.server, &collector, 6).await;
    let unary = spans
        .iter()
        .find(|s| s.span.name == "leash.v1.Authorizer/IsAuthorized")
        .expect("unary span");
    assert!(unary.attribute("leash.audit.error").is_some());
    assert_eq!(
        unary.span.status.as_ref().map(|s| s.code),
        Some(2),
        "an unrecorded decision is leash's failure"
    );
    let batch_span = spans
        .iter()
        .find(|s| s.span.name == "leash.v1.Authorizer/BatchIsAuthorized")
        .expect("batch span");
    let count = |key: &str| batch_span.attribute(key);
    assert_eq!(
        (
            count("leash.batch.allowed"),
            count("leash.batch.denied"),
            count("leash.batch.invalid")
        ),
        (Some("0".into()), Some("2".into()), Some("2".into())),
        "items the trail refused were answered DENY"
    );
    let item = |i: usize| {
        spans
            .iter()
            .find(|s| {
                s.span.name == "leash.decision"
                    && s.attribute("leash.batch.index") == Some(i.to_string())
            })
            .expect("item span")
    };
    assert_eq!(item(0).attribute("leash.decision").as_deref(), Some("deny"));
    assert!(item(0).attribute("leash.audit.error").is_some());
    // Not recording is leash's own failure: each such item's span is an
    // error (2; a caller's mistake alone leaves it unset, as checked above).
    for i in 0..4 {
        // The two decided items were refused by the trail; the invalid two
        // may carry it too (the group was one write).
        let unrecorded = item(i).attribute("leash.audit.error").is_some();
        assert!(unrecorded || i >= 2, "item {i} has no audit error");
        if unrecorded {
            assert_eq!(
                item(i).span.status.as_ref().map(|s| s.code),
                Some(2),
                "item {i}"
            );
        }
    }
    let shown = item(2).attribute("leash.request_id").expect("request id");
    assert_eq!(shown, format!("{}…(cut)", "r".repeat(253)));
    assert_eq!(resp.results[2].request_id, shown);
    assert_eq!(
        item(3).attribute("leash.invalid.field").as_deref(),
        Some("resource.id")
    );
    // The trail never took a write: its outage goes unrecorded, and the run
    // ends in an error that says so.
    let ended = server.stop().await.expect_err("the outage is unrecorded");
    assert!(
        ended
            .to_string()
            .contains("the record of its outage (5 decisions refused)"),
        "{ended}"
    );
}
