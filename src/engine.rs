//! The decision: pure and synchronous, over one immutable [`Snapshot`].
//!
//! With `on_behalf_of` set, a request is decided twice against the same
//! snapshot, once with the agent as principal (its capabilities) and once with
//! the user (their entitlements); it is allowed only if both sides allow.
//! Actions whose schema context declares a `leash` record get it filled with
//! trusted values (the agent, the user, whether a user is present, the time);
//! callers cannot supply it.
//!
//! Each side evaluates only the policies whose scope matches it, as chosen
//! by the snapshot's [`PolicyIndex`](crate::bundle::PolicyIndex); the answer
//! is that of the whole set, at a cost that does not grow with it.
//!
//! leash is stricter than plain Cedar in one respect: a side whose evaluation
//! raised any error is denied, even if a permit was satisfied, because Cedar
//! skips an erroring `forbid` and would otherwise allow around it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityUid, Request, RequestValidationError,
    RestrictedExpression,
};
use serde_json::{json, Map, Value};

use cedar_policy_core::ast as cedar_ast;

use crate::bundle::context_check::Shape;
use crate::bundle::{policy_id_text, LeashFields, Snapshot, LEASH_ATTR};
use crate::service::convert::{extension, Extension};

/// A request, converted from the wire but not yet checked against a schema.
#[derive(Debug, Clone)]
pub struct AuthzRequest {
    pub agent: EntityUid,
    pub on_behalf_of: Option<EntityUid>,
    pub action: EntityUid,
    pub resource: EntityUid,
    pub context: ContextInput,
    pub entities: EntitiesInput,
    /// Signed grants the caller presents ([`crate::grants`]).
    pub grants: Vec<String>,
}

/// The request context in the form the caller sent it.
#[derive(Debug, Clone, Default)]
pub enum ContextInput {
    /// No context: the empty record.
    #[default]
    Empty,
    /// `context_json`: a JSON object in Cedar's context format, parsed with
    /// the schema (so `__entity`/`__extn` escapes may be implicit).
    Json(Map<String, Value>),
    /// `context`: typed values, already converted, with their shape.
    Typed(Vec<(String, RestrictedExpression)>, Shape),
}

/// Request-scoped entities in the form the caller sent them.
#[derive(Debug, Clone, Default)]
pub enum EntitiesInput {
    #[default]
    None,
    /// `entities_json`: the items of a Cedar JSON entities array.
    Json(Vec<Value>),
    /// `entities`: typed entities, already converted.
    Typed(Vec<Entity>),
}

/// Bad input: the field at fault and what is wrong with it. Reported to the
/// caller as `INVALID_ARGUMENT`; never a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct RequestError {
    /// Path of the field in the request, e.g. `principal.on_behalf_of` or
    /// `entities_json[2]`.
    pub field: String,
    pub problem: String,
}

/// Longest field path and problem text a [`RequestError`] keeps. Both can
/// echo the caller's input (a field name, Cedar quoting a whole context),
/// and the message travels in a gRPC trailer, a log line, a span and an
/// audit record: a 4 MiB echo would overflow the client's header limit.
pub const MAX_FIELD_TEXT: usize = 512;
pub const MAX_PROBLEM_TEXT: usize = 2048;

impl RequestError {
    /// The field path as logged, recorded and put on spans: past a context
    /// attribute, the rest of the path (`context.patient.alice@example.com`,
    /// whose nested key is the caller's data) is `…`, and past a brought
    /// entity's index, all of it (`entities.entities[0]…`: attribute and tag
    /// names of entities are not recorded at all). Top-level context keys
    /// are in the audit record anyway; the full path goes to the caller.
    pub fn field_for_records(&self) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        let field = self.field.as_str();
        for prefix in ["context.", "context_json."] {
            if let Some(rest) = field.strip_prefix(prefix) {
                return match rest.find(['.', '[']) {
                    Some(end) => Cow::Owned(format!("{prefix}{}…", &rest[..end])),
                    None => Cow::Borrowed(field),
                };
            }
        }
        if field.starts_with("entities") {
            if let Some(end) = field.find(']') {
                if end + 1 < field.len() {
                    return Cow::Owned(format!("{}…", &field[..=end]));
                }
            }
        }
        Cow::Borrowed(field)
    }

    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: bounded(field.into(), MAX_FIELD_TEXT),
            problem: bounded(problem.into(), MAX_PROBLEM_TEXT),
        }
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), saying how
/// much was left out.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let left_out = text.len() - cut;
    text.truncate(cut);
    text.push_str(&format!("… ({left_out} bytes more)"));
    text
}

/// A policy that raised an error while being evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub policy_id: String,
    pub message: String,
}

/// The decision of one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideDecision {
    /// The principal this side was decided as.
    pub principal: EntityUid,
    pub allowed: bool,
    /// The satisfied permits (allow) or forbids (deny), sorted; empty for a
    /// default deny or a deny forced by errors.
    pub determining: Vec<String>,
    pub errors: Vec<PolicyError>,
}

/// The decision of a whole request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Allow: the permits of both sides. Deny: those of the denying side(s).
    pub determining: Vec<String>,
    /// Errors of both sides.
    pub errors: Vec<PolicyError>,
    pub agent: SideDecision,
    /// `None` when the agent acts autonomously.
    pub on_behalf_of: Option<SideDecision>,
    /// Set when the policies allowed but a limit of a determining permit was
    /// spent, which made the decision a DENY ([`crate::quota`]).
    pub limited: Option<Limited>,
    /// Set when the policies allowed but a determining permit carries
    /// `@approval("required")`: the decision is APPROVAL_REQUIRED, which is
    /// not an allow (`allowed` is false).
    pub approval: Option<ApprovalRequest>,
    /// Set when the request presented a grant that was used or refused:
    /// the approval grant used, the grant refused, or else the first
    /// elevation applied.
    pub grant: Option<GrantUse>,
    /// Every elevation grant applied to this decision, in the order
    /// presented (outcome `elevated`), also when an approval grant then
    /// decided: the audit trail must show each grant that widened the
    /// agent's rights, not only the one in `grant`.
    pub elevated_by: Vec<GrantUse>,
}

/// What became of a grant the request presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantUse {
    /// `used`, or why it was refused (`grant_expired`, `grant_reused`, …).
    pub outcome: &'static str,
    /// The grant's id, approver and expiry (seconds since the Unix epoch),
    /// as it claims them; empty when it could not be read.
    pub grant_id: String,
    pub approver: String,
    pub expires_at: u64,
    pub detail: String,
}

/// What a human is asked to approve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    /// `sha256:` and 64 hex digits over the agent, user, action, resource
    /// and the caller's context in a canonical form ([`fingerprint`]).
    pub fingerprint: String,
    /// The determining permits that require approval.
    pub policies: Vec<String>,
}

/// A limit that turned an ALLOW into a DENY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// `rate_limited`, `budget_exceeded`, `budget_cost_missing` (the cost
    /// attribute is absent), `limit_session_missing` (a per-session limit
    /// and no `context.session_id`) or `limit_capacity` (no counter slot
    /// left).
    pub reason: &'static str,
    /// The permit that declares the limit.
    pub policy_id: String,
    /// The limit as written, e.g. `20/minute`.
    pub limit: String,
    /// When a retry can succeed; `None` when waiting will not help.
    pub retry_after: Option<std::time::Duration>,
    /// One line for logs and answers.
    pub detail: String,
}

