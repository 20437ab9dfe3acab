//! A synthetic agent deployment, scaled by policy count: tenants, agents that
//! call tools (Cedar actions grouped by category), users with roles in a
//! hierarchy, records owned by tenants; per-agent tool grants, per-user
//! entitlements, role policies and a never-by-default baseline of forbids.
//! The same generator gives 10 or 100,000 policies, so a latency curve over
//! policy count compares like with like.
//!
//! Requests mix delegated (agent for a user) and autonomous calls, mostly
//! within the agent's tenant and mostly for tools the agent was granted, so
//! that both allows and denies are common. Every request exists in both input
//! forms, Cedar JSON text and typed values, with the same values.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::bundle::{BundleSources, SchemaFormat, SourceFile};
use crate::proto::v1 as pb;

/// The categories tools fall into. The last two are never-by-default.
const CATEGORIES: [&str; 6] = [
    "read",
    "write",
    "payments",
    "messaging",
    "admin",
    "destructive",
];
const NEVER_BY_DEFAULT: [&str; 2] = ["admin", "destructive"];
const REGIONS: [&str; 3] = ["eu", "us", "apac"];
/// Policies that exist at every scale.
const BASELINE_POLICIES: usize = 8;
/// The smallest policy count the generator makes.
pub const MIN_POLICIES: usize = BASELINE_POLICIES + 2;
/// Requests in the mix: enough that caches see variety, few enough to build fast.
const REQUEST_POOL: usize = 512;
/// Policies per generated file, so no single file is huge.
const POLICIES_PER_FILE: usize = 2_000;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Exact number of policies in the bundle (at least [`MIN_POLICIES`]).
    pub policies: usize,
    /// Seed of the generator: the same seed gives the same bundle and mix.
    pub seed: u64,
}

/// How big the generated deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadShape {
    pub policies: usize,
    pub tenants: usize,
    pub agents: usize,
    pub users: usize,
    pub roles: usize,
    pub tools: usize,
    pub records: usize,
    pub agent_grants: usize,
    pub user_entitlements: usize,
    pub role_policies: usize,
}

/// One request in both input forms.
#[derive(Debug, Clone)]
pub struct RequestForms {
    /// Context and entities as Cedar JSON text.
    pub json: pb::IsAuthorizedRequest,
    /// The same request as typed values.
    pub typed: pb::IsAuthorizedRequest,
}

/// A generated bundle and its request mix.
#[derive(Debug, Clone)]
pub struct Workload {
    pub shape: WorkloadShape,
    pub sources: BundleSources,
    pub requests: Vec<RequestForms>,
}

impl WorkloadShape {
    /// Splits `policies` into the kinds of policy and sizes the population
    /// so that each agent holds about five grants and each user about three
    /// entitlements, as in a deployment that grew rather than one that was
    /// padded with copies.
    pub fn for_policies(policies: usize) -> Self {
        let policies = policies.max(MIN_POLICIES);
        let scaled = policies - BASELINE_POLICIES;
        let agent_grants = (scaled / 2).max(1);
        let role_policies = (scaled * 15 / 100).max(1);
        let user_entitlements = scaled - agent_grants - role_policies;
        let tenants = (policies / 200).clamp(2, 500);
        Self {
            policies,
            tenants,
            agents: (agent_grants / 5).max(4),
            users: (user_entitlements / 3).max(8),
            roles: role_policies.max(4),
            tools: (policies / 50).clamp(24, 240),
            records: tenants * 8,
            agent_grants,
            user_entitlements,
            role_policies,
        }
    }
}

/// SplitMix64: a small, fast, well-mixed generator. Reproducible figures
/// need a fixed sequence, not cryptographic randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        // Modulo bias is irrelevant at these sizes.
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

fn tool_category(tool: usize) -> &'static str {
    // Reads dominate real tool catalogues; never-by-default tools are rare.
    match tool % 12 {
        0..=4 => "read",
        5..=7 => "write",
        8 => "payments",
        9 => "messaging",
        10 => "admin",
        _ => "destructive",
    }
}

/// The tools a grant may name: never-by-default tools are excluded, as a
/// reviewer would (the baseline forbids them anyway).
fn grantable(tool: usize) -> bool {
    !NEVER_BY_DEFAULT.contains(&tool_category(tool))
}

