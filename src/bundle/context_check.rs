//! Contexts already checked against their action's context type.
//!
//! Every request's context is checked against the schema's context type of
//! its action (Cedar's `Context::validate`) before it is decided. Under load
//! that check cost about a tenth of the sidecar's work per call (`leash
//! bench`, 10,000 policies: some 35,000 instructions for six attributes),
//! while its outcome depends only on the context's *shape*:
//!
//! - the attribute names of every record, and the kind of every value
//!   (Bool, Long, String, entity, set, record, extension value);
//! - the type of every entity, and the constructor of every extension
//!   value (whose argument is checked when the context is built, before);
//! - the elements of every set, and the fields of every nested record;
//! - the *ids* of entities of action types (the action must exist) and of
//!   enumerated types (the id must be one of the enumeration).
//!
//! So a snapshot remembers, per action, the shapes that passed, and a
//! context of a shape that passed is not checked again. A context holding an
//! entity of an action or enumerated type is always checked, as is any
//! shape not seen before; a shape that failed is never remembered (the
//! check runs again and words the error). The shapes are dropped with the
//! snapshot, and at most [`KEPT`] are held. With the policy index turned off
//! (`--policy-index off`) nothing is remembered: every context is checked.

use std::collections::{HashMap, HashSet};
use std::str::FromStr as _;
use std::sync::RwLock;

use cedar_policy::{EntityTypeName, EntityUid};
use serde_json::Value;

/// Most shapes remembered; when full, the memory starts again. A bundle's
/// callers send few distinct shapes, so this is rarely reached.
pub const KEPT: usize = 4096;

/// Longest shape key written (bytes). A larger context (a set of thousands
/// of values, say) is not remembered and is checked every time, so the
/// memory holds at most `KEPT` × this, and writing a shape costs at most
/// this much work whatever the context's size.
pub const MAX_KEY: usize = 1024;

/// The shape of a context as it is built, value by value: a key that is
/// equal for two contexts exactly when they have the same shape (lengths
/// prefix every name and no value token starts with a digit, so no two
/// shapes write the same key), plus the entity types seen. Made only inside
/// the crate, by the code that builds the value it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    key: String,
    types: Vec<EntityTypeName>,
    /// False once the shape is too long or does not describe its value:
    /// it is then never remembered nor found.
    usable: bool,
}

impl Shape {
    pub(crate) fn new() -> Self {
        Self {
            key: String::new(),
            types: Vec::new(),
            usable: true,
        }
    }

    pub(crate) fn bool(&mut self) {
        self.token('b');
    }

    pub(crate) fn long(&mut self) {
        self.token('l');
    }

    pub(crate) fn string(&mut self) {
        self.token('s');
    }

    pub(crate) fn entity(&mut self, uid: &EntityUid) {
        if !self.usable {
            return;
        }
        let ty = uid.type_name();
        self.token('e');
        let mut name = String::new();
        super::push_type_name(&mut name, ty);
        self.name(&name);
        // At most MAX_KEY / 3 types fit in a usable key, so this stays short.
        if self.usable && !self.types.contains(ty) {
            self.types.push(ty.clone());
        }
    }

    /// An extension value made by the constructor `name` (`decimal`, ...).
    pub(crate) fn extension(&mut self, name: &str) {
        self.token('x');
        self.name(name);
    }

    pub(crate) fn open_set(&mut self) {
        self.token('[');
    }

    pub(crate) fn close_set(&mut self) {
        self.token(']');
    }

    pub(crate) fn open_record(&mut self) {
        self.token('{');
    }

    /// A record field's name; its value's shape follows.
    pub(crate) fn field(&mut self, name: &str) {
        self.name(name);
    }

    pub(crate) fn close_record(&mut self) {
        self.token('}');
    }

