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
//! filed once, so no policy is found twice. Assembled sets are kept (a
//! bounded cache keyed by the policies they hold), since many requests match
//! the same few policies and assembling a set costs more than evaluating it.
//!
//! The index is built with the [`Snapshot`](super::Snapshot), off the request
//! path, and swapped with it.

use std::collections::HashSet;

// The index's maps are keyed by the bundle's own entities and numbers and
// looked up once or more per request: foldhash, seeded per map, hashes an
// entity name in a fraction of SipHash's time.
use foldhash::{HashMap, HashMapExt as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use cedar_policy::{
    ActionConstraint, Entities, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet,
    PrincipalConstraint, ResourceConstraint, Template,
};

/// The number of an entity or entity type named in some scope, or of a
/// schema action: requests are matched against scopes by comparing numbers.
type Id = u32;

/// What a scope says about the principal or the resource, with entities
/// and types by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Any,
    Eq(Id),
    In(Id),
    Is(Id),
    IsIn(Id, Id),
}

impl Scope {
    /// The entity this scope files its policy under, if any: `==` first.
    fn eq_key(self) -> Option<Id> {
        match self {
            Self::Eq(e) => Some(e),
            _ => None,
        }
    }

    fn in_key(self) -> Option<Id> {
        match self {
            Self::In(e) | Self::IsIn(_, e) => Some(e),
            _ => None,
        }
    }

    /// Whether the request's entity, as `seen`, satisfies this scope, with
    /// Cedar's semantics of `in` (itself or an ancestor).
    fn matches(self, seen: &Seen) -> bool {
        match self {
            Self::Any => true,
            Self::Eq(e) => seen.id == Some(e),
            Self::In(e) => seen.within.contains(&e),
            Self::Is(t) => seen.ty == Some(t),
            Self::IsIn(t, e) => seen.ty == Some(t) && seen.within.contains(&e),
        }
    }
}

/// A request's principal or resource as the index sees it: its number, its
/// type's number, and the numbers of itself and every ancestor (those
/// named in some scope; no other entity can matter).
#[derive(Debug, Default)]
struct Seen {
    id: Option<Id>,
    ty: Option<Id>,
    within: Vec<Id>,
}

/// Numbers for the entities and types that scopes name.
#[derive(Debug, Default)]
struct Names {
    entities: HashMap<EntityUid, Id>,
    types: HashMap<EntityTypeName, Id>,
}

impl Names {
    fn entity(&mut self, uid: EntityUid) -> Id {
        let next = Id::try_from(self.entities.len()).unwrap_or(Id::MAX);
        *self.entities.entry(uid).or_insert(next)
    }

    fn ty(&mut self, ty: EntityTypeName) -> Id {
        let next = Id::try_from(self.types.len()).unwrap_or(Id::MAX);
        *self.types.entry(ty).or_insert(next)
    }

    fn principal(&mut self, c: PrincipalConstraint) -> Scope {
        match c {
            PrincipalConstraint::Any => Scope::Any,
            PrincipalConstraint::Eq(e) => Scope::Eq(self.entity(e)),
            PrincipalConstraint::In(e) => Scope::In(self.entity(e)),
            PrincipalConstraint::Is(t) => Scope::Is(self.ty(t)),
            PrincipalConstraint::IsIn(t, e) => Scope::IsIn(self.ty(t), self.entity(e)),
        }
    }

    fn resource(&mut self, c: ResourceConstraint) -> Scope {
        match c {
            ResourceConstraint::Any => Scope::Any,
            ResourceConstraint::Eq(e) => Scope::Eq(self.entity(e)),
            ResourceConstraint::In(e) => Scope::In(self.entity(e)),
            ResourceConstraint::Is(t) => Scope::Is(self.ty(t)),
            ResourceConstraint::IsIn(t, e) => Scope::IsIn(self.ty(t), self.entity(e)),
        }
    }

    /// How the index sees `uid` in `entities`.
    fn see(&self, uid: &EntityUid, entities: &Entities) -> Seen {
        let mut seen = Seen {
            id: self.entities.get(uid).copied(),
            ty: if self.types.is_empty() {
                None
            } else {
                self.types.get(uid.type_name()).copied()
            },
            within: Vec::new(),
        };
        seen.within.extend(seen.id);
        if !self.entities.is_empty() {
            if let Some(ancestors) = entities.ancestors(uid) {
                seen.within
                    .extend(ancestors.filter_map(|a| self.entities.get(a).copied()));
            }
        }
        seen
    }
}

