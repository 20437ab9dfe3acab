//! The scope index gives exactly the answers of evaluating every policy.
//!
//! - Cedar level: random entity graphs, action groups, static policies with
//!   every kind of scope, template-linked policies and conditions that raise
//!   errors (not validated, so any error Cedar can raise); each request's
//!   narrowed set must give the full set's decision, determining policies
//!   and errors (with their messages), with request-scoped entities that add
//!   ancestors.
//! - Engine level: random schemas (in a namespace or none) and validated
//!   bundles built twice, with the index and without; every decision, both sides of delegated
//!   requests included, must be equal in full.
//! - Server level: two real servers, `--policy-index on` and `off`, over
//!   the example bundle and a generated harness bundle, answer every request
//!   of the mix identically over gRPC.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet,
    RestrictedExpression, SlotId, Template,
};
use common::*;
use leash::bundle::{BuildCache, BundleSources, PolicyIndex, SchemaFormat, Snapshot, SourceFile};
use leash::engine::{decide_with_grants, AuthzRequest, ContextInput, EntitiesInput, RequestTime};
use leash::proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

// ----- the universe ---------------------------------------------------------

/// Principal-side entities: defined by the bundle (0..=10), defined only by
/// some requests (11..=13), never defined (14). Users, agents and groups
/// share ids (`User::"u0"`, `Agent::"u0"`, `Group::"u0"`), as docs and
/// folders do: the index must tell entities apart by type as well as id.
const PRINCIPALS: [&str; 15] = [
    "User::\"u0\"",
    "User::\"u1\"",
    "User::\"u2\"",
    "User::\"u3\"",
    "Agent::\"u0\"",
    "Agent::\"u1\"",
    "Agent::\"u2\"",
    "Group::\"u0\"",
    "Group::\"u1\"",
    "Group::\"u2\"",
    "Group::\"u3\"",
    "User::\"u9\"",
    "Agent::\"u9\"",
    "Group::\"u9\"",
    "User::\"ghost\"",
];
const PRINCIPAL_TYPES: [&str; 3] = ["User", "Agent", "Group"];
/// Resource-side entities, likewise: bundle 0..=7, requests 8..=9, never 10.
const RESOURCES: [&str; 11] = [
    "Doc::\"d0\"",
    "Doc::\"d1\"",
    "Doc::\"d2\"",
    "Doc::\"d3\"",
    "Folder::\"d0\"",
    "Folder::\"d1\"",
    "Folder::\"d2\"",
    "Folder::\"d3\"",
    "Doc::\"d9\"",
    "Folder::\"d9\"",
    "Doc::\"ghost\"",
];
const RESOURCE_TYPES: [&str; 2] = ["Doc", "Folder"];
/// Five actions and two action groups.
const ACTIONS: [&str; 7] = ["act0", "act1", "act2", "act3", "act4", "grpA", "grpB"];
const GROUPS: usize = 4;
const FOLDERS: usize = 4;

fn uid(s: &str) -> EntityUid {
    EntityUid::from_str(s).expect("entity uid")
}

fn action(i: usize) -> String {
    format!("Action::\"{}\"", ACTIONS[i])
}

/// `text` (policies, entity references, entity JSON) with every type in
/// namespace `NS` when `ns`: the engine-level test runs each bundle both
/// ways, as index keys are names that must match whatever the namespace.
fn qualify(text: &str, ns: bool) -> String {
    if !ns {
        return text.to_owned();
    }
    let mut out = text.to_owned();
    for t in ["User", "Group", "Agent", "Folder", "Doc", "Action"] {
        out = out.replace(&format!("{t}::\""), &format!("NS::{t}::\""));
        out = out.replace(&format!("is {t}"), &format!("is NS::{t}"));
        out = out.replace(
            &format!("\"type\":\"{t}\""),
            &format!("\"type\":\"NS::{t}\""),
        );
    }
    out
}

/// A JSON value with its types qualified as [`qualify`] does.
fn qualify_json<T: serde::Serialize + serde::de::DeserializeOwned>(value: T, ns: bool) -> T {
    let text = serde_json::to_string(&value).expect("json");
    serde_json::from_str(&qualify(&text, ns)).expect("json")
}

/// The entity graph and action groups of one case.
#[derive(Debug, Clone)]
struct World {
    /// Parents of group i among groups j < i (bit j), so there is no cycle.
    group_parents: Vec<u8>,
    /// Parents of users 0..4 then agents 0..3 among the groups (bit j).
    member_parents: Vec<u8>,
    folder_parents: Vec<u8>,
    doc_parents: Vec<u8>,
    /// Levels of every bundle entity, in PRINCIPALS then RESOURCES order.
    levels: Vec<i64>,
    /// For each of act0..act4: bit 0 in grpA, bit 1 in grpB.
    action_groups: Vec<u8>,
    grp_b_in_a: bool,
}

fn bits(mask: u8, below: usize) -> impl Iterator<Item = usize> {
    (0..below).filter(move |j| mask & (1 << j) != 0)
}

