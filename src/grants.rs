//! Signed grants: a person's approval of one gated request, or an agent's
//! time-boxed membership in a role (elevation), each as a
//! compact JWS (Ed25519, `alg: EdDSA`) that leash verifies offline against
//! the approvers' public keys shipped in the bundle
//! ([`crate::bundle::approvers`]).
//!
//! ```text
//! header  {"alg":"EdDSA","typ":"leash-grant","kid":"dana-2026-11"}
//! claims  {"grant":"approve","approver":"dana","fingerprint":"sha256:…",
//!          "jti":"…","iat":1795426200,"exp":1795426800}
//! ```
//!
//! A request carrying a grant for its own fingerprint, signed by a key of
//! an approver who may approve its action, within the grant's validity, is
//! allowed once: the grant id is remembered until the grant expires, so a
//! second use is refused. Every other grant is a DENY with a reason
//! saying which check failed.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey};
use serde::{Deserialize, Serialize};

use crate::bundle::approvers::{decode_base64, SignatureError};
use crate::bundle::Snapshot;
use crate::engine::{AuthzRequest, Decision, GrantUse};

/// The JWS `typ` of a leash grant.
pub const TYP: &str = "leash-grant";

/// Default longest lifetime (`exp - iat`) of an approval grant leash
/// accepts.
pub const DEFAULT_MAX_APPROVAL_TTL: Duration = Duration::from_secs(15 * 60);

/// Default longest window of an elevation grant.
pub const DEFAULT_MAX_ELEVATION: Duration = Duration::from_secs(4 * 3600);

/// Clock difference between the approver's machine and this one that is
/// forgiven when checking `iat`.
const SKEW: u64 = 60;

/// Most grant ids remembered at once (each until its grant expires).
pub const MAX_USED_GRANTS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub alg: String,
    pub typ: String,
    pub kid: String,
}

/// What a grant says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// `approve` or `elevate`.
    pub grant: String,
    pub approver: String,
    /// `approve`: the fingerprint of the request approved.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
    /// `elevate`: the agent (`Agent::"support-bot"`), the role it joins,
    /// and, optionally, the only user it may act for meanwhile.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// The grant's id: single use.
    pub jti: String,
    /// Issued at and expiry, seconds since the Unix epoch.
    pub iat: u64,
    pub exp: u64,
}

/// Signs `claims` with `key`, named `kid`: the compact JWS.
pub fn sign(key: &SigningKey, kid: &str, claims: &Claims) -> Result<String, serde_json::Error> {
    let header = Header {
        alg: "EdDSA".to_owned(),
        typ: TYP.to_owned(),
        kid: kid.to_owned(),
    };
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
    );
    let signature = key.sign(input.as_bytes());
    Ok(format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    ))
}

/// A token taken apart, not verified.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub header: Header,
    pub claims: Claims,
    signing_input: String,
    signature: Signature,
}

/// Takes a token apart without verifying it (for `leash grant inspect`, and
/// as verification's first step).
pub fn decode(token: &str) -> Result<Decoded, String> {
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS (three base64url parts joined by `.`)".to_owned());
    };
    let json = |part: &str, what: &str| {
        decode_base64(part).ok_or_else(|| format!("the {what} is not base64url"))
    };
    let header: Header = serde_json::from_slice(&json(h, "header")?)
        .map_err(|e| format!("the header is not a leash grant header: {e}"))?;
    if header.alg != "EdDSA" || header.typ != TYP {
        return Err(format!(
            "the header says alg `{}`, typ `{}`; a leash grant is alg `EdDSA`, typ `{TYP}`",
            header.alg, header.typ
        ));
    }
    let claims: Claims = serde_json::from_slice(&json(c, "claims part")?)
        .map_err(|e| format!("the claims are not a leash grant's: {e}"))?;
    let signature: [u8; 64] = json(s, "signature")?
        .try_into()
        .map_err(|_| "the signature is not 64 bytes".to_owned())?;
    Ok(Decoded {
        header,
        claims,
        signing_input: format!("{h}.{c}"),
        signature: Signature::from_bytes(&signature),
    })
}