/// Generates the bundle and request mix for `spec`.
pub fn generate(spec: WorkloadSpec) -> Workload {
    let shape = WorkloadShape::for_policies(spec.policies);
    let mut rng = Rng::new(spec.seed);
    let mut population = Population::new(&shape, &mut rng);
    let schema = schema(&shape);
    let mut policies = vec![SourceFile {
        path: "policies/baseline.cedar".to_owned(),
        text: BASELINE.to_owned(),
    }];
    let grants = agent_grants(&shape, &mut population, &mut rng);
    let entitlements = user_entitlements(&shape, &mut rng);
    let roles = role_policies(&shape, &mut rng);
    policies.extend(split_files("policies/agents/grants", &grants));
    policies.extend(split_files("policies/users/entitlements", &entitlements));
    policies.extend(split_files("policies/roles/roles", &roles));
    let entities = vec![SourceFile {
        path: "policies/entities/deployment.entities.json".to_owned(),
        text: population.entities_json(&shape),
    }];
    let sources = BundleSources {
        origin: format!(
            "generated workload ({} policies, seed {})",
            shape.policies, spec.seed
        ),
        policies,
        schemas: vec![(
            SchemaFormat::Cedar,
            SourceFile {
                path: "schemas/deployment.cedarschema".to_owned(),
                text: schema,
            },
        )],
        entities,
        approvers: Vec::new(),
        skipped: Vec::new(),
    };
    let requests = (0..REQUEST_POOL)
        .map(|i| population.request(i, &shape, &mut rng))
        .collect();
    Workload {
        shape,
        sources,
        requests,
    }
}

