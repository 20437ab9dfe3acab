//! Which actions ask for leash's trusted `context.leash` record, and with
//! which attributes.
//!
//! A schema opts in per action by declaring a `leash` record in the action's
//! context. leash then fills exactly the attributes declared there. A schema
//! that declares no `leash` attribute gets nothing added: it validates and
//! decides exactly as with plain Cedar.

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{EntityId, EntityTypeName, EntityUid};
use serde_json::{Map, Value};

use super::Diagnostic;

/// The context attribute leash owns on actions that declare it.
pub const LEASH_ATTR: &str = "leash";

/// The attributes of `context.leash` an action declares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeashFields {
    /// `agent: <entity type>`: the agent making the call.
    pub agent: bool,
    /// `user?: <entity type>`: the user the agent acts for, when it does.
    pub user: bool,
    /// `delegated: Bool`: whether a user is present.
    pub delegated: bool,
    /// `now: datetime`: the sidecar's clock.
    pub now: bool,
}

/// `context.leash` declarations, by action.
#[derive(Debug, Clone, Default)]
pub struct ReservedContext {
    by_action: HashMap<EntityUid, LeashFields>,
}

impl ReservedContext {
    /// The fields `action` declares, or `None` for an action without `leash`.
    pub fn fields(&self, action: &EntityUid) -> Option<LeashFields> {
        self.by_action.get(action).copied()
    }

    /// Diagnostics for every action whose context type, as Cedar resolves
    /// it, has a `leash` attribute with other fields than the scan found
    /// (none at all, say, when a common type leads through a namespace the
    /// scan did not follow). Such an action would otherwise take the
    /// trusted record from the caller, so the bundle is refused.
    pub fn check_against(&self, schema: &cedar_policy::Schema) -> Vec<Diagnostic> {
        use cedar_policy_core::validator::types::Type;
        let validator: &cedar_policy_core::validator::ValidatorSchema = schema.as_ref();
        let mut out = Vec::new();
        for action in schema.actions() {
            let core: &cedar_policy_core::ast::EntityUID = action.as_ref();
            let Some(Type::Record { attrs, .. }) = validator.context_type(core) else {
                continue;
            };
            let Some(leash) = attrs.get_attr(LEASH_ATTR) else {
                continue;
            };
            let declared = match leash.attr_type.as_ref() {
                Type::Record { attrs, .. } => LeashFields {
                    agent: attrs.get_attr("agent").is_some(),
                    user: attrs.get_attr("user").is_some(),
                    delegated: attrs.get_attr("delegated").is_some(),
                    now: attrs.get_attr("now").is_some(),
                },
                _ => LeashFields::default(),
            };
            if self.fields(action) != Some(declared) {
                out.push(Diagnostic::plain(
                    None,
                    format!(
                        "{action}: its context declares `{LEASH_ATTR}` through types leash could \
                         not follow; declare the `{LEASH_ATTR}` record in the action's context \
                         or in a common type of the action's own namespace, so leash fills it \
                         and no caller can"
                    ),
                ));
            }
        }
        out
    }

    /// How many actions declare `context.leash`.
    pub fn action_count(&self) -> usize {
        self.by_action.len()
    }

    /// Reads the declarations from the JSON form of every schema fragment
    /// (`(file, fragment)`), checking names and types of the `leash` record.
    pub fn scan(fragments: &[(String, Value)]) -> Result<Self, Vec<Diagnostic>> {
        let common = CommonTypes::collect(fragments);
        let mut reserved = Self::default();
        let mut diagnostics = Vec::new();
        for (file, fragment) in fragments {
            let Some(namespaces) = fragment.as_object() else {
                continue;
            };
            for (namespace, body) in namespaces {
                let Some(actions) = body.get("actions").and_then(Value::as_object) else {
                    continue;
                };
                for (action, decl) in actions {
                    let Some(context) = decl.get("appliesTo").and_then(|a| a.get("context")) else {
                        continue;
                    };
                    let Some(attrs) = common.record_attributes(namespace, context) else {
                        continue;
                    };
                    let Some(leash) = attrs.get(LEASH_ATTR) else {
                        continue;
                    };
                    let shown = action_display(namespace, action);
                    match check_leash_record(&common, namespace, leash) {
                        Ok(fields) => match action_uid(namespace, action) {
                            Some(uid) => {
                                reserved.by_action.insert(uid, fields);
                            }
                            None => diagnostics.push(Diagnostic::plain(
                                Some(file),
                                format!("cannot name action `{shown}`"),
                            )),
                        },
                        Err(problem) => diagnostics.push(Diagnostic::plain(
                            Some(file),
                            format!("context of action `{shown}`: {problem}"),
                        )),
                    }
                }
            }
        }
        if diagnostics.is_empty() {
            Ok(reserved)
        } else {
            Err(diagnostics)
        }
    }
}

