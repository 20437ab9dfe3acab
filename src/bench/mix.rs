//! Request mixes for bundles the generator did not make: a JSON-lines file
//! (one `leash check`-style request per line), or the built-in mix for the
//! example bundle. Each request is also turned into the typed input form, so
//! both forms can be measured on any bundle.

use std::collections::BTreeMap;
use std::str::FromStr;

use cedar_policy::EntityUid;
use serde_json::Value;

use super::workload::RequestForms;
use super::BenchError;
use crate::proto::v1 as pb;

/// The mix for the example bundle: the README's walk-through and seed 001's
/// capability matrix, allows and denies, delegated and autonomous.
pub const EXAMPLE_MIX: &str = include_str!("example-requests.jsonl");

/// Parses a JSON-lines mix. `origin` names the file in messages.
///
/// Each line: `{"agent": "Agent::\"a\"", "user": "User::\"u\"" (optional),
/// "action": "...", "resource": "...", "context": {...} (optional),
/// "entities": [...] (optional)}`; blank lines and lines starting with `#`
/// are skipped.
pub fn parse(origin: &str, text: &str) -> Result<Vec<RequestForms>, BenchError> {
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |problem: String| BenchError::Mix {
            origin: origin.to_owned(),
            line: n + 1,
            problem,
        };
        let value: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let forms = request(&value, requests.len()).map_err(at)?;
        requests.push(forms);
    }
    if requests.is_empty() {
        return Err(BenchError::Mix {
            origin: origin.to_owned(),
            line: 0,
            problem: "holds no requests".to_owned(),
        });
    }
    Ok(requests)
}

fn request(value: &Value, index: usize) -> Result<RequestForms, String> {
    use pb::is_authorized_request::{ContextInput, EntitiesInput};
    let object = value
        .as_object()
        .ok_or_else(|| "a request must be a JSON object".to_owned())?;
    let uid = |field: &str, required: bool| -> Result<Option<pb::EntityUid>, String> {
        match object.get(field) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(format!("`{field}` is missing")),
            Some(Value::String(text)) => entity_ref(text).map(Some).map_err(|()| {
                format!("`{field}`: `{text}` is not an entity reference such as `User::\"alice\"`")
            }),
            Some(_) => Err(format!(
                "`{field}` must be a string such as `User::\"alice\"`"
            )),
        }
    };
    for key in object.keys() {
        if !["agent", "user", "action", "resource", "context", "entities"].contains(&key.as_str()) {
            return Err(format!("`{key}` is not a request field"));
        }
    }
    let base = pb::IsAuthorizedRequest {
        request_id: format!("bench-{index}"),
        principal: Some(pb::Principal {
            agent: uid("agent", true)?,
            on_behalf_of: uid("user", false)?,
        }),
        action: uid("action", true)?,
        resource: uid("resource", true)?,
        ..Default::default()
    };
    let context = match object.get("context") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => Some(map),
        Some(_) => return Err("`context` must be a JSON object".to_owned()),
    };
    let entities = match object.get("entities") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(items),
        Some(_) => return Err("`entities` must be a JSON array".to_owned()),
    };
    let json = pb::IsAuthorizedRequest {
        context_input: context
            .map(|c| ContextInput::ContextJson(Value::Object(c.clone()).to_string())),
        entities_input: entities
            .map(|e| EntitiesInput::EntitiesJson(Value::Array(e.clone()).to_string())),
        ..base.clone()
    };
    let typed_context = context
        .map(|c| record(c, "context", 0).map(|fields| ContextInput::Context(pb::Record { fields })))
        .transpose()?;
    let typed_entities = entities
        .map(|items| {
            items
                .iter()
                .enumerate()
                .map(|(i, e)| entity(e, &format!("entities[{i}]")))
                .collect::<Result<Vec<_>, _>>()
                .map(|entities| EntitiesInput::Entities(pb::EntityList { entities }))
        })
        .transpose()?;
    let typed = pb::IsAuthorizedRequest {
        context_input: typed_context,
        entities_input: typed_entities,
        ..base
    };
    Ok(RequestForms { json, typed })
}

fn entity_ref(text: &str) -> Result<pb::EntityUid, ()> {
    let uid = EntityUid::from_str(text).map_err(|_| ())?;
    Ok(pb::EntityUid {
        r#type: uid.type_name().to_string(),
        id: uid.id().unescaped().to_owned(),
    })
}