/// One policy of the set with its scope, taken apart once at load.
#[derive(Debug)]
struct Entry {
    policy: Policy,
    /// About what a copy of the policy takes in an assembled subset: its
    /// source text (a linked policy's is its template's), which each copy
    /// carries, and [`POLICY_OVERHEAD`]. The parsed template is shared.
    weight: usize,
    principal: Scope,
    /// The schema actions (by number, sorted) the action scope matches,
    /// action groups expanded; `None` for any action.
    actions: Option<Vec<Id>>,
    resource: Scope,
}

impl Entry {
    fn matches(&self, principal: &Seen, action: Id, resource: &Seen) -> bool {
        self.principal.matches(principal)
            && self
                .actions
                .as_ref()
                .is_none_or(|a| a.binary_search(&action).is_ok())
            && self.resource.matches(resource)
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
    names: Names,
    /// The schema's actions by number: a request for any other action is
    /// not narrowed (and never reaches evaluation: the engine refuses it).
    actions: HashMap<EntityUid, Id>,
    /// Policies by the number of the entity or action they are filed under.
    by_principal: HashMap<Id, Vec<u32>>,
    by_resource: HashMap<Id, Vec<u32>>,
    by_action: HashMap<Id, Vec<u32>>,
    unkeyed: Vec<u32>,
    /// Subsets already assembled, by the policies they hold: assembling one
    /// costs more than evaluating it, and a bundle's requests fall into far
    /// fewer distinct subsets than there are requests.
    subsets: RwLock<Subsets>,
    stats: IndexStats,
    /// Whether a request this index could not narrow has been logged (once
    /// per bundle: each one is counted in [`fallbacks`]).
    fell_back: AtomicBool,
}

/// Requests decided on the whole set because the index could not narrow
/// them, since the process started.
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Requests decided on the whole policy set since the process started
/// because the index could not narrow them. The engine refuses requests
/// for actions outside the schema before they get here, and every policy
/// of the set can be added to a subset, so this stays 0; if it does not,
/// the answers are still exact (the whole set decides) but each such
/// decision costs what it would without the index.
pub fn fallbacks() -> u64 {
    FALLBACKS.load(Ordering::Relaxed)
}

/// Most subsets kept.
const SUBSETS_KEPT: usize = 4096;

/// Most bytes of policies held in all kept subsets together, by each
/// policy's weight (its source text, which every copy carries, and
/// [`POLICY_OVERHEAD`]). Each subset holds copies of its policies, so the
/// count of sets alone does not bound memory: 4,096 sets of 2,000 policies
/// each (a bundle with many unscoped policies) would be gigabytes. A subset
/// heavier than this is assembled each time and not kept.
pub const SUBSET_BYTES_KEPT: usize = 32 << 20;

/// What a policy's copy takes in a set beyond its text, rounded up: its
/// entries in the set's maps (the parsed template is shared, not copied).
pub const POLICY_OVERHEAD: usize = 1024;

/// The assembled subsets and the weight of the policies they hold.
#[derive(Debug, Default)]
struct Subsets {
    sets: HashMap<Vec<u32>, Arc<PolicySet>>,
    bytes: usize,
}

/// What the subset cache holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSize {
    pub subsets: usize,
    /// The weight of their policies ([`SUBSET_BYTES_KEPT`]).
    pub bytes: usize,
}

/// The length of a policy's or template's text, counted without building
/// it. (Printing a policy parsed from text writes its text; a linked one
/// would be printed anew from its template, so it is not passed here.)
fn text_len(item: &impl std::fmt::Display) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a policy that would still counts
    // what it wrote.
    let _ = std::fmt::Write::write_fmt(&mut count, format_args!("{item}"));
    count.0
}

