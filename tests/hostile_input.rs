//! Hostile JSON in `context_json` and `entities_json`: random documents
//! built from the words Cedar's JSON formats give meaning to (`__extn`,
//! `__entity`, `fn`, `arg`, `args`, `type`, `id`, `attrs`, `parents`,
//! `tags`) and the example schema's attribute names, with values of every
//! JSON kind and out-of-range numbers. Conversion and decision must never
//! panic, and must answer the same request the same way twice (the second
//! time after the context-shape cache has seen it).

mod common;

use common::*;
use leash::engine::{decide, RequestTime};
use leash::proto::v1 as pb;
use leash::service::convert;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Number, Value};

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![0i64, 1, -1, 25_000, i64::MAX, i64::MIN])
            .prop_map(|n| Value::Number(n.into())),
        prop::sample::select(vec![u64::MAX]).prop_map(|n| Value::Number(n.into())),
        prop::sample::select(vec![1.5f64, -0.0, 1e308])
            .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            "",
            "a",
            "decimal",
            "datetime",
            "unknown",
            "ip",
            "1.50",
            "10.0.0.1",
            "2026-01-01T00:00:00Z",
            "1h",
            "Ticket",
            "T-1",
            "Customer",
            "C-100",
            "User",
            "bob",
            "Action",
            "payments:refund",
            "\u{0}",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
    ]
}

const KEYS: [&str; 16] = [
    "__extn",
    "__entity",
    "fn",
    "arg",
    "args",
    "type",
    "id",
    "uid",
    "attrs",
    "parents",
    "tags",
    "amount_cents",
    "recipient",
    "session_started",
    "batch_size",
    "leash",
];

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..4).prop_map(
                |fields| {
                    Value::Object(
                        fields
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect::<Map<_, _>>(),
                    )
                }
            ),
        ]
    })
}

/// A context: mostly an object (the schema's attribute names among random
/// keys), sometimes any document.
fn context() -> impl Strategy<Value = Value> {
    let object = prop::collection::vec((prop::sample::select(KEYS.to_vec()), json()), 0..4)
        .prop_map(|fields| {
            Value::Object(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect::<Map<_, _>>(),
            )
        });
    prop_oneof![3 => object, 1 => json()]
}

/// An entities array: entity-shaped objects with random parts, and random
/// documents.
fn entities() -> impl Strategy<Value = Value> {
    let entity = (
        prop::sample::select(vec![
            ("Ticket", "T-9"),
            ("Customer", "C-9"),
            ("User", "bob"),
            ("Action", "payments:refund"),
        ]),
        json(),
        json(),
        json(),
    )
        .prop_map(|((ty, id), attrs, parents, tags)| {
            serde_json::json!({
                "uid": {"type": ty, "id": id},
                "attrs": attrs,
                "parents": parents,
                "tags": tags,
            })
        });
    prop::collection::vec(prop_oneof![3 => entity, 1 => json()], 0..3).prop_map(Value::Array)
}

fn request(
    case: usize,
    context: Option<&Value>,
    brought: Option<&Value>,
) -> pb::IsAuthorizedRequest {
    let (agent, user, action, resource) = [
        (
            "billing-agent",
            Some("bob"),
            "payments:refund",
            "BillingAccount::\"BA-100\"",
        ),
        (
            "billing-agent",
            Some("bob"),
            "email:send",
            "EmailTemplate::\"invoice-reminder\"",
        ),
        (
            "support-bot",
            Some("alice"),
            "tickets:read",
            "Ticket::\"T-9\"",
        ),
        (
            "support-bot",
            None,
            "tickets:update_status",
            "Ticket::\"T-1\"",
        ),
    ][case % 4];
    let mut req = example(agent, user, action, resource);
    if let Some(context) = context {
        req = with_context_json(req, &context.to_string());
    }
    if let Some(brought) = brought {
        req = with_entities_json(req, &brought.to_string());
    }
    req
}

/// The decision as compared: allowed, determining policies, errors; or the
/// refusal's field and problem.
fn outcome(
    snapshot: &leash::bundle::Snapshot,
    req: &pb::IsAuthorizedRequest,
    now: &RequestTime,
) -> String {
    match convert::request(req).and_then(|r| decide(snapshot, &r, now)) {
        Ok(d) => format!("{} {:?} {:?}", d.allowed, d.determining, d.errors),
        Err(e) => format!("refused {e}"),
    }
}

#[test]
fn hostile_json_never_panics_and_decides_the_same_twice() {
    let snapshot = example_snapshot();
    let mut runner = TestRunner::new(Config {
        cases: 600,
        failure_persistence: None,
        ..Config::default()
    });
    let (allowed, refused) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    runner
        .run(
            &(
                0usize..4,
                prop::option::of(context()),
                prop::option::of(entities()),
            ),
            |(case, context, brought)| {
                let req = request(case, context.as_ref(), brought.as_ref());
                // One time for both, so only the cache could make them differ.
                let now = RequestTime::now();
                let first = outcome(&snapshot, &req, &now);
                prop_assert_eq!(&first, &outcome(&snapshot, &req, &now));
                allowed.set(allowed.get() + usize::from(first.starts_with("true")));
                refused.set(refused.get() + usize::from(first.starts_with("refused")));
                Ok(())
            },
        )
        .expect("property holds");
    // The documents reach the decision, not only the refusals.
    let (allowed, refused) = (allowed.get(), refused.get());
    assert!(allowed > 10 && refused > 100, "{allowed} {refused}");
}
