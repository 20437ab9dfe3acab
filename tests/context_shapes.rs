//! Remembering context shapes that passed the schema check changes no
//! answer: a snapshot that remembers them (index on) and one that checks
//! every context (index off) decide every request identically, errors and
//! their wording included, over random sequences of contexts in which the
//! same shapes come back with values that pass and values that do not
//! (enumerated entities outside the enumeration, undeclared actions,
//! mistyped attributes, missing and extra attributes), in both input forms.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use leash::bundle::{BuildCache, BundleSources, SchemaFormat, Snapshot, SourceFile};
use leash::engine::{decide, RequestTime};
use leash::proto::v1 as pb;
use leash::service::convert;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

const SCHEMA: &str = r#"
entity User = { level: Long };
entity Doc;
entity Color enum ["red", "blue"];
type Leash = { agent: User, user?: User, delegated: Bool, now: datetime };
type Ctx = {
  leash: Leash,
  n: Long,
  s?: String,
  who?: User,
  color?: Color,
  tags?: Set<String>,
  cost?: decimal,
  since?: datetime,
  inner?: { x: Long, y?: String },
};
action read appliesTo { principal: User, resource: Doc, context: Ctx };
action write appliesTo { principal: User, resource: Doc, context: { leash: Leash, n: Long } };
action "group";
action audit in ["group"] appliesTo { principal: User, resource: Doc, context: { n: Long } };
"#;

const POLICIES: &str = r#"
permit (principal, action, resource) when { context.n > 0 };
forbid (principal, action == Action::"read", resource)
  when { context has color && context.color == Color::"blue" };
permit (principal, action == Action::"read", resource)
  when { context has inner && context.inner.x > principal.level };
"#;

const ENTITIES: &str = r#"[
  {"uid": {"type": "User", "id": "alice"}, "attrs": {"level": 1}, "parents": []},
  {"uid": {"type": "User", "id": "bob"}, "attrs": {"level": 3}, "parents": []},
  {"uid": {"type": "Doc", "id": "d"}, "attrs": {}, "parents": []}
]"#;

fn sources() -> BundleSources {
    BundleSources {
        origin: "context shapes".to_owned(),
        policies: vec![SourceFile {
            path: "policies/p.cedar".to_owned(),
            text: POLICIES.to_owned(),
        }],
        schemas: vec![(
            SchemaFormat::Cedar,
            SourceFile {
                path: "schemas/s.cedarschema".to_owned(),
                text: SCHEMA.to_owned(),
            },
        )],
        entities: vec![SourceFile {
            path: "policies/e.entities.json".to_owned(),
            text: ENTITIES.to_owned(),
        }],
        approvers: Vec::new(),
        skipped: Vec::new(),
    }
}

/// A context value, rendered in both input forms.
#[derive(Debug, Clone)]
enum V {
    Bool(bool),
    Long(i64),
    Str(String),
    Entity(&'static str, &'static str),
    Set(Vec<V>),
    Record(Vec<(&'static str, V)>),
    Ext(&'static str, &'static str),
}

impl V {
    fn json(&self) -> Value {
        match self {
            Self::Bool(b) => json!(b),
            Self::Long(n) => json!(n),
            Self::Str(s) => json!(s),
            Self::Entity(ty, id) => json!({"__entity": {"type": ty, "id": id}}),
            Self::Set(items) => Value::Array(items.iter().map(V::json).collect()),
            Self::Record(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.json()))
                    .collect(),
            ),
            Self::Ext(f, arg) => json!({"__extn": {"fn": f, "arg": arg}}),
        }
    }

