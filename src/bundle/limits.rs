//! Rate and budget limits, declared on permits next to the policy they limit:
//!
//! ```cedar
//! @id("billing-agent-invoices-create")
//! @rate("20/minute")
//! @budget("2500000/day")
//! @cost("amount_cents")
//! permit (principal == Agent::"billing-agent", action == Action::"invoices:create", resource);
//! ```
//!
//! - `@rate("N/unit")`: at most N allowed decisions per window;
//! - `@budget("N/unit")` with `@cost("attr")`: the sum of the top-level
//!   `Long` or `decimal` context attribute `attr` over allowed decisions
//!   stays within N per window, in the attribute's own unit (`2500000/day`
//!   of `amount_cents`, or `25000.00/day` of a decimal `amount`);
//! - `@limit_key("agent")` (the default), `@limit_key("agent+user")`,
//!   `@limit_key("agent+session")` or `@limit_key("user")`: whose
//!   allowances are counted apart; a session is the request's
//!   `context.session_id` (a String); `user` counts each user's calls
//!   through every agent together (a user's own quota, whichever agent acts
//!   for them).
//!
//! `unit` is `second`, `minute`, `hour` or `day`; a rate's N is a whole
//! number, a budget's may have up to four decimal places (Cedar's
//! `decimal`). A malformed limit, one on a
//! forbid, a `@cost` without `@budget` (or the reverse), or a `@limit_key`
//! with no limit refuses the bundle: a typo never silently drops a limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cedar_policy::{Effect, PolicySet};

use super::{Diagnostic, PolicyOrigin};

/// The annotations this module reads.
pub const ANNOTATIONS: [&str; 4] = ["rate", "budget", "cost", "limit_key"];

/// Budgets and costs are counted in ten-thousandths of their unit, the
/// precision of Cedar's `decimal`, so whole and decimal costs add exactly.
pub const COST_SCALE: u64 = 10_000;

/// The context attribute naming the session of `@limit_key("agent+session")`.
pub const SESSION_ATTR: &str = "session_id";

/// Largest N a limit may declare: keeps the counters' arithmetic exact.
const MAX_AMOUNT: u64 = 100_000_000_000;

/// Whose allowances a limit counts together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Agent,
    AgentAndUser,
    /// The agent and the request's `context.session_id`.
    AgentAndSession,
    /// The user the agent acts for, through any agent; an autonomous
    /// agent's calls count as its own.
    User,
}

/// What a limit counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Allowed decisions.
    Calls,
    /// The value of this context attribute, summed over allowed decisions.
    Cost(String),
}

/// One limit of one permit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limit {
    pub policy_id: String,
    pub measure: Measure,
    /// Calls, or ten-thousandths of a unit of cost ([`COST_SCALE`]), per
    /// window.
    pub amount: u64,
    pub window: Duration,
    pub key: LimitKey,
    /// As written (`20/minute`), for answers and logs.
    pub text: String,
    /// See [`Limit::identity`]; made once, at load.
    identity: Arc<str>,
}

impl Limit {
    /// `rate_limited` or `budget_exceeded`.
    pub fn reason(&self) -> &'static str {
        match self.measure {
            Measure::Calls => "rate_limited",
            Measure::Cost(_) => "budget_exceeded",
        }
    }

    /// Identifies the limit's counters across reloads: a reload that keeps
    /// the permit's id and the limit unchanged keeps its counts; any change
    /// starts it afresh.
    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    fn new(
        policy_id: &str,
        measure: Measure,
        per: (u64, Duration),
        key: LimitKey,
        text: &str,
    ) -> Self {
        let identity = format!("{policy_id}\u{0}{measure:?}\u{0}{text}\u{0}{key:?}").into();
        Self {
            policy_id: policy_id.to_owned(),
            measure,
            amount: per.0,
            window: per.1,
            key,
            text: text.to_owned(),
            identity,
        }
    }
}