    /// Appends the shape of values written elsewhere (a typed context's
    /// fields, converted from the wire).
    pub(crate) fn append(&mut self, other: &Shape) {
        if !other.usable {
            self.unusable();
        }
        if !self.usable {
            return;
        }
        self.key.push_str(&other.key);
        for ty in &other.types {
            if !self.types.contains(ty) {
                self.types.push(ty.clone());
            }
        }
        self.bound();
    }

    /// Marks a shape that does not describe its value (or is too long): no
    /// context of it is ever taken as checked, and nothing more is written.
    pub(crate) fn unusable(&mut self) {
        self.usable = false;
        self.key.clear();
        self.key.push('!');
        self.types.clear();
    }

    fn token(&mut self, token: char) {
        if self.usable {
            self.key.push(token);
            self.bound();
        }
    }

    fn name(&mut self, name: &str) {
        if !self.usable {
            return;
        }
        if name.len() > MAX_KEY {
            self.unusable();
            return;
        }
        push_decimal(&mut self.key, name.len());
        self.key.push(':');
        self.key.push_str(name);
        self.bound();
    }

    fn bound(&mut self) {
        if self.key.len() > MAX_KEY {
            self.unusable();
        }
    }
}

/// What a snapshot remembers of the contexts it has checked.
#[derive(Debug, Default)]
pub struct ContextChecks {
    /// Whether shapes are remembered at all.
    enabled: bool,
    /// The schema's enumerated entity types: their ids matter.
    enums: HashSet<EntityTypeName>,
    /// Shapes that passed, with the actions they passed for.
    passed: RwLock<Passed>,
}

#[derive(Debug, Default)]
struct Passed {
    shapes: HashMap<String, HashSet<EntityUid>>,
    /// Entries over all shapes, for the bound.
    entries: usize,
}

impl ContextChecks {
    /// Reads the enumerated entity types from the JSON form of the schema
    /// fragments. `enabled` false remembers nothing. A fragment whose
    /// enumerated type cannot be named turns remembering off: a shape is
    /// only remembered where every id that matters is known.
    pub fn scan(fragments: &[(String, Value)], enabled: bool) -> Self {
        let mut enums = HashSet::new();
        let mut named = true;
        for (_, fragment) in fragments {
            let Some(namespaces) = fragment.as_object() else {
                continue;
            };
            for (namespace, body) in namespaces {
                let Some(types) = body.get("entityTypes").and_then(Value::as_object) else {
                    continue;
                };
                for (name, decl) in types {
                    if decl.get("enum").is_none() {
                        continue;
                    }
                    let qualified = if namespace.is_empty() {
                        name.clone()
                    } else {
                        format!("{namespace}::{name}")
                    };
                    match EntityTypeName::from_str(&qualified) {
                        Ok(ty) => {
                            enums.insert(ty);
                        }
                        Err(_) => named = false,
                    }
                }
            }
        }
        Self {
            enabled: enabled && named,
            enums,
            passed: RwLock::default(),
        }
    }

    /// Whether a context of `shape` for `action` passed the check before.
    pub fn passed(&self, action: &EntityUid, shape: &Shape) -> bool {
        if !self.enabled || !shape.usable {
            return false;
        }
        // A poisoned lock only costs the memory: the context is checked.
        self.passed
            .read()
            .ok()
            .and_then(|p| p.shapes.get(&shape.key).map(|a| a.contains(action)))
            .unwrap_or(false)
    }

    /// Remembers that a context of `shape` passed the check for `action`,
    /// unless it holds an entity whose id matters.
    pub fn remember(&self, action: &EntityUid, shape: &Shape) {
        if !self.enabled || !shape.usable || !self.ids_irrelevant(shape) {
            return;
        }
        if let Ok(mut p) = self.passed.write() {
            if p.entries >= KEPT {
                p.shapes.clear();
                p.entries = 0;
            }
            if p.shapes
                .entry(shape.key.clone())
                .or_default()
                .insert(action.clone())
            {
                p.entries += 1;
            }
        }
    }

