//! Who may approve what: `*.approvers.json` files under `policies/`,
//! reviewed in Git with the policies they gate.
//!
//! ```json
//! {
//!   "approvers": [
//!     {
//!       "id": "dana",
//!       "keys": [{ "kid": "dana-2026-11", "public_key": "ed25519:<base64url of 32 bytes>" }],
//!       "may_approve": ["Action::\"payments:refund\"", "Action::\"consequential\""]
//!     }
//!   ]
//! }
//! ```
//!
//! `may_approve` names actions or action groups of the schema (a group covers
//! every action in it). A key is named by its `kid`, which a grant's header
//! carries, so a key can be rotated by adding the new one, then removing the
//! old one in a later change. Everything is checked at load: unknown fields,
//! malformed keys, duplicate ids or kids, actions the schema does not
//! declare, and an approver with no key or no action each refuse the bundle.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use cedar_policy::{EntityUid, Schema};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;

use super::sources::SourceFile;
use super::Diagnostic;

/// The prefix of a public key in an approvers file.
pub const KEY_PREFIX: &str = "ed25519:";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    approvers: Vec<ApproverEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproverEntry {
    id: String,
    keys: Vec<KeyEntry>,
    #[serde(default)]
    may_approve: Vec<String>,
    /// Roles this approver may grant an agent for a while.
    #[serde(default)]
    may_elevate: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    kid: String,
    public_key: String,
}

/// One approver's key.
#[derive(Debug, Clone)]
pub struct ApproverKey {
    pub approver: String,
    pub key: VerifyingKey,
}

/// Signatures remembered as verified, per bundle. An elevation grant is
/// sent with every call for hours, and checking its Ed25519 signature is
/// most of what a decision costs (about 80 µs against 25 µs on the bench
/// machine), so a signature that verified is remembered: 32 bytes each.
/// When full, the memory is emptied and fills again.
pub const VERIFIED_CAPACITY: usize = 4096;

/// Why a signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No key of the bundle has this `kid`.
    UnknownKey,
    /// The key does not verify the signature.
    Invalid,
}

/// The bundle's approvers.
#[derive(Debug, Clone, Default)]
pub struct Approvers {
    keys: HashMap<String, ApproverKey>,
    /// Approver id → the concrete actions they may approve.
    actions: HashMap<String, HashSet<EntityUid>>,
    /// Approver id → the roles they may grant.
    roles: HashMap<String, HashSet<EntityUid>>,
    /// Every grantable role by its printed form, so a grant naming one is
    /// read without Cedar's parser (a few microseconds a call).
    role_names: HashMap<String, EntityUid>,
    /// Digests of (public key, kid, signed input, signature) that
    /// verified. Dropped with the snapshot, so a key removed by a reload is
    /// never trusted from memory.
    verified: Arc<Mutex<HashSet<[u8; 32]>>>,
}

impl Approvers {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of approvers.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// The key named `kid`.
    pub fn key(&self, kid: &str) -> Option<&ApproverKey> {
        self.keys.get(kid)
    }