/// Why a grant was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a leash grant, or its signature does not verify.
    Forged,
    /// Signed with a key the bundle does not name (or no longer does).
    UnknownKey,
    Expired,
    NotYetValid,
    /// Lives longer than leash accepts.
    TooLong,
    /// Already used.
    Reused,
    /// For another request.
    WrongFingerprint,
    /// Its approver may not approve this action.
    UnauthorizedApprover,
    /// Every slot for used grant ids holds one that has not expired.
    Capacity,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Forged => "grant_forged",
            Self::UnknownKey => "grant_unknown_key",
            Self::Expired => "grant_expired",
            Self::NotYetValid => "grant_not_yet_valid",
            Self::TooLong => "grant_lifetime_too_long",
            Self::Reused => "grant_reused",
            Self::WrongFingerprint => "grant_wrong_fingerprint",
            Self::UnauthorizedApprover => "grant_unauthorized_approver",
            Self::Capacity => "grant_capacity",
        }
    }
}

/// Checks a token's signature, key and times; not what it approves.
pub fn verify(
    snapshot: &Snapshot,
    token: &str,
    now: u64,
    limits: Lifetimes,
) -> Result<Decoded, (Rejection, String)> {
    let decoded = decode(token).map_err(|why| (Rejection::Forged, why))?;
    let kid = &decoded.header.kid;
    // Elevations are sent again and again for their window, so their
    // verified signatures are remembered; an approval is used once.
    let remember = decoded.claims.grant == "elevate";
    let key = snapshot
        .approvers
        .verify_signature(
            kid,
            decoded.signing_input.as_bytes(),
            &decoded.signature,
            remember,
        )
        .map_err(|e| match e {
            SignatureError::UnknownKey => (
                Rejection::UnknownKey,
                format!("key `{kid}` is not one of the bundle's approver keys"),
            ),
            SignatureError::Invalid => (
                Rejection::Forged,
                format!("the signature does not verify with key `{kid}`"),
            ),
        })?;
    let c = &decoded.claims;
    if c.jti.trim().is_empty() {
        return Err((
            Rejection::Forged,
            "the grant has no id (`jti`); every leash grant has one".to_owned(),
        ));
    }
    let max_ttl = match c.grant.as_str() {
        "approve" if !c.fingerprint.is_empty() => limits.approval,
        "elevate" if !c.agent.is_empty() && !c.role.is_empty() => limits.elevation,
        other => {
            return Err((
                Rejection::Forged,
                format!(
                    "grant kind `{other}` with these claims: expected `approve` with a \
                     fingerprint, or `elevate` with an agent and a role"
                ),
            ))
        }
    };
    if c.approver != key.approver {
        return Err((
            Rejection::Forged,
            format!(
                "names approver `{}` but is signed with a key of `{}`",
                c.approver, key.approver
            ),
        ));
    }
    if c.exp <= c.iat {
        // Refused with the lifetime check's reason: no lifetime is valid.
        return Err((
            Rejection::TooLong,
            format!(
                "expires ({}) at or before it was issued ({}): no lifetime leash accepts",
                c.exp, c.iat
            ),
        ));
    }
    if c.exp - c.iat > max_ttl.as_secs() {
        return Err((
            Rejection::TooLong,
            format!(
                "lives {} s; leash accepts at most {} s",
                c.exp.saturating_sub(c.iat),
                max_ttl.as_secs()
            ),
        ));
    }
    if now + SKEW < c.iat {
        return Err((
            Rejection::NotYetValid,
            format!("issued at {} is in the future (now {now})", c.iat),
        ));
    }
    if now >= c.exp {
        return Err((
            Rejection::Expired,
            format!("expired at {} (now {now})", c.exp),
        ));
    }
    Ok(decoded)
}

/// The longest lifetimes accepted, by kind of grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub approval: Duration,
    pub elevation: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            approval: DEFAULT_MAX_APPROVAL_TTL,
            elevation: DEFAULT_MAX_ELEVATION,
        }
    }
}