    fn typed(&self) -> pb::Value {
        use pb::value::Kind;
        let kind = match self {
            Self::Bool(b) => Kind::Bool(*b),
            Self::Long(n) => Kind::Long(*n),
            Self::Str(s) => Kind::String(s.clone()),
            Self::Entity(ty, id) => Kind::Entity(pb::EntityUid {
                r#type: (*ty).to_owned(),
                id: (*id).to_owned(),
            }),
            Self::Set(items) => Kind::Set(pb::ValueSet {
                values: items.iter().map(V::typed).collect(),
            }),
            Self::Record(fields) => Kind::Record(pb::Record {
                fields: fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.typed()))
                    .collect(),
            }),
            Self::Ext(f, arg) => Kind::Extension(pb::ExtensionValue {
                r#fn: (*f).to_owned(),
                arg: (*arg).to_owned(),
            }),
        };
        pb::Value { kind: Some(kind) }
    }
}

/// Values of every kind, the right and the wrong ones for each attribute,
/// with few distinct shapes so that shapes come back.
fn value() -> impl Strategy<Value = V> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(V::Bool),
        (-2i64..3).prop_map(V::Long),
        prop::sample::select(vec!["a", "b"]).prop_map(|s| V::Str(s.to_owned())),
        prop::sample::select(vec![
            ("User", "alice"),
            ("User", "ghost"),
            ("Doc", "d"),
            ("Color", "red"),
            ("Color", "blue"),
            ("Color", "green"),
            ("Action", "read"),
            ("Action", "nope"),
        ])
        .prop_map(|(t, i)| V::Entity(t, i)),
        prop::sample::select(vec![
            ("decimal", "1.50"),
            ("datetime", "2026-01-01"),
            ("ip", "10.0.0.1"),
            ("duration", "1h"),
        ])
        .prop_map(|(f, a)| V::Ext(f, a)),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(V::Set),
            prop::collection::vec((prop::sample::select(vec!["x", "y", "z"]), inner), 0..3)
                .prop_map(|fields| {
                    let mut seen = std::collections::BTreeSet::new();
                    V::Record(
                        fields
                            .into_iter()
                            .filter(|(k, _)| seen.insert(*k))
                            .collect(),
                    )
                }),
        ]
    })
}

/// Mostly well-typed contexts for `read`, with random departures.
fn context() -> impl Strategy<Value = Vec<(&'static str, V)>> {
    let good = prop::collection::vec(
        prop_oneof![
            (-1i64..2).prop_map(|n| ("n", V::Long(n))),
            Just(("s", V::Str("x".to_owned()))),
            prop::sample::select(vec!["alice", "bob", "ghost"])
                .prop_map(|id| ("who", V::Entity("User", id))),
            prop::sample::select(vec!["red", "blue", "green"])
                .prop_map(|id| ("color", V::Entity("Color", id))),
            Just(("tags", V::Set(vec![V::Str("t".to_owned())]))),
            Just(("tags", V::Set(Vec::new()))),
            Just(("cost", V::Ext("decimal", "2.25"))),
            Just(("since", V::Ext("datetime", "2026-01-01T00:00:00Z"))),
            (0i64..4).prop_map(|x| ("inner", V::Record(vec![("x", V::Long(x))]))),
        ],
        0..6,
    );
    let odd = (
        prop::sample::select(vec!["n", "s", "who", "color", "inner", "extra"]),
        value(),
    );
    (-1i64..2, good, prop::collection::vec(odd, 0..2)).prop_map(|(n, mut good, odd)| {
        // `n` is required: most contexts have it, before what may replace it.
        good.insert(0, ("n", V::Long(n)));
        good.extend(odd);
        let mut seen = std::collections::BTreeSet::new();
        // Last one wins, as in a JSON object.
        good.reverse();
        good.retain(|(k, _)| seen.insert(*k));
        good.reverse();
        good
    })
}

