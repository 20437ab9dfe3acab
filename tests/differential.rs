//! Differential property tests over the real server:
//! - leash's decision and determining policies equal a direct cedar-policy
//!   evaluation of the same inputs, per side, over the example bundle (with
//!   the trusted `context.leash` record built independently here) and over a
//!   plain Cedar bundle (no leash attributes: exactly Cedar's answer);
//! - typed and JSON forms of the same context and entities decide identically.

mod common;

use std::str::FromStr;

use cedar_policy::{Authorizer, Context, Entities, Entity, EntityUid, Request};
use common::*;
use leash::bundle::Snapshot;
use leash::proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

const APPROVAL_REQUIRED: i32 = pb::Decision::ApprovalRequired as i32;

/// What plain Cedar plus leash's fail-closed rule says for one side:
/// (allowed, sorted determining policies, sorted erroring policies), or
/// `None` if the request is invalid for this side.
fn cedar_side(
    snap: &Snapshot,
    principal: &str,
    action: &str,
    resource: &str,
    context: &Value,
    entities: &Entities,
) -> Option<(bool, Vec<String>, Vec<String>)> {
    let action_uid = EntityUid::from_str(action).ok()?;
    let context =
        Context::from_json_value(context.clone(), Some((&snap.schema, &action_uid))).ok()?;
    let request = Request::new(
        EntityUid::from_str(principal).ok()?,
        action_uid,
        EntityUid::from_str(resource).ok()?,
        context,
        Some(&snap.schema),
    )
    .ok()?;
    let response = Authorizer::new().is_authorized(&request, &snap.policies, entities);
    let mut errors: Vec<String> = response
        .diagnostics()
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => e.policy_id().to_string(),
        })
        .collect();
    errors.sort();
    let cedar_allow = response.decision() == cedar_policy::Decision::Allow;
    let allowed = cedar_allow && errors.is_empty();
    let mut reasons: Vec<String> = if cedar_allow && !allowed {
        Vec::new()
    } else {
        response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect()
    };
    reasons.sort();
    Some((allowed, reasons, errors))
}

fn side_of(resp: &pb::SideResult) -> (bool, Vec<String>, Vec<String>) {
    let mut errors: Vec<String> = resp.errors.iter().map(|e| e.policy_id.clone()).collect();
    errors.sort();
    (
        resp.decision == ALLOW,
        resp.determining_policies.clone(),
        errors,
    )
}

fn entity_ref(s: &str) -> Value {
    let (ty, id) = s.split_once("::\"").expect("ref");
    json!({"__entity": {"type": ty, "id": id.trim_end_matches('"')}})
}

const EXAMPLE_AGENTS: &[&str] = &[
    "Agent::\"support-bot\"",
    "Agent::\"billing-agent\"",
    "Agent::\"onboarding-agent\"",
    "Agent::\"research-agent\"",
    "Agent::\"ghost\"",
];
const EXAMPLE_USERS: &[&str] = &[
    "User::\"alice\"",
    "User::\"bob\"",
    "User::\"carol\"",
    "User::\"dave\"",
    "User::\"erin\"",
    "User::\"omar\"",
    "User::\"nobody\"",
];
const EXAMPLE_ACTIONS: &[&str] = &[
    "tickets:read",
    "tickets:update_status",
    "tickets:create",
    "customers:read_masked",
    "customers:read_full",
    "billing:read",
    "invoices:create",
    "email:send",
    "kb:read",
    "kb:write",
    "kb:delete",
    "fs:read",
    "fs:write",
    "code:execute",
    "network:request",
    "iam:modify",
    "secrets:read",
    "system:read_env",
    "paid_api:invoke",
    "payments:refund",
];
const EXAMPLE_RESOURCES: &[&str] = &[
    "Ticket::\"T-1\"",
    "Ticket::\"T-2\"",
    "Ticket::\"T-404\"",
    "Customer::\"C-100\"",
    "Customer::\"C-200\"",
    "BillingAccount::\"BA-100\"",
    "EmailTemplate::\"welcome\"",
    "EmailTemplate::\"promo-draft\"",
    "KbArticle::\"reset-password\"",
    "KbArticle::\"refund-runbook\"",
    "SystemResource::\"vault\"",
    "SystemResource::\"tax-rates-api\"",
];