/// The limits of a bundle, by the id of the permit that declares them.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    by_policy: HashMap<String, Vec<Arc<Limit>>>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.by_policy.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_policy.values().map(Vec::len).sum()
    }

    /// The limits declared on `policy_id`.
    pub fn of(&self, policy_id: &str) -> &[Arc<Limit>] {
        self.by_policy.get(policy_id).map_or(&[], Vec::as_slice)
    }

    /// Reads the limit annotations of every policy and template of `set`;
    /// every problem becomes a diagnostic naming the policy's file. A
    /// limited policy without an `@id` is a warning: its counters are kept
    /// under its position in its file, so they start afresh (or pass to
    /// another policy) when policies above it are added or removed.
    pub fn scan(
        set: &PolicySet,
        origins: &std::collections::BTreeMap<String, PolicyOrigin>,
        diagnostics: &mut Vec<Diagnostic>,
        warnings: &mut Vec<String>,
    ) -> Self {
        let mut limits = Self::default();
        let annotated = set
            .policies()
            .map(|p| {
                (
                    p.id().to_string(),
                    p.effect(),
                    collect(|k| p.annotation(k)),
                    p.is_static(),
                    p.is_static() && p.annotation("id").is_none(),
                )
            })
            .chain(set.templates().map(|t| {
                (
                    t.id().to_string(),
                    t.effect(),
                    collect(|k| t.annotation(k)),
                    true,
                    // Links have ids of their own, which key their counters.
                    false,
                )
            }));
        for (id, effect, found, own, unnamed) in annotated {
            // A linked policy carries its template's annotations, which are
            // reported once, on the template.
            let problems_here = own;
            match parse(&id, effect, &found) {
                Ok(parsed) if !parsed.is_empty() => {
                    if unnamed {
                        warnings.push(format!(
                            "policy `{id}` has limits but no `@id`: its counters are kept under \
                             its position in the file, so they start afresh when a policy above \
                             it is added or removed; give it an `@id(\"...\")`"
                        ));
                    }
                    limits
                        .by_policy
                        .insert(id, parsed.into_iter().map(Arc::new).collect());
                }
                Ok(_) => {}
                Err(problem) if problems_here => {
                    let file = origins.get(&id).map(|o| o.file.as_str());
                    diagnostics.push(Diagnostic::plain(file, format!("policy `{id}`: {problem}")));
                }
                Err(_) => {}
            }
        }
        limits
    }
}

type Found<'a> = [Option<&'a str>; 4];

fn collect<'a>(annotation: impl Fn(&str) -> Option<&'a str>) -> Found<'a> {
    ANNOTATIONS.map(annotation)
}

fn parse(id: &str, effect: Effect, found: &Found<'_>) -> Result<Vec<Limit>, String> {
    let [rate, budget, cost, key] = *found;
    if found.iter().all(Option::is_none) {
        return Ok(Vec::new());
    }
    if effect == Effect::Forbid {
        return Err(
            "limits (`@rate`, `@budget`, `@cost`, `@limit_key`) belong on permits; \
             a forbid allows nothing to count"
                .to_owned(),
        );
    }
    let key = match key {
        None | Some("agent") => LimitKey::Agent,
        Some("agent+user") => LimitKey::AgentAndUser,
        Some("agent+session") => LimitKey::AgentAndSession,
        Some("user") => LimitKey::User,
        Some(other) => {
            return Err(format!(
                "`@limit_key(\"{other}\")`: expected `agent`, `agent+user`, `agent+session` or \
                 `user`"
            ))
        }
    };
    let mut limits = Vec::with_capacity(2);
    if let Some(text) = rate {
        let per = per_window("rate", text, Amount::Whole)?;
        limits.push(Limit::new(id, Measure::Calls, per, key, text));
    }
    match (budget, cost) {
        (Some(text), Some(attr)) => {
            if attr.is_empty()
                || !attr.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || attr.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!(
                    "`@cost(\"{attr}\")`: expected the name of a top-level context attribute"
                ));
            }
            let per = per_window("budget", text, Amount::Decimal)?;
            limits.push(Limit::new(
                id,
                Measure::Cost(attr.to_owned()),
                per,
                key,
                text,
            ));
        }
        (Some(_), None) => {
            return Err(
                "`@budget` needs `@cost(\"attribute\")`: the context attribute \
                        that holds each call's cost"
                    .to_owned(),
            )
        }
        (None, Some(_)) => return Err("`@cost` without `@budget` limits nothing".to_owned()),
        (None, None) => {}
    }
    if limits.is_empty() {
        return Err("`@limit_key` without `@rate` or `@budget` limits nothing".to_owned());
    }
    Ok(limits)
}