impl Workload {
    /// Writes the bundle under `dir` (`dir/policies`, `dir/schemas`) and the
    /// request mix as `dir/requests.jsonl` (one `leash check`-style JSON
    /// request per line), for reload tests and for reproducing figures.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        for file in self.sources.files() {
            let path = dir.join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, &file.text)?;
        }
        let mut lines = String::new();
        for r in &self.requests {
            let line = json!({
                "agent": uid_text(r.json.principal.as_ref().and_then(|p| p.agent.as_ref())),
                "user": r.json.principal.as_ref().and_then(|p| p.on_behalf_of.as_ref()).map(|u| uid_text(Some(u))),
                "action": uid_text(r.json.action.as_ref()),
                "resource": uid_text(r.json.resource.as_ref()),
                "context": match &r.json.context_input {
                    Some(pb::is_authorized_request::ContextInput::ContextJson(text)) => {
                        serde_json::from_str::<Value>(text).unwrap_or(Value::Null)
                    }
                    _ => Value::Null,
                },
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        std::fs::write(dir.join("requests.jsonl"), lines)
    }
}

fn uid_text(uid: Option<&pb::EntityUid>) -> String {
    uid.map(|u| format!("{}::{:?}", u.r#type, u.id))
        .unwrap_or_default()
}

fn split_files(stem: &str, policies: &[String]) -> Vec<SourceFile> {
    policies
        .chunks(POLICIES_PER_FILE)
        .enumerate()
        .map(|(i, chunk)| SourceFile {
            path: format!("{stem}-{i:03}.cedar"),
            text: chunk.concat(),
        })
        .collect()
}

fn schema(shape: &WorkloadShape) -> String {
    let mut s = String::from(SCHEMA_HEAD);
    for category in CATEGORIES {
        let parent = if NEVER_BY_DEFAULT.contains(&category) {
            " in [\"never-by-default\"]"
        } else {
            ""
        };
        let _ = writeln!(s, "action \"{category}\"{parent};");
    }
    s.push_str("action \"never-by-default\";\n");
    for tool in 0..shape.tools {
        let _ = writeln!(
            s,
            "action \"tool-{tool}\" in [\"{}\"] appliesTo {{ principal: [Agent, User], resource: [Record], context: ToolCall }};",
            tool_category(tool)
        );
    }
    s
}

const SCHEMA_HEAD: &str = r#"// Generated by `leash bench generate`: a synthetic agent deployment.
type Leash = { agent: Agent, user?: User, delegated: Bool, now: datetime };
type ToolCall = {
  leash: Leash,
  amount_cents: Long,
  region: String,
  cost: decimal,
  session_started: datetime,
  batch_size: Long,
};
entity Tenant;
entity Role in [Role];
entity Agent in [Tenant] = { tenant: Tenant, vetted: Bool, regions: Set<String> };
entity User in [Role, Tenant] = { tenant: Tenant, clearance: Long, region: String };
entity Record in [Tenant] = { tenant: Tenant, classification: Long, owner: User };
"#;

const BASELINE: &str = r#"// Never-by-default: no agent administers or destroys, whoever it acts for.
@id("baseline-never-by-default")
forbid (principal is Agent, action in Action::"never-by-default", resource);

// Tenant isolation for agents and users alike.
@id("baseline-tenant-isolation")
forbid (principal, action, resource)
unless { resource.tenant == principal.tenant };

// Unvetted agents only read.
@id("baseline-unvetted-read-only")
forbid (principal is Agent, action, resource)
unless { principal.vetted || action in Action::"read" };

// Outbound messages only on a user's behalf.
@id("baseline-messaging-delegated")
forbid (principal is Agent, action in Action::"messaging", resource)
unless { context.leash.delegated };

// Payments above 500.00 need a human, not an agent.
@id("baseline-payment-ceiling")
forbid (principal, action in Action::"payments", resource)
when { context.amount_cents > 50000 };

// Sessions end after eight hours.
@id("baseline-session-length")
forbid (principal is Agent, action, resource)
when { context.leash.now > context.session_started.offset(duration("8h")) };

// No single call may cost more than 5.00 or touch more than 100 records.
@id("baseline-cost-and-batch")
forbid (principal, action, resource)
when { context.cost.greaterThan(decimal("5.00")) || context.batch_size > 100 };

// Every user may read their tenant's records up to their clearance.
@id("baseline-user-read")
permit (principal is User, action in Action::"read", resource)
when { resource.classification <= principal.clearance };
"#;

/// The generated entities, kept to build requests that mostly make sense.
struct Population {
    agent_tenant: Vec<usize>,
    user_tenant: Vec<usize>,
    /// Tools granted to each agent, to aim most requests at granted tools.
    agent_tools: Vec<Vec<usize>>,
    users_by_tenant: Vec<Vec<usize>>,
    records_by_tenant: Vec<Vec<usize>>,
    user_roles: Vec<Vec<usize>>,
    user_clearance: Vec<i64>,
    record_class: Vec<i64>,
    record_owner: Vec<usize>,
    agent_vetted: Vec<bool>,
    agent_regions: Vec<Vec<&'static str>>,
    user_region: Vec<&'static str>,
}

impl Population {
    fn new(shape: &WorkloadShape, rng: &mut Rng) -> Self {
        let agent_tenant: Vec<usize> = (0..shape.agents).map(|a| a % shape.tenants).collect();
        let user_tenant: Vec<usize> = (0..shape.users).map(|u| u % shape.tenants).collect();
        let mut users_by_tenant = vec![Vec::new(); shape.tenants];
        for (u, t) in user_tenant.iter().enumerate() {
            users_by_tenant[*t].push(u);
        }
        let mut records_by_tenant = vec![Vec::new(); shape.tenants];
        let mut record_owner = Vec::with_capacity(shape.records);
        for r in 0..shape.records {
            let t = r % shape.tenants;
            records_by_tenant[t].push(r);
            let owners = &users_by_tenant[t];
            // Users outnumber tenants at every size and are dealt to tenants
            // round-robin, so the fallback owner is never used; it only keeps
            // this path panic-free.
            record_owner.push(owners.get(rng.below(owners.len())).copied().unwrap_or(0));
        }
        let user_roles = (0..shape.users)
            .map(|_| {
                let mut roles = vec![rng.below(shape.roles)];
                if rng.chance(30) {
                    roles.push(rng.below(shape.roles));
                }
                roles
            })
            .collect();
        Self {
            agent_tenant,
            user_tenant,
            agent_tools: vec![Vec::new(); shape.agents],
            users_by_tenant,
            records_by_tenant,
            user_roles,
            user_clearance: (0..shape.users).map(|_| rng.below(4) as i64).collect(),
            record_class: (0..shape.records).map(|_| rng.below(4) as i64).collect(),
            record_owner,
            // One agent in seven has not passed review.
            agent_vetted: (0..shape.agents).map(|a| a % 7 != 3).collect(),
            agent_regions: (0..shape.agents)
                .map(|_| {
                    let first = REGIONS[rng.below(REGIONS.len())];
                    let second = REGIONS[rng.below(REGIONS.len())];
                    if first == second {
                        vec![first]
                    } else {
                        vec![first, second]
                    }
                })
                .collect(),
            user_region: (0..shape.users)
                .map(|_| REGIONS[rng.below(REGIONS.len())])
                .collect(),
        }
    }

    fn entities_json(&self, shape: &WorkloadShape) -> String {
        let uid = |ty: &str, id: String| json!({"type": ty, "id": id});
        let mut all = Vec::new();
        for t in 0..shape.tenants {
            all.push(
                json!({"uid": uid("Tenant", format!("tenant-{t}")), "attrs": {}, "parents": []}),
            );
        }
        for r in 0..shape.roles {
            // A tree of roles: each role sits under the role r/4, so `in`
            // checks walk a few levels.
            let parents = if r == 0 {
                vec![]
            } else {
                vec![uid("Role", format!("role-{}", r / 4))]
            };
            all.push(
                json!({"uid": uid("Role", format!("role-{r}")), "attrs": {}, "parents": parents}),
            );
        }
        for a in 0..shape.agents {
            let tenant = uid("Tenant", format!("tenant-{}", self.agent_tenant[a]));
            all.push(json!({
                "uid": uid("Agent", format!("agent-{a}")),
                "attrs": {
                    "tenant": {"__entity": tenant},
                    "vetted": self.agent_vetted[a],
                    "regions": self.agent_regions[a],
                },
                "parents": [tenant],
            }));
        }
        for u in 0..shape.users {
            let tenant = uid("Tenant", format!("tenant-{}", self.user_tenant[u]));
            let mut parents: Vec<Value> = self.user_roles[u]
                .iter()
                .map(|r| uid("Role", format!("role-{r}")))
                .collect();
            parents.push(tenant.clone());
            all.push(json!({
                "uid": uid("User", format!("user-{u}")),
                "attrs": {
                    "tenant": {"__entity": tenant},
                    "clearance": self.user_clearance[u],
                    "region": self.user_region[u],
                },
                "parents": parents,
            }));
        }
        for r in 0..shape.records {
            let tenant = uid("Tenant", format!("tenant-{}", r % shape.tenants));
            all.push(json!({
                "uid": uid("Record", format!("record-{r}")),
                "attrs": {
                    "tenant": {"__entity": tenant},
                    "classification": self.record_class[r],
                    "owner": {"__entity": uid("User", format!("user-{}", self.record_owner[r]))},
                },
                "parents": [tenant],
            }));
        }
        Value::Array(all).to_string()
    }

    /// Request `i` of the mix.
    fn request(&self, i: usize, shape: &WorkloadShape, rng: &mut Rng) -> RequestForms {
        let a = rng.below(shape.agents);
        let tenant = self.agent_tenant[a];
        // 70% of calls are made for a user; most of those for a user of the
        // agent's own tenant.
        let user = if rng.chance(70) {
            let own = &self.users_by_tenant[tenant];
            Some(if rng.chance(90) && !own.is_empty() {
                own[rng.below(own.len())]
            } else {
                rng.below(shape.users)
            })
        } else {
            None
        };
        // Most calls are for tools the agent was granted.
        let granted = &self.agent_tools[a];
        let tool = if rng.chance(75) && !granted.is_empty() {
            granted[rng.below(granted.len())]
        } else {
            rng.below(shape.tools)
        };
        let records = &self.records_by_tenant[tenant];
        let record = if rng.chance(90) && !records.is_empty() {
            records[rng.below(records.len())]
        } else {
            rng.below(shape.records)
        };
        let amount = if rng.chance(90) {
            rng.below(50_000) as i64
        } else {
            50_000 + rng.below(100_000) as i64
        };
        let region = REGIONS[rng.below(REGIONS.len())];
        let cost = format!("{}.{:02}", rng.below(6), rng.below(100));
        let started = chrono::Utc::now()
            - chrono::Duration::minutes(if rng.chance(95) {
                rng.below(420) as i64
            } else {
                500 + rng.below(500) as i64
            });
        let started = started.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let batch = if rng.chance(97) {
            1 + rng.below(50) as i64
        } else {
            101 + rng.below(100) as i64
        };

        let principal = Some(pb::Principal {
            agent: Some(pb_uid("Agent", format!("agent-{a}"))),
            on_behalf_of: user.map(|u| pb_uid("User", format!("user-{u}"))),
        });
        let base = pb::IsAuthorizedRequest {
            request_id: format!("bench-{i}"),
            principal,
            action: Some(pb_uid("Action", format!("tool-{tool}"))),
            resource: Some(pb_uid("Record", format!("record-{record}"))),
            ..Default::default()
        };
        let context_json = json!({
            "amount_cents": amount,
            "region": region,
            "cost": {"__extn": {"fn": "decimal", "arg": cost}},
            "session_started": {"__extn": {"fn": "datetime", "arg": started}},
            "batch_size": batch,
        });
        let mut fields = BTreeMap::new();
        fields.insert(
            "amount_cents".to_owned(),
            pb_value(pb::value::Kind::Long(amount)),
        );
        fields.insert(
            "region".to_owned(),
            pb_value(pb::value::Kind::String(region.to_owned())),
        );
        fields.insert("cost".to_owned(), pb_extension("decimal", cost));
        fields.insert(
            "session_started".to_owned(),
            pb_extension("datetime", started),
        );
        fields.insert(
            "batch_size".to_owned(),
            pb_value(pb::value::Kind::Long(batch)),
        );
        RequestForms {
            json: pb::IsAuthorizedRequest {
                context_input: Some(pb::is_authorized_request::ContextInput::ContextJson(
                    context_json.to_string(),
                )),
                ..base.clone()
            },
            typed: pb::IsAuthorizedRequest {
                context_input: Some(pb::is_authorized_request::ContextInput::Context(
                    pb::Record { fields },
                )),
                ..base
            },
        }
    }
}

fn pb_uid(ty: &str, id: String) -> pb::EntityUid {
    pb::EntityUid {
        r#type: ty.to_owned(),
        id,
    }
}

fn pb_value(kind: pb::value::Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

fn pb_extension(function: &str, arg: String) -> pb::Value {
    pb_value(pb::value::Kind::Extension(pb::ExtensionValue {
        r#fn: function.to_owned(),
        arg,
    }))
}

/// Per-agent tool grants: each names a few tools, bounded by record
/// classification; some are time-boxed, some limited to the agent's regions.
/// Records each agent's tools in `population`, so requests can aim at them.
fn agent_grants(shape: &WorkloadShape, population: &mut Population, rng: &mut Rng) -> Vec<String> {
    (0..shape.agent_grants)
        .map(|g| {
            let a = g % shape.agents;
            let count = 1 + rng.below(3);
            let tools = pick_tools(shape, rng, count);
            population.agent_tools[a].extend(&tools);
            let class = rng.below(4);
            let mut conditions = vec![format!("resource.classification <= {class}")];
            if rng.chance(25) {
                conditions.push("principal.regions.contains(context.region)".to_owned());
            }
            if rng.chance(20) {
                // A time-boxed elevation that has not expired yet.
                conditions.push("context.leash.now < datetime(\"2099-01-01T00:00:00Z\")".to_owned());
            }
            format!(
                "@id(\"grant-agent-{a}-{g}\")\npermit (principal == Agent::\"agent-{a}\", action in [{}], resource)\nwhen {{ {} }};\n",
                tools
                    .iter()
                    .map(|t| format!("Action::\"tool-{t}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                conditions.join(" && ")
            )
        })
        .collect()
}

/// Per-user entitlements: named tools on records they own, or on low
/// classifications.
fn user_entitlements(shape: &WorkloadShape, rng: &mut Rng) -> Vec<String> {
    (0..shape.user_entitlements)
        .map(|e| {
            let u = e % shape.users;
            let count = 1 + rng.below(4);
            let tools = pick_tools(shape, rng, count);
            format!(
                "@id(\"entitle-user-{u}-{e}\")\npermit (principal == User::\"user-{u}\", action in [{}], resource)\nwhen {{ resource.owner == principal || resource.classification <= {} }};\n",
                tools
                    .iter()
                    .map(|t| format!("Action::\"tool-{t}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                rng.below(3)
            )
        })
        .collect()
}

/// Role policies: a role (and every role under it) may use a category of
/// tools up to the member's clearance.
fn role_policies(shape: &WorkloadShape, rng: &mut Rng) -> Vec<String> {
    (0..shape.role_policies)
        .map(|p| {
            let role = p % shape.roles;
            let category = CATEGORIES[rng.below(4)];
            format!(
                "@id(\"role-{role}-{p}\")\npermit (principal in Role::\"role-{role}\", action in Action::\"{category}\", resource)\nwhen {{ resource.classification <= principal.clearance }};\n"
            )
        })
        .collect()
}

fn pick_tools(shape: &WorkloadShape, rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut tools = Vec::with_capacity(n);
    while tools.len() < n {
        let t = rng.below(shape.tools);
        if grantable(t) && !tools.contains(&t) {
            tools.push(t);
        }
    }
    tools
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Snapshot;
    use crate::engine::{decide, RequestTime};
    use crate::service::convert;

    #[test]
    fn the_policy_count_is_exact_and_the_bundle_is_valid() {
        for policies in [MIN_POLICIES, 11, 57, 300] {
            let workload = generate(WorkloadSpec { policies, seed: 7 });
            let snapshot = Snapshot::build(&workload.sources)
                .unwrap_or_else(|e| panic!("{policies} policies: {}", e.render()));
            assert_eq!(snapshot.policy_count(), policies);
            assert_eq!(workload.shape.policies, policies);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_bundle() {
        let version = |seed| {
            let w = generate(WorkloadSpec {
                policies: 120,
                seed,
            });
            Snapshot::build(&w.sources).map(|s| s.version).ok()
        };
        assert_eq!(version(3), version(3));
        assert_ne!(version(3), version(4));
    }

    /// The mix is worth measuring: every request is valid in both forms,
    /// both forms agree, and allows, denies, delegated and autonomous
    /// requests are all common.
    #[test]
    fn the_mix_allows_and_denies_in_both_forms() {
        let workload = generate(WorkloadSpec {
            policies: 300,
            seed: 1,
        });
        let snapshot = Snapshot::build(&workload.sources).expect("valid");
        let now = RequestTime::now();
        let mut allowed = 0;
        let mut delegated = 0;
        for (i, r) in workload.requests.iter().enumerate() {
            let json = decide(&snapshot, &convert::request(&r.json).expect("json"), &now)
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            let typed = decide(&snapshot, &convert::request(&r.typed).expect("typed"), &now)
                .unwrap_or_else(|e| panic!("request {i} typed: {e}"));
            assert_eq!(json, typed, "request {i}");
            allowed += usize::from(json.allowed);
            delegated += usize::from(json.on_behalf_of.is_some());
        }
        let n = workload.requests.len();
        assert!(
            allowed * 10 > n && allowed * 10 < n * 9,
            "{allowed} of {n} allowed"
        );
        assert!(
            delegated * 10 > n * 5 && delegated < n,
            "{delegated} of {n} delegated"
        );
    }

    #[test]
    fn written_bundles_load_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let workload = generate(WorkloadSpec {
            policies: 40,
            seed: 1,
        });
        workload.write_to(dir.path()).expect("written");
        let snapshot =
            Snapshot::load_dirs(&dir.path().join("policies"), &dir.path().join("schemas"))
                .expect("loads");
        assert_eq!(snapshot.policy_count(), 40);
        let mix = std::fs::read_to_string(dir.path().join("requests.jsonl")).expect("mix");
        let parsed = super::super::mix::parse("requests.jsonl", &mix).expect("parses");
        assert_eq!(parsed.len(), workload.requests.len());
    }
}