impl World {
    fn strategy() -> impl Strategy<Value = World> {
        (
            prop::collection::vec(any::<u8>(), GROUPS),
            prop::collection::vec(any::<u8>(), 7),
            prop::collection::vec(any::<u8>(), FOLDERS),
            prop::collection::vec(any::<u8>(), 4),
            prop::collection::vec(-3i64..4, 19),
            prop::collection::vec(0u8..4, 5),
            any::<bool>(),
        )
            .prop_map(
                |(
                    group_parents,
                    member_parents,
                    folder_parents,
                    doc_parents,
                    levels,
                    action_groups,
                    grp_b_in_a,
                )| World {
                    group_parents,
                    member_parents,
                    folder_parents,
                    doc_parents,
                    levels,
                    action_groups,
                    grp_b_in_a,
                },
            )
    }

    /// (uid, parents, level) of every bundle entity.
    fn entities(&self) -> Vec<(String, Vec<String>, i64)> {
        let mut out = Vec::new();
        let group = |j: usize| format!("Group::\"u{j}\"");
        let folder = |j: usize| format!("Folder::\"d{j}\"");
        for (i, p) in PRINCIPALS.iter().take(11).enumerate() {
            let parents: Vec<String> = if i < 7 {
                bits(self.member_parents[i], GROUPS).map(group).collect()
            } else {
                bits(self.group_parents[i - 7], i - 7).map(group).collect()
            };
            out.push(((*p).to_owned(), parents, self.levels[i]));
        }
        for (i, r) in RESOURCES.iter().take(8).enumerate() {
            let parents: Vec<String> = if i < 4 {
                bits(self.doc_parents[i], FOLDERS).map(folder).collect()
            } else {
                bits(self.folder_parents[i - 4], i - 4)
                    .map(folder)
                    .collect()
            };
            out.push(((*r).to_owned(), parents, self.levels[11 + i]));
        }
        out
    }

    /// (action, groups it is in).
    fn actions(&self) -> Vec<(usize, Vec<usize>)> {
        let mut out: Vec<(usize, Vec<usize>)> = self
            .action_groups
            .iter()
            .enumerate()
            .map(|(i, m)| (i, bits(*m, 2).map(|g| 5 + g).collect()))
            .collect();
        out.push((5, Vec::new()));
        out.push((6, if self.grp_b_in_a { vec![5] } else { Vec::new() }));
        out
    }
}

/// Request-scoped entities: each of `User::"u9"`, `Agent::"u9"`, `Group::"u9"`
/// (principal side) and `Doc::"d9"`, `Folder::"d9"`
/// (resource side) may be sent, with parents in the bundle's graph or in
/// each other (the group above the user and the agent; the folder above the doc).
#[derive(Debug, Clone)]
struct Extras {
    sent: u8,
    parents: Vec<u8>,
    levels: Vec<i64>,
}

impl Extras {
    fn strategy() -> impl Strategy<Value = Extras> {
        (
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 5),
            prop::collection::vec(-3i64..4, 5),
        )
            .prop_map(|(sent, parents, levels)| Extras {
                sent,
                parents,
                levels,
            })
    }

    fn entities(&self) -> Vec<(String, Vec<String>, i64)> {
        let mut out = Vec::new();
        let sent = |i: usize| self.sent & (1 << i) != 0;
        let groups = |mask: u8, with_group9: bool| {
            let mut p: Vec<String> = bits(mask, GROUPS)
                .map(|j| format!("Group::\"u{j}\""))
                .collect();
            if with_group9 && mask & 0x80 != 0 && sent(2) {
                p.push("Group::\"u9\"".to_owned());
            }
            p
        };
        let folders = |mask: u8, with_folder9: bool| {
            let mut p: Vec<String> = bits(mask, FOLDERS)
                .map(|j| format!("Folder::\"d{j}\""))
                .collect();
            if with_folder9 && mask & 0x80 != 0 && sent(4) {
                p.push("Folder::\"d9\"".to_owned());
            }
            p
        };
        let candidates = [
            ("User::\"u9\"", groups(self.parents[0], true)),
            ("Agent::\"u9\"", groups(self.parents[1], true)),
            ("Group::\"u9\"", groups(self.parents[2], false)),
            ("Doc::\"d9\"", folders(self.parents[3], true)),
            ("Folder::\"d9\"", folders(self.parents[4], false)),
        ];
        for (i, (uid, parents)) in candidates.into_iter().enumerate() {
            if sent(i) {
                out.push((uid.to_owned(), parents, self.levels[i]));
            }
        }
        out
    }
}

// ----- policies --------------------------------------------------------------

#[derive(Debug, Clone)]
enum EntityScope {
    Any,
    Eq(usize),
    In(usize),
    Is(usize),
    IsIn(usize, usize),
    /// A template slot (`== ?slot` or `in ?slot`).
    Slot(bool),
}