    /// Checks `signature` over `input` with the key named `kid` (strict
    /// Ed25519). With `remember`, a signature that verifies is kept so the
    /// same one is accepted next time without the curve arithmetic.
    pub fn verify_signature(
        &self,
        kid: &str,
        input: &[u8],
        signature: &Signature,
        remember: bool,
    ) -> Result<&ApproverKey, SignatureError> {
        use sha2::{Digest, Sha256};
        let key = self.keys.get(kid).ok_or(SignatureError::UnknownKey)?;
        let digest: [u8; 32] = {
            let mut h = Sha256::new();
            // The key itself is in the digest, so a remembered signature
            // can only ever stand for a check with this very key.
            h.update(key.key.as_bytes());
            h.update((kid.len() as u64).to_be_bytes());
            h.update(kid.as_bytes());
            h.update((input.len() as u64).to_be_bytes());
            h.update(input);
            h.update(signature.to_bytes());
            h.finalize().into()
        };
        // A poisoned lock only means a panic elsewhere while holding it;
        // the set is still whole.
        let lock = || {
            self.verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if remember && lock().contains(&digest) {
            return Ok(key);
        }
        key.key
            .verify_strict(input, signature)
            .map_err(|_| SignatureError::Invalid)?;
        if remember {
            let mut verified = lock();
            if verified.len() >= VERIFIED_CAPACITY {
                verified.clear();
            }
            verified.insert(digest);
        }
        Ok(key)
    }

    /// Signatures remembered as verified.
    pub fn verified_len(&self) -> usize {
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// The grantable role printed as `text`, if there is one.
    pub fn role_named(&self, text: &str) -> Option<&EntityUid> {
        self.role_names.get(text)
    }

    /// Whether `approver` may grant `role`.
    pub fn may_elevate(&self, approver: &str, role: &EntityUid) -> bool {
        self.roles
            .get(approver)
            .is_some_and(|roles| roles.contains(role))
    }

    /// Whether `approver` may approve `action`.
    pub fn may_approve(&self, approver: &str, action: &EntityUid) -> bool {
        self.actions
            .get(approver)
            .is_some_and(|actions| actions.contains(action))
    }

    /// Reads `files`, checking each against `schema`.
    pub fn parse(files: &[SourceFile], schema: &Schema, diagnostics: &mut Vec<Diagnostic>) -> Self {
        let mut approvers = Self::default();
        let groups = match schema.action_entities() {
            Ok(entities) => Some(entities),
            Err(e) => {
                diagnostics.push(Diagnostic::plain(
                    None,
                    format!("schema: action groups could not be read: {e}"),
                ));
                None
            }
        };
        let all_actions: Vec<EntityUid> = schema.actions().cloned().collect();
        for file in files {
            let mut problem = |message: String| {
                diagnostics.push(Diagnostic::plain(Some(&file.path), message));
            };
            let parsed: File = match serde_json::from_str(&file.text) {
                Ok(parsed) => parsed,
                Err(e) => {
                    problem(format!("not a valid approvers file: {e}"));
                    continue;
                }
            };
            for (i, entry) in parsed.approvers.into_iter().enumerate() {
                let at = format!("approvers[{i}] (`{}`)", entry.id);
                if entry.id.is_empty() {
                    problem(format!("approvers[{i}].id: must not be empty"));
                    continue;
                }
                if approvers.actions.contains_key(&entry.id) {
                    problem(format!("{at}: approver id defined twice"));
                    continue;
                }
                if entry.keys.is_empty() {
                    problem(format!("{at}.keys: an approver needs at least one key"));
                }
                if entry.may_approve.is_empty() && entry.may_elevate.is_empty() {
                    problem(format!(
                        "{at}: `may_approve` and `may_elevate` name nothing; this approver could \
                         approve nothing"
                    ));
                }
                let mut roles = HashSet::new();
                for (r, text) in entry.may_elevate.iter().enumerate() {
                    match text.parse::<EntityUid>() {
                        Ok(uid) if schema.entity_types().any(|t| *t == uid.type_name().clone()) => {
                            roles.insert(uid);
                        }
                        Ok(uid) => problem(format!(
                            "{at}.may_elevate[{r}]: `{text}`: the schema declares no entity type \
                             `{}`",
                            uid.type_name()
                        )),
                        Err(_) => problem(format!(
                            "{at}.may_elevate[{r}]: `{text}` is not an entity uid such as \
                             `AgentRole::\"ticket-escalation\"`"
                        )),
                    }
                }
                for role in &roles {
                    approvers.role_names.insert(role.to_string(), role.clone());
                }
                approvers.roles.insert(entry.id.clone(), roles);
                for (k, key) in entry.keys.iter().enumerate() {
                    match parse_key(&key.public_key) {
                        Ok(_) if key.kid.is_empty() => {
                            problem(format!("{at}.keys[{k}].kid: must not be empty"));
                        }
                        Ok(_) if approvers.keys.contains_key(&key.kid) => {
                            problem(format!("{at}.keys[{k}].kid: `{}` is used twice", key.kid));
                        }
                        Ok(verifying) => {
                            approvers.keys.insert(
                                key.kid.clone(),
                                ApproverKey {
                                    approver: entry.id.clone(),
                                    key: verifying,
                                },
                            );
                        }
                        Err(why) => problem(format!("{at}.keys[{k}].public_key: {why}")),
                    }
                }
                let mut covered = HashSet::new();
                for (a, text) in entry.may_approve.iter().enumerate() {
                    let listed = match text.parse::<EntityUid>() {
                        Ok(uid) if all_actions.contains(&uid) || is_group(&groups, &uid) => uid,
                        Ok(_) => {
                            problem(format!(
                                "{at}.may_approve[{a}]: `{text}` is not an action or action \
                                 group of the schema"
                            ));
                            continue;
                        }
                        Err(_) => {
                            problem(format!(
                                "{at}.may_approve[{a}]: `{text}` is not an entity uid such as \
                                 `Action::\"payments:refund\"`"
                            ));
                            continue;
                        }
                    };
                    for action in &all_actions {
                        let in_group = groups
                            .as_ref()
                            .and_then(|g| g.ancestors(action))
                            .is_some_and(|mut up| up.any(|p| *p == listed));
                        if *action == listed || in_group {
                            covered.insert(action.clone());
                        }
                    }
                }
                approvers.actions.insert(entry.id, covered);
            }
        }
        approvers
    }
}

fn is_group(groups: &Option<cedar_policy::Entities>, uid: &EntityUid) -> bool {
    groups.as_ref().is_some_and(|g| g.get(uid).is_some())
}

/// `ed25519:` and the base64url (or standard base64) of a 32-byte key.
pub fn parse_key(text: &str) -> Result<VerifyingKey, String> {
    let encoded = text
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| format!("expected `{KEY_PREFIX}` and the key in base64url"))?;
    let bytes = decode_base64(encoded).ok_or("not base64url")?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes; an Ed25519 public key has 32", b.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 public key".to_owned())
}

