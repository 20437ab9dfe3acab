//! The scope index: which policies could apply to a request.
//!
//! Cedar's authorizer evaluates every policy of a set on every request, so a
//! decision costs time in proportion to the bundle (about 13 ms with 10,000
//! policies on a 2-core machine). But a policy's condition is its scope
//! (`principal …, action …, resource …`) *and* its `when`/`unless` clauses,
//! evaluated in that order with short-circuit `&&`, and a scope never raises
//! an error. So a policy whose scope does not match a request evaluates to
//! false without evaluating anything else: it cannot be a determining policy
//! or an erroring one, and leaving it out changes nothing in the answer.
//!
//! At load, each policy is filed under one key taken from its scope, the
//! most selective one it has, in this order:
//!
//! 1. `principal == E` → the principal key `E`;
//! 2. `resource == E` → the resource key `E`;
//! 3. `principal in E` / `principal is T in E` → the principal key `E`;
//! 4. `resource in E` / `resource is T in E` → the resource key `E`;
//! 5. `action == A` / `action in [A, …]` → every schema action the
//!    constraint matches (action groups expanded through the schema);
//! 6. anything else (`principal`, `principal is T`, …) → unkeyed.
//!
//! Template-linked policies are filed by their slot values. A request looks
//! up its principal and every ancestor of it, its resource and every
//! ancestor of it (ancestors from the entity data the request is decided
//! with, so request-scoped entities count), its action, and the unkeyed
//! policies; each policy found is then checked against the whole scope, and
//! those that match make up the policy set Cedar evaluates. Each policy is
//! filed once, so no policy is found twice.
//!
//! The index is built with the [`Snapshot`](super::Snapshot), off the request
//! path, and swapped with it.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use cedar_policy::{
    ActionConstraint, Entities, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet,
    PrincipalConstraint, ResourceConstraint, Template,
};

/// What a scope says about the principal or the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EntityScope {
    Any,
    Eq(EntityUid),
    In(EntityUid),
    Is(EntityTypeName),
    IsIn(EntityTypeName, EntityUid),
}

impl EntityScope {
    fn principal(c: PrincipalConstraint) -> Self {
        match c {
            PrincipalConstraint::Any => Self::Any,
            PrincipalConstraint::Eq(e) => Self::Eq(e),
            PrincipalConstraint::In(e) => Self::In(e),
            PrincipalConstraint::Is(t) => Self::Is(t),
            PrincipalConstraint::IsIn(t, e) => Self::IsIn(t, e),
        }
    }

    fn resource(c: ResourceConstraint) -> Self {
        match c {
            ResourceConstraint::Any => Self::Any,
            ResourceConstraint::Eq(e) => Self::Eq(e),
            ResourceConstraint::In(e) => Self::In(e),
            ResourceConstraint::Is(t) => Self::Is(t),
            ResourceConstraint::IsIn(t, e) => Self::IsIn(t, e),
        }
    }

    /// Whether `uid` satisfies this constraint, with Cedar's semantics of
    /// `in` (equal, or an ancestor in `entities`; an entity missing from
    /// `entities` is `in` only itself).
    fn matches(&self, uid: &EntityUid, entities: &Entities) -> bool {
        match self {
            Self::Any => true,
            Self::Eq(e) => uid == e,
            Self::In(e) => within(uid, e, entities),
            Self::Is(t) => uid.type_name() == t,
            Self::IsIn(t, e) => uid.type_name() == t && within(uid, e, entities),
        }
    }
}

/// `uid in ancestor`, as Cedar evaluates it.
fn within(uid: &EntityUid, ancestor: &EntityUid, entities: &Entities) -> bool {
    // `Entities::is_ancestor_of` alone says an existing entity is not `in`
    // itself; Cedar's `in` says it is.
    uid == ancestor || entities.is_ancestor_of(ancestor, uid)
}

fn action_matches(constraint: &ActionConstraint, action: &EntityUid, entities: &Entities) -> bool {
    match constraint {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(a) => action == a,
        ActionConstraint::In(list) => list.iter().any(|a| within(action, a, entities)),
    }
}

/// One policy of the set with its scope, taken apart once at load.
#[derive(Debug)]
struct Entry {
    policy: Policy,
    principal: EntityScope,
    action: ActionConstraint,
    resource: EntityScope,
}