impl EntityScope {
    fn strategy(entities: usize, types: usize) -> impl Strategy<Value = EntityScope> {
        prop_oneof![
            2 => Just(EntityScope::Any),
            3 => (0..entities).prop_map(EntityScope::Eq),
            3 => (0..entities).prop_map(EntityScope::In),
            1 => (0..types).prop_map(EntityScope::Is),
            1 => (0..types, 0..entities).prop_map(|(t, e)| EntityScope::IsIn(t, e)),
        ]
    }

    fn render(&self, var: &str, entities: &[&str], types: &[&str]) -> String {
        match self {
            Self::Any => var.to_owned(),
            Self::Eq(e) => format!("{var} == {}", entities[*e]),
            Self::In(e) => format!("{var} in {}", entities[*e]),
            Self::Is(t) => format!("{var} is {}", types[*t]),
            Self::IsIn(t, e) => format!("{var} is {} in {}", types[*t], entities[*e]),
            Self::Slot(eq) => format!("{var} {} ?{var}", if *eq { "==" } else { "in" }),
        }
    }
}

#[derive(Debug, Clone)]
enum ActionScope {
    Any,
    Eq(usize),
    In(Vec<usize>),
}

impl ActionScope {
    fn strategy() -> impl Strategy<Value = ActionScope> {
        prop_oneof![
            1 => Just(ActionScope::Any),
            2 => (0..ACTIONS.len()).prop_map(ActionScope::Eq),
            2 => prop::collection::vec(0..ACTIONS.len(), 1..4).prop_map(ActionScope::In),
        ]
    }

