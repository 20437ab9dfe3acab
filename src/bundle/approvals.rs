//! Human approval gates, declared on the permit they gate:
//!
//! ```cedar
//! @id("billing-agent-refunds")
//! @approval("required")
//! permit (principal == Agent::"billing-agent", action == Action::"payments:refund", resource);
//! ```
//!
//! When the policies allow and a determining permit carries
//! `@approval("required")`, the decision is APPROVAL_REQUIRED instead of
//! ALLOW ([`crate::engine::approval_gate`]).
//!
//! leash's annotations are checked here too: `@approval` with any other
//! value, on a forbid, or an annotation one or two letters away from one of
//! leash's (`@aproval`, `@rates`, `@limitkey`) refuses the bundle, so a typo
//! can never silently drop a gate or a limit.

use std::collections::{BTreeMap, HashSet};

use cedar_policy::{Effect, PolicySet};

use super::{Diagnostic, PolicyOrigin};

/// Every annotation leash reads (`@id` is Cedar's own, used for policy ids).
pub const LEASH_ANNOTATIONS: [&str; 5] = ["approval", "rate", "budget", "cost", "limit_key"];

/// The permits whose allowances need a human's approval.
#[derive(Debug, Clone, Default)]
pub struct Gates {
    gated: HashSet<String>,
}

impl Gates {
    pub fn is_empty(&self) -> bool {
        self.gated.is_empty()
    }

    pub fn len(&self) -> usize {
        self.gated.len()
    }

    /// Whether `policy_id` carries `@approval("required")`.
    pub fn requires_approval(&self, policy_id: &str) -> bool {
        self.gated.contains(policy_id)
    }

    /// Reads `@approval` on every policy and template of `set`, and refuses
    /// near-misses of leash's annotation names; every problem becomes a
    /// diagnostic naming the policy's file.
    pub fn scan(
        set: &PolicySet,
        origins: &BTreeMap<String, PolicyOrigin>,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Self {
        let mut gates = Self::default();
        // A linked policy carries its template's annotations, which are
        // reported once, on the template.
        let annotated = set
            .policies()
            .map(|p| {
                let names: Vec<String> = p.annotations().map(|(k, _)| k.to_owned()).collect();
                (
                    p.id().to_string(),
                    p.effect(),
                    p.annotation("approval").map(str::to_owned),
                    names,
                    p.is_static(),
                )
            })
            .chain(set.templates().map(|t| {
                let names: Vec<String> = t.annotations().map(|(k, _)| k.to_owned()).collect();
                (
                    t.id().to_string(),
                    t.effect(),
                    t.annotation("approval").map(str::to_owned),
                    names,
                    true,
                )
            }));
        for (id, effect, approval, names, own) in annotated {
            let mut problems = Vec::new();
            for name in &names {
                if let Some(meant) = near_miss(name) {
                    problems.push(format!(
                        "annotation `@{name}` is not one of leash's; did you mean `@{meant}`? \
                         (leash reads {})",
                        LEASH_ANNOTATIONS.map(|a| format!("`@{a}`")).join(", ")
                    ));
                }
            }
            match approval.as_deref() {
                None => {}
                Some("required") if effect == Effect::Permit => {
                    gates.gated.insert(id.clone());
                }
                Some("required") => problems.push(
                    "`@approval` belongs on permits: a forbid allows nothing to approve".to_owned(),
                ),
                Some(other) => problems.push(format!(
                    "`@approval(\"{other}\")`: expected `@approval(\"required\")`"
                )),
            }
            if own {
                let file = origins.get(&id).map(|o| o.file.as_str());
                for problem in problems {
                    diagnostics.push(Diagnostic::plain(file, format!("policy `{id}`: {problem}")));
                }
            }
        }
        gates
    }
}

/// The leash annotation `name` is probably a typo of: the same but for case,
/// or with the same first letter and one edit away (two for
/// the longer `approval` and `limit_key`). The first-letter rule keeps
/// common words such as `@date` (one edit from `rate`) usable.
fn near_miss(name: &str) -> Option<&'static str> {
    if LEASH_ANNOTATIONS.contains(&name) || name == "id" {
        return None;
    }
    let folded = name.to_ascii_lowercase();
    LEASH_ANNOTATIONS.into_iter().find(|known| {
        let allowed = if known.len() > 6 { 2 } else { 1 };
        folded == *known
            || (folded.chars().next() == known.chars().next() && edits(&folded, known) <= allowed)
    })
}

/// Levenshtein distance, for short names.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j] + 1).min(row[j + 1] + 1).min(prev + cost);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(src: &str) -> (Gates, Vec<String>) {
        let set = crate::bundle::numbered_policies(src);
        let mut diagnostics = Vec::new();
        let gates = Gates::scan(&set, &Default::default(), &mut diagnostics);
        (gates, diagnostics.into_iter().map(|d| d.message).collect())
    }

    #[test]
    fn reads_gates() {
        let (gates, problems) = scan(
            r#"@approval("required") permit (principal, action, resource);
               @description("not leash's, left alone") permit (principal, action, resource);"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(gates.requires_approval("p0"));
        assert!(!gates.requires_approval("p1"));
        assert_eq!(gates.len(), 1);
    }

    #[test]
    fn typos_and_malformed_gates_are_refused() {
        for (src, expected) in [
            (r#"@aproval("required")"#, "did you mean `@approval`"),
            (r#"@Approval("required")"#, "did you mean `@approval`"),
            (r#"@approvals("required")"#, "did you mean `@approval`"),
            (r#"@rates("1/day")"#, "did you mean `@rate`"),
            (r#"@limitkey("agent")"#, "did you mean `@limit_key`"),
            (r#"@budgt("1/day")"#, "did you mean `@budget`"),
            (r#"@approval("yes")"#, "expected `@approval(\"required\")`"),
            (r#"@approval"#, "expected `@approval(\"required\")`"),
        ] {
            let (gates, problems) = scan(&format!("{src} permit (principal, action, resource);"));
            assert!(gates.is_empty(), "{src}");
            assert_eq!(problems.len(), 1, "{src}: {problems:?}");
            assert!(problems[0].contains(expected), "{src}: {}", problems[0]);
        }
        let (_, problems) = scan(r#"@approval("required") forbid (principal, action, resource);"#);
        assert!(problems[0].contains("belongs on permits"), "{problems:?}");
    }

    #[test]
    fn unrelated_annotations_are_not_typos() {
        for name in [
            "description",
            "owner",
            "ticket",
            "reason",
            "costs_center",
            "note",
            "date",
            "host",
            "budgeted_by",
        ] {
            assert_eq!(near_miss(name), None, "{name}");
        }
    }
}