impl Entry {
    fn matches(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
        entities: &Entities,
    ) -> bool {
        self.principal.matches(principal, entities)
            && action_matches(&self.action, action, entities)
            && self.resource.matches(resource, entities)
    }
}

/// Where a policy was filed; for the counts in [`IndexStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Principal,
    Resource,
    Action,
    Unkeyed,
}

/// What the index holds and what building it cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IndexStats {
    /// Static and template-linked policies indexed.
    pub policies: usize,
    /// Policies filed under a principal (an `==` or `in` entity).
    pub by_principal: usize,
    /// Policies filed under a resource.
    pub by_resource: usize,
    /// Policies filed under the actions their scope names.
    pub by_action: usize,
    /// Policies every request evaluates (no entity or action in the scope).
    pub unkeyed: usize,
    /// Distinct keys (entities and actions) in the index.
    pub keys: usize,
    /// Wall time of the build, microseconds.
    pub build_us: u64,
}

/// Policies filed by what their scope constrains; see the module docs.
#[derive(Debug)]
pub struct PolicyIndex {
    entries: Vec<Entry>,
    /// Templates of the linked policies, to link them again in a subset.
    templates: HashMap<PolicyId, Template>,
    by_principal: HashMap<EntityUid, Vec<u32>>,
    by_resource: HashMap<EntityUid, Vec<u32>>,
    by_action: HashMap<EntityUid, Vec<u32>>,
    unkeyed: Vec<u32>,
    /// The schema's actions: a request for any other action is not
    /// narrowed (and never reaches evaluation: the engine refuses it).
    actions: HashSet<EntityUid>,
    stats: IndexStats,
}

impl PolicyIndex {
    /// Indexes `policies`. `entities` must hold the schema's action entities
    /// (their hierarchy expands action groups); `actions` are the schema's
    /// actions.
    pub fn build(policies: &PolicySet, entities: &Entities, actions: &HashSet<EntityUid>) -> Self {
        let began = Instant::now();
        // Each action and action group, with the actions `in` it.
        let mut members: HashMap<&EntityUid, Vec<&EntityUid>> = HashMap::new();
        for action in actions {
            members.entry(action).or_default().push(action);
            if let Some(ancestors) = entities.ancestors(action) {
                for group in ancestors {
                    members.entry(group).or_default().push(action);
                }
            }
        }

        let mut index = Self {
            entries: Vec::with_capacity(policies.num_of_policies()),
            templates: HashMap::new(),
            by_principal: HashMap::new(),
            by_resource: HashMap::new(),
            by_action: HashMap::new(),
            unkeyed: Vec::new(),
            actions: actions.clone(),
            stats: IndexStats::default(),
        };
        for policy in policies.policies() {
            if let Some(template) = policy.template_id() {
                if let Some(t) = policies.template(template) {
                    index
                        .templates
                        .entry(template.clone())
                        .or_insert_with(|| t.clone());
                }
            }
            let entry = Entry {
                principal: EntityScope::principal(policy.principal_constraint()),
                action: policy.action_constraint(),
                resource: EntityScope::resource(policy.resource_constraint()),
                policy: policy.clone(),
            };
            // Fewer than 2^32 policies: a bundle that size could not load.
            let Ok(at) = u32::try_from(index.entries.len()) else {
                break;
            };
            let key = index.file(at, &entry, &members);
            match key {
                Key::Principal => index.stats.by_principal += 1,
                Key::Resource => index.stats.by_resource += 1,
                Key::Action => index.stats.by_action += 1,
                Key::Unkeyed => index.stats.unkeyed += 1,
            }
            index.entries.push(entry);
        }
        index.stats.policies = index.entries.len();
        index.stats.keys =
            index.by_principal.len() + index.by_resource.len() + index.by_action.len();
        index.stats.build_us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        index
    }