/// Base64url without padding (as in JWS), or with padding, or standard.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    URL_SAFE_NO_PAD
        .decode(text)
        .or_else(|_| URL_SAFE.decode(text))
        .or_else(|_| STANDARD.decode(text))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer as _, SigningKey};
    use std::str::FromStr;

    fn approvers(seed: u8) -> Approvers {
        let schema = Schema::from_str(
            r#"entity AgentRole; entity Agent in [AgentRole];
               action "a" appliesTo { principal: Agent, resource: Agent };"#,
        )
        .expect("schema");
        let key = SigningKey::from_bytes(&[seed; 32]);
        let public =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
        let text = format!(
            r#"{{"approvers": [{{"id": "mia", "keys": [{{"kid": "mia-1", "public_key": "ed25519:{public}"}}],
                "may_approve": ["Action::\"a\""], "may_elevate": ["AgentRole::\"r\""]}}]}}"#
        );
        let mut diagnostics = Vec::new();
        let parsed = Approvers::parse(
            &[SourceFile {
                path: "policies/t.approvers.json".to_owned(),
                text,
            }],
            &schema,
            &mut diagnostics,
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        parsed
    }

    #[test]
    fn verified_signatures_are_remembered_only_when_asked_and_only_if_valid() {
        let set = approvers(7);
        let key = SigningKey::from_bytes(&[7; 32]);
        let good = key.sign(b"claims");
        let forged = SigningKey::from_bytes(&[8; 32]).sign(b"claims");

        assert!(set
            .verify_signature("mia-1", b"claims", &good, false)
            .is_ok());
        assert_eq!(set.verified_len(), 0);
        assert!(set
            .verify_signature("mia-1", b"claims", &good, true)
            .is_ok());
        assert!(set
            .verify_signature("mia-1", b"claims", &good, true)
            .is_ok());
        assert_eq!(set.verified_len(), 1);
        // Neither another signature nor other input rides on the memory.
        assert_eq!(
            set.verify_signature("mia-1", b"claims", &forged, true)
                .err(),
            Some(SignatureError::Invalid)
        );
        assert_eq!(
            set.verify_signature("mia-1", b"claims!", &good, true).err(),
            Some(SignatureError::Invalid)
        );
        assert_eq!(
            set.verify_signature("mia-2", b"claims", &good, true).err(),
            Some(SignatureError::UnknownKey)
        );
        assert_eq!(set.verified_len(), 1);
        assert_eq!(
            set.role_named("AgentRole::\"r\"").map(ToString::to_string),
            Some("AgentRole::\"r\"".to_owned())
        );
        // Another bundle's approvers start with nothing remembered, and a
        // different key under the same kid refuses the signature.
        let other = approvers(9);
        assert_eq!(
            other
                .verify_signature("mia-1", b"claims", &good, true)
                .err(),
            Some(SignatureError::Invalid)
        );
    }
}
