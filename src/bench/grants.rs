//! What grants cost a decision, in-process on one thread: verifying a
//! grant's Ed25519 signature, and applying an elevation. The first decision
//! with an elevation builds the bundle's entity set with the agent in the
//! role (a cost in proportion to the entities, paid once per snapshot and
//! set); later ones reuse it. Measured on the example bundle with an
//! approver and filler users added, so the entity count is the variable.

use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::driver::{self, Timing};
use super::BenchError;
use crate::bundle::{BuildCache, BundleSources, Snapshot, SourceFile};
use crate::engine::{self, RequestTime};
use crate::grants::{self, Claims, Lifetimes};
use crate::proto::v1 as pb;
use crate::service::convert;

/// Interleaved rounds of each variant (the order alternates per round).
const ROUNDS: usize = 3;

/// Fewest verifications timed for the mean.
const MIN_VERIFICATIONS: u32 = 20;

#[derive(Debug, Clone, Serialize)]
pub struct ElevationPoint {
    /// Entities in the bundle.
    pub entities: usize,
    /// The first decision with the grant: verification, building the
    /// elevated entity set, and the decision.
    pub first_use_ns: u64,
    /// Median of the rounds' p50 without a grant and with the elevation
    /// (set already built).
    pub p50_without_ns: u64,
    pub p50_elevated_ns: u64,
    /// A request that brings an entity of its own (a ticket), without a
    /// grant: decided on the bundle entities it can reach.
    pub p50_request_entity_ns: u64,
    /// The same on a full copy of the bundle's entities, as with
    /// `--policy-index off` (the bundle built without the index).
    pub p50_request_entity_full_copy_ns: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrantsReport {
    /// Mean time to decode and verify a grant whose signature is checked
    /// (an approval: each is used once), and an elevation whose verified
    /// signature the bundle remembers.
    pub verify_ns: f64,
    pub verify_remembered_ns: f64,
    pub points: Vec<ElevationPoint>,
}

fn task(what: impl std::fmt::Display) -> BenchError {
    BenchError::Task(format!("grants: {what}"))
}

/// The example bundle with an approver who may grant the escalation role,
/// and `extra` more users.
fn sources(public_key: &str, extra: usize) -> BundleSources {
    let mut sources = BundleSources::embedded();
    sources.approvers.push(SourceFile {
        path: "policies/bench.approvers.json".to_owned(),
        text: serde_json::json!({"approvers": [{
            "id": "bench-manager",
            "keys": [{"kid": "bench-1", "public_key": public_key}],
            "may_approve": ["Action::\"tickets\""],
            "may_elevate": ["AgentRole::\"ticket-escalation\""],
        }]})
        .to_string(),
    });
    if extra > 0 {
        let users: Vec<serde_json::Value> = (0..extra)
            .map(|i| {
                serde_json::json!({
                    "uid": {"type": "User", "id": format!("bench-user-{i}")},
                    "attrs": {"display_name": format!("User {i}"), "department": "support",
                              "region": if i % 2 == 0 { "EMEA" } else { "APAC" }},
                    "parents": [{"type": "Role", "id": "support"}],
                })
            })
            .collect();
        sources.entities.push(SourceFile {
            path: "policies/entities/bench-users.entities.json".to_owned(),
            text: serde_json::Value::Array(users).to_string(),
        });
    }
    sources
}

fn uid(ty: &str, id: &str) -> Option<pb::EntityUid> {
    Some(pb::EntityUid {
        r#type: ty.to_owned(),
        id: id.to_owned(),
    })
}

/// The Support Bot, for Alice, opening a ticket: allowed only in the
/// escalation role.
fn open_ticket(grant: Option<&str>) -> pb::IsAuthorizedRequest {
    pb::IsAuthorizedRequest {
        principal: Some(pb::Principal {
            agent: uid("Agent", "support-bot"),
            on_behalf_of: uid("User", "alice"),
        }),
        action: uid("Action", "tickets:create"),
        resource: uid("Customer", "C-100"),
        grants: grant.map(str::to_owned).into_iter().collect(),
        ..Default::default()
    }
}

/// The Support Bot reading, for Alice, a ticket the request brings.
fn read_brought_ticket() -> pb::IsAuthorizedRequest {
    pb::IsAuthorizedRequest {
        principal: Some(pb::Principal {
            agent: uid("Agent", "support-bot"),
            on_behalf_of: uid("User", "alice"),
        }),
        action: uid("Action", "tickets:read"),
        resource: uid("Ticket", "T-900"),
        entities_input: Some(pb::is_authorized_request::EntitiesInput::EntitiesJson(
            serde_json::json!([{
                "uid": {"type": "Ticket", "id": "T-900"},
                "attrs": {"customer": {"__entity": {"type": "Customer", "id": "C-100"}},
                          "region": "EMEA", "tier": 1},
                "parents": [],
            }])
            .to_string(),
        )),
        ..Default::default()
    }
}

fn decide(
    snapshot: &Snapshot,
    req: &pb::IsAuthorizedRequest,
) -> Result<engine::Decision, BenchError> {
    let at = SystemTime::now();
    let req = convert::request(req).map_err(task)?;
    engine::decide_with_grants(
        snapshot,
        &req,
        &RequestTime::of(at),
        at,
        Lifetimes::default(),
    )
    .map_err(task)
}

pub fn measure(
    extra_entities: &[usize],
    timing: Timing,
    min_calls: u64,
) -> Result<GrantsReport, BenchError> {
    let key = grants::generate_key().map_err(task)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(task)?
        .as_secs();
    let claims = Claims {
        grant: "elevate".to_owned(),
        approver: "bench-manager".to_owned(),
        fingerprint: String::new(),
        agent: "Agent::\"support-bot\"".to_owned(),
        role: "AgentRole::\"ticket-escalation\"".to_owned(),
        user: String::new(),
        jti: "bench-elevation".to_owned(),
        iat: now,
        exp: now + 3600,
    };
    let token = grants::sign(&key, "bench-1", &claims).map_err(task)?;
    let approval = grants::sign(
        &key,
        "bench-1",
        &Claims {
            grant: "approve".to_owned(),
            fingerprint: format!("sha256:{}", "0".repeat(64)),
            agent: String::new(),
            role: String::new(),
            jti: "bench-approval".to_owned(),
            exp: now + 600,
            ..claims
        },
    )
    .map_err(task)?;
    let (with, without) = (open_ticket(Some(&token)), open_ticket(None));
    let mut points = Vec::new();
    let (mut verify_ns, mut verify_remembered_ns) = (0.0, 0.0);
    for &extra in extra_entities {
        let snapshot = Snapshot::build(&sources(&grants::public_key_text(&key), extra))
            .map_err(|e| task(format!("the bundle: {e:?}")))?;
        // Timed before the verifications below, which leave the
        // elevation's signature remembered.
        let began = Instant::now();
        let first = decide(&snapshot, &with)?;
        let first_use = began.elapsed();
        if verify_ns == 0.0 {
            // As many verifications as fit the measuring time, at least
            // `MIN_VERIFICATIONS`.
            let mean = |token: &str| -> Result<f64, BenchError> {
                let began = Instant::now();
                let mut n = 0u32;
                while n < MIN_VERIFICATIONS || began.elapsed() < timing.measure {
                    let verified = grants::verify(&snapshot, token, now, Lifetimes::default())
                        .map_err(|(r, d)| task(format!("{}: {d}", r.reason())))?;
                    std::hint::black_box(verified);
                    n += 1;
                }
                Ok(began.elapsed().as_nanos() as f64 / f64::from(n))
            };
            verify_ns = mean(&approval)?;
            verify_remembered_ns = mean(&token)?;
        }
        // The figures are of a real elevation: the grant applied and the
        // role's permit the one that allowed.
        let outcome = first.grant.as_ref().map(|g| g.outcome);
        if !first.allowed || outcome != Some("elevated") || decide(&snapshot, &without)?.allowed {
            return Err(task(format!(
                "the elevation did not decide as expected (allowed {}, grant {outcome:?})",
                first.allowed
            )));
        }
        let brought = read_brought_ticket();
        if !decide(&snapshot, &brought)?.allowed {
            return Err(task("the request with its own ticket was not allowed"));
        }
        let (mut plain, mut elevated, mut with_entity) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let run = |req: &pb::IsAuthorizedRequest| {
                driver::time_sync(timing, min_calls, |_| {
                    std::hint::black_box(decide(&snapshot, req)?);
                    Ok(())
                })
                .map(|s| s.p50_ns)
            };
            if round % 2 == 0 {
                plain.push(run(&without)?);
                elevated.push(run(&with)?);
                with_entity.push(run(&brought)?);
            } else {
                with_entity.push(run(&brought)?);
                elevated.push(run(&with)?);
                plain.push(run(&without)?);
            }
        }
        plain.sort_unstable();
        elevated.sort_unstable();
        with_entity.sort_unstable();
        let unsliced = Snapshot::build_cached(
            &sources(&grants::public_key_text(&key), extra),
            &mut BuildCache::new(false),
        )
        .map_err(|e| task(format!("the bundle without the index: {e:?}")))?;
        let full_copy = driver::time_sync(timing, min_calls, |_| {
            std::hint::black_box(decide(&unsliced, &brought)?);
            Ok(())
        })?
        .p50_ns;
        points.push(ElevationPoint {
            entities: snapshot.entity_count(),
            first_use_ns: u64::try_from(first_use.as_nanos()).unwrap_or(u64::MAX),
            p50_without_ns: plain[ROUNDS / 2],
            p50_elevated_ns: elevated[ROUNDS / 2],
            p50_request_entity_ns: with_entity[ROUNDS / 2],
            p50_request_entity_full_copy_ns: full_copy,
        });
    }
    Ok(GrantsReport {
        verify_ns,
        verify_remembered_ns,
        points,
    })
}

/// The entity counts measured: the example alone, and with 10,000 and
/// 100,000 more users (the example only in quick mode).
pub fn sizes(quick: bool) -> &'static [usize] {
    if quick {
        &[0]
    } else {
        &[0, 10_000, 100_000]
    }
}