    /// Files policy `at` under its most selective key.
    fn file(
        &mut self,
        at: u32,
        entry: &Entry,
        members: &HashMap<&EntityUid, Vec<&EntityUid>>,
    ) -> Key {
        use EntityScope as S;
        let (principal_eq, principal_in) = match &entry.principal {
            S::Eq(e) => (Some(e), None),
            S::In(e) | S::IsIn(_, e) => (None, Some(e)),
            S::Any | S::Is(_) => (None, None),
        };
        let (resource_eq, resource_in) = match &entry.resource {
            S::Eq(e) => (Some(e), None),
            S::In(e) | S::IsIn(_, e) => (None, Some(e)),
            S::Any | S::Is(_) => (None, None),
        };
        if let Some(e) = principal_eq {
            self.by_principal.entry(e.clone()).or_default().push(at);
            return Key::Principal;
        }
        if let Some(e) = resource_eq {
            self.by_resource.entry(e.clone()).or_default().push(at);
            return Key::Resource;
        }
        if let Some(e) = principal_in {
            self.by_principal.entry(e.clone()).or_default().push(at);
            return Key::Principal;
        }
        if let Some(e) = resource_in {
            self.by_resource.entry(e.clone()).or_default().push(at);
            return Key::Resource;
        }
        let named: Vec<&EntityUid> = match &entry.action {
            ActionConstraint::Any => Vec::new(),
            ActionConstraint::Eq(a) => vec![a],
            ActionConstraint::In(list) => list.iter().collect(),
        };
        if named.is_empty() {
            self.unkeyed.push(at);
            return Key::Unkeyed;
        }
        let mut matched: HashSet<&EntityUid> = HashSet::new();
        for a in named {
            match (&entry.action, members.get(a)) {
                // `action == A` matches A alone, never the members of a group A.
                (ActionConstraint::Eq(_), _) => {
                    if self.actions.contains(a) {
                        matched.insert(a);
                    }
                }
                (_, Some(found)) => matched.extend(found.iter().copied()),
                (_, None) => {}
            }
        }
        if matched.is_empty() {
            // It names no action of the schema, so it applies to no request
            // the engine accepts; it is kept (and checked) all the same.
            self.unkeyed.push(at);
            return Key::Unkeyed;
        }
        for a in matched {
            self.by_action.entry(a.clone()).or_default().push(at);
        }
        Key::Action
    }

    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// The policies whose scope matches `principal`, `action` and
    /// `resource`, as a set for Cedar to evaluate; `entities` is the entity
    /// data the request is decided with. `None` when the index cannot
    /// narrow this request (an action it does not know, or a subset that
    /// cannot be assembled): the caller then evaluates the whole set.
    pub fn select(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
        entities: &Entities,
    ) -> Option<PolicySet> {
        if !self.actions.contains(action) {
            return None;
        }
        let mut found: Vec<u32> = Vec::new();
        let mut gather = |map: &HashMap<EntityUid, Vec<u32>>, uid: &EntityUid| {
            if map.is_empty() {
                return;
            }
            if let Some(ids) = map.get(uid) {
                found.extend_from_slice(ids);
            }
            if let Some(ancestors) = entities.ancestors(uid) {
                for ancestor in ancestors.filter(|a| *a != uid) {
                    if let Some(ids) = map.get(ancestor) {
                        found.extend_from_slice(ids);
                    }
                }
            }
        };
        gather(&self.by_principal, principal);
        gather(&self.by_resource, resource);
        if let Some(ids) = self.by_action.get(action) {
            found.extend_from_slice(ids);
        }
        found.extend_from_slice(&self.unkeyed);
        // Set order, and no policy twice (filing makes that so already; the
        // sort is cheap and keeps it so whatever the entity data holds).
        found.sort_unstable();
        found.dedup();

        let mut set = PolicySet::new();
        for at in found {
            let entry = self.entries.get(usize::try_from(at).ok()?)?;
            if !entry.matches(principal, action, resource, entities) {
                continue;
            }
            self.add(&mut set, &entry.policy)?;
        }
        Some(set)
    }

    fn add(&self, set: &mut PolicySet, policy: &Policy) -> Option<()> {
        let Some(template) = policy.template_id() else {
            return set.add(policy.clone()).ok();
        };
        if set.template(template).is_none() {
            set.add_template(self.templates.get(template)?.clone())
                .ok()?;
        }
        set.link(
            template.clone(),
            policy.id().clone(),
            policy.template_links()?,
        )
        .ok()
    }
}