fn request(
    action: &str,
    user: bool,
    context: &[(&'static str, V)],
    typed: bool,
) -> pb::IsAuthorizedRequest {
    let uid = |ty: &str, id: &str| pb::EntityUid {
        r#type: ty.to_owned(),
        id: id.to_owned(),
    };
    use pb::is_authorized_request::ContextInput as C;
    let context_input = if typed {
        C::Context(pb::Record {
            fields: context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.typed()))
                .collect::<BTreeMap<_, _>>(),
        })
    } else {
        C::ContextJson(
            Value::Object(
                context
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.json()))
                    .collect(),
            )
            .to_string(),
        )
    };
    pb::IsAuthorizedRequest {
        principal: Some(pb::Principal {
            agent: Some(uid("User", "alice")),
            on_behalf_of: user.then(|| uid("User", "bob")),
        }),
        action: Some(uid("Action", action)),
        resource: Some(uid("Doc", "d")),
        context_input: Some(context_input),
        ..Default::default()
    }
}

#[test]
fn remembered_shapes_decide_as_checking_every_context() {
    let remembering =
        Snapshot::build_cached(&sources(), &mut BuildCache::new(true)).expect("bundle builds");
    let checking =
        Snapshot::build_cached(&sources(), &mut BuildCache::new(false)).expect("bundle builds");
    assert!(checking.context_checks.is_empty());
    let now = RequestTime::at("2026-01-31T12:00:00.000Z");
    let (passed, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let strategy = prop::collection::vec(
        (
            prop::sample::select(vec!["read", "write", "audit"]),
            any::<bool>(),
            context(),
            any::<bool>(),
        ),
        1..40,
    );
    let mut runner = TestRunner::new(Config {
        cases: 200,
        ..Config::default()
    });
    runner
        .run(&strategy, |asks| {
            for (action, user, context, typed) in &asks {
                let wire = request(action, *user, context, *typed);
                let converted = convert::request(&wire);
                let Ok(req) = converted else {
                    continue;
                };
                let a = decide(&remembering, &req, &now);
                let b = decide(&checking, &req, &now);
                match &b {
                    Ok(_) => passed.fetch_add(1, Ordering::Relaxed),
                    Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                };
                prop_assert_eq!(a, b, "{:?}", wire);
            }
            Ok(())
        })
        .expect("remembering and checking engines agree");
    let (passed, refused) = (passed.into_inner(), refused.into_inner());
    assert!(passed > 300, "{passed} contexts passed");
    assert!(refused > 300, "{refused} contexts refused");
    assert!(!remembering.context_checks.is_empty());
    assert!(checking.context_checks.is_empty());
}

/// The cases the shape alone cannot tell, one by one: after a context of
/// the same shape passed, a value outside the enumeration and a mistyped
/// attribute are still refused, and a shape that passed for one action
/// is checked again for another.
#[test]
fn ids_that_matter_are_checked_every_time() {
    let snapshot =
        Snapshot::build_cached(&sources(), &mut BuildCache::new(true)).expect("bundle builds");
    let now = RequestTime::at("2026-01-31T12:00:00.000Z");
    let decide_wire = |action: &str, context: &[(&'static str, V)], typed: bool| {
        let req = convert::request(&request(action, false, context, typed)).expect("converts");
        decide(&snapshot, &req, &now)
    };
    for typed in [false, true] {
        let red = [("n", V::Long(1)), ("color", V::Entity("Color", "red"))];
        let green = [("n", V::Long(1)), ("color", V::Entity("Color", "green"))];
        assert!(decide_wire("read", &red, typed).is_ok());
        let err = decide_wire("read", &green, typed).expect_err("green is not a Color");
        assert!(err.problem.contains("green"), "{err}");
        let field = if typed {
            "context.color"
        } else {
            "context_json.color"
        };
        assert_eq!(err.field, field, "{err}");

        let plain = [("n", V::Long(1)), ("who", V::Entity("User", "alice"))];
        assert!(decide_wire("read", &plain, typed).is_ok());
        assert!(decide_wire("read", &plain, typed).is_ok());
        // Same shape, but `write` declares no `who`.
        let err = decide_wire("write", &plain, typed).expect_err("write has no `who`");
        assert!(err.field.starts_with("context"), "{err}");
    }
    assert!(!snapshot.context_checks.is_empty());
}