fn resource_type(action: &str) -> &'static str {
    match action.split(':').next().unwrap_or_default() {
        "tickets" if action == "tickets:create" => "Customer::",
        "tickets" => "Ticket::",
        "customers" => "Customer::",
        "billing" | "invoices" | "payments" => "BillingAccount::",
        "email" => "EmailTemplate::",
        "kb" => "KbArticle::",
        _ => "SystemResource::",
    }
}

#[test]
fn example_bundle_decides_as_cedar_does_per_side() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(TestServer::example());
    let snap = example_snapshot();
    let strategy = (
        0..EXAMPLE_AGENTS.len(),
        proptest::option::of(0..EXAMPLE_USERS.len()),
        0..EXAMPLE_ACTIONS.len(),
        (0..64usize, proptest::bool::weighted(0.1)),
        prop_oneof![
            Just(0i64),
            Just(1200),
            Just(150000),
            Just(500000),
            Just(500001)
        ],
        0..2usize,
    );
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    let compared = std::cell::Cell::new(0usize);
    let gated_seen = std::cell::Cell::new(0usize);
    type Case = (usize, Option<usize>, usize, (usize, bool), i64, usize);
    let check = |(a, u, act, r, amount, recipient): Case| -> Result<(), TestCaseError> {
        let agent = EXAMPLE_AGENTS[a];
        let user = u.map(|u| EXAMPLE_USERS[u]);
        let action = format!("Action::\"{}\"", EXAMPLE_ACTIONS[act]);
        // Mostly a resource of the action's type, sometimes any (invalid).
        let (r, any_type) = r;
        let ty = resource_type(EXAMPLE_ACTIONS[act]);
        let fitting: Vec<&str> = EXAMPLE_RESOURCES
            .iter()
            .copied()
            .filter(|x| x.starts_with(ty))
            .collect();
        let resource = if any_type || fitting.is_empty() {
            EXAMPLE_RESOURCES[r % EXAMPLE_RESOURCES.len()]
        } else {
            fitting[r % fitting.len()]
        };
        let mut caller_context = serde_json::Map::new();
        match EXAMPLE_ACTIONS[act] {
            "invoices:create" | "payments:refund" => {
                caller_context.insert("amount_cents".into(), json!(amount));
            }
            "email:send" => {
                caller_context.insert(
                    "recipient".into(),
                    entity_ref(["Customer::\"C-100\"", "Customer::\"C-200\""][recipient]),
                );
            }
            _ => {}
        }
        let req = with_context_json(
            request(agent, user, &action, resource),
            &Value::Object(caller_context.clone()).to_string(),
        );
        let got = rt.block_on(server.decide(req));

        // The trusted record, built here independently of leash.
        let mut leash = serde_json::Map::new();
        leash.insert("agent".into(), entity_ref(agent));
        if let Some(user) = user {
            leash.insert("user".into(), entity_ref(user));
        }
        leash.insert("delegated".into(), json!(user.is_some()));
        let now = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        leash.insert(
            "now".into(),
            json!({"__extn": {"fn": "datetime", "arg": now}}),
        );
        let mut context = caller_context;
        context.insert("leash".into(), Value::Object(leash));
        let context = Value::Object(context);

        let agent_side = cedar_side(&snap, agent, &action, resource, &context, &snap.entities);
        let user_side =
            user.map(|u| cedar_side(&snap, u, &action, resource, &context, &snap.entities));
        let valid = agent_side.is_some() && user_side.as_ref().is_none_or(Option::is_some);
        match got {
            Ok(resp) => {
                prop_assert!(
                    valid,
                    "leash decided a request Cedar refuses: {agent} {user:?} {action} {resource}"
                );
                let want_agent = agent_side.expect("valid");
                prop_assert_eq!(
                    side_of(resp.agent.as_ref().expect("agent side")),
                    want_agent.clone()
                );
                let mut allowed = want_agent.0;
                let mut determining = want_agent.1.clone();
                if let Some(Some(want_user)) = user_side {
                    prop_assert_eq!(
                        side_of(resp.on_behalf_of.as_ref().expect("user side")),
                        want_user.clone()
                    );
                    allowed &= want_user.0;
                    determining.extend(want_user.1.iter().cloned());
                } else {
                    prop_assert!(resp.on_behalf_of.is_none());
                }
                // An allowed request whose determining permits (either
                // side) include one annotated `@approval("required")`
                // waits for a person; read here from Cedar's own
                // annotations, not from leash's index of them.
                let gated = determining.iter().any(|id| {
                    snap.policies
                        .policy(&cedar_policy::PolicyId::new(id.as_str()))
                        .and_then(|p| p.annotation("approval"))
                        == Some("required")
                });
                let want = match (allowed, gated) {
                    (false, _) => DENY,
                    (true, true) => APPROVAL_REQUIRED,
                    (true, false) => ALLOW,
                };
                prop_assert_eq!(
                    resp.decision,
                    want,
                    "{} {:?} {} {}",
                    agent,
                    user,
                    action,
                    resource
                );
                if want == APPROVAL_REQUIRED {
                    gated_seen.set(gated_seen.get() + 1);
                }
                compared.set(compared.get() + 1);
            }
            Err(status) => {
                prop_assert!(
                    !valid,
                    "leash refused a valid request: {}",
                    status.message()
                );
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            }
        }
        Ok(())
    };
    runner
        .run(&strategy, check)
        .expect("leash agrees with cedar-policy");
    // Random draws reach the gated permits only now and then, so every
    // user, resource and amount of each gated action, for the agent whose
    // permit is gated, is checked as well.
    let agent = |name: &str| {
        EXAMPLE_AGENTS
            .iter()
            .position(|a| a.contains(name))
            .expect("agent")
    };
    for (agent, act) in [
        (agent("billing-agent"), "email:send"),
        (agent("billing-agent"), "payments:refund"),
        (agent("onboarding-agent"), "kb:delete"),
    ] {
        let act = EXAMPLE_ACTIONS
            .iter()
            .position(|x| *x == act)
            .expect("gated action");
        for u in std::iter::once(None).chain((0..EXAMPLE_USERS.len()).map(Some)) {
            for r in 0..EXAMPLE_RESOURCES.len() {
                for amount in [0, 1200, 150000, 500001] {
                    if let Err(e) = check((agent, u, act, (r, false), amount, r % 2)) {
                        panic!("leash disagrees with cedar-policy: {e}");
                    }
                }
            }
        }
    }
    assert!(
        compared.get() > 50,
        "too few valid requests were generated ({})",
        compared.get()
    );
    assert!(
        gated_seen.get() > 0,
        "no approval-gated request was generated"
    );
}

