//! Wire → domain: entity references, typed values and JSON inputs, each
//! problem reported with the path of the field at fault.

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use serde_json::Value;

use crate::bundle::context_check::Shape;
use crate::engine::{AuthzRequest, ContextInput, EntitiesInput, RequestError};
use crate::proto::v1 as pb;

/// How deep sets and records may nest in a context or entity attribute.
/// Bounds the work of converting and evaluating one request.
pub const MAX_VALUE_DEPTH: usize = 32;

/// Longest accepted `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 256;

/// Longest accepted type name or id of the request's agent, user, action
/// and resource, in bytes. Those go into every span, deny line and audit
/// record of the call, and the queues in front of them count items, not
/// bytes; 4 KiB is twice the longest SPIFFE id and far past URLs and object
/// keys in practice. (Entities a request brings, and entity values in its
/// context, are not logged and have no limit of their own.)
pub const MAX_ENTITY_ID_LEN: usize = 4096;

/// A request id as logged, traced and recorded: an invalid request may carry
/// one of any length (up to the message limit); those stay small.
pub fn shown_request_id(id: &str) -> String {
    shown(id, MAX_REQUEST_ID_LEN)
}

/// `text`, or its first `max` bytes (cut at a character boundary) and
/// `…(cut)` when it is longer.
pub fn shown(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…(cut)", &text[..end])
}

/// The request's own references (agent, user, action, resource): required,
/// and bounded in length.
fn principal_uid(field: &str, uid: Option<&pb::EntityUid>) -> Result<EntityUid, RequestError> {
    if let Some(uid) = uid {
        for (part, text) in [("type", &uid.r#type), ("id", &uid.id)] {
            if text.len() > MAX_ENTITY_ID_LEN {
                return Err(RequestError::new(
                    format!("{field}.{part}"),
                    format!(
                        "{} bytes; at most {MAX_ENTITY_ID_LEN} are accepted",
                        text.len()
                    ),
                ));
            }
        }
    }
    entity_uid(field, uid)
}

pub fn request(req: &pb::IsAuthorizedRequest) -> Result<AuthzRequest, RequestError> {
    if req.request_id.len() > MAX_REQUEST_ID_LEN {
        return Err(RequestError::new(
            "request_id",
            format!("longer than {MAX_REQUEST_ID_LEN} bytes"),
        ));
    }
    let principal = req
        .principal
        .as_ref()
        .ok_or_else(|| RequestError::new("principal", "required"))?;
    let agent = principal_uid("principal.agent", principal.agent.as_ref())?;
    let on_behalf_of = match &principal.on_behalf_of {
        Some(user) => Some(principal_uid("principal.on_behalf_of", Some(user))?),
        None => None,
    };
    if on_behalf_of.as_ref() == Some(&agent) {
        return Err(RequestError::new(
            "principal.on_behalf_of",
            "names the agent itself; leave it out for an agent acting on its own",
        ));
    }
    let action = principal_uid("action", req.action.as_ref())?;
    let resource = principal_uid("resource", req.resource.as_ref())?;

    use pb::is_authorized_request::{ContextInput as C, EntitiesInput as E};
    let context = match &req.context_input {
        None => ContextInput::Empty,
        Some(C::ContextJson(text)) => ContextInput::Json(context_json(text)?),
        Some(C::Context(record)) => {
            let mut pairs = Vec::with_capacity(record.fields.len());
            let mut shape = Shape::new();
            let root = FieldPath::Root("context");
            for (name, v) in &record.fields {
                shape.field(name);
                let path = FieldPath::Field(&root, name);
                pairs.push((name.clone(), value(&path, v, 1, &mut shape)?));
            }
            ContextInput::Typed(pairs, shape)
        }
    };
    let entities = match &req.entities_input {
        None => EntitiesInput::None,
        Some(E::EntitiesJson(text)) => EntitiesInput::Json(entities_json(text)?),
        Some(E::Entities(list)) => {
            if list.entities.len() > MAX_REQUEST_ENTITIES {
                return Err(too_many_entities("entities.entities", list.entities.len()));
            }
            let mut out = Vec::with_capacity(list.entities.len());
            for (i, e) in list.entities.iter().enumerate() {
                out.push(entity(&format!("entities.entities[{i}]"), e)?);
            }
            EntitiesInput::Typed(out)
        }
    };
    if req.grants.len() > MAX_GRANTS {
        return Err(RequestError::new(
            "grants",
            format!("{} grants; at most {MAX_GRANTS} are read", req.grants.len()),
        ));
    }
    if let Some((i, _)) = req
        .grants
        .iter()
        .enumerate()
        .find(|(_, g)| g.len() > MAX_GRANT_BYTES)
    {
        return Err(RequestError::new(
            format!("grants[{i}]"),
            format!("longer than {MAX_GRANT_BYTES} bytes; a leash grant is a few hundred"),
        ));
    }
    Ok(AuthzRequest {
        agent,
        on_behalf_of,
        action,
        resource,
        context,
        entities,
        grants: req.grants.clone(),
    })
}

/// Most entities one request may bring. Cedar computes every entity's
/// ancestors when it takes them, so a long chain of parents among them
/// costs time and memory that grow with the square of their number; a
/// request brings its resource and a few related entities.
pub const MAX_REQUEST_ENTITIES: usize = 500;

fn too_many_entities(field: &str, count: usize) -> RequestError {
    RequestError::new(
        field,
        format!("{count} entities; a request may bring at most {MAX_REQUEST_ENTITIES}"),
    )
}

/// Where a value sits in the request, written out only for an error:
/// writing it for every value would cost time that grows with the square of
/// the input (a long field name times many set members).
#[derive(Clone, Copy)]
enum FieldPath<'a> {
    Root(&'a str),
    Field(&'a FieldPath<'a>, &'a str),
    Index(&'a FieldPath<'a>, usize),
}

impl FieldPath<'_> {
    fn render(&self) -> String {
        match self {
            Self::Root(root) => (*root).to_owned(),
            Self::Field(parent, name) => format!("{}.{name}", parent.render()),
            Self::Index(parent, i) => format!("{}[{i}]", parent.render()),
        }
    }
}

/// Most grants one request may present.
const MAX_GRANTS: usize = 8;
/// Longest grant read.
const MAX_GRANT_BYTES: usize = 4096;

/// Entity type names parsed before, by their text. Cedar parses a name
/// with its full grammar, building a fresh lexer automaton each time (tens
/// of microseconds); a deployment has a handful of entity types, so a
/// request's names are nearly always here.
static TYPE_NAMES: std::sync::LazyLock<std::sync::RwLock<HashMap<String, EntityTypeName>>> =
    std::sync::LazyLock::new(Default::default);

/// Names kept at most: callers choose the text, so the cache is bounded;
/// past it, names are parsed each time.
const TYPE_NAMES_KEPT: usize = 1024;

/// `text` as an entity type name, or `None` if it is not a valid one.
pub(crate) fn type_name(text: &str) -> Option<EntityTypeName> {
    if let Some(known) = TYPE_NAMES
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(text)
    {
        return Some(known.clone());
    }
    let parsed = EntityTypeName::from_str(text).ok()?;
    let mut names = TYPE_NAMES
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if names.len() < TYPE_NAMES_KEPT {
        names.insert(text.to_owned(), parsed.clone());
    }
    Some(parsed)
}

/// Cedar's extension constructors that a request may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extension {
    Ip,
    Decimal,
    Datetime,
    Duration,
}