impl Decision {
    /// Why a request was denied, side by side, for logs: `agent: forbidden
    /// by deny-payments; on_behalf_of: no permit matched`. Names policies,
    /// never values. Empty for an allow.
    pub fn deny_reason(&self) -> String {
        if self.allowed {
            return String::new();
        }
        if let Some(limited) = &self.limited {
            return limited.detail.clone();
        }
        if let Some(grant) = &self.grant {
            return format!("{}: {}", grant.outcome, grant.detail);
        }
        // Not the fingerprint: an unkeyed hash of the request's values, it
        // would let a reader of the log confirm guesses of them.
        if let Some(approval) = &self.approval {
            return format!("approval required by {}", approval.policies.join(","));
        }
        let mut parts = Vec::with_capacity(2);
        for (name, side) in std::iter::once(("agent", &self.agent))
            .chain(self.on_behalf_of.as_ref().map(|s| ("on_behalf_of", s)))
        {
            if side.allowed {
                continue;
            }
            let why = if !side.errors.is_empty() {
                let ids: Vec<&str> = side.errors.iter().map(|e| e.policy_id.as_str()).collect();
                format!("evaluation errors in {}", ids.join(","))
            } else if !side.determining.is_empty() {
                format!("forbidden by {}", side.determining.join(","))
            } else {
                "no permit matched".to_owned()
            };
            parts.push(format!("{name}: {why}"));
        }
        parts.join("; ")
    }
}