    fn render(&self) -> String {
        match self {
            Self::Any => "action".to_owned(),
            Self::Eq(a) => format!("action == {}", action(*a)),
            Self::In(list) if list.len() == 1 => format!("action in {}", action(list[0])),
            Self::In(list) => format!(
                "action in [{}]",
                list.iter()
                    .map(|a| action(*a))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Conditions; those from `VALID_CONDITIONS` on pass strict validation
/// against the engine-level schema, the rest raise type or attribute errors.
const CONDITIONS: [&str; 14] = [
    "",
    "when { context.n > 1 }",
    // Overflows (an evaluation error) when the level is 2 or more.
    "when { principal.level * 4611686018427387904 > 0 }",
    "when { resource.level < principal.level }",
    "when { context.n * 4611686018427387904 > 1 }",
    "when { resource in Folder::\"d1\" }",
    "unless { principal.level > 1 }",
    // Entities reached through attributes, a literal and the context (an
    // owner or `who` that no one defines is an evaluation error).
    "when { resource has owner && resource.owner.level > 0 }",
    "when { resource has owner && resource.owner has manager && resource.owner.manager in Group::\"u1\" }",
    "when { User::\"u2\".level > principal.level }",
    "when { context has who && context.who.level > 1 }",
    // Not valid: errors Cedar raises only without a schema.
    "when { principal.missing == 1 }",
    "when { resource.level like \"x\" }",
    "when { principal.level + context.n > resource.level }",
];
const VALID_CONDITIONS: usize = 11;

#[derive(Debug, Clone)]
struct PolicyGen {
    forbid: bool,
    principal: EntityScope,
    action: ActionScope,
    resource: EntityScope,
    condition: usize,
}

impl PolicyGen {
    fn strategy(conditions: usize) -> impl Strategy<Value = PolicyGen> {
        (
            prop::bool::weighted(0.3),
            EntityScope::strategy(PRINCIPALS.len(), PRINCIPAL_TYPES.len()),
            ActionScope::strategy(),
            EntityScope::strategy(RESOURCES.len(), RESOURCE_TYPES.len()),
            0..conditions,
        )
            .prop_map(
                |(forbid, principal, action, resource, condition)| PolicyGen {
                    forbid,
                    principal,
                    action,
                    resource,
                    condition,
                },
            )
    }

    fn render(&self, id: &str) -> String {
        format!(
            "@id(\"{id}\")\n{} ({}, {}, {}) {};\n",
            if self.forbid { "forbid" } else { "permit" },
            self.principal
                .render("principal", &PRINCIPALS, &PRINCIPAL_TYPES),
            self.action.render(),
            self.resource
                .render("resource", &RESOURCES, &RESOURCE_TYPES),
            CONDITIONS[self.condition],
        )
    }
}

/// A template with a slot in the principal, the resource or both, and its
/// links (principal index, resource index).
#[derive(Debug, Clone)]
struct TemplateGen {
    body: PolicyGen,
    links: Vec<(usize, usize)>,
}

fn template_strategy() -> impl Strategy<Value = TemplateGen> {
    (
        PolicyGen::strategy(CONDITIONS.len()),
        0u8..3,
        any::<bool>(),
        prop::collection::vec((0..PRINCIPALS.len(), 0..RESOURCES.len()), 0..4),
    )
        .prop_map(|(mut body, slots, eq, links)| {
            if slots != 1 {
                body.principal = EntityScope::Slot(eq);
            }
            if slots != 0 {
                body.resource = EntityScope::Slot(!eq);
            }
            TemplateGen { body, links }
        })
}

// ----- Cedar level ----------------------------------------------------------

#[derive(Debug, Clone)]
struct Ask {
    principal: usize,
    action: usize,
    resource: usize,
    n: i64,
    extras: Extras,
}

fn ask_strategy() -> impl Strategy<Value = Ask> {
    (
        0..PRINCIPALS.len(),
        0..ACTIONS.len(),
        0..RESOURCES.len(),
        -3i64..4,
        Extras::strategy(),
    )
        .prop_map(|(principal, action, resource, n, extras)| Ask {
            principal,
            action,
            resource,
            n,
            extras,
        })
}

fn entity(uid_text: &str, parents: &[String], level: Option<i64>) -> Entity {
    let attrs: HashMap<String, RestrictedExpression> = level
        .map(|l| ("level".to_owned(), RestrictedExpression::new_long(l)))
        .into_iter()
        .collect();
    Entity::new(
        uid(uid_text),
        attrs,
        parents.iter().map(|p| uid(p)).collect::<HashSet<_>>(),
    )
    .expect("entity")
}

/// Everything Cedar says about a request, in a comparable form.
type Answer = (bool, BTreeSet<String>, BTreeSet<(String, String)>);

fn answer(policies: &PolicySet, request: &cedar_policy::Request, entities: &Entities) -> Answer {
    let response = Authorizer::new().is_authorized(request, policies, entities);
    let reasons = response
        .diagnostics()
        .reason()
        .map(ToString::to_string)
        .collect();
    let errors = response
        .diagnostics()
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                (e.policy_id().to_string(), e.inner().to_string())
            }
        })
        .collect();
    (
        response.decision() == cedar_policy::Decision::Allow,
        reasons,
        errors,
    )
}

#[test]
fn narrowed_sets_answer_as_the_full_set_in_cedar() {
    let strategy = (
        World::strategy(),
        prop::collection::vec(PolicyGen::strategy(CONDITIONS.len()), 0..24),
        prop::collection::vec(template_strategy(), 0..3),
        prop::collection::vec(ask_strategy(), 1..12),
    );
    let evaluated = AtomicUsize::new(0);
    let narrowed = AtomicUsize::new(0);
    let total = AtomicUsize::new(0);
    let errors_seen = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 400,
        ..Config::default()
    });
    runner
        .run(&strategy, |(world, policies, templates, asks)| {
            let mut set = PolicySet::new();
            for (i, p) in policies.iter().enumerate() {
                let id = format!("p{i}");
                let policy = Policy::parse(Some(PolicyId::new(&id)), p.render(&id))
                    .unwrap_or_else(|e| panic!("{}: {e}", p.render(&id)));
                set.add(policy).expect("unique id");
            }
            for (t, template) in templates.iter().enumerate() {
                let tid = PolicyId::new(format!("t{t}"));
                let text = template.body.render(&format!("t{t}"));
                set.add_template(
                    Template::parse(Some(tid.clone()), &text)
                        .unwrap_or_else(|e| panic!("{text}: {e}")),
                )
                .expect("unique template id");
                for (l, (p, r)) in template.links.iter().enumerate() {
                    let mut values = HashMap::new();
                    if matches!(template.body.principal, EntityScope::Slot(_)) {
                        values.insert(SlotId::principal(), uid(PRINCIPALS[*p]));
                    }
                    if matches!(template.body.resource, EntityScope::Slot(_)) {
                        values.insert(SlotId::resource(), uid(RESOURCES[*r]));
                    }
                    set.link(tid.clone(), PolicyId::new(format!("t{t}-link{l}")), values)
                        .expect("link");
                }
            }

            let mut base: Vec<Entity> = world
                .entities()
                .iter()
                .map(|(u, parents, level)| entity(u, parents, Some(*level)))
                .collect();
            for (a, groups) in world.actions() {
                let parents: Vec<String> = groups.iter().map(|g| action(*g)).collect();
                base.push(entity(&action(a), &parents, None));
            }
            let base = Entities::from_entities(base, None).expect("entities");
            let actions: HashSet<EntityUid> = (0..ACTIONS.len()).map(|a| uid(&action(a))).collect();
            let index = PolicyIndex::build(&set, &base, &actions);
            prop_assert_eq!(index.stats().policies, set.policies().count());

            for ask in &asks {
                let extras: Vec<Entity> = ask
                    .extras
                    .entities()
                    .iter()
                    .map(|(u, parents, level)| entity(u, parents, Some(*level)))
                    .collect();
                let entities = base.clone().add_entities(extras, None).expect("extras");
                let (p, a, r) = (
                    uid(PRINCIPALS[ask.principal]),
                    uid(&action(ask.action)),
                    uid(RESOURCES[ask.resource]),
                );
                let request = cedar_policy::Request::new(
                    p.clone(),
                    a.clone(),
                    r.clone(),
                    Context::from_pairs([("n".to_owned(), RestrictedExpression::new_long(ask.n))])
                        .expect("context"),
                    None,
                )
                .expect("request");
                let subset = index
                    .select(&p, &a, &r, &entities)
                    .expect("the index narrows every request for a known action");
                let full = answer(&set, &request, &entities);
                let fast = answer(&subset, &request, &entities);
                evaluated.fetch_add(1, Ordering::Relaxed);
                narrowed.fetch_add(subset.policies().count(), Ordering::Relaxed);
                total.fetch_add(set.policies().count(), Ordering::Relaxed);
                if !full.2.is_empty() {
                    errors_seen.fetch_add(1, Ordering::Relaxed);
                }
                prop_assert_eq!(
                    &fast,
                    &full,
                    "request {} {} {} n={} extras {:?}\npolicies:\n{}",
                    PRINCIPALS[ask.principal],
                    ACTIONS[ask.action],
                    RESOURCES[ask.resource],
                    ask.n,
                    ask.extras.entities(),
                    set.to_string()
                );
            }
            Ok(())
        })
        .expect("narrowed and full sets agree");
    let (evaluated, narrowed, total) = (
        evaluated.into_inner(),
        narrowed.into_inner(),
        total.into_inner(),
    );
    // The comparison means something only if the index left policies out
    // and the cases reached errors.
    assert!(evaluated > 1000, "{evaluated} requests");
    assert!(
        narrowed * 2 < total,
        "the index kept {narrowed} of {total} policies"
    );
    assert!(
        errors_seen.into_inner() > 50,
        "too few requests with errors"
    );
}