impl Extension {
    const ALL: [Self; 4] = [Self::Ip, Self::Decimal, Self::Datetime, Self::Duration];

    /// The constructor called `name`.
    pub(crate) fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Decimal => "decimal",
            Self::Datetime => "datetime",
            Self::Duration => "duration",
        }
    }

    /// Cedar's public constructor: parses the constructor's name each call.
    fn public(self, arg: &str) -> RestrictedExpression {
        match self {
            Self::Ip => RestrictedExpression::new_ip(arg),
            Self::Decimal => RestrictedExpression::new_decimal(arg),
            Self::Datetime => RestrictedExpression::new_datetime(arg),
            Self::Duration => RestrictedExpression::new_duration(arg),
        }
    }
}

/// The constructors' names, parsed once. Cedar's public constructors parse
/// the name (`decimal`, `datetime`, ...) with a freshly built lexer on every
/// call: `leash bench` measured that at 8% of the sidecar's CPU under load.
static EXTENSION_NAMES: std::sync::LazyLock<[Option<cedar_policy_core::ast::Name>; 4]> =
    std::sync::LazyLock::new(|| {
        Extension::ALL.map(|e| {
            e.name()
                .parse::<cedar_policy_core::ast::UnreservedId>()
                .ok()
                .map(cedar_policy_core::ast::Name::unqualified_name)
        })
    });

/// The call `kind(arg)` as a value of a context or attribute: the same
/// expression Cedar's public constructor builds (a test holds them equal),
/// without parsing the name again. Like Cedar's, it does not check `arg`:
/// evaluating the context does, and a bad one is an error naming the field.
pub(crate) fn extension(kind: Extension, arg: &str) -> RestrictedExpression {
    use cedar_policy_core::ast::RestrictedExpr;
    match &EXTENSION_NAMES[kind as usize] {
        Some(name) => RestrictedExpression::from(RestrictedExpr::call_extension_fn(
            name.clone(),
            [RestrictedExpr::val(arg)],
        )),
        None => kind.public(arg),
    }
}