/// How a limit's N is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Amount {
    /// Calls: a whole number.
    Whole,
    /// Cost: up to four decimal places, kept in ten-thousandths.
    Decimal,
}

/// `N/unit`, N positive.
fn per_window(what: &str, text: &str, form: Amount) -> Result<(u64, Duration), String> {
    let number = match form {
        Amount::Whole => "a positive whole number",
        Amount::Decimal => "a positive number with at most four decimal places",
    };
    let bad = |why: &str| {
        format!(
            "`@{what}(\"{text}\")`: {why}; expected `N/second`, `N/minute`, `N/hour` or `N/day` \
             with N {number} up to {MAX_AMOUNT}"
        )
    };
    let (amount_text, unit) = text.split_once('/').ok_or_else(|| bad("no `/`"))?;
    let amount_text = amount_text.trim();
    let amount = match form {
        Amount::Whole => amount_text.parse::<u64>().ok().filter(|n| *n <= MAX_AMOUNT),
        Amount::Decimal => ten_thousandths(amount_text).filter(|n| *n <= MAX_AMOUNT * COST_SCALE),
    }
    .ok_or_else(|| bad(&format!("`{amount_text}` is not {number}")))?;
    if amount == 0 {
        return Err(bad("N must be more than 0"));
    }
    let window = match unit.trim() {
        "second" => Duration::from_secs(1),
        "minute" => Duration::from_secs(60),
        "hour" => Duration::from_secs(3600),
        "day" => Duration::from_secs(86_400),
        other => return Err(bad(&format!("unknown unit `{other}`"))),
    };
    Ok((amount, window))
}

/// `12`, `12.5` or `12.3456` as ten-thousandths (`123456`); `None` for a
/// sign, more than four decimal places, or anything else.
pub fn ten_thousandths(text: &str) -> Option<u64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 4 {
        return None;
    }
    if text.contains('.') && fraction.is_empty() {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let mut fraction_value: u64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    for _ in fraction.len()..4 {
        fraction_value *= 10;
    }
    whole.checked_mul(COST_SCALE)?.checked_add(fraction_value)
}

#[cfg(test)]
impl Limit {
    /// A limit as `scan` would read it, for tests of the counters.
    pub(crate) fn for_test(amount: u64, window: Duration, measure: Measure) -> Self {
        let text = format!("{amount}/{window:?}");
        Self::new("p", measure, (amount, window), LimitKey::Agent, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(src: &str) -> (Limits, Vec<String>) {
        let set = crate::bundle::numbered_policies(src);
        let mut diagnostics = Vec::new();
        let limits = Limits::scan(&set, &Default::default(), &mut diagnostics, &mut Vec::new());
        (limits, diagnostics.into_iter().map(|d| d.message).collect())
    }

    #[test]
    fn reads_rates_budgets_and_keys() {
        let (limits, problems) = scan(
            r#"@rate("20/minute") @budget("500/day") @cost("amount_cents") @limit_key("agent+user")
               permit (principal, action, resource);
               permit (principal, action, resource);"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let l = limits.of("p0");
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].amount, l[0].window), (20, Duration::from_secs(60)));
        assert_eq!(l[0].reason(), "rate_limited");
        assert_eq!(l[1].measure, Measure::Cost("amount_cents".to_owned()));
        assert_eq!(l[1].key, LimitKey::AgentAndUser);
        assert!(limits.of("p1").is_empty());
    }