// ----- engine level ---------------------------------------------------------

fn schema_text(world: &World) -> String {
    let mut s = String::from(
        "entity Group in [Group] = { level: Long };\n\
         entity User in [Group] = { level: Long, manager?: User };\n\
         entity Agent in [Group] = { level: Long };\n\
         entity Folder in [Folder] = { level: Long };\n\
         entity Doc in [Folder] = { level: Long, owner?: User };\n\
         action \"grpA\";\n",
    );
    s.push_str(if world.grp_b_in_a {
        "action \"grpB\" in [\"grpA\"];\n"
    } else {
        "action \"grpB\";\n"
    });
    for (a, groups) in world.actions().into_iter().take(5) {
        let parents: Vec<String> = groups
            .iter()
            .map(|g| format!("\"{}\"", ACTIONS[*g]))
            .collect();
        let within = if parents.is_empty() {
            String::new()
        } else {
            format!(" in [{}]", parents.join(", "))
        };
        s.push_str(&format!(
            "action \"{}\"{within} appliesTo {{ principal: [User, Agent], resource: [Doc, Folder], context: {{ n: Long, who?: User }} }};\n",
            ACTIONS[a]
        ));
    }
    s
}

fn entity_json(uid_text: &str, parents: &[String], level: i64) -> Value {
    let reference = |s: &str| {
        let (ty, id) = s.split_once("::\"").expect("uid");
        json!({"type": ty, "id": id.trim_end_matches('"')})
    };
    // Docs have an owner and users a manager, chosen by level: a user of
    // the bundle, one only some requests define, or one no one does.
    let mut attrs = json!({"level": level});
    if uid_text.starts_with("Doc::") && level != 0 {
        attrs["owner"] = json!({"__entity": reference(OWNERS[level.rem_euclid(4) as usize])});
    }
    if uid_text.starts_with("User::") && level > 0 {
        attrs["manager"] =
            json!({"__entity": reference(OWNERS[(level + 1).rem_euclid(4) as usize])});
    }
    json!({
        "uid": reference(uid_text),
        "attrs": attrs,
        "parents": parents.iter().map(|p| reference(p)).collect::<Vec<_>>(),
    })
}

/// Owners and managers: bundle users, a request-only one, a ghost.
const OWNERS: [&str; 4] = [
    "User::\"u0\"",
    "User::\"u1\"",
    "User::\"u9\"",
    "User::\"ghost\"",
];

/// The context of a request: `n`, and for some a `who` like an owner.
fn context_json(n: i64) -> serde_json::Map<String, Value> {
    let mut context = serde_json::Map::new();
    context.insert("n".to_owned(), json!(n));
    let who = ["", "User::\"u3\"", "User::\"u9\"", "User::\"ghost\""][n.rem_euclid(4) as usize];
    if let Some((ty, id)) = who.split_once("::\"") {
        context.insert(
            "who".to_owned(),
            json!({"__entity": {"type": ty, "id": id.trim_end_matches('"')}}),
        );
    }
    context
}

fn sources(world: &World, policies: &[PolicyGen], ns: bool) -> BundleSources {
    let text: String = policies
        .iter()
        .enumerate()
        .map(|(i, p)| qualify(&p.render(&format!("p{i}")), ns))
        .collect();
    let entities: Vec<Value> = world
        .entities()
        .iter()
        .map(|(u, parents, level)| qualify_json(entity_json(u, parents, *level), ns))
        .collect();
    let schema = if ns {
        format!("namespace NS {{\n{}}}\n", schema_text(world))
    } else {
        schema_text(world)
    };
    BundleSources {
        origin: "property test".to_owned(),
        policies: vec![SourceFile {
            path: "policies/p.cedar".to_owned(),
            // A file with no policies is a valid (deny-all) bundle.
            text: format!("// generated\n{text}"),
        }],
        schemas: vec![(
            SchemaFormat::Cedar,
            SourceFile {
                path: "schemas/s.cedarschema".to_owned(),
                text: schema,
            },
        )],
        entities: vec![SourceFile {
            path: "policies/e.entities.json".to_owned(),
            text: Value::Array(entities).to_string(),
        }],
        approvers: vec![SourceFile {
            path: "policies/ops.approvers.json".to_owned(),
            text: approvers_json(ns),
        }],
        skipped: Vec::new(),
    }
}