/// A `{"type", "id"}` object.
fn uid_object(value: &Value, at: &str) -> Result<pb::EntityUid, String> {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("`{at}` needs string fields `type` and `id`"))
    };
    Ok(pb::EntityUid {
        r#type: field("type")?,
        id: field("id")?,
    })
}

fn record(
    map: &serde_json::Map<String, Value>,
    at: &str,
    depth: usize,
) -> Result<BTreeMap<String, pb::Value>, String> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), typed_value(v, &format!("{at}.{k}"), depth + 1)?)))
        .collect()
}

/// Cedar JSON → typed value. Entity references and extension values must
/// use the explicit `__entity` / `__extn` escapes: without the schema a plain
/// string cannot be told from an implicit one.
fn typed_value(value: &Value, at: &str, depth: usize) -> Result<pb::Value, String> {
    use pb::value::Kind;
    if depth > crate::service::convert::MAX_VALUE_DEPTH {
        return Err(format!("`{at}` is nested too deeply"));
    }
    let kind = match value {
        Value::Bool(b) => Kind::Bool(*b),
        Value::Number(n) => Kind::Long(
            n.as_i64()
                .ok_or_else(|| format!("`{at}`: {n} is not a 64-bit integer"))?,
        ),
        Value::String(s) => Kind::String(s.clone()),
        Value::Array(items) => Kind::Set(pb::ValueSet {
            values: items
                .iter()
                .enumerate()
                .map(|(i, v)| typed_value(v, &format!("{at}[{i}]"), depth + 1))
                .collect::<Result<_, _>>()?,
        }),
        Value::Object(map) => {
            if let Some(e) = map.get("__entity") {
                Kind::Entity(uid_object(e, at)?)
            } else if let Some(x) = map.get("__extn") {
                let part = |name: &str| {
                    x.get(name)
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| format!("`{at}.__extn` needs string fields `fn` and `arg`"))
                };
                Kind::Extension(pb::ExtensionValue {
                    r#fn: part("fn")?,
                    arg: part("arg")?,
                })
            } else {
                Kind::Record(pb::Record {
                    fields: record(map, at, depth)?,
                })
            }
        }
        Value::Null => return Err(format!("`{at}` is null; Cedar has no null")),
    };
    Ok(pb::Value { kind: Some(kind) })
}

fn entity(value: &Value, at: &str) -> Result<pb::Entity, String> {
    let uid = uid_object(
        value
            .get("uid")
            .ok_or_else(|| format!("`{at}.uid` is missing"))?,
        &format!("{at}.uid"),
    )?;
    let attrs = match value.get("attrs") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => record(m, &format!("{at}.attrs"), 0)?,
        Some(_) => return Err(format!("`{at}.attrs` must be an object")),
    };
    let tags = match value.get("tags") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => record(m, &format!("{at}.tags"), 0)?,
        Some(_) => return Err(format!("`{at}.tags` must be an object")),
    };
    let parents = match value.get("parents") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, p)| uid_object(p, &format!("{at}.parents[{i}]")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(format!("`{at}.parents` must be an array")),
    };
    Ok(pb::Entity {
        uid: Some(uid),
        attrs,
        parents,
        tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_mix_parses_in_both_forms() {
        let mix = parse("example", EXAMPLE_MIX).expect("parses");
        assert!(mix.len() >= 10, "{}", mix.len());
        assert!(mix.iter().any(|r| r
            .json
            .principal
            .as_ref()
            .is_some_and(|p| p.on_behalf_of.is_none())));
    }

    #[test]
    fn bad_lines_are_named() {
        let err = parse("mix.jsonl", "\n{\"agent\": \"Agent::\\\"a\\\"\"}\n").expect_err("refused");
        assert_eq!(err.to_string(), "mix.jsonl:2: `action` is missing");
        let err = parse("mix.jsonl", "{\"agent\": \"nope\", \"action\": \"Action::\\\"x\\\"\", \"resource\": \"R::\\\"r\\\"\"}")
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "mix.jsonl:1: `agent`: `nope` is not an entity reference such as `User::\"alice\"`"
        );
        let err = parse("mix.jsonl", "# only a comment\n").expect_err("refused");
        assert_eq!(err.to_string(), "mix.jsonl: holds no requests");
    }
}