pub fn entity_uid(field: &str, uid: Option<&pb::EntityUid>) -> Result<EntityUid, RequestError> {
    entity_uid_at(&FieldPath::Root(field), uid)
}

fn entity_uid_at(
    field: &FieldPath<'_>,
    uid: Option<&pb::EntityUid>,
) -> Result<EntityUid, RequestError> {
    let uid = uid.ok_or_else(|| RequestError::new(field.render(), "required"))?;
    if uid.r#type.is_empty() {
        return Err(RequestError::new(
            FieldPath::Field(field, "type").render(),
            "required (an entity type such as `User`)",
        ));
    }
    let type_name = type_name(&uid.r#type).ok_or_else(|| {
        RequestError::new(
            FieldPath::Field(field, "type").render(),
            format!("`{}` is not a valid entity type name", uid.r#type),
        )
    })?;
    Ok(EntityUid::from_type_name_and_id(
        type_name,
        EntityId::new(&uid.id),
    ))
}

/// A typed value, its shape written to `shape`.
fn value(
    path: &FieldPath<'_>,
    v: &pb::Value,
    depth: usize,
    shape: &mut Shape,
) -> Result<RestrictedExpression, RequestError> {
    if depth > MAX_VALUE_DEPTH {
        return Err(RequestError::new(
            path.render(),
            format!("values nest deeper than {MAX_VALUE_DEPTH} levels"),
        ));
    }
    use pb::value::Kind;
    let kind = v
        .kind
        .as_ref()
        .ok_or_else(|| RequestError::new(path.render(), "value has no kind set"))?;
    Ok(match kind {
        Kind::Bool(b) => {
            shape.bool();
            RestrictedExpression::new_bool(*b)
        }
        Kind::Long(n) => {
            shape.long();
            RestrictedExpression::new_long(*n)
        }
        Kind::String(s) => {
            shape.string();
            RestrictedExpression::new_string(s.clone())
        }
        Kind::Entity(uid) => {
            let uid = entity_uid_at(path, Some(uid))?;
            shape.entity(&uid);
            RestrictedExpression::new_entity_uid(uid)
        }
        Kind::Set(set) => {
            let mut items = Vec::with_capacity(set.values.len());
            shape.open_set();
            for (i, item) in set.values.iter().enumerate() {
                items.push(value(&FieldPath::Index(path, i), item, depth + 1, shape)?);
            }
            shape.close_set();
            RestrictedExpression::new_set(items)
        }
        Kind::Record(record) => {
            let mut fields = Vec::with_capacity(record.fields.len());
            shape.open_record();
            for (name, item) in &record.fields {
                shape.field(name);
                let item_path = FieldPath::Field(path, name);
                fields.push((name.clone(), value(&item_path, item, depth + 1, shape)?));
            }
            shape.close_record();
            RestrictedExpression::new_record(fields)
                .map_err(|e| RequestError::new(path.render(), crate::bundle::cedar_message(&e)))?
        }
        Kind::Extension(ext) => {
            // `ipaddr`, the extension's name, is taken for `ip` in typed values.
            let name = if ext.r#fn == "ipaddr" {
                "ip"
            } else {
                ext.r#fn.as_str()
            };
            let Some(kind) = Extension::named(name) else {
                return Err(RequestError::new(
                    FieldPath::Field(path, "fn").render(),
                    format!(
                        "unknown extension constructor `{}`; expected `ip`, `decimal`, \
                         `datetime` or `duration`",
                        ext.r#fn
                    ),
                ));
            };
            typed_extension(kind, &ext.arg, shape)
        }
    })
}

fn typed_extension(kind: Extension, arg: &str, shape: &mut Shape) -> RestrictedExpression {
    shape.extension(kind.name());
    extension(kind, arg)
}