/// The key elevation grants are signed with in these tests.
fn elevation_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

/// One approver who may put an agent in any bundle group (the roles).
fn approvers_json(ns: bool) -> String {
    let roles: Vec<String> = (0..GROUPS)
        .map(|j| qualify(&format!("Group::\"u{j}\""), ns))
        .collect();
    json!({
        "approvers": [{
            "id": "ops",
            "keys": [{
                "kid": "ops-1",
                "public_key": leash::grants::public_key_text(&elevation_key()),
            }],
            "may_elevate": roles,
        }]
    })
    .to_string()
}

/// When the elevation grants of the property test are checked.
const GRANTS_AT: u64 = 1_795_426_200;

/// An elevation grant putting `agent` in `Group::"u{role}"` (for `user`
/// only, when given), valid around [`GRANTS_AT`].
fn elevation_grant(agent: &EntityUid, role: usize, user: Option<&EntityUid>, ns: bool) -> String {
    leash::grants::sign(
        &elevation_key(),
        "ops-1",
        &leash::grants::Claims {
            grant: "elevate".to_owned(),
            approver: "ops".to_owned(),
            fingerprint: String::new(),
            agent: agent.to_string(),
            role: qualify(&format!("Group::\"u{role}\""), ns),
            user: user.map(ToString::to_string).unwrap_or_default(),
            jti: format!("e-{agent}-{role}"),
            iat: GRANTS_AT - 60,
            exp: GRANTS_AT + 600,
        },
    )
    .expect("signs")
}

/// Principals a request may name as agent or user: users and agents of the
/// bundle, `User::"u9"`/`Agent::"u9"` (defined only if the request sends them)
/// and a ghost.
const ENGINE_PRINCIPALS: [usize; 10] = [0, 1, 2, 3, 4, 5, 6, 11, 12, 14];
/// Resources: docs and folders of the bundle, `Doc::"d9"`/`Folder::"d9"`, a ghost.
const ENGINE_RESOURCES: [usize; 11] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