/// A context for the plain bundle, in both forms.
#[derive(Debug, Clone)]
struct Ctx {
    ip: &'static str,
    mfa: Option<bool>,
    score: &'static str,
    labels: Vec<&'static str>,
    source: String,
    n: i64,
    reviewer: Option<&'static str>,
    extra: bool,
}

fn ctx_strategy() -> impl Strategy<Value = Ctx> {
    (
        prop::sample::select(vec!["10.1.2.3", "192.168.0.1", "10.0.0.0/8", "not-an-ip"]),
        proptest::option::weighted(0.95, any::<bool>()),
        prop::sample::select(vec!["0.7", "0.3", "1.2345", "nan"]),
        prop::sample::subsequence(vec!["blocked", "a", "b"], 0..=3),
        "[a-z]{0,6}",
        prop_oneof![Just(0i64), Just(200), Just(i64::MAX), any::<i64>()],
        proptest::option::of(prop::sample::select(vec![
            "User::\"ana\"",
            "User::\"ben\"",
            "User::\"zed\"",
        ])),
        proptest::bool::weighted(0.05),
    )
        .prop_map(|(ip, mfa, score, labels, source, n, reviewer, extra)| Ctx {
            ip,
            mfa,
            score,
            labels,
            source,
            n,
            reviewer,
            extra,
        })
}