fn action_display(namespace: &str, action: &str) -> String {
    if namespace.is_empty() {
        format!("Action::{action:?}")
    } else {
        format!("{namespace}::Action::{action:?}")
    }
}

fn action_uid(namespace: &str, action: &str) -> Option<EntityUid> {
    let type_name = if namespace.is_empty() {
        "Action".to_owned()
    } else {
        format!("{namespace}::Action")
    };
    let type_name = EntityTypeName::from_str(&type_name).ok()?;
    Some(EntityUid::from_type_name_and_id(
        type_name,
        EntityId::new(action),
    ))
}

/// Checks the declared type of `context.leash` and returns its fields.
fn check_leash_record(
    common: &CommonTypes<'_>,
    namespace: &str,
    leash: &Value,
) -> Result<LeashFields, String> {
    let attrs = common.record_attributes(namespace, leash).ok_or_else(|| {
        "`leash` is reserved for leash's trusted record and must be a record type \
         (for example `leash: { agent: Agent, user?: User, delegated: Bool, now: datetime }`)"
            .to_owned()
    })?;
    let mut fields = LeashFields::default();
    for (name, decl) in attrs {
        let required = decl
            .get("required")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let kind = common.kind(namespace, decl);
        match name.as_str() {
            "agent" => {
                expect_kind(name, kind, TypeKind::Entity, "an entity type")?;
                fields.agent = true;
            }
            "user" => {
                expect_kind(name, kind, TypeKind::Entity, "an entity type")?;
                if required {
                    return Err("`leash.user` must be optional (`user?: User`): \
                                an agent acting alone has no user"
                        .to_owned());
                }
                fields.user = true;
            }
            "delegated" => {
                expect_kind(name, kind, TypeKind::Bool, "`Bool`")?;
                fields.delegated = true;
            }
            "now" => {
                expect_kind(name, kind, TypeKind::Datetime, "`datetime`")?;
                fields.now = true;
            }
            other => {
                return Err(format!(
                    "unknown attribute `leash.{other}`; leash supplies `agent`, `user`, \
                     `delegated` and `now`"
                ))
            }
        }
    }
    Ok(fields)
}

fn expect_kind(name: &str, got: TypeKind, want: TypeKind, shown: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("`leash.{name}` must be {shown}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeKind {
    Entity,
    Bool,
    Datetime,
    Other,
}

/// Common type declarations of every fragment, by namespace and name.
struct CommonTypes<'a> {
    types: HashMap<(String, String), &'a Value>,
}

/// Common types may refer to common types; a chain longer than this is a cycle.
const MAX_TYPE_CHAIN: usize = 32;

impl<'a> CommonTypes<'a> {
    fn collect(fragments: &'a [(String, Value)]) -> Self {
        let mut types = HashMap::new();
        for (_, fragment) in fragments {
            let Some(namespaces) = fragment.as_object() else {
                continue;
            };
            for (namespace, body) in namespaces {
                if let Some(common) = body.get("commonTypes").and_then(Value::as_object) {
                    for (name, decl) in common {
                        types.insert((namespace.clone(), name.clone()), decl);
                    }
                }
            }
        }
        Self { types }
    }