#[test]
fn indexed_and_full_engines_decide_identically() {
    let strategy = (
        World::strategy(),
        prop::collection::vec(PolicyGen::strategy(VALID_CONDITIONS), 0..24),
        any::<bool>(),
        prop::collection::vec(
            (
                0..ENGINE_PRINCIPALS.len(),
                prop::option::weighted(0.6, 0..ENGINE_PRINCIPALS.len()),
                0..5usize,
                0..ENGINE_RESOURCES.len(),
                -3i64..4,
                Extras::strategy(),
                // Elevation grants: none for most requests; else roles to
                // put the agent in, each bound to the request's user or not,
                // and whether the request leaves its entities out (the
                // bundle's elevated entities are then built once and kept;
                // with request entities, for the request alone).
                prop::option::weighted(
                    0.35,
                    (
                        prop::collection::vec((0..GROUPS, any::<bool>()), 1..3),
                        any::<bool>(),
                    ),
                ),
            ),
            1..10,
        ),
    );
    let built = AtomicUsize::new(0);
    let refused = AtomicUsize::new(0);
    let decided = AtomicUsize::new(0);
    let delegated = AtomicUsize::new(0);
    let errors_seen = AtomicUsize::new(0);
    let namespaced = AtomicUsize::new(0);
    let elevated_alone = AtomicUsize::new(0);
    let elevated_with_entities = AtomicUsize::new(0);
    let now = RequestTime::at("2026-01-31T12:00:00.000Z");
    let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(GRANTS_AT);
    let mut runner = TestRunner::new(Config {
        cases: 150,
        ..Config::default()
    });
    runner
        .run(&strategy, |(world, policies, ns, asks)| {
            let sources = sources(&world, &policies, ns);
            let indexed = Snapshot::build_cached(&sources, &mut BuildCache::new(true));
            let full = Snapshot::build_cached(&sources, &mut BuildCache::new(false));
            let (indexed, full) = match (indexed, full) {
                (Ok(i), Ok(f)) => (i, f),
                (Err(a), Err(b)) => {
                    prop_assert_eq!(a.render(), b.render());
                    refused.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                (i, f) => panic!(
                    "one build failed: indexed {:?}, full {:?}",
                    i.err(),
                    f.err()
                ),
            };
            built.fetch_add(1, Ordering::Relaxed);
            prop_assert!(indexed.index.is_some());
            prop_assert!(full.index.is_none());
            for (agent, user, act, resource, n, extras, elevations) in &asks {
                let plain = elevations.as_ref().is_some_and(|(_, plain)| *plain);
                let sent: Vec<Value> = extras
                    .entities()
                    .iter()
                    .filter(|_| !plain)
                    .map(|(u, parents, level)| qualify_json(entity_json(u, parents, *level), ns))
                    .collect();
                let named = |text: &str| uid(&qualify(text, ns));
                let agent = named(PRINCIPALS[ENGINE_PRINCIPALS[*agent]]);
                let on_behalf_of = user.map(|u| named(PRINCIPALS[ENGINE_PRINCIPALS[u]]));
                let grants: Vec<String> = elevations
                    .iter()
                    .flat_map(|(roles, _)| roles)
                    .map(|(role, bound)| {
                        let user = on_behalf_of.as_ref().filter(|_| *bound);
                        elevation_grant(&agent, *role, user, ns)
                    })
                    .collect();
                let request = AuthzRequest {
                    agent,
                    on_behalf_of,
                    action: named(&action(*act)),
                    resource: named(RESOURCES[ENGINE_RESOURCES[*resource]]),
                    context: ContextInput::Json(qualify_json(context_json(*n), ns)),
                    entities: if sent.is_empty() {
                        EntitiesInput::None
                    } else {
                        EntitiesInput::Json(sent)
                    },
                    grants,
                };
                let lifetimes = leash::grants::Lifetimes::default();
                let a = decide_with_grants(&indexed, &request, &now, at, lifetimes);
                let b = decide_with_grants(&full, &request, &now, at, lifetimes);
                if let Ok(d) = &b {
                    if !d.elevated_by.is_empty() {
                        if matches!(request.entities, EntitiesInput::None) {
                            elevated_alone.fetch_add(1, Ordering::Relaxed);
                        } else {
                            elevated_with_entities.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    decided.fetch_add(1, Ordering::Relaxed);
                    if ns {
                        namespaced.fetch_add(1, Ordering::Relaxed);
                    }
                    if d.on_behalf_of.is_some() {
                        delegated.fetch_add(1, Ordering::Relaxed);
                    }
                    if !d.errors.is_empty() {
                        errors_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                prop_assert_eq!(a, b, "request {:?}", request);
            }
            Ok(())
        })
        .expect("indexed and full engines agree");
    let (built, refused) = (built.into_inner(), refused.into_inner());
    assert!(
        built > refused * 4,
        "{built} bundles built, {refused} refused"
    );
    assert!(decided.into_inner() > 300, "too few decisions");
    assert!(
        namespaced.into_inner() > 100,
        "too few decisions in a namespaced bundle"
    );
    assert!(delegated.into_inner() > 100, "too few delegated decisions");
    assert!(
        errors_seen.into_inner() > 20,
        "too few decisions with errors"
    );
    // Typical runs: about 120 without, 55 with.
    eprintln!(
        "elevated decisions: {} without request entities, {} with",
        elevated_alone.load(Ordering::Relaxed),
        elevated_with_entities.load(Ordering::Relaxed)
    );
    assert!(
        elevated_alone.into_inner() > 20,
        "too few elevated decisions without request entities"
    );
    assert!(
        elevated_with_entities.into_inner() > 20,
        "too few elevated decisions with request entities"
    );
}

// ----- server level ---------------------------------------------------------

/// Serves the bundle in `dir` twice, with and without the index, and sends
/// every request to both: the answers, errors included, must be equal.
async fn servers_agree(dir: &std::path::Path, requests: &[pb::IsAuthorizedRequest]) -> usize {
    let (policies, schemas) = (dir.join("policies"), dir.join("schemas"));
    let serve = |index: bool| {
        ReloadingServer::start(
            &policies,
            &schemas,
            leash::reload::ReloadOptions {
                policy_index: index,
                ..Default::default()
            },
        )
    };
    let indexed = serve(true).await;
    let full = serve(false).await;
    let mut allowed = 0;
    for (i, request) in requests.iter().enumerate() {
        let a = indexed
            .decide(request.clone())
            .await
            .map_err(|s| s.to_string());
        let b = full
            .decide(request.clone())
            .await
            .map_err(|s| s.to_string());
        assert_eq!(a, b, "request {i}: {request:?}");
        if let Ok(r) = &b {
            allowed += usize::from(r.decision == pb::Decision::Allow as i32);
        }
    }
    indexed.shutdown().await;
    full.shutdown().await;
    allowed
}

#[tokio::test]
async fn servers_with_and_without_the_index_agree_on_the_example_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    for sub in ["policies", "schemas"] {
        copy_tree(&repo_path(sub), &dir.path().join(sub));
    }
    let mix = leash::bench::mix::parse("example mix", leash::bench::mix::EXAMPLE_MIX)
        .expect("example mix");
    let mut requests: Vec<pb::IsAuthorizedRequest> = mix
        .iter()
        .flat_map(|r| [r.json.clone(), r.typed.clone()])
        .collect();
    // Requests that bring their ticket: decided on the reachable entities
    // with the index, on a full copy without it.
    for (user, ticket, customer, region) in [
        ("alice", "T-900", "C-100", "EMEA"),
        ("alice", "T-901", "C-200", "APAC"),
        ("dave", "T-901", "C-200", "APAC"),
        ("bob", "T-902", "C-404", "EMEA"),
    ] {
        for action in ["tickets:read", "tickets:update_status"] {
            let mut request = with_entities_json(
                example(
                    "support-bot",
                    Some(user),
                    action,
                    &format!("Ticket::\"{ticket}\""),
                ),
                &json!([{
                    "uid": {"type": "Ticket", "id": ticket},
                    "attrs": {"customer": {"__entity": {"type": "Customer", "id": customer}},
                              "region": region, "tier": 2},
                    "parents": [],
                }])
                .to_string(),
            );
            // Both servers answer with the id sent, not one of their own.
            request.request_id = format!("{user}-{ticket}-{action}");
            requests.push(request);
        }
    }
    let allowed = servers_agree(dir.path(), &requests).await;
    assert!(allowed > 0 && allowed < requests.len(), "{allowed} allowed");
}

#[tokio::test]
async fn servers_with_and_without_the_index_agree_on_a_generated_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = leash::bench::workload::generate(leash::bench::workload::WorkloadSpec {
        policies: 500,
        seed: 7,
    });
    workload.write_to(dir.path()).expect("write bundle");
    // One form each: the forms' equivalence is tested on its own, and the
    // unindexed server is slow in a debug build.
    let requests: Vec<pb::IsAuthorizedRequest> = workload
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if i % 2 == 0 {
                r.json.clone()
            } else {
                r.typed.clone()
            }
        })
        .collect();
    let allowed = servers_agree(dir.path(), &requests).await;
    assert!(
        allowed > 25 && allowed < requests.len() - 25,
        "{allowed} allowed"
    );
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
fn the_subset_cache_is_bounded_by_the_weight_of_its_policies() {
    use leash::bundle::{POLICY_OVERHEAD, SUBSET_BYTES_KEPT};
    // Every request matches the 300 unscoped forbids and its user's own
    // permit: 301 policies a subset, one subset per user.
    const UNSCOPED: usize = 300;
    const USERS: usize = 400;
    let mut set = PolicySet::new();
    for i in 0..UNSCOPED {
        let text = format!("forbid (principal, action, resource) when {{ context.n == {i} }};");
        let id = PolicyId::new(format!("f{i}"));
        set.add(Policy::parse(Some(id), text).expect("parses"))
            .expect("unique");
    }
    for u in 0..USERS {
        let text = format!("permit (principal == User::\"u{u}\", action, resource);");
        let id = PolicyId::new(format!("p{u}"));
        set.add(Policy::parse(Some(id), text).expect("parses"))
            .expect("unique");
    }
    let act = uid("Action::\"a\"");
    let entities =
        Entities::from_entities([entity("Action::\"a\"", &[], None)], None).expect("entities");
    let index = PolicyIndex::build(&set, &entities, &HashSet::from([act.clone()]));
    let resource = uid("Doc::\"d\"");
    let mut last = None;
    for u in 0..USERS {
        let principal = uid(&format!("User::\"u{u}\""));
        let subset = index
            .select(&principal, &act, &resource, &entities)
            .expect("narrowed");
        assert_eq!(subset.policies().count(), UNSCOPED + 1);
        let held = index.cache_size();
        assert!(held.bytes <= SUBSET_BYTES_KEPT, "{held:?} after {u} users");
        // Each policy weighs its text and the overhead.
        assert!(
            held.bytes > held.subsets * (UNSCOPED + 1) * POLICY_OVERHEAD,
            "{held:?}"
        );
        last = Some((principal, subset));
    }
    // The test fills the cache past its bound.
    const { assert!(USERS * (UNSCOPED + 1) * POLICY_OVERHEAD > SUBSET_BYTES_KEPT) };
    // The latest subset is still kept, and handed out again.
    let (principal, subset) = last.expect("selected");
    let again = index
        .select(&principal, &act, &resource, &entities)
        .expect("narrowed");
    assert!(std::sync::Arc::ptr_eq(&subset, &again));
}

#[test]
fn a_subset_heavier_than_the_cache_is_not_kept() {
    use leash::bundle::SUBSET_BYTES_KEPT;
    // One unscoped policy whose text alone is over the cache's bound.
    let big = "x".repeat(SUBSET_BYTES_KEPT);
    let mut set = PolicySet::new();
    let text = format!("forbid (principal, action, resource) when {{ context.s == \"{big}\" }};");
    set.add(Policy::parse(Some(PolicyId::new("big")), text).expect("parses"))
        .expect("unique");
    let act = uid("Action::\"a\"");
    let entities =
        Entities::from_entities([entity("Action::\"a\"", &[], None)], None).expect("entities");
    let index = PolicyIndex::build(&set, &entities, &HashSet::from([act.clone()]));
    let subset = index
        .select(&uid("User::\"u\""), &act, &uid("Doc::\"d\""), &entities)
        .expect("narrowed");
    assert_eq!(subset.policies().count(), 1);
    let held = index.cache_size();
    assert_eq!((held.subsets, held.bytes), (0, 0), "{held:?}");
}
