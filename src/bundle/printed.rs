//! Cedar's printed forms of entity references, type names and policy ids,
//! written directly rather than through `Display`: each decision prints
//! them for its answer, deny line, audit record and span, and the
//! formatting machinery cost about 2,000 instructions for each. The tests
//! hold every form equal to Cedar's `Display`.

/// `uid` as Cedar prints it: `Type::"id"`, the id escaped as Cedar
/// escapes it.
pub fn uid_text(uid: &cedar_policy::EntityUid) -> String {
    let id = uid.id().unescaped();
    let mut out = String::with_capacity(id.len() + 32);
    push_type_name(&mut out, uid.type_name());
    out.push_str("::\"");
    push_escaped(&mut out, id);
    out.push('"');
    out
}

/// A policy id as Cedar prints it: escaped, so an id cannot break a text
/// log line.
pub fn policy_id_text(id: &cedar_policy::PolicyId) -> String {
    let id: &str = id.as_ref();
    let mut out = String::with_capacity(id.len());
    push_escaped(&mut out, id);
    out
}

/// An entity type's name as Cedar prints it, `Namespace::Type`.
pub fn push_type_name(out: &mut String, ty: &cedar_policy::EntityTypeName) {
    for part in ty.namespace_components() {
        out.push_str(part);
        out.push_str("::");
    }
    out.push_str(ty.basename());
}

/// `text` escaped as Cedar escapes ids (`str::escape_debug`), which leaves
/// printable ASCII other than quotes and backslashes as it is.
fn push_escaped(out: &mut String, text: &str) {
    if text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && !matches!(b, b'"' | b'\'' | b'\\'))
    {
        out.push_str(text);
    } else {
        out.extend(text.escape_debug());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::{EntityId, EntityTypeName, EntityUid, PolicyId};
    use std::str::FromStr as _;

    const IDS: &[&str] = &[
        "alice",
        "",
        "with space",
        "a\"quote",
        "it's",
        "back\\slash",
        "new\nline",
        "tab\there",
        "del\u{7f}",
        "nul\u{0}",
        "caf\u{e9}",
        "\u{301}combining first",
        "e\u{301}",
        "emoji \u{1F600}",
        "zero\u{200b}width",
        "~!@#$%^&*()_+-=[]{}|;:,.<>/?`",
    ];

    #[test]
    fn entity_references_print_as_cedar_prints_them() {
        for ty in ["User", "Acme::User", "A::B::C::Doc"] {
            let ty = EntityTypeName::from_str(ty).expect("type name");
            let mut name = String::new();
            push_type_name(&mut name, &ty);
            assert_eq!(name, ty.to_string());
            for id in IDS {
                let uid = EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id));
                assert_eq!(uid_text(&uid), uid.to_string(), "{id:?}");
            }
        }
    }

    #[test]
    fn every_ascii_character_is_escaped_as_cedar_escapes_it() {
        let ty = EntityTypeName::from_str("User").expect("type name");
        for c in (0u8..=0x7f).map(char::from) {
            for id in [c.to_string(), format!("a{c}b")] {
                let uid = EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(&id));
                assert_eq!(uid_text(&uid), uid.to_string(), "{id:?}");
                let policy = PolicyId::new(&id);
                assert_eq!(policy_id_text(&policy), policy.to_string(), "{id:?}");
            }
        }
    }

    #[test]
    fn policy_ids_print_as_cedar_prints_them() {
        for id in IDS {
            let id = PolicyId::new(id);
            assert_eq!(policy_id_text(&id), id.to_string(), "{id:?}");
        }
    }
}