/// The roles valid elevation grants add to the request's agent, or the
/// refusal of the first grant that fails a check. Approval grants are left
/// to [`apply`].
pub fn elevations(
    snapshot: &Snapshot,
    request: &AuthzRequest,
    now: SystemTime,
    limits: Lifetimes,
) -> Result<Vec<(cedar_policy::EntityUid, GrantUse)>, GrantUse> {
    let mut roles = Vec::new();
    if request.grants.is_empty() {
        return Ok(roles);
    }
    let now = seconds(now);
    for token in &request.grants {
        let claimed = decode(token).ok().map(|d| d.claims);
        if claimed.as_ref().is_some_and(|c| c.grant != "elevate") {
            continue;
        }
        let refusal = |rejection: Rejection, detail: String| GrantUse {
            outcome: rejection.reason(),
            grant_id: claimed.as_ref().map(|c| c.jti.clone()).unwrap_or_default(),
            approver: claimed
                .as_ref()
                .map(|c| c.approver.clone())
                .unwrap_or_default(),
            expires_at: claimed.as_ref().map_or(0, |c| c.exp),
            detail,
        };
        let verified = verify(snapshot, token, now, limits).map_err(|(r, d)| refusal(r, d))?;
        let c = &verified.claims;
        let wrong = |what: &str| {
            refusal(
                Rejection::WrongFingerprint,
                format!("grant `{}` elevates {what}", c.jti),
            )
        };
        if c.agent != request.agent.to_string() {
            return Err(wrong(&format!("{}, not {}", c.agent, request.agent)));
        }
        if !c.user.is_empty() {
            let acting_for = request
                .on_behalf_of
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            if c.user != acting_for {
                return Err(wrong(&format!(
                    "only while acting for {}, and this request is for {}",
                    c.user,
                    if acting_for.is_empty() {
                        "no user"
                    } else {
                        &acting_for
                    }
                )));
            }
        }
        let parsed = match snapshot.approvers.role_named(&c.role) {
            Some(role) => Ok(role.clone()),
            None => c.role.parse::<cedar_policy::EntityUid>(),
        };
        let Ok(role) = parsed else {
            return Err(refusal(
                Rejection::Forged,
                format!("role `{}` is not an entity uid", c.role),
            ));
        };
        if !snapshot.approvers.may_elevate(&c.approver, &role) {
            return Err(refusal(
                Rejection::UnauthorizedApprover,
                format!("approver `{}` may not grant {role}", c.approver),
            ));
        }
        roles.push((
            role.clone(),
            GrantUse {
                outcome: "elevated",
                grant_id: c.jti.clone(),
                approver: c.approver.clone(),
                expires_at: c.exp,
                detail: format!(
                    "{} in {role} until {} (granted by {})",
                    request.agent, c.exp, c.approver
                ),
            },
        ));
    }
    Ok(roles)
}

fn seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Grant ids already used, by approver, each kept until its grant expires.
/// Ids are the approver's to choose, so one approver's ids never use up
/// another's.
#[derive(Debug, Default)]
pub struct UsedGrants {
    used: Mutex<HashMap<(String, String), u64>>,
}

impl UsedGrants {
    /// Marks `approver`'s `jti` used; false when it already was (or no slot
    /// is left).
    fn take(&self, approver: &str, jti: &str, exp: u64, now: u64) -> Result<(), Rejection> {
        let key = (approver.to_owned(), jti.to_owned());
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if used.contains_key(&key) {
            return Err(Rejection::Reused);
        }
        if used.len() >= MAX_USED_GRANTS {
            used.retain(|_, exp| *exp > now);
            if used.len() >= MAX_USED_GRANTS {
                return Err(Rejection::Capacity);
            }
        }
        used.insert(key, exp);
        Ok(())
    }