    /// A limited policy without `@id` is warned about (its counters follow
    /// its position); one with an `@id`, or without limits, is not.
    #[test]
    fn a_limited_policy_without_an_id_is_warned_about() {
        let set = crate::bundle::numbered_policies(
            r#"@rate("20/minute") permit (principal, action, resource);
               @id("named") @rate("20/minute") permit (principal, action, resource);
               permit (principal, action, resource);"#,
        );
        let (mut diagnostics, mut warnings) = (Vec::new(), Vec::new());
        let limits = Limits::scan(&set, &Default::default(), &mut diagnostics, &mut warnings);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(limits.len(), 2);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("policy `p0` has limits but no `@id`"),
            "{warnings:?}"
        );
    }

    #[test]
    fn budgets_may_be_decimal_and_sessions_keyed() {
        let (limits, problems) = scan(
            r#"@budget("25000.50/day") @cost("amount") @limit_key("agent+session")
               permit (principal, action, resource);
               @budget("300/hour") @cost("amount_cents")
               permit (principal, action, resource);"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(limits.of("p0")[0].amount, 250_005_000);
        assert_eq!(limits.of("p0")[0].key, LimitKey::AgentAndSession);
        assert_eq!(limits.of("p1")[0].amount, 3_000_000);
        assert_eq!(limits.of("p1")[0].text, "300/hour");
    }

    #[test]
    fn ten_thousandths_read_cedar_decimals_exactly() {
        for (text, expected) in [
            ("0", Some(0)),
            ("12", Some(120_000)),
            ("12.5", Some(125_000)),
            ("12.3456", Some(123_456)),
            ("0.0001", Some(1)),
            ("12.", None),
            (".5", None),
            ("1.23456", None),
            ("-1.0", None),
            ("1e3", None),
            ("", None),
            ("18446744073709551615", None),
        ] {
            assert_eq!(ten_thousandths(text), expected, "{text}");
        }
    }

    #[test]
    fn malformed_limits_are_refused_with_the_reason() {
        for (src, expected) in [
            (
                r#"@rate("20/minutes") permit (principal, action, resource);"#,
                "unknown unit `minutes`",
            ),
            (
                r#"@rate("0/day") permit (principal, action, resource);"#,
                "more than 0",
            ),
            (
                r#"@rate("ten/day") permit (principal, action, resource);"#,
                "`ten` is not a positive whole number",
            ),
            (
                r#"@rate("20") permit (principal, action, resource);"#,
                "no `/`",
            ),
            (
                r#"@rate("1.5/second") permit (principal, action, resource);"#,
                "`1.5` is not a positive whole number",
            ),
            (
                r#"@budget("0.00001/day") @cost("c") permit (principal, action, resource);"#,
                "at most four decimal places",
            ),
            (
                r#"@budget("-5/day") @cost("c") permit (principal, action, resource);"#,
                "`-5` is not a positive number",
            ),
            (
                r#"@rate("100000000001/day") permit (principal, action, resource);"#,
                "up to 100000000000",
            ),
            (
                r#"@budget("20/day") permit (principal, action, resource);"#,
                "needs `@cost",
            ),
            (
                r#"@cost("amount") permit (principal, action, resource);"#,
                "without `@budget`",
            ),
            (
                r#"@budget("20/day") @cost("a.b") permit (principal, action, resource);"#,
                "top-level context attribute",
            ),
            (
                r#"@limit_key("users") @rate("1/day") permit (principal, action, resource);"#,
                "expected `agent`, `agent+user`, `agent+session` or `user`",
            ),
            (
                r#"@limit_key("agent") permit (principal, action, resource);"#,
                "limits nothing",
            ),
            (
                r#"@rate("1/day") forbid (principal, action, resource);"#,
                "belong on permits",
            ),
        ] {
            let (limits, problems) = scan(src);
            assert!(limits.is_empty(), "{src}");
            assert_eq!(problems.len(), 1, "{src}: {problems:?}");
            assert!(problems[0].contains(expected), "{src}: {}", problems[0]);
        }
    }
}