/// Where the sidecar reads the time: the system clock, or, for tests of
/// time windows, a clock that moves only when told.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    /// Milliseconds since the Unix epoch.
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    /// A clock standing at `start` until [`Clock::advance`] moves it.
    pub fn manual(start: std::time::SystemTime) -> Self {
        let ms = start
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self::Manual(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(ms)))
    }

    /// Moves a manual clock forward; the system clock moves by itself.
    pub fn advance(&self, by: std::time::Duration) {
        if let Self::Manual(ms) = self {
            let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
            ms.fetch_add(by, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub fn now(&self) -> std::time::SystemTime {
        match self {
            Self::System => std::time::SystemTime::now(),
            Self::Manual(ms) => {
                std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis(ms.load(std::sync::atomic::Ordering::SeqCst))
            }
        }
    }
}

/// The trusted time given to policies, as a Cedar `datetime` literal
/// (RFC 3339, UTC, milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTime(String);

impl RequestTime {
    /// The sidecar's clock now.
    pub fn now() -> Self {
        Self::of(SystemTime::now())
    }

    /// The time `at`, e.g. from the server's [`crate::server::Clock`].
    pub fn of(at: std::time::SystemTime) -> Self {
        // RFC 3339 in UTC to the millisecond, `2026-01-31T12:00:00.000Z`;
        // the direct formatter, as a format string is parsed on every call.
        Self(
            chrono::DateTime::<chrono::Utc>::from(at)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    }

    /// A fixed time, for tests and replays: `2026-01-31T12:00:00.000Z`.
    pub fn at(rfc3339: impl Into<String>) -> Self {
        Self(rfc3339.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The time as a Cedar `datetime` expression.
    fn expression(&self) -> RestrictedExpression {
        extension(Extension::Datetime, &self.0)
    }

    /// The time as a Cedar `datetime` value. Parsing one costs Cedar a few
    /// regular-expression matches, and every request in the same
    /// millisecond has the same time, so each thread keeps the last one.
    fn value(&self) -> Result<cedar_ast::Value, String> {
        thread_local! {
            static LAST: std::cell::RefCell<Option<(String, cedar_ast::Value)>> =
                const { std::cell::RefCell::new(None) };
        }
        let cached = LAST.with_borrow(|last| match last {
            Some((time, value)) if *time == self.0 => Some(value.clone()),
            _ => None,
        });
        if let Some(value) = cached {
            return Ok(value);
        }
        let context = Context::from_pairs([("now".to_owned(), self.expression())])
            .map_err(|e| crate::bundle::cedar_message(&e))?;
        let value = match context.as_ref() {
            cedar_ast::Context::Value(values) => values.get("now").cloned(),
            cedar_ast::Context::RestrictedResidual(_) => None,
        }
        .ok_or_else(|| format!("`{}` did not evaluate to a datetime", self.0))?;
        LAST.set(Some((self.0.clone(), value.clone())));
        Ok(value)
    }
}

/// Decides `request` against `snapshot` at time `now`.
pub fn decide(
    snapshot: &Snapshot,
    request: &AuthzRequest,
    now: &RequestTime,
) -> Result<Decision, RequestError> {
    decide_with_grants(
        snapshot,
        request,
        now,
        SystemTime::now(),
        crate::grants::Lifetimes::default(),
    )
}

/// [`decide`], with the request's elevation grants checked at `at` and,
/// when valid, applied: each adds its role as a parent of the agent for
/// this decision. A refused elevation grant makes the decision DENY.
pub fn decide_with_grants(
    snapshot: &Snapshot,
    request: &AuthzRequest,
    now: &RequestTime,
    at: SystemTime,
    lifetimes: crate::grants::Lifetimes,
) -> Result<Decision, RequestError> {
    if !snapshot.actions.contains(&request.action) {
        return Err(RequestError::new(
            "action",
            format!("`{}` is not an action of the schema", request.action),
        ));
    }
    check_type(
        snapshot,
        &request.agent,
        "principal.agent",
        &request.action,
        Role::Principal,
    )?;
    if let Some(user) = &request.on_behalf_of {
        check_type(
            snapshot,
            user,
            "principal.on_behalf_of",
            &request.action,
            Role::Principal,
        )?;
    }
    check_type(
        snapshot,
        &request.resource,
        "resource",
        &request.action,
        Role::Resource,
    )?;
    let leash = snapshot.reserved.fields(&request.action);
    let context = build_context(snapshot, request, leash, now)?;
    // The context is the same for both sides, so it is checked against the
    // action's context type once, here, not in each side's Cedar request.
    if !context.validated {
        check_context(snapshot, &request.action, &context.context, &context.shape).map_err(
            |e| {
                context_mismatch(snapshot, request, &context.context).unwrap_or_else(|| {
                    // Whatever Cedar says (an entity in the context that is
                    // not an action of the schema reads "request's action"),
                    // it is the context that was checked.
                    RequestError::new(
                        context_field(&request.context),
                        crate::bundle::cedar_message(&*e),
                    )
                })
            },
        )?;
    }
    let context = context.context;
    // Elevations are read first: a request that brings entities and is
    // elevated is decided on a full copy of the bundle's entities (see
    // `with_request_entities`).
    let (roles, grant, elevated_by) =
        match crate::grants::elevations(snapshot, request, at, lifetimes) {
            Ok(found) => {
                let mut roles = Vec::with_capacity(found.len());
                let mut elevated_by: Vec<GrantUse> = Vec::with_capacity(found.len());
                for (role, g) in found {
                    roles.push(role);
                    // The same grant presented twice is one grant; two
                    // grants that share an id (but not role or expiry) are
                    // both recorded.
                    if !elevated_by.contains(&g) {
                        elevated_by.push(g);
                    }
                }
                roles.sort_unstable();
                roles.dedup();
                (roles, elevated_by.first().cloned(), elevated_by)
            }
            Err(refused) => (Vec::new(), Some(refused), Vec::new()),
        };
    let extended;
    // Kept for the approval fingerprint only when the bundle has gates.
    let mut brought = Vec::new();
    let mut entities = match &request.entities {
        EntitiesInput::None => &snapshot.entities,
        other => {
            let keep = (!snapshot.gates.is_empty()).then_some(&mut brought);
            extended = with_request_entities(snapshot, other, request, &context, &roles, keep)?;
            &extended
        }
    };
    let elevated = if roles.is_empty() {
        None
    } else {
        // The bundle's own entities elevated are the same for every
        // request with these roles, so they are built once per snapshot;
        // with request entities the set is this request's alone.
        let set = if matches!(request.entities, EntitiesInput::None) {
            snapshot.elevated.get_or_build(&request.agent, &roles, || {
                elevate(&snapshot.entities, &request.agent, &roles)
            })
        } else {
            elevate(entities, &request.agent, &roles).map(Arc::new)
        }
        .map_err(|e| RequestError::new("grants", format!("elevation could not be applied: {e}")))?;
        Some(set)
    };
    if let Some(e) = &elevated {
        entities = e.as_ref();
    }

    let agent = decide_side(
        snapshot,
        entities,
        &request.agent,
        "principal.agent",
        request,
        &context,
    )?;
    let on_behalf_of = match &request.on_behalf_of {
        Some(user) => Some(decide_side(
            snapshot,
            entities,
            user,
            "principal.on_behalf_of",
            request,
            &context,
        )?),
        None => None,
    };
    let mut decision = combine(agent, on_behalf_of);
    approval_gate(snapshot, request, &context, &brought, &mut decision);
    if let Some(grant) = grant {
        if grant.outcome != "elevated" {
            // Refused: whatever the policies said, the answer is DENY.
            decision.allowed = false;
            decision.approval = None;
            decision.determining.clear();
        }
        decision.grant = Some(grant);
    }
    decision.elevated_by = elevated_by;
    Ok(decision)
}

/// `entities` with `roles` added to the agent's parents: a copy, since the
/// bundle's entities are shared. The agent keeps its attributes and tags
/// (it goes through Cedar's JSON form, the one public way to rebuild an
/// entity with its tags): a forbid on a tag must still hold for an elevated
/// agent. An agent the bundle does not define is added with none.
fn elevate(
    entities: &Entities,
    agent: &EntityUid,
    roles: &[EntityUid],
) -> Result<Entities, String> {
    let entity = match entities.get(agent) {
        Some(entity) => {
            let mut json = entity.to_json_value().map_err(|e| e.to_string())?;
            let parents = json
                .get_mut("parents")
                .and_then(serde_json::Value::as_array_mut)
                .ok_or_else(|| "the agent's entity has no parent list".to_owned())?;
            parents.extend(roles.iter().map(|role| {
                serde_json::json!({
                    "type": role.type_name().to_string(),
                    "id": role.id().unescaped(),
                })
            }));
            Entity::from_json_value(json, None).map_err(|e| e.to_string())?
        }
        None => Entity::new_no_attrs(agent.clone(), roles.iter().cloned().collect()),
    };
    entities
        .clone()
        .upsert_entities([entity], None)
        .map_err(|e| e.to_string())
}

/// Turns an ALLOW whose determining permits include a gated one
/// (`@approval("required")`) into APPROVAL_REQUIRED, with the request's
/// fingerprint for the approver. `brought` are the entities the request
/// brings, parsed.
pub fn approval_gate(
    snapshot: &Snapshot,
    request: &AuthzRequest,
    context: &Context,
    brought: &[Entity],
    decision: &mut Decision,
) {
    if !decision.allowed || snapshot.gates.is_empty() {
        return;
    }
    let gated: Vec<String> = decision
        .determining
        .iter()
        .filter(|id| snapshot.gates.requires_approval(id))
        .cloned()
        .collect();
    if gated.is_empty() {
        return;
    }
    decision.allowed = false;
    decision.approval = Some(ApprovalRequest {
        fingerprint: fingerprint(request, context, brought),
        policies: gated,
    });
}

/// A stable fingerprint of what is asked: the agent, the user (if any), the
/// action, the resource, the caller's context, without the trusted
/// `context.leash` leash adds (it holds the time), and the entities the
/// request brings (`brought`), which the gated permit may read: an approval
/// for one ticket's data is not one for other data under the same id. The
/// context and entities are taken after parsing with the schema, each value
/// in Cedar's canonical form (records by key, sets sorted), entities by
/// uid with their parents sorted, so the same request in JSON or typed
/// form, in any order, has one fingerprint. A request that brings no
/// entities has the fingerprint it had before they were covered.
pub fn fingerprint(request: &AuthzRequest, context: &Context, brought: &[Entity]) -> String {
    use sha2::{Digest, Sha256};
    let mut keys: Vec<String> = context
        .clone()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != LEASH_ATTR)
        .collect();
    keys.sort_unstable();
    let mut canonical = format!(
        "leash-approval-v1\nagent={}\nuser={}\naction={}\nresource={}\n",
        request.agent,
        request
            .on_behalf_of
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string),
        request.action,
        request.resource,
    );
    for key in keys {
        if let Some(value) = context.get(&key) {
            // Keys are quoted so no key or value can pose as a separator.
            canonical.push_str(&format!("context.{key:?}={value}\n"));
        }
    }
    let mut entities: Vec<String> = brought.iter().map(canonical_entity).collect();
    entities.sort_unstable();
    for entity in entities {
        canonical.push_str(&entity);
    }
    let digest = Sha256::digest(canonical.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// One request entity for the fingerprint: uid, parents sorted, then
/// attributes and tags by name; names and uids quoted or printed as Cedar
/// does, so none can pose as a separator.
fn canonical_entity(entity: &Entity) -> String {
    let core: &cedar_ast::Entity = entity.as_ref();
    let mut parents: Vec<String> = core.ancestors().map(ToString::to_string).collect();
    parents.sort_unstable();
    let mut out = format!("entity={}\n", core.uid());
    for parent in parents {
        out.push_str(&format!("entity.parent={parent}\n"));
    }
    let attrs = core.attrs().map(|(name, value)| ("attr", name, value));
    let tags = core.tags().map(|(name, value)| ("tag", name, value));
    let mut fields: Vec<String> = attrs
        .chain(tags)
        .map(|(kind, name, value)| format!("entity.{kind}.{:?}={value}\n", name.as_str()))
        .collect();
    fields.sort_unstable();
    for field in fields {
        out.push_str(&field);
    }
    out
}

#[derive(Clone, Copy)]
enum Role {
    Principal,
    Resource,
}

/// Checks an entity's type against the action's `appliesTo` before anything
/// else, so the error names the field at fault (the trusted context record
/// carries the principals too and would otherwise report them first).
fn check_type(
    snapshot: &Snapshot,
    uid: &EntityUid,
    field: &str,
    action: &EntityUid,
    role: Role,
) -> Result<(), RequestError> {
    let declared = || {
        match role {
            Role::Principal => snapshot
                .schema
                .principals_for_action(action)
                .map(|t| t.cloned().collect::<Vec<_>>()),
            Role::Resource => snapshot
                .schema
                .resources_for_action(action)
                .map(|t| t.cloned().collect::<Vec<_>>()),
        }
        .unwrap_or_default()
    };
    // Compared without allocating: this runs on every request.
    let fits = match role {
        Role::Principal => snapshot
            .schema
            .principals_for_action(action)
            .is_some_and(|mut t| t.any(|t| t == uid.type_name())),
        Role::Resource => snapshot
            .schema
            .resources_for_action(action)
            .is_some_and(|mut t| t.any(|t| t == uid.type_name())),
    };
    if fits {
        return Ok(());
    }
    let ty = uid.type_name().to_string();
    let allowed: Vec<String> = declared().iter().map(ToString::to_string).collect();
    let what = match role {
        Role::Principal => "principal",
        Role::Resource => "resource",
    };
    let expected = if allowed.is_empty() {
        "none".to_owned()
    } else {
        allowed.join(", ")
    };
    Err(RequestError::new(
        field,
        format!("entity type `{ty}` is not a valid {what} for `{action}` (expected: {expected})"),
    ))
}

fn combine(agent: SideDecision, user: Option<SideDecision>) -> Decision {
    let sides: Vec<&SideDecision> = std::iter::once(&agent).chain(user.as_ref()).collect();
    let allowed = sides.iter().all(|s| s.allowed);
    let mut determining: Vec<String> = Vec::new();
    for side in sides.iter().filter(|s| s.allowed == allowed) {
        for id in &side.determining {
            if !determining.contains(id) {
                determining.push(id.clone());
            }
        }
    }
    let mut errors: Vec<PolicyError> = Vec::new();
    for side in &sides {
        for err in &side.errors {
            if !errors.contains(err) {
                errors.push(err.clone());
            }
        }
    }
    Decision {
        allowed,
        determining,
        errors,
        agent,
        on_behalf_of: user,
        limited: None,
        approval: None,
        grant: None,
        elevated_by: Vec::new(),
    }
}

fn decide_side(
    snapshot: &Snapshot,
    entities: &Entities,
    principal: &EntityUid,
    principal_field: &str,
    request: &AuthzRequest,
    context: &Context,
) -> Result<SideDecision, RequestError> {
    // Built without the schema: `decide` has checked the action, both
    // principal types, the resource type and the context already, once for
    // both sides (Cedar would check the context again for every side).
    let cedar_request = Request::new(
        principal.clone(),
        request.action.clone(),
        request.resource.clone(),
        context.clone(),
        None,
    )
    .map_err(|e| request_validation_error(e, principal_field, &request.context))?;
    // The scope index narrows the set to the policies that could apply;
    // without it (turned off, or a request it cannot narrow) Cedar
    // evaluates them all. Both give the same answer (see bundle::index).
    let narrowed = snapshot
        .index
        .as_ref()
        .and_then(|index| index.select(principal, &request.action, &request.resource, entities));
    let policies = narrowed.as_deref().unwrap_or(&snapshot.policies);
    let response = Authorizer::new().is_authorized(&cedar_request, policies, entities);
    let diagnostics = response.diagnostics();
    let mut errors: Vec<PolicyError> = diagnostics
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => PolicyError {
                policy_id: policy_id_text(e.policy_id()),
                message: e.inner().to_string(),
            },
        })
        .collect();
    errors.sort_by(|a, b| a.policy_id.cmp(&b.policy_id));
    let cedar_allowed = response.decision() == cedar_policy::Decision::Allow;
    // Fail closed: an error may have hidden a forbid, so it denies the side.
    let allowed = cedar_allowed && errors.is_empty();
    let mut determining: Vec<String> = if cedar_allowed && !allowed {
        Vec::new()
    } else {
        diagnostics.reason().map(policy_id_text).collect()
    };
    determining.sort();
    Ok(SideDecision {
        principal: principal.clone(),
        allowed,
        determining,
        errors,
    })
}

fn context_field(input: &ContextInput) -> &'static str {
    match input {
        ContextInput::Json(_) => "context_json",
        _ => "context",
    }
}

/// The first attribute of a context that does not fit its action's context
/// type, as an error naming it (`context.amount_cents`) and the problem;
/// Cedar's own message names only the action and echoes the whole context.
/// A trusted `leash` record that does not fit is the principals' fault (an
/// `on_behalf_of` of another type than `leash.user` declares, say), so it
/// names them. `None` when nothing is found at fault (Cedar's message is
/// used then).
fn context_mismatch(
    snapshot: &Snapshot,
    request: &AuthzRequest,
    context: &Context,
) -> Option<RequestError> {
    let action_core: &cedar_ast::EntityUID = request.action.as_ref();
    let schema: &cedar_policy_core::validator::ValidatorSchema = snapshot.schema.as_ref();
    let ty = schema.context_type(action_core)?;
    let cedar_ast::Context::Value(values) = context.as_ref() else {
        return None;
    };
    let action = &request.action;
    if let (Some(leash), cedar_policy_core::validator::types::Type::Record { attrs, .. }) =
        (values.get(LEASH_ATTR), ty)
    {
        if let Some(attr) = attrs.get_attr(LEASH_ATTR) {
            if let Some((path, problem)) =
                value_mismatch(schema, String::new(), leash, &attr.attr_type, false)
            {
                let field = match path.as_str() {
                    ".agent" => "principal.agent",
                    ".user" => "principal.on_behalf_of",
                    _ => context_field(&request.context),
                };
                return Some(RequestError::new(
                    field,
                    format!("{problem} (`context.{LEASH_ATTR}{path}` of `{action}`)"),
                ));
            }
        }
    }
    let mut record: std::collections::BTreeMap<_, _> = (**values).clone();
    record.remove(LEASH_ATTR);
    let value = cedar_ast::Value::record_arc(Arc::new(record), None);
    let (path, problem) = value_mismatch(schema, String::new(), &value, ty, true)?;
    Some(RequestError::new(
        format!("{}{path}", context_field(&request.context)),
        format!("{problem} (the context type of `{action}`)"),
    ))
}

/// Where `value` does not fit `ty`, as (path, problem); `None` if it fits
/// as far as is looked. An entity must be of the declared type, and an
/// action or a member of an enumerated type must be declared.
/// `top` leaves out the attribute the trusted record is.
fn value_mismatch(
    schema: &cedar_policy_core::validator::ValidatorSchema,
    path: String,
    value: &cedar_ast::Value,
    ty: &cedar_policy_core::validator::types::Type,
    top: bool,
) -> Option<(String, String)> {
    use cedar_ast::{Literal, ValueKind};
    use cedar_policy_core::validator::types::{EntityKind, OpenTag, Type};
    match (ty, &value.value) {
        (
            Type::Record {
                attrs,
                open_attributes,
            },
            ValueKind::Record(record),
        ) => {
            for (name, attr) in attrs.iter() {
                if top && name.as_str() == LEASH_ATTR {
                    continue;
                }
                if attr.is_required && !record.contains_key(name) {
                    return Some((
                        format!("{path}.{name}"),
                        format!("required, missing ({})", a(&attr.attr_type)),
                    ));
                }
            }
            for (name, item) in record.iter() {
                match attrs.get_attr(name) {
                    Some(attr) => {
                        let found = value_mismatch(
                            schema,
                            format!("{path}.{name}"),
                            item,
                            &attr.attr_type,
                            false,
                        );
                        if found.is_some() {
                            return found;
                        }
                    }
                    None if *open_attributes == OpenTag::ClosedAttributes => {
                        let of = if top { "this context" } else { "this record" };
                        return Some((
                            format!("{path}.{name}"),
                            format!("not an attribute of {of}"),
                        ));
                    }
                    None => {}
                }
            }
            None
        }
        (Type::Set { element_type }, ValueKind::Set(set)) => {
            let element = element_type.as_deref()?;
            // Members have no order the caller gave: the path is the set's.
            set.iter()
                .find_map(|item| value_mismatch(schema, path.clone(), item, element, false))
                .map(|(path, problem)| (path, format!("a member: {problem}")))
        }
        (Type::Entity(kind), ValueKind::Lit(Literal::EntityUID(uid))) => {
            // Strict validation gives one entity type, and Cedar entity
            // types have no subtypes.
            if let Some(expected) = match kind {
                EntityKind::Entity(lub) => lub.get_single_entity(),
                EntityKind::AnyEntity => None,
            } {
                if uid.entity_type() != expected {
                    return Some((path, format!("expected {}, got `{value}`", a(expected))));
                }
            }
            let core = cedar_policy_core::validator::CoreSchema::new(schema);
            cedar_policy_core::entities::conformance::validate_euid(&core, uid)
                .err()
                .map(|e| (path, crate::bundle::cedar_message(&e)))
        }
        (Type::Long, ValueKind::Lit(Literal::Long(_)))
        | (Type::String, ValueKind::Lit(Literal::String(_)))
        | (Type::Bool(_), ValueKind::Lit(Literal::Bool(_)))
        | (Type::Never, _) => None,
        (Type::ExtensionType { name }, ValueKind::ExtensionValue(ext))
            if ext.typename() == *name =>
        {
            None
        }
        (expected, _) => Some((path, format!("expected {}, got `{value}`", a(expected)))),
    }
}

/// `ty` with its indefinite article, for messages: "a Long", "an Agent".
fn a(ty: &dyn std::fmt::Display) -> String {
    let name = ty.to_string();
    let article = match name.chars().next() {
        Some('A' | 'E' | 'I' | 'O' | 'a' | 'e' | 'i' | 'o') => "an",
        _ => "a",
    };
    format!("{article} {name}")
}

fn request_validation_error(
    err: RequestValidationError,
    principal_field: &str,
    context: &ContextInput,
) -> RequestError {
    let field =
        match &err {
            RequestValidationError::UndeclaredAction(_)
            | RequestValidationError::ExternalAction(_) => "action",
            RequestValidationError::UndeclaredPrincipalType(_)
            | RequestValidationError::InvalidPrincipalType(_) => principal_field,
            RequestValidationError::UndeclaredResourceType(_)
            | RequestValidationError::InvalidResourceType(_) => "resource",
            RequestValidationError::InvalidContext(_)
            | RequestValidationError::TypeOfContext(_) => context_field(context),
            _ => "request",
        };
    RequestError::new(field, crate::bundle::cedar_message(&err))
}

/// A request's context, whether it has been checked against the action's
/// context type already, and its shape (`None`: not known, so a check is
/// never skipped).
struct BuiltContext {
    context: Context,
    validated: bool,
    shape: Option<Shape>,
}

impl BuiltContext {
    fn unchecked(context: Context) -> Self {
        Self {
            context,
            validated: false,
            shape: None,
        }
    }

    fn shaped(context: Context, shape: Shape) -> Self {
        Self {
            context,
            validated: false,
            shape: Some(shape),
        }
    }
}

/// Checks `context` against the context type of `action`, unless a context
/// of the same shape passed for it before (see `bundle::context_check`).
fn check_context(
    snapshot: &Snapshot,
    action: &EntityUid,
    context: &Context,
    shape: &Option<Shape>,
) -> Result<(), Box<RequestValidationError>> {
    let checks = &snapshot.context_checks;
    if let Some(shape) = shape {
        if checks.passed(action, shape) {
            return Ok(());
        }
    }
    context
        .validate(&snapshot.schema, action)
        .map_err(Box::new)?;
    if let Some(shape) = shape {
        checks.remember(action, shape);
    }
    Ok(())
}

/// The context of both sides: the caller's attributes plus, where the
/// action declares it, the trusted `leash` record.
fn build_context(
    snapshot: &Snapshot,
    request: &AuthzRequest,
    leash: Option<LeashFields>,
    now: &RequestTime,
) -> Result<BuiltContext, RequestError> {
    let field = context_field(&request.context);
    let reserved = |present: bool| -> Result<(), RequestError> {
        if present && leash.is_some() {
            Err(RequestError::new(
                format!("{field}.{LEASH_ATTR}"),
                "attribute is reserved: leash supplies it for this action",
            ))
        } else {
            Ok(())
        }
    };
    match &request.context {
        ContextInput::Json(map) => {
            reserved(map.contains_key(LEASH_ATTR))?;
            if let Some(context) = explicit_json_context(snapshot, request, map, leash, now) {
                return Ok(BuiltContext {
                    context,
                    validated: true,
                    shape: None,
                });
            }
            let mut with_record = map.clone();
            if let Some(fields) = leash {
                with_record.insert(LEASH_ATTR.to_owned(), leash_json(fields, request, now));
            }
            Context::from_json_value(
                Value::Object(with_record),
                Some((&snapshot.schema, &request.action)),
            )
            .map(BuiltContext::unchecked)
            .map_err(|e| {
                json_context_error(snapshot, &request.action, map)
                    .unwrap_or_else(|| RequestError::new(field, crate::bundle::cedar_message(&e)))
            })
        }
        ContextInput::Typed(pairs, fields_shape) => {
            reserved(pairs.iter().any(|(k, _)| k == LEASH_ATTR))?;
            let mut seen = HashSet::new();
            if let Some((dup, _)) = pairs.iter().find(|(k, _)| !seen.insert(k.as_str())) {
                return Err(RequestError::new(
                    format!("{field}.{dup}"),
                    "attribute given twice",
                ));
            }
            let mut shape = {
                let mut record = Shape::new();
                record.open_record();
                record.append(fields_shape);
                record
            };
            let built = with_leash(pairs.clone(), leash, request, now, &mut shape)
                .map_err(|e| typed_context_error(field, pairs, e))?;
            shape.close_record();
            Ok(BuiltContext::shaped(built, shape))
        }
        ContextInput::Empty => {
            let mut shape = Shape::new();
            shape.open_record();
            let built = with_leash(Vec::new(), leash, request, now, &mut shape)
                .map_err(|e| RequestError::new(field, e))?;
            shape.close_record();
            Ok(BuiltContext::shaped(built, shape))
        }
    }
}

/// The JSON context's attribute at fault when Cedar's schema-directed
/// parser refused the context (whose message names no attribute: "while
/// parsing context, expected a literal entity reference"), found by parsing
/// each declared attribute alone against its type, as that parser does:
/// only on this error path. `None` when no attribute alone is at fault
/// (one missing or undeclared, which Cedar's message names).
fn json_context_error(
    snapshot: &Snapshot,
    action: &EntityUid,
    map: &Map<String, Value>,
) -> Option<RequestError> {
    use cedar_policy_core::entities::json::err::JsonDeserializationErrorContext;
    use cedar_policy_core::entities::json::{SchemaType, ValueParser};
    let schema: &cedar_policy_core::validator::ValidatorSchema = snapshot.schema.as_ref();
    let action_core: &cedar_ast::EntityUID = action.as_ref();
    let expected = SchemaType::try_from(schema.context_type(action_core)?.clone()).ok()?;
    let SchemaType::Record { attrs, .. } = expected else {
        return None;
    };
    let parser = ValueParser::new(cedar_policy_core::extensions::Extensions::all_available());
    map.iter().find_map(|(key, value)| {
        let attr = attrs.get(key.as_str())?;
        let problem =
            match parser.val_into_restricted_expr(value.clone(), Some(attr.schema_type()), &|| {
                JsonDeserializationErrorContext::Context
            }) {
                Err(e) => crate::bundle::cedar_message(&e),
                // An extension value is checked when it is evaluated.
                Ok(expr) => Context::from_pairs([(key.clone(), RestrictedExpression::from(expr))])
                    .err()
                    .map(|e| crate::bundle::cedar_message(&e))?,
            };
        Some(RequestError::new(format!("context_json.{key}"), problem))
    })
}

/// The typed context's attribute at fault when it could not be built (an
/// extension value whose argument Cedar refuses, `datetime("yesterday")`),
/// found by building each alone: only on this error path.
fn typed_context_error(
    field: &str,
    pairs: &[(String, RestrictedExpression)],
    whole: String,
) -> RequestError {
    for (key, value) in pairs {
        if let Err(e) = Context::from_pairs([(key.clone(), value.clone())]) {
            return RequestError::new(format!("{field}.{key}"), crate::bundle::cedar_message(&e));
        }
    }
    RequestError::new(field, whole)
}

fn entity_json(uid: &EntityUid) -> Value {
    json!({ "__entity": { "type": uid.type_name().to_string(), "id": uid.id().unescaped() } })
}

fn leash_json(fields: LeashFields, request: &AuthzRequest, now: &RequestTime) -> Value {
    let mut record = Map::new();
    if fields.agent {
        record.insert("agent".to_owned(), entity_json(&request.agent));
    }
    if let (true, Some(user)) = (fields.user, &request.on_behalf_of) {
        record.insert("user".to_owned(), entity_json(user));
    }
    if fields.delegated {
        record.insert(
            "delegated".to_owned(),
            Value::Bool(request.on_behalf_of.is_some()),
        );
    }
    if fields.now {
        record.insert(
            "now".to_owned(),
            json!({ "__extn": { "fn": "datetime", "arg": now.as_str() } }),
        );
    }
    Value::Object(record)
}

/// The fast path for `context_json`: Cedar's schema-directed JSON parser
/// costs tens of microseconds for a handful of attributes (`leash bench`
/// measured about 80 µs of a 150 µs decision), while building the values
/// directly and checking them against the schema costs a few. It takes only
/// JSON whose meaning does not depend on the schema (explicit `__entity` and
/// `__extn` escapes, integers, strings, booleans, sets, records) and only
/// when the result conforms to the action's context type. Anything else
/// returns `None` and goes through Cedar's parser, which accepts implicit
/// escapes and words the errors; so both paths give the same context.
fn explicit_json_context(
    snapshot: &Snapshot,
    request: &AuthzRequest,
    map: &Map<String, Value>,
    leash: Option<LeashFields>,
    now: &RequestTime,
) -> Option<Context> {
    let mut pairs = Vec::with_capacity(map.len());
    let mut shape = Shape::new();
    shape.open_record();
    for (key, value) in map {
        shape.field(key);
        pairs.push((key.clone(), explicit_json_value(value, 0, &mut shape)?));
    }
    let context = with_leash(pairs, leash, request, now, &mut shape).ok()?;
    shape.close_record();
    check_context(snapshot, &request.action, &context, &Some(shape)).ok()?;
    Some(context)
}

fn explicit_json_value(
    value: &Value,
    depth: usize,
    shape: &mut Shape,
) -> Option<RestrictedExpression> {
    if depth > crate::service::convert::MAX_VALUE_DEPTH {
        return None;
    }
    match value {
        Value::Bool(b) => {
            shape.bool();
            Some(RestrictedExpression::new_bool(*b))
        }
        Value::Number(n) => {
            shape.long();
            n.as_i64().map(RestrictedExpression::new_long)
        }
        Value::String(s) => {
            shape.string();
            Some(RestrictedExpression::new_string(s.clone()))
        }
        Value::Array(items) => {
            shape.open_set();
            let items = items
                .iter()
                .map(|v| explicit_json_value(v, depth + 1, shape))
                .collect::<Option<Vec<_>>>()
                .map(RestrictedExpression::new_set);
            shape.close_set();
            items
        }
        Value::Object(map) if map.keys().any(|k| k.starts_with("__")) => {
            if map.len() != 1 {
                return None;
            }
            if let Some(Value::Object(uid)) = map.get("__entity") {
                let (Some(Value::String(ty)), Some(Value::String(id)), 2) =
                    (uid.get("type"), uid.get("id"), uid.len())
                else {
                    return None;
                };
                let ty = crate::service::convert::type_name(ty)?;
                let uid = EntityUid::from_type_name_and_id(ty, cedar_policy::EntityId::new(id));
                shape.entity(&uid);
                return Some(RestrictedExpression::new_entity_uid(uid));
            }
            let Some(Value::Object(ext)) = map.get("__extn") else {
                return None;
            };
            let (Some(Value::String(function)), Some(Value::String(arg)), 2) =
                (ext.get("fn"), ext.get("arg"), ext.len())
            else {
                return None;
            };
            let kind = Extension::named(function)?;
            shape.extension(kind.name());
            Some(extension(kind, arg))
        }
        Value::Object(map) => {
            shape.open_record();
            let fields = map
                .iter()
                .map(|(k, v)| {
                    shape.field(k);
                    explicit_json_value(v, depth + 1, shape).map(|e| (k.clone(), e))
                })
                .collect::<Option<Vec<_>>>();
            shape.close_record();
            fields.and_then(|fields| RestrictedExpression::new_record(fields).ok())
        }
        Value::Null => None,
    }
}

/// The context of `pairs` (the caller's attributes) plus, if policies read
/// it, the trusted `leash` record, whose shape is written to `shape` after
/// the caller's. The record is a Cedar value built directly, not an
/// expression for Cedar to evaluate: so `now` is parsed once per
/// millisecond on each thread instead of once per request (Cedar parses
/// `datetime` strings with regular expressions), and its entity ids are not
/// rebuilt as expressions. A test holds the result equal to evaluating the
/// same record as an expression. Errors are Cedar's message.
fn with_leash(
    pairs: Vec<(String, RestrictedExpression)>,
    leash: Option<LeashFields>,
    request: &AuthzRequest,
    now: &RequestTime,
    shape: &mut Shape,
) -> Result<Context, String> {
    let cedar = |e: cedar_policy::ContextCreationError| crate::bundle::cedar_message(&e);
    let Some(fields) = leash else {
        return if pairs.is_empty() {
            Ok(Context::empty())
        } else {
            Context::from_pairs(pairs).map_err(cedar)
        };
    };
    shape.field(LEASH_ATTR);
    let record = leash_value(fields, request, now, shape)?;
    let mut values = if pairs.is_empty() {
        std::collections::BTreeMap::new()
    } else {
        match Context::from_pairs(pairs).map_err(cedar)?.as_ref() {
            cedar_ast::Context::Value(values) => (**values).clone(),
            // Only `unknown(..)` makes a residual, and no input builds one.
            cedar_ast::Context::RestrictedResidual(_) => {
                return Err("the context is not a concrete record".to_owned())
            }
        }
    };
    // The caller's pairs were checked for `leash` before; should one ever
    // get here, it is refused as Cedar refuses a duplicate key.
    if values.insert(LEASH_ATTR.into(), record).is_some() {
        return Err(format!("`{LEASH_ATTR}` is given twice in the context"));
    }
    Ok(Context::from(cedar_ast::Context::Value(Arc::new(values))))
}

/// The trusted `leash` record as a Cedar value, its shape written to `shape`.
fn leash_value(
    fields: LeashFields,
    request: &AuthzRequest,
    now: &RequestTime,
    shape: &mut Shape,
) -> Result<cedar_ast::Value, String> {
    let entity = |uid: &EntityUid| cedar_ast::Value::from(cedar_ast::EntityUID::from(uid.clone()));
    let mut record = std::collections::BTreeMap::new();
    shape.open_record();
    if fields.agent {
        shape.field("agent");
        shape.entity(&request.agent);
        record.insert("agent".into(), entity(&request.agent));
    }
    if let (true, Some(user)) = (fields.user, &request.on_behalf_of) {
        shape.field("user");
        shape.entity(user);
        record.insert("user".into(), entity(user));
    }
    if fields.delegated {
        shape.field("delegated");
        shape.bool();
        record.insert(
            "delegated".into(),
            cedar_ast::Value::from(request.on_behalf_of.is_some()),
        );
    }
    if fields.now {
        shape.field("now");
        shape.extension(Extension::Datetime.name());
        record.insert("now".into(), now.value()?);
    }
    shape.close_record();
    Ok(cedar_ast::Value::record_arc(Arc::new(record), None))
}

/// The bundle's entities plus the request's. A request may add entities but
/// never redefine one the bundle defines, define its own principals, or
/// define one the bundle names without defining it (a parent, a value of
/// an attribute or tag, an entity a policy's condition reads): the caller
/// must not be able to assert its own roles or attributes, or anyone
/// else's.
fn with_request_entities(
    snapshot: &Snapshot,
    input: &EntitiesInput,
    request: &AuthzRequest,
    context: &Context,
    roles: &[EntityUid],
    keep: Option<&mut Vec<Entity>>,
) -> Result<Entities, RequestError> {
    let (field, parsed): (&str, Vec<Entity>) = match input {
        EntitiesInput::None => return Ok(snapshot.entities.clone()),
        EntitiesInput::Json(items) => {
            let mut parsed = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let entity = Entity::from_json_value(item.clone(), Some(&snapshot.schema))
                    .map_err(|e| {
                        RequestError::new(
                            format!("entities_json[{i}]"),
                            crate::bundle::cedar_message(&e),
                        )
                    })?;
                parsed.push(entity);
            }
            ("entities_json", parsed)
        }
        EntitiesInput::Typed(entities) => ("entities.entities", entities.clone()),
    };
    let mut seen = HashSet::new();
    for (i, entity) in parsed.iter().enumerate() {
        let uid = entity.uid();
        // A forbid reading an unknown would be left out of Cedar's decision,
        // reported only as an error (see `reach::first_residual`): refused
        // up front, like any bad value.
        if let Some(residual) = crate::bundle::reach::first_residual(entity) {
            return Err(RequestError::new(
                format!("{field}[{i}]"),
                format!("{residual}; a request's entities must hold concrete values"),
            ));
        }
        if snapshot.actions.contains(&uid) {
            return Err(RequestError::new(
                format!("{field}[{i}]"),
                format!("`{uid}` is an action of the schema; a request may not define actions"),
            ));
        }
        if let Some(named) = snapshot.undefined_named.get(&uid) {
            let (how, why) = named.reason();
            return Err(RequestError::new(
                format!("{field}[{i}]"),
                format!("entity `{uid}` is {how}; a request may not define it ({why})"),
            ));
        }
        if snapshot.entities.get(&uid).is_some() {
            return Err(RequestError::new(
                format!("{field}[{i}]"),
                format!(
                    "entity `{uid}` is defined by the policy bundle; a request may add entities \
                     but not redefine them"
                ),
            ));
        }
        if roles.contains(&uid) {
            return Err(RequestError::new(
                format!("{field}[{i}]"),
                format!(
                    "entity `{uid}` is a role this request's elevation grant puts the agent in; \
                     a request may not define it (its parents would become the agent's)"
                ),
            ));
        }
        if uid == request.agent || Some(&uid) == request.on_behalf_of.as_ref() {
            return Err(RequestError::new(
                format!("{field}[{i}]"),
                format!(
                    "entity `{uid}` is a principal of this request; its attributes and roles \
                     come from the policy bundle, never from the request"
                ),
            ));
        }
        if !seen.insert(uid.clone()) {
            return Err(RequestError::new(
                format!("{field}[{i}]"),
                format!("entity `{uid}` is given twice"),
            ));
        }
    }
    if let Some(keep) = keep {
        keep.clone_from(&parsed);
    }
    // An elevation overwrites the agent in the set, and Cedar then derives
    // anew the ancestors of every entity below the agent by walking their
    // parents, which the reachable set may leave out (an entity between a
    // reachable one and the agent). So an elevated request that brings
    // entities is decided on the full copy.
    let reach = if roles.is_empty() {
        snapshot.reach.as_ref()
    } else {
        None
    };
    let combined = match reach.and_then(|reach| {
        let roots = [&request.agent, &request.action, &request.resource]
            .into_iter()
            .chain(request.on_behalf_of.as_ref())
            .cloned()
            .chain(context_refs(context)?);
        reach.slice(&snapshot.entities, roots, &parsed)
    }) {
        // Only what the request can reach, with the request's entities; the
        // schema's action entities come with it.
        Some(mut slice) => {
            slice.extend(parsed);
            Entities::from_entities(slice, Some(&snapshot.schema))
        }
        None => snapshot
            .entities
            .clone()
            .add_entities(parsed, Some(&snapshot.schema)),
    };
    combined.map_err(|e| {
        typed_entity_error(snapshot, input)
            .unwrap_or_else(|| RequestError::new(field, crate::bundle::cedar_message(&e)))
    })
}

/// The typed request entity at fault when the entities could not be
/// combined (an attribute of the wrong type: typed entities meet the schema
/// only here, while JSON ones are each checked as they are parsed), found by
/// checking each alone: only on this error path.
fn typed_entity_error(snapshot: &Snapshot, input: &EntitiesInput) -> Option<RequestError> {
    let EntitiesInput::Typed(entities) = input else {
        return None;
    };
    // Cedar's own per-entity check, without building a set (which would
    // copy the schema's actions once per entity).
    let schema = cedar_policy_core::validator::CoreSchema::new(snapshot.schema.as_ref());
    let checker = cedar_policy_core::entities::conformance::EntitySchemaConformanceChecker::new(
        &schema,
        cedar_policy_core::extensions::Extensions::all_available(),
    );
    entities.iter().enumerate().find_map(|(i, entity)| {
        checker.validate_entity(entity.as_ref()).err().map(|e| {
            RequestError::new(
                format!("entities.entities[{i}]"),
                crate::bundle::cedar_message(&e),
            )
        })
    })
}

/// The entities the context names (in records and sets too); `None` if it
/// is not concrete.
fn context_refs(context: &Context) -> Option<Vec<EntityUid>> {
    match context.as_ref() {
        cedar_policy_core::ast::Context::Value(values) => {
            let mut out = Vec::new();
            for value in values.values() {
                crate::bundle::reach::value_refs(value, &mut out);
            }
            Some(out)
        }
        cedar_policy_core::ast::Context::RestrictedResidual(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nested context keys are the caller's data: records keep the path to
    /// the top-level key only.
    #[test]
    fn field_paths_are_cut_after_the_context_attribute_for_records() {
        let cut = |field: &str| {
            RequestError::new(field, "x")
                .field_for_records()
                .into_owned()
        };
        assert_eq!(cut("context.patient.alice@example.com"), "context.patient…");
        assert_eq!(cut("context.items[3].name"), "context.items…");
        assert_eq!(cut("context.amount_cents"), "context.amount_cents");
        assert_eq!(cut("context_json"), "context_json");
        assert_eq!(cut("principal.on_behalf_of"), "principal.on_behalf_of");
        assert_eq!(cut("entities_json[2]"), "entities_json[2]");
        assert_eq!(
            cut("context_json.inner.alice@example.com"),
            "context_json.inner…"
        );
        assert_eq!(
            cut("entities.entities[0].tags.alice@example.com"),
            "entities.entities[0]…"
        );
        assert_eq!(cut("entities.entities[1]"), "entities.entities[1]");
    }

    /// The deny line says which permits want approval, never the
    /// fingerprint (a hash of the request's values).
    #[test]
    fn the_deny_reason_of_an_approval_has_no_fingerprint() {
        let fingerprint = format!("sha256:{}", "ab".repeat(32));
        let decision = Decision {
            allowed: false,
            determining: Vec::new(),
            errors: Vec::new(),
            agent: SideDecision {
                principal: "Agent::\"a\"".parse().expect("uid"),
                allowed: true,
                determining: vec!["gated".to_owned()],
                errors: Vec::new(),
            },
            on_behalf_of: None,
            limited: None,
            approval: Some(ApprovalRequest {
                fingerprint: fingerprint.clone(),
                policies: vec!["gated".to_owned()],
            }),
            grant: None,
            elevated_by: Vec::new(),
        };
        let reason = decision.deny_reason();
        assert_eq!(reason, "approval required by gated");
        assert!(!reason.contains("abab"));
    }

    #[test]
    fn request_time_is_rfc3339_utc_to_the_millisecond() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_769_860_800_500);
        assert_eq!(RequestTime::of(at).as_str(), "2026-01-31T12:00:00.500Z");
        let now = RequestTime::now();
        assert_eq!(now.as_str().len(), "2026-01-31T12:00:00.500Z".len());
        assert!(now.as_str().ends_with('Z'));
    }

    /// The context as Cedar evaluates it from expressions: the caller's
    /// pairs and the `leash` record written as an expression.
    fn evaluated(
        pairs: &[(String, RestrictedExpression)],
        fields: LeashFields,
        request: &AuthzRequest,
        now: &RequestTime,
    ) -> Result<Context, String> {
        let mut record = Vec::new();
        if fields.agent {
            let agent = RestrictedExpression::new_entity_uid(request.agent.clone());
            record.push(("agent".to_owned(), agent));
        }
        if let (true, Some(user)) = (fields.user, &request.on_behalf_of) {
            record.push((
                "user".to_owned(),
                RestrictedExpression::new_entity_uid(user.clone()),
            ));
        }
        if fields.delegated {
            let delegated = RestrictedExpression::new_bool(request.on_behalf_of.is_some());
            record.push(("delegated".to_owned(), delegated));
        }
        if fields.now {
            record.push(("now".to_owned(), now.expression()));
        }
        let mut all = pairs.to_vec();
        all.push((
            LEASH_ATTR.to_owned(),
            RestrictedExpression::new_record(record).map_err(|e| e.to_string())?,
        ));
        Context::from_pairs(all).map_err(|e| crate::bundle::cedar_message(&e))
    }

    #[test]
    fn the_leash_record_built_as_a_value_equals_the_one_cedar_evaluates() {
        let uid = |s: &str| s.parse::<EntityUid>().expect("uid");
        let mut request = AuthzRequest {
            agent: uid(r#"Agent::"support-bot""#),
            on_behalf_of: None,
            action: uid(r#"Action::"tickets:read""#),
            resource: uid(r#"Ticket::"T-1""#),
            context: ContextInput::Empty,
            entities: EntitiesInput::None,
            grants: Vec::new(),
        };
        let caller = vec![
            ("amount".to_owned(), extension(Extension::Decimal, "12.50")),
            (
                "tags".to_owned(),
                RestrictedExpression::new_set([RestrictedExpression::new_string("a".to_owned())]),
            ),
        ];
        // Repeated times take the per-thread cache; new ones replace it.
        let times = [
            "2026-01-31T12:00:00.500Z",
            "2026-01-31T12:00:00.500Z",
            "2026-01-31T12:00:00.501Z",
            "1969-12-31T23:59:59.999Z",
            "2026-01-31T12:00:00.501Z",
        ];
        let mut compared = 0;
        for time in times {
            let now = RequestTime::at(time);
            for user in [true, false] {
                request.on_behalf_of = user.then(|| uid(r#"User::"omar""#));
                for bits in 0..16u8 {
                    let fields = LeashFields {
                        agent: bits & 1 != 0,
                        user: bits & 2 != 0,
                        delegated: bits & 4 != 0,
                        now: bits & 8 != 0,
                    };
                    for pairs in [Vec::new(), caller.clone()] {
                        let mut shape = Shape::new();
                        let direct =
                            with_leash(pairs.clone(), Some(fields), &request, &now, &mut shape);
                        let expected = evaluated(&pairs, fields, &request, &now);
                        assert_eq!(direct, expected, "{time} {fields:?} {} pairs", pairs.len());
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 5 * 2 * 16 * 2);
        // Without the record: the caller's pairs alone, or the empty context.
        let mut shape = Shape::new();
        let now = RequestTime::at(times[0]);
        assert_eq!(
            with_leash(Vec::new(), None, &request, &now, &mut shape),
            Ok(Context::empty())
        );
        assert_eq!(
            with_leash(caller.clone(), None, &request, &now, &mut shape),
            Context::from_pairs(caller.clone()).map_err(|e| crate::bundle::cedar_message(&e))
        );
        // A time Cedar refuses is the same error either way, cached or not.
        let bad = RequestTime::at("2026-13-01T00:00:00.000Z");
        let everything = LeashFields {
            agent: true,
            user: true,
            delegated: true,
            now: true,
        };
        let expected = evaluated(&caller, everything, &request, &bad);
        assert!(expected.is_err());
        for _ in 0..2 {
            let direct = with_leash(caller.clone(), Some(everything), &request, &bad, &mut shape);
            assert_eq!(direct.err(), expected.clone().err());
        }
    }
}