fn ext(f: &str, arg: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Extension(pb::ExtensionValue {
            r#fn: f.into(),
            arg: arg.into(),
        })),
    }
}
fn long(n: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Long(n)),
    }
}
fn string(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::String(s.into())),
    }
}
fn boolean(b: bool) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Bool(b)),
    }
}
fn entity_value(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Entity(uid(s))),
    }
}
fn set(values: Vec<pb::Value>) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Set(pb::ValueSet { values })),
    }
}
fn record(fields: Vec<(&str, pb::Value)>) -> pb::Record {
    pb::Record {
        fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

impl Ctx {
    fn json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("ip".into(), json!({"__extn": {"fn": "ip", "arg": self.ip}}));
        if let Some(mfa) = self.mfa {
            m.insert("mfa".into(), json!(mfa));
        }
        m.insert(
            "score".into(),
            json!({"__extn": {"fn": "decimal", "arg": self.score}}),
        );
        m.insert("labels".into(), json!(self.labels));
        m.insert("meta".into(), json!({"source": self.source, "n": self.n}));
        if let Some(r) = self.reviewer {
            m.insert("reviewer".into(), entity_ref(r));
        }
        if self.extra {
            m.insert("extra".into(), json!(1));
        }
        Value::Object(m)
    }

    fn typed(&self) -> pb::Record {
        let mut fields = vec![
            ("ip", ext("ip", self.ip)),
            ("score", ext("decimal", self.score)),
            (
                "labels",
                set(self.labels.iter().map(|l| string(l)).collect()),
            ),
            (
                "meta",
                pb::Value {
                    kind: Some(pb::value::Kind::Record(record(vec![
                        ("source", string(&self.source)),
                        ("n", long(self.n)),
                    ]))),
                },
            ),
        ];
        if let Some(mfa) = self.mfa {
            fields.push(("mfa", boolean(mfa)));
        }
        if let Some(r) = self.reviewer {
            fields.push(("reviewer", entity_value(r)));
        }
        if self.extra {
            fields.push(("extra", long(1)));
        }
        record(fields)
    }
}

/// An optional request-scoped photo, in both forms.
#[derive(Debug, Clone)]
struct NewPhoto {
    owner: &'static str,
    private: bool,
    tags: Vec<&'static str>,
    album: &'static str,
}

impl NewPhoto {
    fn json(&self) -> Value {
        json!([{
            "uid": {"type": "Photo", "id": "p9"},
            "attrs": {"owner": entity_ref(self.owner), "private": self.private, "tags": self.tags},
            "parents": [{"type": "Album", "id": self.album}],
        }])
    }
    fn typed(&self) -> pb::EntityList {
        pb::EntityList {
            entities: vec![pb::Entity {
                uid: Some(uid("Photo::\"p9\"")),
                attrs: record(vec![
                    ("owner", entity_value(self.owner)),
                    ("private", boolean(self.private)),
                    ("tags", set(self.tags.iter().map(|t| string(t)).collect())),
                ])
                .fields,
                parents: vec![uid(&format!("Album::\"{}\"", self.album))],
                tags: Default::default(),
            }],
        }
    }
}

fn photo_strategy() -> impl Strategy<Value = Option<NewPhoto>> {
    proptest::option::of(
        (
            prop::sample::select(vec!["User::\"ana\"", "User::\"ben\"", "User::\"cy\""]),
            any::<bool>(),
            prop::sample::subsequence(vec!["cat", "dog"], 0..=2),
            prop::sample::select(vec!["shared", "private"]),
        )
            .prop_map(|(owner, private, tags, album)| NewPhoto {
                owner,
                private,
                tags,
                album,
            }),
    )
}

#[test]
fn plain_bundle_decides_as_cedar_and_typed_equals_json() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(TestServer::plain());
    let snap = plain_snapshot();
    let users = [
        "User::\"ana\"",
        "User::\"ben\"",
        "User::\"cy\"",
        "User::\"zed\"",
    ];
    let actions = ["Action::\"view\"", "Action::\"edit\"", "Action::\"delete\""];
    let resources = [
        "Photo::\"p1\"",
        "Photo::\"p2\"",
        "Photo::\"p9\"",
        "Album::\"shared\"",
        "Album::\"private\"",
    ];
    let strategy = (
        prop::sample::select(users.to_vec()),
        proptest::option::of(prop::sample::select(users.to_vec())),
        prop::sample::select(actions.to_vec()),
        prop::sample::select(resources.to_vec()),
        ctx_strategy(),
        photo_strategy(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    let compared = std::cell::Cell::new(0usize);
    runner
        .run(
            &strategy,
            |(principal, user, action, resource, ctx, photo)| {
                use pb::is_authorized_request::{ContextInput, EntitiesInput};
                let base = request(principal, user, action, resource);
                let mut as_json = base.clone();
                as_json.context_input = Some(ContextInput::ContextJson(ctx.json().to_string()));
                let mut as_typed = base;
                as_typed.context_input = Some(ContextInput::Context(ctx.typed()));
                if let Some(photo) = &photo {
                    as_json.entities_input =
                        Some(EntitiesInput::EntitiesJson(photo.json().to_string()));
                    as_typed.entities_input = Some(EntitiesInput::Entities(photo.typed()));
                }
                let json_resp = rt.block_on(server.decide(as_json));
                let typed_resp = rt.block_on(server.decide(as_typed));

                // Typed and JSON give the same answer.
                match (&json_resp, &typed_resp) {
                    (Ok(j), Ok(t)) => {
                        prop_assert_eq!(j.decision, t.decision);
                        prop_assert_eq!(&j.determining_policies, &t.determining_policies);
                        prop_assert_eq!(&j.errors, &t.errors);
                        prop_assert_eq!(&j.agent, &t.agent);
                        prop_assert_eq!(&j.on_behalf_of, &t.on_behalf_of);
                    }
                    (Err(j), Err(t)) => prop_assert_eq!(j.code(), t.code()),
                    (j, t) => prop_assert!(false, "forms disagree: json {:?} typed {:?}", j, t),
                }

                // And the answer is Cedar's.
                let entities = match &photo {
                    None => Some(snap.entities.clone()),
                    Some(p) => p
                        .json()
                        .as_array()
                        .and_then(|items| {
                            Entity::from_json_value(items[0].clone(), Some(&snap.schema)).ok()
                        })
                        .and_then(|e| {
                            snap.entities
                                .clone()
                                .add_entities([e], Some(&snap.schema))
                                .ok()
                        }),
                };
                let context = ctx.json();
                let want_agent = entities
                    .as_ref()
                    .and_then(|e| cedar_side(&snap, principal, action, resource, &context, e));
                let want_user = user.map(|u| {
                    entities
                        .as_ref()
                        .and_then(|e| cedar_side(&snap, u, action, resource, &context, e))
                });
                // An agent acting for itself is refused: it is not a user.
                let valid = want_agent.is_some()
                    && want_user.as_ref().is_none_or(Option::is_some)
                    && user != Some(principal);
                match json_resp {
                    Ok(resp) => {
                        prop_assert!(valid, "decided an invalid request");
                        prop_assert_eq!(
                            side_of(resp.agent.as_ref().expect("agent")),
                            want_agent.clone().expect("valid")
                        );
                        if let Some(Some(u)) = want_user {
                            prop_assert_eq!(side_of(resp.on_behalf_of.as_ref().expect("user")), u);
                        }
                        compared.set(compared.get() + 1);
                    }
                    Err(status) => {
                        prop_assert!(!valid, "refused a valid request: {}", status.message());
                        prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    }
                }
                Ok(())
            },
        )
        .expect("plain bundle: leash agrees with cedar-policy; typed agrees with JSON");
    assert!(
        compared.get() > 50,
        "too few valid requests were generated ({})",
        compared.get()
    );
}