fn entity(path: &str, e: &pb::Entity) -> Result<Entity, RequestError> {
    let uid = entity_uid(&format!("{path}.uid"), e.uid.as_ref())?;
    let root = FieldPath::Root(path);
    let attrs_path = FieldPath::Field(&root, "attrs");
    let mut attrs = Vec::with_capacity(e.attrs.len());
    for (name, v) in &e.attrs {
        // An entity's attributes are not checked by shape: theirs is unused.
        let unused = &mut Shape::new();
        let attr = FieldPath::Field(&attrs_path, name);
        attrs.push((name.clone(), value(&attr, v, 1, unused)?));
    }
    let mut parents = Vec::with_capacity(e.parents.len());
    for (i, p) in e.parents.iter().enumerate() {
        parents.push(entity_uid(&format!("{path}.parents[{i}]"), Some(p))?);
    }
    let tags_path = FieldPath::Field(&root, "tags");
    let mut tags = Vec::with_capacity(e.tags.len());
    for (name, v) in &e.tags {
        let unused = &mut Shape::new();
        let tag = FieldPath::Field(&tags_path, name);
        tags.push((name.clone(), value(&tag, v, 1, unused)?));
    }
    Entity::new_with_tags(uid, attrs, parents, tags)
        .map_err(|err| RequestError::new(path, crate::bundle::cedar_message(&err)))
}