    /// Whether `approver`'s `jti` is marked used.
    fn is_used(&self, approver: &str, jti: &str) -> bool {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&(approver.to_owned(), jti.to_owned()))
    }

    /// Gives `approver`'s `jti` back: the decision it was taken for did not
    /// allow after all (a limit refused it, or it could not be recorded).
    pub fn release(&self, approver: &str, jti: &str) {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(approver.to_owned(), jti.to_owned()));
    }

    /// Marks `approver`'s `jti` used, as a trail read at start says it was.
    pub fn remember(&self, approver: &str, jti: &str, exp: u64) {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((approver.to_owned(), jti.to_owned()), exp);
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Applies the request's grants to its decision: an APPROVAL_REQUIRED with a
/// valid grant for its fingerprint becomes ALLOW (and the grant is used);
/// any grant that fails a check makes the decision DENY, saying which check.
/// A valid grant on a request that needs none is left unused.
pub fn apply(
    snapshot: &Snapshot,
    used: &UsedGrants,
    request: &AuthzRequest,
    decision: &mut Decision,
    now: SystemTime,
    limits: Lifetimes,
) {
    // A refused elevation grant has decided already.
    if request.grants.is_empty()
        || decision
            .grant
            .as_ref()
            .is_some_and(|g| g.outcome != "elevated")
    {
        return;
    }
    let now = seconds(now);
    // Every approval grant is checked before one is used, so the answer
    // does not depend on where a bad one sits in the list.
    let mut approvals = Vec::new();
    for token in &request.grants {
        if decode(token).is_ok_and(|d| d.claims.grant == "elevate") {
            continue;
        }
        match verify(snapshot, token, now, limits) {
            Ok(v) => approvals.push(v.claims),
            Err((rejection, detail)) => {
                // What an unverified grant claims is still worth recording
                // (which grant, whose name it bears).
                let claimed = decode(token).ok().map(|d| d.claims);
                refuse(decision, rejection, claimed.as_ref(), detail);
                return;
            }
        }
    }
    // A valid grant on a request that needs none is left unused.
    let Some(wanted) = decision.approval.as_ref().map(|a| a.fingerprint.clone()) else {
        return;
    };
    for c in &approvals {
        if c.fingerprint != wanted {
            // Without either fingerprint: the detail is logged and recorded,
            // and a fingerprint would let their readers confirm guesses of
            // the request's values. `leash grant inspect` shows the grant's.
            let detail = format!(
                "grant `{}` approves another request, not this one (its `fingerprint` differs from \
                 this request's fingerprint)",
                c.jti
            );
            refuse(decision, Rejection::WrongFingerprint, Some(c), detail);
            return;
        }
        if !snapshot.approvers.may_approve(&c.approver, &request.action) {
            let detail = format!(
                "approver `{}` may not approve {}",
                c.approver, request.action
            );
            refuse(decision, Rejection::UnauthorizedApprover, Some(c), detail);
            return;
        }
    }
    // One grant is used, but a used one anywhere in the list denies, as
    // any other bad grant does.
    if let Some(c) = approvals
        .iter()
        .skip(1)
        .find(|c| used.is_used(&c.approver, &c.jti))
    {
        let detail = format!("grant `{}` was already used", c.jti);
        refuse(decision, Rejection::Reused, Some(c), detail);
        return;
    }
    if let Some(c) = approvals.first() {
        if let Err(rejection) = used.take(&c.approver, &c.jti, c.exp, now) {
            let detail = match rejection {
                Rejection::Reused => format!("grant `{}` was already used", c.jti),
                _ => "every slot for used grant ids is taken by an unexpired grant".to_owned(),
            };
            refuse(decision, rejection, Some(c), detail);
            return;
        }
        decision.allowed = true;
        decision.approval = None;
        decision.grant = Some(GrantUse {
            outcome: "used",
            grant_id: c.jti.clone(),
            approver: c.approver.clone(),
            expires_at: c.exp,
            detail: format!(
                "approved by {} with grant {} (expires {})",
                c.approver, c.jti, c.exp
            ),
        });
    }
}

fn refuse(decision: &mut Decision, rejection: Rejection, claims: Option<&Claims>, detail: String) {
    decision.allowed = false;
    decision.approval = None;
    decision.determining.clear();
    decision.grant = Some(GrantUse {
        outcome: rejection.reason(),
        grant_id: claims.map(|c| c.jti.clone()).unwrap_or_default(),
        approver: claims.map(|c| c.approver.clone()).unwrap_or_default(),
        expires_at: claims.map_or(0, |c| c.exp),
        detail,
    });
}

/// A fresh signing key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey, getrandom::Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A private key file (`leash keygen`): the key, and the `kid` and
/// approver it stands for when they were given, so signing needs only the
/// file.
#[derive(Debug)]
pub struct KeyFile {
    pub key: SigningKey,
    pub kid: Option<String>,
    pub approver: Option<String>,
}

/// The text of a key file: a comment, `kid:` and `approver:` lines when
/// given, and `ed25519-private:` with the base64url of the 32-byte seed.
pub fn key_file_text(key: &SigningKey, kid: Option<&str>, approver: Option<&str>) -> String {
    let mut text =
        "# leash approver key: keep it secret; its public half goes in an approvers file\n"
            .to_owned();
    if let Some(kid) = kid {
        text.push_str(&format!("kid: {kid}\n"));
    }
    if let Some(approver) = approver {
        text.push_str(&format!("approver: {approver}\n"));
    }
    text.push_str(&format!(
        "{PRIVATE_PREFIX}{}\n",
        URL_SAFE_NO_PAD.encode(key.to_bytes())
    ));
    text
}

/// Reads what [`key_file_text`] wrote (a file of the key line alone too).
pub fn parse_key_file(text: &str) -> Result<KeyFile, String> {
    let (mut key, mut kid, mut approver) = (None, None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let field = |rest: &str, name: &str, slot: &mut Option<String>| {
            let value = rest.trim();
            if value.is_empty() {
                return Err(format!("line {}: `{name}:` with no value", n + 1));
            }
            if slot.replace(value.to_owned()).is_some() {
                return Err(format!("line {}: a second `{name}:`", n + 1));
            }
            Ok(())
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        } else if let Some(rest) = line.strip_prefix("kid:") {
            field(rest, "kid", &mut kid)?;
        } else if let Some(rest) = line.strip_prefix("approver:") {
            field(rest, "approver", &mut approver)?;
        } else if let Some(encoded) = line.strip_prefix(PRIVATE_PREFIX) {
            let seed: [u8; 32] = decode_base64(encoded)
                .ok_or_else(|| format!("line {}: the key is not base64url", n + 1))?
                .try_into()
                .map_err(|_| format!("line {}: the key is not 32 bytes", n + 1))?;
            if key.replace(SigningKey::from_bytes(&seed)).is_some() {
                return Err(format!("line {}: a second key", n + 1));
            }
        } else {
            return Err(format!(
                "line {}: expected `kid:`, `approver:` or `{PRIVATE_PREFIX}` and the key (from `leash keygen`)",
                n + 1
            ));
        }
    }
    Ok(KeyFile {
        key: key.ok_or_else(|| {
            format!("no `{PRIVATE_PREFIX}` line: not a key file from `leash keygen`")
        })?,
        kid,
        approver,
    })
}

const PRIVATE_PREFIX: &str = "ed25519-private:";

/// `ed25519:` and the base64url of `key`'s public half, as approvers files
/// hold it.
pub fn public_key_text(key: &SigningKey) -> String {
    format!(
        "{}{}",
        crate::bundle::approvers::KEY_PREFIX,
        URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_ids_fill_up_to_the_cap_then_refuse_until_one_expires() {
        let used = UsedGrants::default();
        let now = 1_000;
        // All but one live for an hour; the last lives ten seconds.
        for i in 0..MAX_USED_GRANTS - 1 {
            assert_eq!(
                used.take("dana", &format!("g-{i}"), now + 3600, now),
                Ok(())
            );
        }
        assert_eq!(used.take("dana", "short", now + 10, now), Ok(()));
        assert_eq!(used.len(), MAX_USED_GRANTS);
        // Full of unexpired ids: refused, and nothing forgotten.
        assert_eq!(
            used.take("eve", "one-more", now + 60, now),
            Err(Rejection::Capacity)
        );
        assert_eq!(
            used.take("dana", "g-0", now + 3600, now),
            Err(Rejection::Reused)
        );
        // Once one has expired, its slot is free.
        assert_eq!(used.take("eve", "one-more", now + 60, now + 10), Ok(()));
        assert_eq!(used.len(), MAX_USED_GRANTS);
        assert!(
            !used.is_used("dana", "short"),
            "the expired id is forgotten"
        );
    }
}