    /// Follows common-type references until a type that is not one.
    fn resolve(&self, namespace: &str, mut ty: &'a Value) -> &'a Value {
        for _ in 0..MAX_TYPE_CHAIN {
            let Some(name) = self.reference(ty) else {
                return ty;
            };
            match self.lookup(namespace, name) {
                Some(next) => ty = next,
                None => return ty,
            }
        }
        ty
    }

    /// The name a type refers to, if it may be a common type.
    fn reference(&self, ty: &'a Value) -> Option<&'a str> {
        let tag = ty.get("type")?.as_str()?;
        match tag {
            "EntityOrCommon" => ty.get("name")?.as_str(),
            "Record" | "Set" | "Entity" | "Extension" | "String" | "Long" | "Boolean" => None,
            other => Some(other),
        }
    }

    fn lookup(&self, namespace: &str, name: &str) -> Option<&'a Value> {
        if let Some((ns, base)) = name.rsplit_once("::") {
            return self.types.get(&(ns.to_owned(), base.to_owned())).copied();
        }
        self.types
            .get(&(namespace.to_owned(), name.to_owned()))
            .or_else(|| self.types.get(&(String::new(), name.to_owned())))
            .copied()
    }

    fn record_attributes(&self, namespace: &str, ty: &'a Value) -> Option<&'a Map<String, Value>> {
        let ty = self.resolve(namespace, ty);
        if ty.get("type")?.as_str()? != "Record" {
            return None;
        }
        ty.get("attributes")?.as_object()
    }

    fn kind(&self, namespace: &str, ty: &'a Value) -> TypeKind {
        let ty = self.resolve(namespace, ty);
        let tag = ty.get("type").and_then(Value::as_str).unwrap_or_default();
        let name = ty.get("name").and_then(Value::as_str).unwrap_or_default();
        let base = name.rsplit("::").next().unwrap_or(name);
        match tag {
            "Entity" => TypeKind::Entity,
            "Boolean" => TypeKind::Bool,
            "Extension" if base == "datetime" => TypeKind::Datetime,
            // An unresolved name in Cedar syntax is an entity type unless it
            // names a builtin.
            "EntityOrCommon" => match base {
                "Bool" | "Boolean" => TypeKind::Bool,
                "datetime" => TypeKind::Datetime,
                "String" | "Long" | "decimal" | "ipaddr" | "duration" => TypeKind::Other,
                _ => TypeKind::Entity,
            },
            _ => TypeKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::SchemaFragment;

    fn scan(src: &str) -> Result<ReservedContext, Vec<Diagnostic>> {
        let (fragment, _) = SchemaFragment::from_cedarschema_str(src).expect("schema parses");
        let json = fragment.to_json_value().expect("schema converts");
        ReservedContext::scan(&[("s.cedarschema".to_owned(), json)])
    }

    fn uid(s: &str) -> EntityUid {
        s.parse().expect("uid")
    }

    #[test]
    fn finds_leash_through_common_types_and_namespaces() {
        let reserved = scan(
            r#"
            type L = { agent: Agent, user?: User, delegated: Bool, now: datetime };
            entity Agent, User, Doc;
            action "read" appliesTo { principal: [Agent, User], resource: Doc, context: { leash: L } };
            action "plain" appliesTo { principal: [Agent], resource: Doc };
            namespace Ns {
              type Ctx = { leash: { now: __cedar::datetime } };
              entity Doc;
              action "go" appliesTo { principal: [Doc], resource: Doc, context: Ctx };
            }
            "#,
        )
        .expect("valid");
        let all = LeashFields {
            agent: true,
            user: true,
            delegated: true,
            now: true,
        };
        assert_eq!(reserved.fields(&uid(r#"Action::"read""#)), Some(all));
        assert_eq!(reserved.fields(&uid(r#"Action::"plain""#)), None);
        let only_now = LeashFields {
            now: true,
            ..LeashFields::default()
        };
        assert_eq!(reserved.fields(&uid(r#"Ns::Action::"go""#)), Some(only_now));
    }

    #[test]
    fn rejects_unknown_and_mistyped_leash_attributes() {
        let errs = scan(
            r#"entity A; action "x" appliesTo { principal: A, resource: A, context: { leash: { usr?: A } } };"#,
        )
        .expect_err("typo refused");
        assert!(
            errs[0].message.contains("unknown attribute `leash.usr`"),
            "{}",
            errs[0].message
        );

        let errs = scan(
            r#"entity A; action "x" appliesTo { principal: A, resource: A, context: { leash: { user: A } } };"#,
        )
        .expect_err("required user refused");
        assert!(
            errs[0].message.contains("`leash.user` must be optional"),
            "{}",
            errs[0].message
        );

        let errs = scan(
            r#"entity A; action "x" appliesTo { principal: A, resource: A, context: { leash: { now: Long } } };"#,
        )
        .expect_err("wrong type refused");
        assert!(
            errs[0].message.contains("`leash.now` must be `datetime`"),
            "{}",
            errs[0].message
        );

        let errs = scan(
            r#"entity A; action "x" appliesTo { principal: A, resource: A, context: { leash: String } };"#,
        )
        .expect_err("non-record refused");
        assert!(
            errs[0].message.contains("must be a record type"),
            "{}",
            errs[0].message
        );
    }
}