/// Parses `text`, refusing values nested deeper than [`MAX_VALUE_DEPTH`]
/// levels below `wrapping` levels of the document's own structure.
fn parse_json(field: &str, text: &str, wrapping: usize) -> Result<Value, RequestError> {
    let json: Value = serde_json::from_str(text).map_err(|e| {
        RequestError::new(
            field,
            format!(
                "malformed JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let depth = json_depth(&json).saturating_sub(wrapping);
    if depth > MAX_VALUE_DEPTH {
        return Err(RequestError::new(
            field,
            format!("values nest deeper than {MAX_VALUE_DEPTH} levels"),
        ));
    }
    Ok(json)
}

fn context_json(text: &str) -> Result<serde_json::Map<String, Value>, RequestError> {
    match parse_json("context_json", text, 0)? {
        Value::Object(map) => Ok(map),
        _ => Err(RequestError::new(
            "context_json",
            "must be a JSON object (a Cedar record)",
        )),
    }
}

fn entities_json(text: &str) -> Result<Vec<Value>, RequestError> {
    // An entities file holds an array of entity objects, whose `attrs` and
    // `tags` objects hold the values: two levels more than a context's
    // values sit below, and not counted against the entities' values, so
    // they may nest as deep as typed entities' values may.
    match parse_json("entities_json", text, 2)? {
        Value::Array(items) if items.len() > MAX_REQUEST_ENTITIES => {
            Err(too_many_entities("entities_json", items.len()))
        }
        Value::Array(items) => Ok(items),
        _ => Err(RequestError::new(
            "entities_json",
            "must be a JSON array of entities, as in a Cedar entities file",
        )),
    }
}

/// Nesting of Cedar values in a JSON document, counted as the typed form
/// counts it: a set or record is one level; an `__entity`/`__extn` escape
/// (an object with that one key) is a single value, though what it holds
/// is still counted, so an escape key cannot hide deeper nesting beside it.
fn json_depth(v: &Value) -> usize {
    // Iterative, so that a hostile document cannot overflow the stack here.
    let mut max = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        max = max.max(depth);
        if max > MAX_VALUE_DEPTH + 2 {
            break;
        }
        match v {
            Value::Object(map)
                if map.len() == 1
                    && (map.contains_key("__entity") || map.contains_key("__extn")) =>
            {
                for inner in map.values() {
                    match inner {
                        Value::Object(fields) => stack.extend(fields.values().map(|c| (c, depth))),
                        other => stack.push((other, depth)),
                    }
                }
            }
            Value::Object(map) => stack.extend(map.values().map(|c| (c, depth + 1))),
            Value::Array(items) => stack.extend(items.iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_uid_names_the_field() {
        let err = entity_uid("principal.agent", None).expect_err("missing");
        assert_eq!(err.to_string(), "principal.agent: required");
        let bad = pb::EntityUid {
            r#type: "Not A Type".into(),
            id: "x".into(),
        };
        let err = entity_uid("resource", Some(&bad)).expect_err("bad type");
        assert_eq!(
            err.to_string(),
            "resource.type: `Not A Type` is not a valid entity type name"
        );
    }

    /// Guards the Cedar pin: our constructor must build exactly what Cedar's
    /// public one does, valid argument or not.
    #[test]
    fn extension_values_equal_cedars_own() {
        let args = [
            "12.34",
            "-0.0001",
            "10.0.0.1",
            "10.0.0.0/8",
            "::1",
            "2026-01-31",
            "2026-01-31T12:00:00.000Z",
            "1h30m",
            "-2d",
            "",
            "not a value",
        ];
        for kind in Extension::ALL {
            for arg in args {
                assert_eq!(
                    extension(kind, arg),
                    kind.public(arg),
                    "{}({arg:?})",
                    kind.name()
                );
            }
        }
    }

    #[test]
    fn depth_counts_records_and_sets_not_escapes() {
        let v: Value =
            serde_json::from_str(r#"{"a": {"b": [1, {"__entity": {"type": "U", "id": "x"}}]}}"#)
                .expect("json");
        assert_eq!(json_depth(&v), 3);
    }

    #[test]
    fn deep_typed_values_are_refused() {
        let mut v = pb::Value {
            kind: Some(pb::value::Kind::Long(1)),
        };
        for _ in 0..MAX_VALUE_DEPTH + 1 {
            v = pb::Value {
                kind: Some(pb::value::Kind::Set(pb::ValueSet { values: vec![v] })),
            };
        }
        let err =
            value(&FieldPath::Root("context.x"), &v, 1, &mut Shape::new()).expect_err("too deep");
        assert!(err.problem.contains("deeper than 32"), "{err}");
        assert_eq!(
            err.field,
            format!("context.x{}", "[0]".repeat(MAX_VALUE_DEPTH))
        );
    }

    /// A value may nest as deep in an entity's attributes as in the
    /// context: the entities array and each entity's `attrs` object are
    /// the document's structure, not the value's.
    #[test]
    fn entity_attributes_nest_as_deep_as_context_values() {
        let nested = |k: usize| format!("{}1{}", "[".repeat(k), "]".repeat(k));
        let context = |k: usize| context_json(&format!(r#"{{"x": {}}}"#, nested(k)));
        let entities = |k: usize| {
            entities_json(&format!(
                r#"[{{"uid": {{"type": "T", "id": "t"}}, "attrs": {{"x": {}}}, "parents": []}}]"#,
                nested(k)
            ))
        };
        let deepest = MAX_VALUE_DEPTH - 1;
        assert!(context(deepest).is_ok());
        assert!(entities(deepest).is_ok());
        for err in [
            context(deepest + 1).expect_err("too deep"),
            entities(deepest + 1).expect_err("too deep"),
        ] {
            assert!(err.problem.contains("deeper than 32"), "{err}");
        }
    }

    #[test]
    fn an_escape_key_does_not_hide_nesting_beside_it() {
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        for text in [
            format!(r#"{{"__extn": 0, "a": {deep}}}"#),
            format!(r#"{{"__entity": {{"type": "U", "id": "x", "more": {deep}}}}}"#),
            format!(r#"{{"__extn": {deep}}}"#),
        ] {
            let v: Value = serde_json::from_str(&text).expect("json");
            assert!(json_depth(&v) > MAX_VALUE_DEPTH, "{text}");
        }
    }

    #[test]
    fn paths_name_the_value_at_fault() {
        use pb::value::Kind;
        let bad = pb::Value {
            kind: Some(Kind::Extension(pb::ExtensionValue {
                r#fn: "sqrt".into(),
                arg: "2".into(),
            })),
        };
        let record = pb::Value {
            kind: Some(Kind::Record(pb::Record {
                fields: [("k".to_owned(), bad)].into_iter().collect(),
            })),
        };
        let ok = pb::Value {
            kind: Some(Kind::Bool(true)),
        };
        let set = pb::Value {
            kind: Some(Kind::Set(pb::ValueSet {
                values: vec![ok, record],
            })),
        };
        let root = FieldPath::Root("context");
        let err = value(&FieldPath::Field(&root, "x"), &set, 1, &mut Shape::new())
            .expect_err("unknown constructor");
        assert_eq!(err.field, "context.x[1].k.fn");
        let no_type = pb::Value {
            kind: Some(Kind::Entity(pb::EntityUid::default())),
        };
        let err = value(
            &FieldPath::Root("entities.entities[0].attrs.owner"),
            &no_type,
            1,
            &mut Shape::new(),
        )
        .expect_err("no type");
        assert_eq!(err.field, "entities.entities[0].attrs.owner.type");
    }

    #[test]
    fn a_request_brings_a_bounded_number_of_entities() {
        let one = r#"{"uid": {"type": "T", "id": "x"}, "attrs": {}, "parents": []}"#;
        let at_most = format!("[{}]", vec![one; MAX_REQUEST_ENTITIES].join(","));
        assert_eq!(
            entities_json(&at_most).expect("at the limit").len(),
            MAX_REQUEST_ENTITIES
        );
        let over = format!("[{}]", vec![one; MAX_REQUEST_ENTITIES + 1].join(","));
        let err = entities_json(&over).expect_err("over the limit");
        assert_eq!(
            err.to_string(),
            format!(
                "entities_json: 501 entities; a request may bring at most {MAX_REQUEST_ENTITIES}"
            )
        );
    }
}
