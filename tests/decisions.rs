//! Decisions over the real server: the example capability matrix, delegation,
//! batches and bad input.

mod common;

use common::*;
use leash::proto::v1 as pb;
use leash::server::ServerOptions;
use tonic::Code;

/// Context each example action needs (the schema declares it).
fn context_for(action: &str) -> Option<&'static str> {
    match action {
        "invoices:create" => Some(r#"{"amount_cents": 1200}"#),
        "email:send" => Some(r#"{"recipient": {"__entity": {"type": "Customer", "id": "C-100"}}}"#),
        _ => None,
    }
}

fn example_request(
    agent: &str,
    user: Option<&str>,
    action: &str,
    resource: &str,
) -> pb::IsAuthorizedRequest {
    let req = request(
        &format!("Agent::\"{agent}\""),
        user.map(|u| format!("User::\"{u}\"")).as_deref(),
        &format!("Action::\"{action}\""),
        resource,
    );
    match context_for(action) {
        Some(ctx) => with_context_json(req, ctx),
        None => req,
    }
}

/// Seed 001's capability matrix, one row per (agent, capability). The user is
/// Omar, who holds every staff role and works in a department every agent
/// serves, so the agent side alone decides each cell.
#[tokio::test]
async fn every_cell_of_the_capability_matrix() {
    let server = TestServer::example().await;
    let capabilities = [
        ("tickets:read", "Ticket::\"T-1\""),
        ("tickets:update_status", "Ticket::\"T-1\""),
        ("tickets:create", "Customer::\"C-100\""),
        ("customers:read_masked", "Customer::\"C-100\""),
        ("customers:read_full", "Customer::\"C-100\""),
        ("billing:read", "BillingAccount::\"BA-100\""),
        ("invoices:create", "BillingAccount::\"BA-100\""),
        ("email:send", "EmailTemplate::\"welcome\""),
        ("kb:read", "KbArticle::\"refund-runbook\""),
        ("kb:write", "KbArticle::\"refund-runbook\""),
    ];
    //                 tickets r/u/c      cust m/f     billing r/i   email   kb r/w
    let matrix = [
        (
            "support-bot",
            [
                true, true, false, true, false, false, false, false, true, false,
            ],
        ),
        (
            "billing-agent",
            [
                true, false, false, true, true, true, true, true, true, false,
            ],
        ),
        (
            "onboarding-agent",
            [
                false, false, true, true, false, false, false, true, true, true,
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (agent, row) in matrix {
        for ((action, resource), expected) in capabilities.iter().zip(row) {
            let resp = server
                .decide(example_request(agent, Some("omar"), action, resource))
                .await
                .unwrap_or_else(|s| panic!("{agent} {action}: {s}"));
            let user_side = resp.on_behalf_of.as_ref().expect("user side");
            if user_side.decision != ALLOW {
                failures.push(format!("{agent} {action}: omar should be entitled"));
            }
            let want = if expected { ALLOW } else { DENY };
            if resp.decision != want {
                failures.push(format!(
                    "{agent} {action}: got {}, want {}",
                    name(resp.decision),
                    name(want)
                ));
            }
            if expected
                && resp
                    .agent
                    .as_ref()
                    .map(|a| a.determining_policies.is_empty())
                    != Some(false)
            {
                failures.push(format!("{agent} {action}: an allow must name its permit"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn never_by_default_categories_are_forbidden_for_every_agent() {
    let server = TestServer::example().await;
    let categories = [
        ("fs:read", "host-filesystem"),
        ("fs:write", "host-filesystem"),
        ("code:execute", "shell"),
        ("network:request", "internet"),
        ("iam:modify", "iam"),
        ("secrets:read", "vault"),
        ("system:read_env", "process-env"),
        ("paid_api:invoke", "tax-rates-api"),
    ];
    for agent in [
        "support-bot",
        "billing-agent",
        "onboarding-agent",
        "research-agent",
    ] {
        for (action, target) in categories {
            // The one documented exception: the billing agent and the paid tax API.
            if agent == "billing-agent" && action == "paid_api:invoke" {
                continue;
            }
            for user in [None, Some("omar")] {
                let resource = format!("SystemResource::\"{target}\"");
                let resp = server
                    .decide(example_request(agent, user, action, &resource))
                    .await
                    .expect("decides");
                assert_eq!(resp.decision, DENY, "{agent} {action} {user:?}");
                let agent_side = resp.agent.expect("agent side");
                if action != "paid_api:invoke" {
                    assert_eq!(
                        agent_side.determining_policies,
                        vec!["baseline-never-by-default"],
                        "{agent} {action}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn documented_exception_holds_until_it_expires() {
    let server = TestServer::example().await;
    let resp = server
        .decide(example_request(
            "billing-agent",
            None,
            "paid_api:invoke",
            "SystemResource::\"tax-rates-api\"",
        ))
        .await
        .expect("decides");
    // The exception record expires 2027-06-30; leash supplies the time.
    let expired = chrono::Utc::now()
        >= "2027-06-30T00:00:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .expect("date");
    if expired {
        assert_eq!(resp.decision, DENY);
        assert_eq!(resp.determining_policies, vec!["baseline-never-by-default"]);
    } else {
        assert_eq!(resp.decision, ALLOW);
        assert_eq!(
            resp.determining_policies,
            vec!["exception-billing-agent-tax-rates-api"]
        );
    }
}

#[tokio::test]
async fn data_level_limits_in_the_example() {
    let server = TestServer::example().await;
    // Approved templates only: a draft is never the Onboarding Agent's to
    // send, and the Billing Agent's only after a person approves the send.
    let draft = |agent: &str, user: &str| {
        example_request(
            agent,
            Some(user),
            "email:send",
            "EmailTemplate::\"promo-draft\"",
        )
    };
    let resp = server
        .decide(draft("onboarding-agent", "carol"))
        .await
        .expect("decides");
    assert_eq!(resp.decision, DENY);
    let resp = server
        .decide(draft("billing-agent", "bob"))
        .await
        .expect("decides");
    assert_eq!(resp.decision, pb::Decision::ApprovalRequired as i32);
    assert_eq!(
        resp.approval.expect("approval").policies,
        ["billing-agent-email-drafts"]
    );
    // Invoices above 5,000.00 stay with people.
    let big = with_context_json(
        example_request(
            "billing-agent",
            Some("bob"),
            "invoices:create",
            "BillingAccount::\"BA-100\"",
        ),
        r#"{"amount_cents": 500001}"#,
    );
    let resp = server.decide(big).await.expect("decides");
    assert_eq!(resp.decision, DENY);
    assert_eq!(resp.agent.expect("agent").decision, DENY);
    assert_eq!(resp.on_behalf_of.expect("user").decision, ALLOW);
}

/// Batch size and session length are plain Cedar conditions in the example
/// baseline: a bulk update of more than 100 tickets, and any call in a
/// session older than 8 hours by leash's clock, are denied.
#[tokio::test]
async fn batch_size_and_session_length_in_the_example() {
    let server = TestServer::example().await;
    let update = |context: &str| {
        with_context_json(
            example_request(
                "support-bot",
                Some("omar"),
                "tickets:update_status",
                "Ticket::\"T-1\"",
            ),
            context,
        )
    };
    let decide = |req| async { server.decide(req).await.expect("decides") };
    assert_eq!(
        decide(update(r#"{"batch_size": 100}"#)).await.decision,
        ALLOW
    );
    let bulk = decide(update(r#"{"batch_size": 101}"#)).await;
    assert_eq!(bulk.decision, DENY);
    assert_eq!(bulk.determining_policies, vec!["baseline-batch-size"]);

    let started = |hours_ago: i64| {
        let at = chrono::Utc::now() - chrono::Duration::hours(hours_ago);
        format!(
            r#"{{"session_started": {{"__extn": {{"fn": "datetime", "arg": "{}"}}}}}}"#,
            at.format("%Y-%m-%dT%H:%M:%SZ")
        )
    };
    assert_eq!(decide(update(&started(7))).await.decision, ALLOW);
    let stale = decide(update(&started(9))).await;
    assert_eq!(stale.decision, DENY);
    assert_eq!(stale.determining_policies, vec!["baseline-session-length"]);
    server.shutdown().await;
}

fn sides(resp: &pb::IsAuthorizedResponse) -> (i32, Option<i32>) {
    (
        resp.agent.as_ref().expect("agent side").decision,
        resp.on_behalf_of.as_ref().map(|s| s.decision),
    )
}

#[tokio::test]
async fn the_four_delegation_cases_and_autonomous_requests() {
    let server = TestServer::example().await;

    // Both allow.
    let resp = server
        .decide(example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-1\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, ALLOW);
    assert_eq!(sides(&resp), (ALLOW, Some(ALLOW)));
    assert_eq!(
        resp.determining_policies,
        vec!["support-bot-tickets", "role-support-tickets"]
    );
    assert_eq!(
        resp.on_behalf_of.as_ref().and_then(|s| s.principal.clone()),
        Some(uid("User::\"alice\""))
    );

    // Agent yes, user no: Alice (EMEA) may not read an APAC ticket, so her
    // agent may not either. No confused deputy.
    let resp = server
        .decide(example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-2\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, DENY);
    assert_eq!(sides(&resp), (ALLOW, Some(DENY)));
    assert!(
        resp.determining_policies.is_empty(),
        "default deny names no policy"
    );
    assert_eq!(
        resp.agent.as_ref().expect("agent").determining_policies,
        vec!["support-bot-tickets"]
    );

    // Agent no, user yes: Omar may read full PII; the Support Bot may not.
    let resp = server
        .decide(example_request(
            "support-bot",
            Some("omar"),
            "customers:read_full",
            "Customer::\"C-100\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, DENY);
    assert_eq!(sides(&resp), (DENY, Some(ALLOW)));
    assert_eq!(
        resp.on_behalf_of
            .as_ref()
            .expect("user")
            .determining_policies,
        vec!["role-billing"]
    );

    // Neither.
    let resp = server
        .decide(example_request(
            "support-bot",
            Some("erin"),
            "billing:read",
            "BillingAccount::\"BA-100\"",
        ))
        .await
        .expect("decides");
    assert_eq!(sides(&resp), (DENY, Some(DENY)));
    assert_eq!(resp.decision, DENY);

    // Autonomous: no user side at all.
    let resp = server
        .decide(example_request(
            "support-bot",
            None,
            "tickets:read",
            "Ticket::\"T-1\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, ALLOW);
    assert!(resp.on_behalf_of.is_none());

    // Policies tell the cases apart: consequential actions need a user.
    let resp = server
        .decide(example_request(
            "billing-agent",
            None,
            "customers:read_full",
            "Customer::\"C-100\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, DENY);
    assert_eq!(
        resp.determining_policies,
        vec!["baseline-consequential-needs-user"]
    );
    let resp = server
        .decide(example_request(
            "billing-agent",
            Some("bob"),
            "customers:read_full",
            "Customer::\"C-100\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, ALLOW);
}

#[tokio::test]
async fn each_side_can_condition_on_the_other() {
    let server = TestServer::example().await;
    // Agent side looks at the user: the Billing Agent does not work for support staff.
    let resp = server
        .decide(example_request(
            "billing-agent",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-1\"",
        ))
        .await
        .expect("decides");
    assert_eq!(sides(&resp), (DENY, Some(ALLOW)));
    assert_eq!(
        resp.determining_policies,
        vec!["baseline-agent-serves-department"]
    );

    // User side looks at the agent: finance users only with vetted agents.
    let resp = server
        .decide(example_request(
            "research-agent",
            Some("bob"),
            "kb:read",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect("decides");
    assert_eq!(sides(&resp), (ALLOW, Some(DENY)));
    assert_eq!(
        resp.determining_policies,
        vec!["finance-requires-vetted-agent"]
    );
    let resp = server
        .decide(example_request(
            "research-agent",
            Some("alice"),
            "kb:read",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, ALLOW);
}

#[tokio::test]
async fn request_ids_and_policy_version_are_reported() {
    let server = TestServer::example().await;
    let version = server
        .server
        .live()
        .current()
        .expect("loaded")
        .version
        .clone();
    let mut req = example_request(
        "support-bot",
        None,
        "kb:read",
        "KbArticle::\"reset-password\"",
    );
    req.request_id = "call-42".into();
    let resp = server.decide(req).await.expect("decides");
    assert_eq!(resp.request_id, "call-42");
    assert_eq!(resp.policy_version, version);
    assert_eq!(version.len(), 16);
    let resp = server
        .decide(example_request(
            "support-bot",
            None,
            "kb:read",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect("decides");
    assert_eq!(
        resp.request_id.len(),
        36,
        "a UUID is made when none is sent"
    );
}

#[tokio::test]
async fn batches_keep_order_and_report_items_on_their_own() {
    let server = TestServer::start(
        Some(example_snapshot()),
        ServerOptions {
            max_batch: 4,
            ..ServerOptions::default()
        },
        false,
    )
    .await;
    let mut bad = example_request("support-bot", None, "tickets:read", "Ticket::\"T-1\"");
    bad.action = Some(uid("Action::\"tickets:burn\""));
    bad.request_id = "bad-one".into();
    let requests = vec![
        example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-1\"",
        ),
        bad,
        example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-2\"",
        ),
        example_request(
            "onboarding-agent",
            Some("carol"),
            "kb:write",
            "KbArticle::\"refund-runbook\"",
        ),
    ];
    let resp = server
        .client
        .clone()
        .batch_is_authorized(pb::BatchIsAuthorizedRequest {
            requests: requests.clone(),
        })
        .await
        .expect("batch")
        .into_inner();
    let decisions: Vec<i32> = resp.results.iter().map(|r| r.decision).collect();
    assert_eq!(decisions, vec![ALLOW, DENY, DENY, ALLOW]);
    let err = resp.results[1].error.as_ref().expect("item error");
    assert_eq!(err.code, Code::InvalidArgument as i32);
    assert_eq!(
        err.message,
        "requests[1].action: `Action::\"tickets:burn\"` is not an action of the schema"
    );
    assert_eq!(resp.results[1].request_id, "bad-one");
    assert!(resp.results[2].error.is_none());
    assert!(resp
        .results
        .iter()
        .all(|r| r.policy_version == resp.policy_version));

    // The same answers one by one.
    for (req, batched) in requests
        .iter()
        .zip(&resp.results)
        .filter(|(_, r)| r.error.is_none())
    {
        let single = server.decide(req.clone()).await.expect("decides");
        assert_eq!(single.decision, batched.decision);
        assert_eq!(single.determining_policies, batched.determining_policies);
    }

    let too_many = vec![
        example_request(
            "support-bot",
            None,
            "kb:read",
            "KbArticle::\"reset-password\""
        );
        5
    ];
    let status = server
        .client
        .clone()
        .batch_is_authorized(pb::BatchIsAuthorizedRequest { requests: too_many })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "requests: a batch of 5 exceeds the maximum of 4 (--max-batch)"
    );
}

async fn invalid(server: &TestServer, req: pb::IsAuthorizedRequest) -> String {
    let status = server.decide(req).await.expect_err("must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    status.message().to_owned()
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_naming_the_field() {
    let server = TestServer::example().await;
    let base = || {
        example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-1\"",
        )
    };

    let mut req = base();
    req.principal = None;
    assert_eq!(invalid(&server, req).await, "principal: required");

    let mut req = base();
    req.principal = Some(pb::Principal {
        agent: None,
        on_behalf_of: None,
    });
    assert_eq!(invalid(&server, req).await, "principal.agent: required");

    let mut req = base();
    req.resource = Some(pb::EntityUid {
        r#type: String::new(),
        id: "T-1".into(),
    });
    assert_eq!(
        invalid(&server, req).await,
        "resource.type: required (an entity type such as `User`)"
    );

    // Unknown entity type and action.
    let req = request(
        "Robot::\"r2\"",
        None,
        "Action::\"tickets:read\"",
        "Ticket::\"T-1\"",
    );
    let msg = invalid(&server, req).await;
    assert!(msg.starts_with("principal.agent: "), "{msg}");
    assert!(msg.contains("Robot"), "{msg}");
    let req = request(
        "Agent::\"support-bot\"",
        Some("Robot::\"r2\""),
        "Action::\"tickets:read\"",
        "Ticket::\"T-1\"",
    );
    assert!(invalid(&server, req)
        .await
        .starts_with("principal.on_behalf_of: "));
    let req = request(
        "Agent::\"support-bot\"",
        None,
        "Action::\"tickets:read\"",
        "Customer::\"C-100\"",
    );
    assert!(invalid(&server, req).await.starts_with("resource: "));
    let req = example_request("support-bot", None, "tickets:shred", "Ticket::\"T-1\"");
    assert_eq!(
        invalid(&server, req).await,
        "action: `Action::\"tickets:shred\"` is not an action of the schema"
    );

    // Context that does not match the action's schema, and malformed JSON.
    let req = with_context_json(
        example_request(
            "billing-agent",
            Some("bob"),
            "invoices:create",
            "BillingAccount::\"BA-100\"",
        ),
        r#"{"amount_cents": "twelve"}"#,
    );
    assert_eq!(
        invalid(&server, req).await,
        "context_json.amount_cents: expected a Long, got `\"twelve\"` (the context type of \
         `Action::\"invoices:create\"`)"
    );
    let req = with_context_json(base(), r#"{"amount_cents": 1"#);
    assert!(invalid(&server, req)
        .await
        .starts_with("context_json: malformed JSON at line 1 column"));
    let req = with_context_json(base(), "[1, 2]");
    assert_eq!(
        invalid(&server, req).await,
        "context_json: must be a JSON object (a Cedar record)"
    );

    // The trusted record cannot be supplied by the caller.
    let req = with_context_json(base(), r#"{"leash": {"delegated": false}}"#);
    assert_eq!(
        invalid(&server, req).await,
        "context_json.leash: attribute is reserved: leash supplies it for this action"
    );

    // A typed extension value names a constructor Cedar has (`ipaddr` is
    // taken for `ip`; here the schema then refuses the undeclared attribute).
    let typed_ext = |name: &str| {
        let mut req = base();
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "origin".to_owned(),
            pb::Value {
                kind: Some(pb::value::Kind::Extension(pb::ExtensionValue {
                    r#fn: name.to_owned(),
                    arg: "10.0.0.1".to_owned(),
                })),
            },
        );
        req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
            pb::Record { fields },
        ));
        req
    };
    assert_eq!(
        invalid(&server, typed_ext("sqrt")).await,
        "context.origin.fn: unknown extension constructor `sqrt`; expected `ip`, `decimal`, \
         `datetime` or `duration`"
    );
    for name in ["ip", "ipaddr"] {
        let msg = invalid(&server, typed_ext(name)).await;
        assert!(!msg.contains("extension constructor"), "{name}: {msg}");
        assert!(msg.contains("origin"), "{name}: {msg}");
    }

    // An agent is not its own user: the user side would be the agent's.
    let req = example_request("support-bot", None, "tickets:read", "Ticket::\"T-1\"");
    let mut req = req;
    if let Some(p) = req.principal.as_mut() {
        p.on_behalf_of = p.agent.clone();
    }
    assert_eq!(
        invalid(&server, req).await,
        "principal.on_behalf_of: names the agent itself; leave it out for an agent acting on its own"
    );

    // A request may add entities but not redefine the bundle's: no
    // asserting one's own roles.
    let req = with_entities_json(
        base(),
        r#"[{"uid": {"type": "User", "id": "alice"}, "attrs": {"display_name": "A", "department": "billing", "region": "NA"}, "parents": [{"type": "Role", "id": "billing"}]}]"#,
    );
    assert_eq!(
        invalid(&server, req).await,
        "entities_json[0]: entity `User::\"alice\"` is defined by the policy bundle; a request may add entities but not redefine them"
    );
    let req = with_entities_json(
        base(),
        r#"[{"uid": {"type": "Action", "id": "tickets:read"}, "attrs": {}, "parents": []}]"#,
    );
    assert!(invalid(&server, req)
        .await
        .starts_with("entities_json[0]: "));
    let req = with_entities_json(base(), r#"{"uid": 1}"#);
    assert_eq!(
        invalid(&server, req).await,
        "entities_json: must be a JSON array of entities, as in a Cedar entities file"
    );

    // Deeply nested values are bounded (JSON and typed alike).
    let deep = format!("{{\"x\": {}1{}}}", "[".repeat(40), "]".repeat(40));
    let req = with_context_json(base(), &deep);
    assert_eq!(
        invalid(&server, req).await,
        "context_json: values nest deeper than 32 levels"
    );
}

#[tokio::test]
async fn request_entities_extend_the_bundle() {
    let server = TestServer::example().await;
    // A ticket the bundle does not know, sent by the gateway with the call.
    let req = with_entities_json(
        example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-900\"",
        ),
        r#"[{"uid": {"type": "Ticket", "id": "T-900"}, "attrs": {"customer": {"__entity": {"type": "Customer", "id": "C-100"}}, "region": "EMEA", "tier": 2}, "parents": []}]"#,
    );
    assert_eq!(server.decide(req).await.expect("decides").decision, ALLOW);
    let req = with_entities_json(
        example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-901\"",
        ),
        r#"[{"uid": {"type": "Ticket", "id": "T-901"}, "attrs": {"customer": {"__entity": {"type": "Customer", "id": "C-200"}}, "region": "APAC", "tier": 2}, "parents": []}]"#,
    );
    assert_eq!(server.decide(req).await.expect("decides").decision, DENY);
    // Attributes are checked against the schema.
    let req = with_entities_json(
        example_request(
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-902\"",
        ),
        r#"[{"uid": {"type": "Ticket", "id": "T-902"}, "attrs": {"region": "EMEA"}, "parents": []}]"#,
    );
    assert!(invalid(&server, req)
        .await
        .starts_with("entities_json[0]: "));
}

/// Cedar's JSON entity format reads `{"__extn": {"fn": "unknown", ..}}` as
/// an unknown of any type, which passes the schema check; a forbid reading
/// it evaluates to a residual, which Cedar's authorizer leaves out of its
/// decision and reports as an error. leash denies a side with errors, so
/// such a request was denied, but with an evaluation error for a reason;
/// and a bundle could ship such a value. Both are refused up front, the
/// value named; so is an unknown in the context.
#[tokio::test]
async fn unknown_values_never_switch_off_a_forbid() {
    let mut sources =
        leash::bundle::BundleSources::read_dirs(&repo_path("policies"), &repo_path("schemas"))
            .expect("readable");
    sources.policies.push(leash::bundle::SourceFile {
        path: "policies/tiers.cedar".to_owned(),
        text: "@id(\"no-agent-reads-tier-3\")\n\
               forbid (principal is Agent, action == Action::\"tickets:read\", resource is Ticket)\n\
               when { resource.tier >= 3 };\n"
            .to_owned(),
    });
    let snapshot = leash::bundle::Snapshot::build(&sources).expect("loads");
    let server = TestServer::start(Some(snapshot), ServerOptions::default(), false).await;
    let ticket = |tier: &str| {
        with_entities_json(
            example_request(
                "support-bot",
                Some("alice"),
                "tickets:read",
                "Ticket::\"T-950\"",
            ),
            &format!(
                r#"[{{"uid": {{"type": "Ticket", "id": "T-950"}}, "attrs": {{"customer": {{"__entity": {{"type": "Customer", "id": "C-100"}}}}, "region": "EMEA", "tier": {tier}}}, "parents": []}}]"#
            ),
        )
    };
    // The forbid applies: tier 2 is allowed, tier 3 denied by it.
    assert_eq!(
        server.decide(ticket("2")).await.expect("decides").decision,
        ALLOW
    );
    let denied = server.decide(ticket("3")).await.expect("decides");
    assert_eq!(denied.decision, DENY);
    // An unknown tier is refused, not decided without the forbid.
    assert_eq!(
        invalid(
            &server,
            ticket(r#"{"__extn": {"fn": "unknown", "arg": "t"}}"#)
        )
        .await,
        "entities_json[0]: entity `Ticket::\"T-950\"`: attribute `tier` is `unknown(..)`, \
         not a value; a request's entities must hold concrete values"
    );
    // In the context, an unknown is refused too (Cedar's context check).
    let refund = with_context_json(
        example_request(
            "billing-agent",
            Some("bob"),
            "payments:refund",
            "BillingAccount::\"BA-100\"",
        ),
        r#"{"amount_cents": {"__extn": {"fn": "unknown", "arg": "a"}}}"#,
    );
    let refused = invalid(&server, refund).await;
    assert!(refused.starts_with("context_json: "), "{refused}");
    server.shutdown().await;

    // A bundle entity file holding one is refused, the value named.
    sources.entities.push(leash::bundle::SourceFile {
        path: "policies/entities/more.entities.json".to_owned(),
        text: r#"[{"uid": {"type": "Ticket", "id": "T-951"}, "attrs": {"customer": {"__entity": {"type": "Customer", "id": "C-100"}}, "region": "EMEA", "tier": {"__extn": {"fn": "unknown", "arg": "t"}}}, "parents": []}]"#
            .to_owned(),
    });
    let refused = leash::bundle::Snapshot::build(&sources).expect_err("refused");
    assert!(
        refused.diagnostics.iter().any(|d| d.file.as_deref()
            == Some("policies/entities/more.entities.json")
            && d.message.starts_with(
                "entity `Ticket::\"T-951\"`: attribute `tier` is `unknown(..)`, not a value"
            )),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_context_that_does_not_fit_names_the_attribute() {
    let server = TestServer::example().await;
    let refund = || {
        example_request(
            "billing-agent",
            Some("bob"),
            "payments:refund",
            "BillingAccount::\"BA-100\"",
        )
    };
    let typed = |fields: Vec<(&str, pb::value::Kind)>| {
        let mut req = refund();
        req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
            pb::Record {
                fields: fields
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), pb::Value { kind: Some(v) }))
                    .collect(),
            },
        ));
        req
    };
    use pb::value::Kind;
    let of = "(the context type of `Action::\"payments:refund\"`)";
    assert_eq!(
        invalid(
            &server,
            typed(vec![("amount_cents", Kind::String("25000".into()))])
        )
        .await,
        format!("context.amount_cents: expected a Long, got `\"25000\"` {of}")
    );
    assert_eq!(
        invalid(&server, typed(vec![])).await,
        format!("context.amount_cents: required, missing (a Long) {of}")
    );
    assert_eq!(
        invalid(
            &server,
            typed(vec![
                ("amount_cents", Kind::Long(5)),
                ("extra", Kind::Bool(true))
            ])
        )
        .await,
        format!("context.extra: not an attribute of this context {of}")
    );
    let wrong_extension = with_context_json(
        refund(),
        r#"{"amount_cents": 5, "session_started": {"__extn": {"fn": "decimal", "arg": "1.0"}}}"#,
    );
    assert_eq!(
        invalid(&server, wrong_extension).await,
        format!("context_json.session_started: expected a datetime, got `decimal(\"1.0\")` {of}")
    );
}

#[tokio::test]
async fn an_error_echoing_a_huge_input_stays_readable() {
    let server = TestServer::example().await;
    // A 100 kB field name: the path is cut, the problem still said.
    let mut req = example_request(
        "support-bot",
        Some("alice"),
        "kb:read",
        "KbArticle::\"reset-password\"",
    );
    let name = "n".repeat(100_000);
    req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
        pb::Record {
            fields: [(name, pb::Value { kind: None })].into_iter().collect(),
        },
    ));
    let message = invalid(&server, req).await;
    assert!(message.len() < 4096, "{} bytes", message.len());
    assert!(message.starts_with("context.nnnn"), "{message}");
    assert!(message.contains("bytes more)"), "{message}");
    assert!(message.ends_with(": value has no kind set"), "{message}");
}

#[tokio::test]
async fn a_request_cannot_define_its_principals() {
    let server = TestServer::example().await;
    // An agent the bundle does not know, claiming the escalation role and
    // `vetted`: its roles and attributes would be the caller's word.
    let req = with_entities_json(
        example_request("new-bot", Some("alice"), "tickets:read", "Ticket::\"T-1\""),
        r#"[{"uid": {"type": "Agent", "id": "new-bot"}, "attrs": {"display_name": "x", "vetted": true, "serves_departments": ["support"]}, "parents": [{"type": "AgentRole", "id": "ticket-escalation"}]}]"#,
    );
    assert_eq!(
        invalid(&server, req).await,
        "entities_json[0]: entity `Agent::\"new-bot\"` is a principal of this request; its \
         attributes and roles come from the policy bundle, never from the request"
    );
    // The same for the user it acts for, in the typed form.
    let mut req = example_request(
        "support-bot",
        Some("mallory"),
        "tickets:read",
        "Ticket::\"T-1\"",
    );
    req.entities_input = Some(pb::is_authorized_request::EntitiesInput::Entities(
        pb::EntityList {
            entities: vec![pb::Entity {
                uid: Some(uid("User::\"mallory\"")),
                attrs: Default::default(),
                parents: vec![uid("Role::\"finance\"")],
                tags: Default::default(),
            }],
        },
    ));
    assert_eq!(
        invalid(&server, req).await,
        "entities.entities[0]: entity `User::\"mallory\"` is a principal of this request; \
         its attributes and roles come from the policy bundle, never from the request"
    );
    // Without the claim, the unknown agent holds no role: denied.
    let req = example_request("new-bot", Some("alice"), "tickets:read", "Ticket::\"T-1\"");
    assert_eq!(server.decide(req).await.expect("decides").decision, DENY);
}

#[test]
fn a_leash_record_reached_through_another_namespace_refuses_the_bundle() {
    // `Shared::Ctx` names `Inner` unqualified, inside `Shared`: were the
    // action not known to ask for the trusted record, a caller could send
    // `context.leash` itself and pass the forbid.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = empty_bundle_dirs(dir.path());
    std::fs::write(
        schemas.join("s.cedarschema"),
        "namespace Shared {\n\
           type Inner = { leash: { agent: App::Agent, delegated: Bool } };\n\
           type Ctx = Inner;\n\
         }\n\
         namespace App {\n\
           entity Agent;\n\
           entity Doc;\n\
           action \"go\" appliesTo { principal: [Agent], resource: [Doc], context: Shared::Ctx };\n\
         }\n",
    )
    .expect("write schema");
    std::fs::write(
        policies.join("p.cedar"),
        "permit (principal, action, resource);\n\
         forbid (principal, action, resource) unless { context.leash.delegated };\n",
    )
    .expect("write policy");
    let err = leash::bundle::Snapshot::load_dirs(&policies, &schemas)
        .expect_err("refused, not served unprotected");
    assert!(
        err.diagnostics.iter().any(|d| {
            d.message.starts_with(
            "App::Action::\"go\": its context declares `leash` through types leash could not follow"
        )
        }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_request_cannot_define_a_parent_the_bundle_names() {
    // `Group::"contractors"` is named as a parent by a bundle user but not
    // defined; a request defining it inside `Group::"admins"` would make
    // that user an admin.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = empty_bundle_dirs(dir.path());
    std::fs::write(
        schemas.join("s.cedarschema"),
        "entity Group in [Group];\nentity User in [Group];\nentity Doc;\n\
         action read appliesTo { principal: [User], resource: [Doc] };\n",
    )
    .expect("write schema");
    std::fs::write(
        policies.join("p.cedar"),
        "permit (principal in Group::\"admins\", action, resource);\n",
    )
    .expect("write policy");
    std::fs::write(
        policies.join("users.entities.json"),
        r#"[{"uid": {"type": "User", "id": "eve"}, "attrs": {}, "parents": [{"type": "Group", "id": "contractors"}]},
            {"uid": {"type": "Group", "id": "admins"}, "attrs": {}, "parents": []}]"#,
    )
    .expect("write entities");
    let snapshot = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect("bundle loads");
    let server = TestServer::start(Some(snapshot), ServerOptions::default(), false).await;
    let base = || request("User::\"eve\"", None, "Action::\"read\"", "Doc::\"d\"");
    let req = with_entities_json(
        base(),
        r#"[{"uid": {"type": "Group", "id": "contractors"}, "attrs": {}, "parents": [{"type": "Group", "id": "admins"}]}]"#,
    );
    assert_eq!(
        invalid(&server, req).await,
        "entities_json[0]: entity `Group::\"contractors\"` is a parent of entities in the \
         policy bundle; a request may not define it (its parents would become theirs)"
    );
    // A new group of its own may still come with the request.
    let req = with_entities_json(
        base(),
        r#"[{"uid": {"type": "Group", "id": "visitors"}, "attrs": {}, "parents": [{"type": "Group", "id": "admins"}]}]"#,
    );
    assert_eq!(server.decide(req).await.expect("decides").decision, DENY);
    assert_eq!(server.decide(base()).await.expect("decides").decision, DENY);
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_cannot_define_an_entity_the_bundle_reads_without_defining() {
    // A policy reads `Config::"kill"` and a bundle user's `manager` names
    // `User::"mallory"`; neither is defined. A request defining one would
    // assert attributes the bundle's authors meant to keep: the forbid,
    // erring on the missing entity, denies; with the caller's
    // `{"on": false}` it would not.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = empty_bundle_dirs(dir.path());
    std::fs::write(
        schemas.join("s.cedarschema"),
        "entity Config = { on: Bool };\nentity User = { manager?: User };\nentity Doc;\n\
         action read appliesTo { principal: [User], resource: [Doc] };\n",
    )
    .expect("write schema");
    std::fs::write(
        policies.join("p.cedar"),
        "permit (principal, action, resource);\n\
         forbid (principal, action, resource) when { Config::\"kill\".on };\n",
    )
    .expect("write policy");
    std::fs::write(
        policies.join("users.entities.json"),
        r#"[{"uid": {"type": "User", "id": "eve"}, "attrs": {"manager": {"__entity": {"type": "User", "id": "mallory"}}}, "parents": []}]"#,
    )
    .expect("write entities");
    let snapshot = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect("bundle loads");
    let server = TestServer::start(Some(snapshot), ServerOptions::default(), false).await;
    let base = || request("User::\"eve\"", None, "Action::\"read\"", "Doc::\"d\"");
    assert_eq!(server.decide(base()).await.expect("decides").decision, DENY);
    for (entity, says) in [
        (
            r#"{"uid": {"type": "Config", "id": "kill"}, "attrs": {"on": false}, "parents": []}"#,
            "entities_json[1]: entity `Config::\"kill\"` is named in a condition of a policy in \
             the bundle; a request may not define it (its attributes would be the caller's word)",
        ),
        (
            r#"{"uid": {"type": "User", "id": "mallory"}, "attrs": {}, "parents": []}"#,
            "entities_json[1]: entity `User::\"mallory\"` is named in attributes or tags of \
             entities in the policy bundle; a request may not define it (its attributes would \
             be the caller's word)",
        ),
    ] {
        let req = with_entities_json(
            base(),
            &format!(
                r#"[{{"uid": {{"type": "Doc", "id": "d"}}, "attrs": {{}}, "parents": []}}, {entity}]"#
            ),
        );
        assert_eq!(invalid(&server, req).await, says);
    }
    // Entities the bundle does not name may still come with the request;
    // the forbid still errs, so the answer is still DENY.
    let req = with_entities_json(
        base(),
        r#"[{"uid": {"type": "Config", "id": "other"}, "attrs": {"on": false}, "parents": []}]"#,
    );
    assert_eq!(server.decide(req).await.expect("decides").decision, DENY);
    server.shutdown().await;
}

#[tokio::test]
async fn context_errors_name_the_attribute_or_principal_at_fault() {
    let server = TestServer::example().await;
    let email = |agent: &str, user: &str| {
        example_request(
            agent,
            Some(user),
            "email:send",
            "EmailTemplate::\"promo-draft\"",
        )
    };
    // An entity of another type than declared, an action among them: the
    // attribute is named, never the request's own action.
    for (recipient, shown) in [
        (r#"{"type": "User", "id": "alice"}"#, "User::\"alice\""),
        (r#"{"type": "Action", "id": "nope"}"#, "Action::\"nope\""),
    ] {
        let req = with_context_json(
            email("billing-agent", "bob"),
            &format!(r#"{{"recipient": {{"__entity": {recipient}}}}}"#),
        );
        assert_eq!(
            invalid(&server, req).await,
            format!(
                "context_json.recipient: expected a Customer, got `{shown}` (the context type \
                 of `Action::\"email:send\"`)"
            )
        );
    }
    // The same through Cedar's own parser (implicit forms, which the schema
    // types): a string where an entity is declared, a date that is not one.
    for (context, field) in [
        (r#"{"recipient": "C-200"}"#, "context_json.recipient: "),
        (
            r#"{"recipient": {"type": "Customer", "id": "C-100"}, "session_started": "yesterday"}"#,
            "context_json.session_started: ",
        ),
    ] {
        let msg = invalid(
            &server,
            with_context_json(email("billing-agent", "bob"), context),
        )
        .await;
        assert!(msg.starts_with(field), "{msg}");
    }
    // A typed extension value whose argument Cedar refuses.
    let mut req = email("billing-agent", "bob");
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "session_started".to_owned(),
        pb::Value {
            kind: Some(pb::value::Kind::Extension(pb::ExtensionValue {
                r#fn: "datetime".to_owned(),
                arg: "yesterday".to_owned(),
            })),
        },
    );
    req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
        pb::Record { fields },
    ));
    let msg = invalid(&server, req).await;
    assert!(msg.starts_with("context.session_started: "), "{msg}");
    assert!(msg.contains("`datetime`"), "{msg}");
    // A principal of a type the trusted record does not declare: an agent
    // acting for another agent where `leash.user` is a User, and a user in
    // the agent's place where `leash.agent` is an Agent (both are principal
    // types of the action).
    let ok_context = r#"{"recipient": {"__entity": {"type": "Customer", "id": "C-100"}}}"#;
    let req = with_context_json(
        request(
            "Agent::\"billing-agent\"",
            Some("Agent::\"support-bot\""),
            "Action::\"email:send\"",
            "EmailTemplate::\"promo-draft\"",
        ),
        ok_context,
    );
    assert_eq!(
        invalid(&server, req).await,
        "principal.on_behalf_of: expected a User, got `Agent::\"support-bot\"` \
         (`context.leash.user` of `Action::\"email:send\"`)"
    );
    let req = with_context_json(
        request(
            "User::\"bob\"",
            Some("User::\"alice\""),
            "Action::\"email:send\"",
            "EmailTemplate::\"promo-draft\"",
        ),
        ok_context,
    );
    assert_eq!(
        invalid(&server, req).await,
        "principal.agent: expected an Agent, got `User::\"bob\"` (`context.leash.agent` of \
         `Action::\"email:send\"`)"
    );
    // A typed request entity whose attribute has the wrong type is named by
    // its place in the list (typed entities meet the schema only when they
    // join the bundle's).
    let ticket = |id: &str, tier: pb::value::Kind| {
        let mut attrs = std::collections::BTreeMap::new();
        for (name, kind) in [
            (
                "customer",
                pb::value::Kind::Entity(uid("Customer::\"C-100\"")),
            ),
            ("region", pb::value::Kind::String("eu".to_owned())),
            ("tier", tier),
        ] {
            attrs.insert(name.to_owned(), pb::Value { kind: Some(kind) });
        }
        pb::Entity {
            uid: Some(uid(&format!("Ticket::\"{id}\""))),
            attrs,
            parents: vec![],
            tags: Default::default(),
        }
    };
    let mut req = example_request(
        "support-bot",
        Some("alice"),
        "tickets:read",
        "Ticket::\"T-1\"",
    );
    req.entities_input = Some(pb::is_authorized_request::EntitiesInput::Entities(
        pb::EntityList {
            entities: vec![
                ticket("T-900", pb::value::Kind::Long(2)),
                ticket("T-901", pb::value::Kind::String("2".to_owned())),
            ],
        },
    ));
    let msg = invalid(&server, req).await;
    assert!(msg.starts_with("entities.entities[1]: "), "{msg}");
    assert!(msg.contains("tier"), "{msg}");
    server.shutdown().await;
}

#[tokio::test]
async fn oversize_messages_are_resource_exhausted() {
    let server = TestServer::start(
        Some(example_snapshot()),
        ServerOptions {
            max_message_bytes: 4096,
            ..ServerOptions::default()
        },
        false,
    )
    .await;
    let big = format!("{{\"note\": \"{}\"}}", "x".repeat(8192));
    let req = with_context_json(
        example_request(
            "support-bot",
            None,
            "kb:read",
            "KbArticle::\"reset-password\"",
        ),
        &big,
    );
    let status = server.decide(req).await.expect_err("too large");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn evaluation_errors_fail_closed_and_are_reported() {
    let server = TestServer::plain().await;
    let ctx = |n: i64| {
        format!(
            r#"{{"ip": {{"__extn": {{"fn": "ip", "arg": "10.1.2.3"}}}}, "mfa": false, "score": {{"__extn": {{"fn": "decimal", "arg": "0.1"}}}}, "labels": [], "meta": {{"source": "t", "n": {n}}}}}"#
        )
    };
    // A permit that errors cannot allow.
    let req = with_context_json(
        request(
            "User::\"cy\"",
            None,
            "Action::\"view\"",
            "Album::\"shared\"",
        ),
        &ctx(i64::MAX),
    );
    let resp = server.decide(req).await.expect("decides");
    assert_eq!(resp.decision, DENY);
    assert_eq!(resp.errors.len(), 1);
    assert_eq!(resp.errors[0].policy_id, "counter");
    assert!(
        resp.errors[0].message.contains("overflow"),
        "{}",
        resp.errors[0].message
    );
    let req = with_context_json(
        request(
            "User::\"cy\"",
            None,
            "Action::\"view\"",
            "Album::\"shared\"",
        ),
        &ctx(500),
    );
    assert_eq!(
        server
            .decide(req)
            .await
            .expect("decides")
            .determining_policies,
        vec!["counter"]
    );

    // A forbid that errors does not let a permit through: leash denies where
    // plain Cedar would allow.
    let req = with_context_json(
        request("User::\"cy\"", None, "Action::\"delete\"", "Photo::\"p2\""),
        &ctx(i64::MAX),
    );
    let resp = server.decide(req).await.expect("decides");
    assert_eq!(resp.decision, DENY);
    assert!(resp.determining_policies.is_empty());
    assert_eq!(resp.errors[0].policy_id, "forbid-counter");
    let req = with_context_json(
        request("User::\"cy\"", None, "Action::\"delete\"", "Photo::\"p2\""),
        &ctx(1),
    );
    let resp = server.decide(req).await.expect("decides");
    assert_eq!(resp.decision, ALLOW);
    assert_eq!(resp.determining_policies, vec!["owner"]);
}

#[tokio::test]
async fn policies_without_id_get_a_stable_file_position_id() {
    let server = TestServer::plain().await;
    let req = with_context_json(
        request("User::\"cy\"", None, "Action::\"view\"", "Photo::\"p1\""),
        r#"{"ip": {"__extn": {"fn": "ip", "arg": "10.1.2.3"}}, "mfa": false, "score": {"__extn": {"fn": "decimal", "arg": "0.1"}}, "labels": [], "meta": {"source": "t", "n": 1}, "reviewer": {"__entity": {"type": "User", "id": "ana"}}}"#,
    );
    let resp = server.decide(req).await.expect("decides");
    assert_eq!(resp.decision, ALLOW);
    assert_eq!(
        resp.determining_policies,
        vec!["policies/photos.cedar#9", "view-public"]
    );
}

#[tokio::test]
async fn a_cedar_json_schema_works_like_the_cedar_syntax_one() {
    let dir = tempfile::tempdir().expect("temp");
    let text =
        std::fs::read_to_string(repo_path("schemas/support-desk.cedarschema")).expect("read");
    let (fragment, _) = cedar_policy::SchemaFragment::from_cedarschema_str(&text).expect("parses");
    let json = fragment.to_json_string().expect("to json");
    std::fs::write(dir.path().join("support-desk.cedarschema.json"), json).expect("write");
    let snapshot =
        leash::bundle::Snapshot::load_dirs(&repo_path("policies"), dir.path()).expect("loads");
    assert_eq!(snapshot.reserved.action_count(), 20);
    let server = TestServer::start(Some(snapshot), ServerOptions::default(), false).await;
    let resp = server
        .decide(example_request(
            "research-agent",
            Some("bob"),
            "kb:read",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect("decides");
    assert_eq!(
        resp.determining_policies,
        vec!["finance-requires-vetted-agent"]
    );
}

/// Context JSON is read two ways: explicit escapes are built directly (the
/// fast path) and anything else goes through Cedar's schema-directed parser.
/// Both must decide alike, and errors still name the field.
#[tokio::test]
async fn implicit_and_explicit_json_context_decide_alike() {
    let server = TestServer::example().await;
    let base = || {
        request(
            "Agent::\"onboarding-agent\"",
            Some("User::\"carol\""),
            "Action::\"email:send\"",
            "EmailTemplate::\"welcome\"",
        )
    };
    let explicit = server
        .decide(with_context_json(
            base(),
            r#"{"recipient": {"__entity": {"type": "Customer", "id": "C-200"}}}"#,
        ))
        .await
        .expect("explicit decides");
    let implicit = server
        .decide(with_context_json(
            base(),
            r#"{"recipient": {"type": "Customer", "id": "C-200"}}"#,
        ))
        .await
        .expect("implicit decides");
    assert_eq!(name(explicit.decision), "ALLOW", "{explicit:?}");
    assert_eq!(explicit.decision, implicit.decision);
    assert_eq!(explicit.determining_policies, implicit.determining_policies);

    // A value of the wrong type takes the slow path and is refused there.
    let wrong = server
        .decide(with_context_json(base(), r#"{"recipient": "C-200"}"#))
        .await
        .expect_err("refused");
    assert_eq!(wrong.code(), Code::InvalidArgument);
    assert!(
        wrong.message().starts_with("context_json.recipient: "),
        "{}",
        wrong.message()
    );
    // An unknown attribute too: the fast path never admits what the schema
    // does not declare.
    let extra = server
        .decide(with_context_json(
            base(),
            r#"{"recipient": {"__entity": {"type": "Customer", "id": "C-200"}}, "cc": "x"}"#,
        ))
        .await
        .expect_err("refused");
    assert_eq!(extra.code(), Code::InvalidArgument);
    assert!(
        extra.message().starts_with("context_json: "),
        "{}",
        extra.message()
    );
    server.shutdown().await;
}