impl PolicyIndex {
    /// Indexes `policies`. `entities` must hold the schema's action entities
    /// (their hierarchy expands action groups); `actions` are the schema's
    /// actions.
    pub fn build(policies: &PolicySet, entities: &Entities, actions: &HashSet<EntityUid>) -> Self {
        let began = Instant::now();
        let numbered: HashMap<EntityUid, Id> = actions
            .iter()
            .enumerate()
            .map(|(i, a)| (a.clone(), Id::try_from(i).unwrap_or(Id::MAX)))
            .collect();
        // Each action and action group, with the actions `in` it.
        let mut members: HashMap<&EntityUid, Vec<Id>> = HashMap::new();
        for (action, id) in &numbered {
            members.entry(action).or_default().push(*id);
            if let Some(ancestors) = entities.ancestors(action) {
                for group in ancestors {
                    members.entry(group).or_default().push(*id);
                }
            }
        }

        let mut index = Self {
            entries: Vec::with_capacity(policies.num_of_policies()),
            templates: HashMap::new(),
            names: Names::default(),
            actions: HashMap::new(),
            by_principal: HashMap::new(),
            by_resource: HashMap::new(),
            by_action: HashMap::new(),
            unkeyed: Vec::new(),
            subsets: RwLock::new(Subsets::default()),
            stats: IndexStats::default(),
            fell_back: AtomicBool::new(false),
        };
        let mut template_text: HashMap<PolicyId, usize> = HashMap::new();
        for policy in policies.policies() {
            // Fewer than 2^32 policies: a bundle that size could not load.
            let Ok(at) = u32::try_from(index.entries.len()) else {
                break;
            };
            // A linked policy's copy carries its template's text.
            let mut text = None;
            if let Some(template) = policy.template_id() {
                if let Some(t) = policies.template(template) {
                    index
                        .templates
                        .entry(template.clone())
                        .or_insert_with(|| t.clone());
                    text = Some(
                        *template_text
                            .entry(template.clone())
                            .or_insert_with(|| text_len(t)),
                    );
                }
            }
            let actions = match policy.action_constraint() {
                ActionConstraint::Any => None,
                // `action == A` matches A alone, never the members of a group A.
                ActionConstraint::Eq(a) => Some(numbered.get(&a).copied().into_iter().collect()),
                ActionConstraint::In(list) => {
                    let mut ids: Vec<Id> = list
                        .iter()
                        .filter_map(|a| members.get(a))
                        .flatten()
                        .copied()
                        .collect();
                    ids.sort_unstable();
                    ids.dedup();
                    Some(ids)
                }
            };
            let entry = Entry {
                principal: index.names.principal(policy.principal_constraint()),
                actions,
                resource: index.names.resource(policy.resource_constraint()),
                weight: text.unwrap_or_else(|| text_len(policy)) + POLICY_OVERHEAD,
                policy: policy.clone(),
            };
            let key = index.file(at, &entry);
            match key {
                Key::Principal => index.stats.by_principal += 1,
                Key::Resource => index.stats.by_resource += 1,
                Key::Action => index.stats.by_action += 1,
                Key::Unkeyed => index.stats.unkeyed += 1,
            }
            index.entries.push(entry);
        }
        index.actions = numbered;
        index.stats.policies = index.entries.len();
        index.stats.keys =
            index.by_principal.len() + index.by_resource.len() + index.by_action.len();
        index.stats.build_us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        index
    }

