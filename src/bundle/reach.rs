//! Which of the bundle's entities a request's evaluation can reach, so a
//! request that brings entities of its own is decided on a small set instead
//! of a copy of all of them.
//!
//! Cedar reads an entity from the store in exactly three ways: a variable
//! (`principal`, `action`, `resource`), an entity literal in a policy's
//! condition, or an entity value found in the context or in an attribute or
//! tag of an entity it already read. `in` reads only the left side's
//! ancestors, which an entity carries with it. So the bundle entities that
//! matter to a request are those reachable from its principals, action,
//! resource, context and request entities, plus the condition literals,
//! following entity values in attributes and tags. With those, the request
//! entities, and the bundle's parents of request entities (whose ancestors
//! a request entity inherits), every lookup Cedar makes finds what it would
//! find in the full set, and every ancestor set closes the same way.
//!
//! The reachable part is computed per request from references collected
//! once per bundle. When it would hold more than half of a large bundle's
//! entities, or the bundle holds a value that is not concrete, the request
//! gets a full copy as before.

use std::collections::{HashMap, HashSet};

use cedar_policy::{Entities, Entity, EntityUid, PolicySet};
use cedar_policy_core::ast::{self, Literal, PartialValue, ValueKind};

/// Below this many entities a slice is always used.
const SMALL_BUNDLE: usize = 256;

/// The bundle's entity references, collected at load.
#[derive(Debug, Default)]
pub struct EntityReach {
    /// The entities each bundle entity names in its attributes and tags
    /// (only entities that name any).
    refs: HashMap<EntityUid, Vec<EntityUid>>,
    /// Entity literals in the conditions of policies and templates.
    literals: Vec<EntityUid>,
    /// Every value could be read: the slice is exact.
    exact: bool,
    /// Entities in the bundle, to know when slicing no longer pays.
    entity_count: usize,
}

/// Appends the entities `value` names, inside sets and records too.
pub(crate) fn value_refs(value: &ast::Value, out: &mut Vec<EntityUid>) {
    match &value.value {
        ValueKind::Lit(Literal::EntityUID(uid)) => out.push(EntityUid::from((**uid).clone())),
        ValueKind::Lit(_) | ValueKind::ExtensionValue(_) => {}
        ValueKind::Set(set) => set.iter().for_each(|v| value_refs(v, out)),
        ValueKind::Record(record) => record.values().for_each(|v| value_refs(v, out)),
    }
}

/// The entities `entity` names in its attributes and tags; `None` if a
/// value is not concrete.
fn entity_refs(entity: &Entity) -> Option<Vec<EntityUid>> {
    let core: &ast::Entity = entity.as_ref();
    let mut out = Vec::new();
    for (_, value) in core.attrs().chain(core.tags()) {
        match value {
            PartialValue::Value(v) => value_refs(v, &mut out),
            PartialValue::Residual(_) => return None,
        }
    }
    Some(out)
}

/// The first attribute or tag of `entity` whose value is not concrete,
/// said as `` entity `T::"id"`: attribute `a` is `unknown(..)`, not a value ``
/// (callers add why it is refused). Cedar's JSON entity format reads
/// `{"__extn": {"fn": "unknown", "arg": ..}}` as an unknown of any type,
/// and the schema check lets an unknown pass as any type; a policy reading
/// it then evaluates to a residual, which Cedar's authorizer leaves out of
/// its decision (a forbid would not apply) and reports only as an error.
/// leash denies a side with errors, but a value that can never be decided
/// on is bad input, so neither a bundle nor a request may hold one.
pub(crate) fn first_residual(entity: &Entity) -> Option<String> {
    let core: &ast::Entity = entity.as_ref();
    let residual = |(name, value): (_, &PartialValue)| {
        matches!(value, PartialValue::Residual(_)).then_some(name)
    };
    let (kind, name) = core
        .attrs()
        .find_map(residual)
        .map(|name| ("attribute", name))
        .or_else(|| core.tags().find_map(residual).map(|name| ("tag", name)))?;
    Some(format!(
        "entity `{}`: {kind} `{name}` is `unknown(..)`, not a value",
        entity.uid()
    ))
}

/// The entity literals in the conditions of `policies` and their
/// templates, each once.
pub fn condition_literals(policies: &PolicySet) -> Vec<EntityUid> {
    let core: &ast::PolicySet = policies.as_ref();
    let mut literals = HashSet::new();
    for template in core.all_templates() {
        if let Some(condition) = template.non_scope_constraints() {
            for expr in condition.subexpressions() {
                if let ast::ExprKind::Lit(Literal::EntityUID(uid)) = expr.expr_kind() {
                    literals.insert(EntityUid::from((**uid).clone()));
                }
            }
        }
    }
    literals.into_iter().collect()
}

impl EntityReach {
    /// From the bundle's entities and its condition literals
    /// ([`condition_literals`]).
    pub fn build(literals: Vec<EntityUid>, entities: &Entities) -> Self {
        let mut reach = Self {
            exact: true,
            literals,
            ..Self::default()
        };
        for entity in entities.iter() {
            reach.entity_count += 1;
            match entity_refs(entity) {
                Some(refs) if refs.is_empty() => {}
                Some(refs) => {
                    reach.refs.insert(entity.uid(), refs);
                }
                None => reach.exact = false,
            }
        }
        reach
    }

    /// The bundle entities a request can reach from `roots` (its principals,
    /// action, resource and the entities its context names) and from
    /// `request_entities`; `None` when the request should use a full copy.
    pub fn slice(
        &self,
        bundle: &Entities,
        roots: impl IntoIterator<Item = EntityUid>,
        request_entities: &[Entity],
    ) -> Option<Vec<Entity>> {
        if !self.exact {
            return None;
        }
        // Small bundles are sliced whatever the share: it costs little
        // either way, and it keeps one path for every bundle tests build.
        let limit = (self.entity_count / 2).max(SMALL_BUNDLE);
        let mut seen: HashSet<EntityUid> = HashSet::new();
        let mut queue: Vec<EntityUid> = roots.into_iter().collect();
        queue.extend(self.literals.iter().cloned());
        for entity in request_entities {
            // The bundle's parents of a request entity: their ancestors
            // become the request entity's.
            let core: &ast::Entity = entity.as_ref();
            queue.extend(core.ancestors().map(|uid| EntityUid::from(uid.clone())));
            queue.extend(entity_refs(entity)?);
        }
        let mut slice = Vec::new();
        while let Some(uid) = queue.pop() {
            if !seen.insert(uid.clone()) {
                continue;
            }
            let Some(entity) = bundle.get(&uid) else {
                continue;
            };
            if slice.len() >= limit {
                return None;
            }
            if let Some(refs) = self.refs.get(&uid) {
                queue.extend(refs.iter().filter(|r| !seen.contains(*r)).cloned());
            }
            slice.push(entity.clone());
        }
        Some(slice)
    }
}