    /// How many (shape, action) pairs are remembered.
    pub fn len(&self) -> usize {
        self.passed.read().map(|p| p.entries).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No entity in the shape is of an action type (the action must exist)
    /// or of an enumerated type (the id must be listed).
    fn ids_irrelevant(&self, shape: &Shape) -> bool {
        shape
            .types
            .iter()
            .all(|ty| ty.basename() != "Action" && !self.enums.contains(ty))
    }
}

/// `n` in decimal, without the formatting machinery: a shape's names are
/// length-prefixed about a dozen times per request, and `write!` cost more
/// than the rest of the key.
fn push_decimal(out: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        // `n % 10` is below 10: the cast cannot truncate.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::SchemaFragment;

    fn uid(text: &str) -> EntityUid {
        text.parse().expect("uid parses")
    }

    fn checks(schema: &str) -> ContextChecks {
        let (fragment, _) = SchemaFragment::from_cedarschema_str(schema).expect("schema parses");
        let json = fragment.to_json_value().expect("schema converts");
        ContextChecks::scan(&[("s.cedarschema".to_owned(), json)], true)
    }

    #[test]
    fn length_prefixes_are_the_decimal_lengths() {
        for n in [0, 1, 9, 10, 99, 100, 1024, 12_345, usize::MAX] {
            let mut key = String::from("x");
            push_decimal(&mut key, n);
            assert_eq!(key, format!("x{n}"));
        }
    }

    #[test]
    fn names_are_length_prefixed_so_shapes_do_not_collide() {
        let mut a = Shape::new();
        a.open_record();
        a.field("ab");
        a.string();
        a.close_record();
        let mut b = Shape::new();
        b.open_record();
        b.field("a");
        b.field("bs");
        b.close_record();
        assert_ne!(a, b);
    }

    #[test]
    fn enumerated_and_action_entities_are_never_remembered() {
        let checks = checks(
            "namespace App { entity Color enum [\"red\", \"blue\"]; entity User; \
             action read appliesTo { principal: User, resource: User }; }",
        );
        let action = uid("App::Action::\"read\"");
        for entity in [
            "App::Color::\"red\"",
            "App::Action::\"read\"",
            "Action::\"read\"",
        ] {
            let mut shape = Shape::new();
            shape.entity(&uid(entity));
            checks.remember(&action, &shape);
            assert!(!checks.passed(&action, &shape), "{entity}");
        }
        let mut plain = Shape::new();
        plain.entity(&uid("App::User::\"alice\""));
        checks.remember(&action, &plain);
        assert!(checks.passed(&action, &plain));
        assert!(!checks.passed(&uid("App::Action::\"other\""), &plain));
        assert_eq!(checks.len(), 1);
    }

    #[test]
    fn large_contexts_are_never_remembered() {
        let checks = ContextChecks::scan(&[], true);
        let action = uid("Action::\"read\"");
        let mut shape = Shape::new();
        shape.open_record();
        shape.field("tags");
        shape.open_set();
        for _ in 0..MAX_KEY {
            shape.string();
        }
        shape.close_set();
        shape.close_record();
        assert!(shape.key.len() <= MAX_KEY);
        checks.remember(&action, &shape);
        assert!(!checks.passed(&action, &shape));
        assert!(checks.is_empty());
        // Unusable stays unusable when appended.
        let mut outer = Shape::new();
        outer.open_record();
        outer.append(&shape);
        outer.close_record();
        checks.remember(&action, &outer);
        assert!(checks.is_empty());
    }

    #[test]
    fn turned_off_remembers_nothing() {
        let checks = ContextChecks::scan(&[], false);
        let action = uid("Action::\"read\"");
        let shape = Shape::new();
        checks.remember(&action, &shape);
        assert!(!checks.passed(&action, &shape));
        assert!(checks.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let checks = ContextChecks::scan(&[], true);
        for i in 0..=KEPT {
            checks.remember(&uid(&format!("Action::\"a{i}\"")), &Shape::new());
        }
        assert!(checks.len() <= KEPT);
    }
}