    /// Files policy `at` under its most selective key.
    fn file(&mut self, at: u32, entry: &Entry) -> Key {
        let (principal, resource) = (entry.principal, entry.resource);
        let key = if let Some(e) = principal.eq_key() {
            (Key::Principal, e)
        } else if let Some(e) = resource.eq_key() {
            (Key::Resource, e)
        } else if let Some(e) = principal.in_key() {
            (Key::Principal, e)
        } else if let Some(e) = resource.in_key() {
            (Key::Resource, e)
        } else {
            match entry.actions.as_deref() {
                // Names no action of the schema: it applies to no request the
                // engine accepts, and costs nothing where it is filed.
                Some([]) | None => {
                    self.unkeyed.push(at);
                    return Key::Unkeyed;
                }
                Some(actions) => {
                    for a in actions {
                        self.by_action.entry(*a).or_default().push(at);
                    }
                    return Key::Action;
                }
            }
        };
        let map = match key.0 {
            Key::Principal => &mut self.by_principal,
            _ => &mut self.by_resource,
        };
        map.entry(key.1).or_default().push(at);
        key.0
    }

    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// The policies whose scope matches `principal`, `action` and
    /// `resource`, as a set for Cedar to evaluate; `entities` is the entity
    /// data the request is decided with. `None` when the index cannot
    /// narrow this request (an action it does not know, or a subset that
    /// cannot be assembled): the caller then evaluates the whole set. Such
    /// requests are counted ([`fallbacks`]), and the first is logged.
    pub fn select(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
        entities: &Entities,
    ) -> Option<Arc<PolicySet>> {
        let narrowed = self.narrow(principal, action, resource, entities);
        if narrowed.is_none() {
            FALLBACKS.fetch_add(1, Ordering::Relaxed);
            if !self.fell_back.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    action = %action,
                    "the scope index could not narrow a request: it was decided on the whole \
                     policy set (the same answer, at the cost of evaluating every policy); \
                     leash_index_fallbacks_total counts such requests"
                );
            }
        }
        narrowed
    }

    /// [`select`](Self::select), without counting or logging a request
    /// it cannot narrow (for the benchmark, which asks it of requests the
    /// engine has not checked).
    pub fn narrow(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
        entities: &Entities,
    ) -> Option<Arc<PolicySet>> {
        let action = *self.actions.get(action)?;
        let principal = self.names.see(principal, entities);
        let resource = self.names.see(resource, entities);
        let mut found: Vec<u32> = Vec::new();
        for (map, seen) in [
            (&self.by_principal, &principal),
            (&self.by_resource, &resource),
        ] {
            for id in &seen.within {
                if let Some(ids) = map.get(id) {
                    found.extend_from_slice(ids);
                }
            }
        }
        if let Some(ids) = self.by_action.get(&action) {
            found.extend_from_slice(ids);
        }
        found.extend_from_slice(&self.unkeyed);
        // Set order, and no policy twice (filing makes that so already; the
        // sort is cheap and keeps it so whatever the entity data holds).
        found.sort_unstable();
        found.dedup();

        let mut matched = Vec::with_capacity(found.len());
        for at in found {
            let entry = self.entries.get(usize::try_from(at).ok()?)?;
            if entry.matches(&principal, action, &resource) {
                matched.push(at);
            }
        }
        // A poisoned lock only costs the cache: the subset is assembled anew.
        if let Some(set) = self
            .subsets
            .read()
            .ok()
            .and_then(|cache| cache.sets.get(&matched).cloned())
        {
            return Some(set);
        }
        let mut set = PolicySet::new();
        let mut weight = 0;
        for &at in &matched {
            let entry = self.entries.get(usize::try_from(at).ok()?)?;
            self.add(&mut set, &entry.policy)?;
            weight = entry.weight.saturating_add(weight);
        }
        let set = Arc::new(set);
        if weight <= SUBSET_BYTES_KEPT {
            let dropped = match self.subsets.write() {
                // Another request may have kept the same subset meanwhile.
                Ok(mut cache) if !cache.sets.contains_key(&matched) => {
                    // Full: start again. The old sets are freed after the
                    // lock is released, so other requests do not wait on it.
                    let full = cache.sets.len() >= SUBSETS_KEPT
                        || cache.bytes.saturating_add(weight) > SUBSET_BYTES_KEPT;
                    let dropped = full.then(|| std::mem::take(&mut *cache));
                    cache.bytes = cache.bytes.saturating_add(weight);
                    cache.sets.insert(matched, Arc::clone(&set));
                    dropped
                }
                _ => None,
            };
            drop(dropped);
        }
        Some(set)
    }

    /// How many subsets the cache holds, and the weight of their policies.
    pub fn cache_size(&self) -> CacheSize {
        self.subsets.read().map_or(
            CacheSize {
                subsets: 0,
                bytes: 0,
            },
            |cache| CacheSize {
                subsets: cache.sets.len(),
                bytes: cache.bytes,
            },
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr as _;

    fn uid(text: &str) -> EntityUid {
        EntityUid::from_str(text).expect("uid")
    }

    #[test]
    fn a_request_it_cannot_narrow_is_counted_and_logged_once() {
        let mut policies = PolicySet::from_str(
            r#"permit (principal == User::"alice", action == Action::"read", resource);
               permit (principal == ?principal, action == Action::"read", resource);"#,
        )
        .expect("policies");
        policies
            .link(
                PolicyId::new("policy1"),
                PolicyId::new("bob"),
                std::collections::HashMap::from([(
                    cedar_policy::SlotId::principal(),
                    uid(r#"User::"bob""#),
                )]),
            )
            .expect("link");
        let read = uid(r#"Action::"read""#);
        let doc = uid(r#"Doc::"d""#);
        let mut index = PolicyIndex::build(
            &policies,
            &Entities::empty(),
            &HashSet::from([read.clone()]),
        );
        let entities = Entities::empty();
        let before = fallbacks();
        let alice = index.select(&uid(r#"User::"alice""#), &read, &doc, &entities);
        assert_eq!(alice.map(|set| set.num_of_policies()), Some(1));
        assert!(!index.fell_back.load(Ordering::Relaxed));

        // Bob's policy is linked from a template the index no longer has:
        // its subset cannot be assembled.
        index.templates.clear();
        let bob = uid(r#"User::"bob""#);
        assert!(index.select(&bob, &read, &doc, &entities).is_none());
        assert!(fallbacks() > before);
        assert!(index.fell_back.load(Ordering::Relaxed));
        // An action outside the schema is not narrowed either.
        let after = fallbacks();
        let write = uid(r#"Action::"write""#);
        assert!(index.select(&bob, &write, &doc, &entities).is_none());
        assert!(fallbacks() > after);
    }
}
