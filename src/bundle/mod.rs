//! Loading a policy bundle: policies, schema and entity data, validated as a
//! whole into an immutable [`Snapshot`], or refused with every diagnostic.
//!
//! Loading is blocking work (file I/O, parsing, validation); callers run it
//! off the request path. A snapshot is never modified after it is built.

pub mod approvals;
pub mod approvers;
pub mod context_check;
mod diagnostic;
pub mod elevated;
mod index;
pub mod limits;
mod printed;
pub mod reach;
mod reserved;
mod sources;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use cedar_policy::{
    Entities, EntityUid, PolicyId, PolicySet, Schema, SchemaFragment, ValidationMode, Validator,
};
use sha2::Digest as _;

pub use approvals::Gates;
pub use approvers::Approvers;
pub use diagnostic::Diagnostic;
pub use index::{
    fallbacks as index_fallbacks, CacheSize, IndexStats, PolicyIndex, POLICY_OVERHEAD,
    SUBSET_BYTES_KEPT,
};
pub use limits::{Limit, LimitKey, Limits, Measure};
pub use printed::{policy_id_text, push_type_name, uid_text};
pub use reserved::{LeashFields, ReservedContext, LEASH_ATTR};
pub(crate) use sources::is_bundle_file;
pub use sources::{
    effective_root, BundleSources, ReadOutcome, SchemaFormat, SourceFile, TreeStamp, MAX_FILE_BYTES,
};

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
#[error("policy bundle from {origin} is invalid ({} problem{})", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" })]
pub struct BundleError {
    pub origin: String,
    /// Every problem found, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl BundleError {
    /// All diagnostics, rendered one after the other.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.diagnostics {
            out.push_str(&d.rendered);
            if !d.rendered.ends_with("\n\n") {
                out.push('\n');
            }
        }
        let _ = writeln!(out, "{self}");
        out
    }
}

/// Where a policy came from, for diagnostics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOrigin {
    pub file: String,
    /// 1-based position of the policy within its file.
    pub position: usize,
}

/// A loaded, validated bundle. Immutable: a new bundle is a new snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// Content hash of every file of the bundle; reported with every decision.
    pub version: String,
    /// Where the bundle came from.
    pub origin: String,
    pub loaded_at: SystemTime,
    pub policies: PolicySet,
    pub schema: Schema,
    /// Entity data of the bundle, with the schema's action entities.
    pub entities: Entities,
    /// The schema's actions, to reject an undeclared action by name.
    pub actions: HashSet<EntityUid>,
    /// Entities the bundle names but does not define: as a parent of its
    /// entities, in their attributes or tags, or in a policy's condition.
    /// A request must not define one (see [`Named`]).
    pub undefined_named: HashMap<EntityUid, Named>,
    /// Which actions ask for the trusted `context.leash` record.
    pub reserved: ReservedContext,
    /// Context shapes that passed the check against their action's context
    /// type, so a context of the same shape is not checked again; off with
    /// the index.
    pub context_checks: context_check::ContextChecks,
    /// The file and position of each policy, by id.
    pub policy_origins: BTreeMap<String, PolicyOrigin>,
    /// The bundle's files, in load order.
    pub files: Vec<String>,
    /// Warnings (the bundle still loads): files passed over, Cedar's schema
    /// and validator warnings, limited permits without `@id`.
    pub warnings: Vec<String>,
    /// The files passed over ([`BundleSources::skipped`]): a reload that
    /// finds the same bundle files but other passed-over ones builds again,
    /// so the warnings stay true.
    pub skipped: Vec<String>,
    /// The scope index the engine narrows each request with; `None` when
    /// it was turned off (`--policy-index off`): every request evaluates
    /// the whole set.
    pub index: Option<PolicyIndex>,
    /// What a request can reach in `entities`, so a request that brings
    /// entities is decided on those alone; built with the index and off
    /// with it (`--policy-index off` decides on a full copy, as Cedar would).
    pub reach: Option<reach::EntityReach>,
    /// What each step of the build took.
    pub timings: BuildTimings,
    /// Rate and budget limits declared on permits (`@rate`, `@budget`).
    pub limits: Limits,
    /// Permits that need a human's approval (`@approval("required")`).
    pub gates: Gates,
    /// Who may approve what, with their public keys (`*.approvers.json`).
    pub approvers: Approvers,
    /// Entity sets with an agent elevated into roles, built on first use
    /// and dropped with the snapshot (the one thing in it that fills up
    /// after the build, and only with what the bundle already determines).
    pub elevated: elevated::ElevatedEntities,
}

/// Wall time of the steps of one build. Steps a [`BuildCache`] skipped
/// (unchanged files) take next to nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildTimings {
    /// Parsing the policy files.
    pub parse: Duration,
    /// Validating the policies against the schema.
    pub validate: Duration,
    /// Parsing the entity data.
    pub entities: Duration,
    /// Building the scope index.
    pub index: Duration,
}

impl Snapshot {
    /// Reads and validates the bundle in two directories. Blocking.
    ///
    /// Files that change while they are read (a deploy in progress) are read
    /// again, a few times, after a short pause.
    pub fn load_dirs(policies: &Path, schemas: &Path) -> Result<Self, BundleError> {
        const ATTEMPTS: u32 = 10;
        for attempt in 1..=ATTEMPTS {
            match BundleSources::read_stable(policies, schemas) {
                ReadOutcome::Read(sources) => return Self::build(&sources),
                ReadOutcome::Unreadable {
                    origin,
                    diagnostics,
                } => {
                    return Err(BundleError {
                        origin,
                        diagnostics,
                    })
                }
                ReadOutcome::Changing => {
                    std::thread::sleep(std::time::Duration::from_millis(20 * u64::from(attempt)))
                }
            }
        }
        Err(BundleError {
            origin: format!("{} + {}", policies.display(), schemas.display()),
            diagnostics: vec![Diagnostic::plain(
                None,
                format!("the files kept changing while they were read ({ATTEMPTS} tries)"),
            )],
        })
    }

    /// Validates the example bundle built into the binary.
    pub fn load_embedded() -> Result<Self, BundleError> {
        Self::build(&BundleSources::embedded())
    }

    /// Parses and validates `sources` as a whole. Every problem is collected
    /// before the bundle is refused, so one run shows them all.
    pub fn build(sources: &BundleSources) -> Result<Self, BundleError> {
        Self::build_cached(sources, &mut BuildCache::default())
    }

    /// [`Snapshot::build`], reusing what `cache` kept from the builds before:
    /// with the same schema, a policy file already validated is not
    /// validated again, and unchanged entity files are not parsed again. The
    /// result is exactly that of a fresh build (Cedar validates each policy
    /// on its own against the schema); a one-file change to a large bundle
    /// then costs the parse and validation of that file.
    pub fn build_cached(
        sources: &BundleSources,
        cache: &mut BuildCache,
    ) -> Result<Self, BundleError> {
        let mut diagnostics = Vec::new();
        let refuse = |diagnostics| BundleError {
            origin: sources.origin.clone(),
            diagnostics,
        };

        if sources.policies.is_empty() {
            // An empty directory is far more often a broken sync or mount
            // than a decision to deny everything; an intended deny-all bundle
            // says so with a policy file that holds no policies.
            diagnostics.push(Diagnostic::plain(
                None,
                "no policy files (`*.cedar`) in the policies directory; a bundle \
                 with none would deny every request. To deny everything on \
                 purpose, ship a `*.cedar` file with no policies in it (a comment)",
            ));
        }
        let mut timings = BuildTimings::default();
        let mut schema_warnings = Vec::new();
        let schema_parts = parse_schema(sources, &mut diagnostics, &mut schema_warnings);
        let began = Instant::now();
        let (policies, policy_origins) =
            parse_policies(sources, &mut cache.parsed, &mut diagnostics);
        timings.parse = began.elapsed();
        let Some((schema, fragments_json)) = schema_parts else {
            return Err(refuse(diagnostics));
        };
        cache.use_schema(file_key_all(sources.schemas.iter().map(|(_, f)| f)));

        let reserved = match ReservedContext::scan(&fragments_json) {
            Ok(reserved) => {
                // Cedar's own reading of every action's context type must
                // agree: an action whose `leash` the scan missed would take
                // the trusted record from the caller.
                diagnostics.extend(reserved.check_against(&schema));
                reserved
            }
            Err(mut found) => {
                diagnostics.append(&mut found);
                ReservedContext::default()
            }
        };
        let context_checks = context_check::ContextChecks::scan(&fragments_json, cache.index);

        let began = Instant::now();
        let (validator_warnings, clean) = validate(
            sources,
            &schema,
            &policies,
            &policy_origins,
            cache,
            &mut diagnostics,
        );
        timings.validate = began.elapsed();
        let mut warnings = sources.skipped.clone();
        warnings.extend(schema_warnings);
        warnings.extend(validator_warnings);
        let limits = Limits::scan(&policies, &policy_origins, &mut diagnostics, &mut warnings);
        let gates = Gates::scan(&policies, &policy_origins, &mut diagnostics);
        let approvers = Approvers::parse(&sources.approvers, &schema, &mut diagnostics);

        let began = Instant::now();
        let entity_key = file_key_all(sources.entities.iter());
        let entities = match &cache.entities {
            Some((key, entities)) if *key == entity_key => Some(entities.clone()),
            _ => {
                let parsed = parse_entities(sources, &schema, &mut diagnostics);
                if let Some(entities) = &parsed {
                    cache.entities = Some((entity_key, entities.clone()));
                }
                parsed
            }
        };

        timings.entities = began.elapsed();
        if !diagnostics.is_empty() {
            return Err(refuse(diagnostics));
        }
        let Some(entities) = entities else {
            return Err(refuse(diagnostics));
        };
        // Only a bundle that loaded vouches for its files: in a refused one,
        // a policy may have been left out of validation (a duplicate id, an
        // empty `@id`) while the rest of its file passed.
        cache.validated.extend(clean);

        let actions = action_uids(&schema);
        let literals = reach::condition_literals(&policies);
        let undefined_named = undefined_named(&literals, &entities);
        let began = Instant::now();
        let index = cache
            .index
            .then(|| PolicyIndex::build(&policies, &entities, &actions));
        let reach = cache
            .index
            .then(|| reach::EntityReach::build(literals, &entities));
        timings.index = began.elapsed();
        Ok(Self {
            version: sources.version(),
            origin: sources.origin.clone(),
            loaded_at: SystemTime::now(),
            policies,
            schema,
            entities,
            actions,
            undefined_named,
            reserved,
            context_checks,
            policy_origins,
            files: sources.files().map(|f| f.path.clone()).collect(),
            warnings,
            skipped: sources.skipped.clone(),
            index,
            reach,
            timings,
            limits,
            gates,
            approvers,
            elevated: elevated::ElevatedEntities::default(),
        })
    }

    /// Number of policies and templates.
    pub fn policy_count(&self) -> usize {
        self.policy_origins.len()
    }

    /// Number of entities, including the schema's action entities.
    pub fn entity_count(&self) -> usize {
        self.entities.iter().count()
    }
}

/// How the bundle names an entity it does not define, which is why a
/// request may not define it.
/// Ordered by precedence: an entity named in several ways is reported by
/// the first, whatever order the bundle's entities are visited in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Named {
    /// A parent of the bundle's entities: the request's parents for it would
    /// become their ancestors (roles the bundle never granted).
    Parent,
    /// A value in an attribute or tag of the bundle's entities: the request
    /// would assert the attributes of an entity the bundle refers to.
    Value,
    /// An entity literal in a policy's condition: the request would assert
    /// the attributes a policy reads (a policy that reads a missing entity
    /// errs, and its side is denied).
    Policy,
}

impl Named {
    /// How the bundle names such an entity, and what a request defining it
    /// would do, for its error.
    pub fn reason(self) -> (&'static str, &'static str) {
        match self {
            Named::Parent => (
                "a parent of entities in the policy bundle",
                "its parents would become theirs",
            ),
            Named::Value => (
                "named in attributes or tags of entities in the policy bundle",
                "its attributes would be the caller's word",
            ),
            Named::Policy => (
                "named in a condition of a policy in the bundle",
                "its attributes would be the caller's word",
            ),
        }
    }
}

/// The entities the bundle names without defining them (Cedar allows such
/// dangling references): the ancestors of its entities (already transitive
/// here), the entities in their attributes and tags, and `literals`, the
/// entity literals in the conditions of its policies and templates. Action
/// entities are left out: a request may define no action at all.
fn undefined_named(literals: &[EntityUid], entities: &Entities) -> HashMap<EntityUid, Named> {
    use cedar_policy_core::ast;
    let mut out = HashMap::new();
    let mut note = |uid: EntityUid, how: Named| {
        let core_uid: &ast::EntityUID = uid.as_ref();
        if core_uid.entity_type().is_action() || entities.get(&uid).is_some() {
            return;
        }
        let named = out.entry(uid).or_insert(how);
        *named = (*named).min(how);
    };
    let mut values = Vec::new();
    for entity in entities.iter() {
        let core: &ast::Entity = entity.as_ref();
        for parent in core.ancestors() {
            note(EntityUid::from(parent.clone()), Named::Parent);
        }
        for (_, value) in core.attrs().chain(core.tags()) {
            if let ast::PartialValue::Value(v) = value {
                reach::value_refs(v, &mut values);
            }
        }
        for uid in values.drain(..) {
            note(uid, Named::Value);
        }
    }
    for uid in literals {
        note(uid.clone(), Named::Policy);
    }
    out
}

/// What one build leaves for the next (see [`Snapshot::build_cached`]),
/// and whether builds index the policies. Entries of files that are gone
/// are dropped at each build.
#[derive(Debug)]
pub struct BuildCache {
    /// Build a [`PolicyIndex`] with each snapshot.
    index: bool,
    /// The schema files the entries below were checked against.
    schema: Option<FileKey>,
    /// Policy files (path and contents) that validated without errors
    /// against `schema`, with their warnings.
    validated: HashMap<FileKey, Vec<String>>,
    /// Entity data built against `schema` from the entity files with this key.
    entities: Option<(FileKey, Entities)>,
    /// Parsed policy files, by contents (parsing needs no schema).
    parsed: HashMap<FileKey, PolicySet>,
}

impl Default for BuildCache {
    fn default() -> Self {
        Self::new(true)
    }
}

impl BuildCache {
    /// An empty cache; `index` says whether snapshots get a scope index.
    pub fn new(index: bool) -> Self {
        Self {
            index,
            schema: None,
            validated: HashMap::new(),
            entities: None,
            parsed: HashMap::new(),
        }
    }

    /// Whether snapshots built with this cache get a scope index.
    pub fn indexes(&self) -> bool {
        self.index
    }

    /// Forgets everything checked against another schema.
    fn use_schema(&mut self, key: FileKey) {
        if self.schema != Some(key) {
            self.validated.clear();
            self.entities = None;
            self.schema = Some(key);
        }
    }
}

/// SHA-256 of files' paths and contents.
type FileKey = [u8; 32];

fn file_key_all<'a>(files: impl Iterator<Item = &'a SourceFile>) -> FileKey {
    let mut hasher = sha2::Sha256::new();
    for file in files {
        sha2::Digest::update(&mut hasher, (file.path.len() as u64).to_le_bytes());
        sha2::Digest::update(&mut hasher, file.path.as_bytes());
        sha2::Digest::update(&mut hasher, (file.text.len() as u64).to_le_bytes());
        sha2::Digest::update(&mut hasher, file.text.as_bytes());
    }
    sha2::Digest::finalize(hasher).into()
}

fn text_key(text: &str) -> FileKey {
    sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
        text.as_bytes(),
    ))
    .into()
}

/// Validates the policies of every file not already known to be valid
/// against this schema; reports errors as diagnostics. Returns the warnings
/// of every file, in file order, and the files validated here without
/// errors (for the cache, once the whole bundle has loaded).
fn validate(
    sources: &BundleSources,
    schema: &Schema,
    policies: &PolicySet,
    origins: &BTreeMap<String, PolicyOrigin>,
    cache: &mut BuildCache,
    diagnostics: &mut Vec<Diagnostic>,
) -> (Vec<String>, Vec<(FileKey, Vec<String>)>) {
    let keys: HashMap<&str, FileKey> = sources
        .policies
        .iter()
        .map(|f| (f.path.as_str(), file_key_all(std::iter::once(f))))
        .collect();
    let known = |file: &str| {
        keys.get(file)
            .is_some_and(|k| cache.validated.contains_key(k))
    };

    let mut subset = PolicySet::new();
    for (id, origin) in origins {
        if known(&origin.file) {
            continue;
        }
        let pid = PolicyId::new(id);
        // Both adds succeed: the ids are unique in `policies` already.
        if let Some(p) = policies.policy(&pid) {
            let _ = subset.add(p.clone());
        } else if let Some(t) = policies.template(&pid) {
            let _ = subset.add_template(t.clone());
        }
    }
    let mut fresh_warnings: HashMap<String, Vec<String>> = HashMap::new();
    let mut failed: HashSet<String> = HashSet::new();
    if !subset.is_empty() {
        let result = Validator::new(schema.clone()).validate(&subset, ValidationMode::Strict);
        for err in result.validation_errors() {
            let id = err.policy_id().to_string();
            if let Some(origin) = origins.get(&id) {
                failed.insert(origin.file.clone());
            }
            diagnostics.push(located(sources, origins, &id, err));
        }
        for warning in result.validation_warnings() {
            let file = origins
                .get(&warning.policy_id().to_string())
                .map(|o| o.file.clone())
                .unwrap_or_default();
            fresh_warnings
                .entry(file)
                .or_default()
                .push(diagnostic::full_message(warning));
        }
    }

    let mut warnings = Vec::new();
    let mut clean = Vec::new();
    for file in &sources.policies {
        let Some(key) = keys.get(file.path.as_str()) else {
            continue;
        };
        if let Some(cached) = cache.validated.get(key) {
            warnings.extend(cached.iter().cloned());
            continue;
        }
        let found = fresh_warnings.remove(&file.path).unwrap_or_default();
        warnings.extend(found.iter().cloned());
        if !failed.contains(&file.path) {
            clean.push((*key, found));
        }
    }
    // Warnings not traced to a file (none are expected) are kept, not lost.
    for (_, rest) in fresh_warnings {
        warnings.extend(rest);
    }
    let current: HashSet<&FileKey> = keys.values().collect();
    cache.validated.retain(|k, _| current.contains(k));
    (warnings, clean)
}

/// The message of a Cedar error with its causes, for callers and logs.
pub fn cedar_message(err: &dyn miette::Diagnostic) -> String {
    diagnostic::full_message(err)
}

/// A validation error located in its policy's file.
fn located(
    sources: &BundleSources,
    origins: &BTreeMap<String, PolicyOrigin>,
    id: &str,
    err: &dyn miette::Diagnostic,
) -> Diagnostic {
    let file = origins
        .get(id)
        .and_then(|o| sources.policies.iter().find(|f| f.path == o.file));
    match file {
        Some(file) => Diagnostic::from_miette(&file.path, &file.text, err),
        None => Diagnostic::plain(
            None,
            format!("policy `{id}`: {}", diagnostic::full_message(err)),
        ),
    }
}

/// Parses every schema file into one schema, and each fragment into JSON for
/// the `context.leash` scan. `None` when there is no usable schema.
fn parse_schema(
    sources: &BundleSources,
    diagnostics: &mut Vec<Diagnostic>,
    warnings: &mut Vec<String>,
) -> Option<(Schema, Vec<(String, serde_json::Value)>)> {
    if sources.schemas.is_empty() {
        diagnostics.push(Diagnostic::plain(
            None,
            "no schema found: the schemas directory needs a `*.cedarschema` \
             (Cedar syntax) or `*.cedarschema.json`/`*.json` (Cedar JSON) file; \
             policies are validated against it",
        ));
        return None;
    }
    let before = diagnostics.len();
    let mut fragments = Vec::new();
    let mut fragments_json = Vec::new();
    for (format, file) in &sources.schemas {
        let parsed = match format {
            SchemaFormat::Cedar => SchemaFragment::from_cedarschema_str(&file.text)
                .map(|(fragment, found)| {
                    // Cedar's own schema warnings (a name that shadows a
                    // built-in type, say) are the load's warnings too.
                    warnings.extend(
                        found.map(|w| format!("{}: {}", file.path, diagnostic::full_message(&w))),
                    );
                    fragment
                })
                .map_err(|e| Diagnostic::from_miette(&file.path, &file.text, &e)),
            SchemaFormat::Json => SchemaFragment::from_json_str(&file.text)
                .map_err(|e| Diagnostic::from_miette(&file.path, &file.text, &e)),
        };
        match parsed {
            Ok(fragment) => {
                // `to_json_value` consumes the fragment; parse it a second time
                // for the JSON view rather than require `Clone`.
                let again = match format {
                    SchemaFormat::Cedar => SchemaFragment::from_cedarschema_str(&file.text)
                        .map(|(f, _)| f)
                        .ok(),
                    SchemaFormat::Json => SchemaFragment::from_json_str(&file.text).ok(),
                };
                match again.map(SchemaFragment::to_json_value) {
                    Some(Ok(json)) => fragments_json.push((file.path.clone(), json)),
                    Some(Err(e)) => {
                        diagnostics.push(Diagnostic::from_miette(&file.path, &file.text, &e))
                    }
                    None => diagnostics.push(Diagnostic::plain(
                        Some(&file.path),
                        "schema fragment could not be read twice",
                    )),
                }
                fragments.push(fragment);
            }
            Err(d) => diagnostics.push(d),
        }
    }
    if diagnostics.len() > before {
        return None;
    }
    match Schema::from_schema_fragments(fragments) {
        Ok(schema) => Some((schema, fragments_json)),
        Err(e) => {
            let message = diagnostic::full_message(&e);
            match sources.schemas.as_slice() {
                [(_, only)] => diagnostics.push(Diagnostic::plain(Some(&only.path), message)),
                // The fragments parsed one by one and clash together (a type
                // declared twice, say, by `x.cedarschema` and its JSON
                // translation beside it): name every file taking part.
                several => {
                    let files: Vec<&str> = several.iter().map(|(_, f)| f.path.as_str()).collect();
                    diagnostics.push(Diagnostic::plain(
                        None,
                        format!(
                            "the schema files do not combine ({}): {message}",
                            files.join(", ")
                        ),
                    ));
                }
            }
            None
        }
    }
}

/// Parses every policy file; gives each policy its `@id` or a stable
/// `file#position` id, and reports duplicate ids.
fn parse_policies(
    sources: &BundleSources,
    parsed_cache: &mut HashMap<FileKey, PolicySet>,
    diagnostics: &mut Vec<Diagnostic>,
) -> (PolicySet, BTreeMap<String, PolicyOrigin>) {
    let mut set = PolicySet::new();
    let mut origins: BTreeMap<String, PolicyOrigin> = BTreeMap::new();
    let mut seen: HashSet<FileKey> = HashSet::new();
    for file in &sources.policies {
        let key = text_key(&file.text);
        seen.insert(key);
        let parsed = match parsed_cache.get(&key) {
            Some(cached) => Ok(cached.clone()),
            None => PolicySet::from_str(&file.text),
        };
        let parsed = match parsed {
            Ok(parsed) => {
                parsed_cache.entry(key).or_insert_with(|| parsed.clone());
                parsed
            }
            Err(errors) => {
                diagnostics.push(Diagnostic::from_miette(&file.path, &file.text, &errors));
                if let Some(related) = miette::Diagnostic::related(&errors) {
                    for err in related {
                        diagnostics.push(Diagnostic::from_miette(&file.path, &file.text, err));
                    }
                }
                continue;
            }
        };
        // The parser names policies `policy0`, `policy1`, ... in source order
        // (templates share the numbering); that order gives each policy its
        // position in the file.
        let mut items: Vec<(usize, Item)> = parsed
            .policies()
            .filter(|p| p.is_static())
            .map(|p| (parser_position(p.id()), Item::Policy(p.clone())))
            .chain(
                parsed
                    .templates()
                    .map(|t| (parser_position(t.id()), Item::Template(t.clone()))),
            )
            .collect();
        items.sort_by_key(|(position, _)| *position);

        for (index, item) in items {
            let position = index + 1;
            let annotated = item.annotation("id").map(str::to_owned);
            let id = match annotated {
                Some(id) if id.trim().is_empty() => {
                    diagnostics.push(Diagnostic::plain(
                        Some(&file.path),
                        format!("policy {position}: `@id` must not be empty"),
                    ));
                    continue;
                }
                Some(id) => id,
                None => format!("{}#{position}", file.path),
            };
            if let Some(first) = origins.get(&id) {
                diagnostics.push(Diagnostic::plain(
                    Some(&file.path),
                    format!(
                        "duplicate policy id `{id}`: policy {position} of `{}` and policy {} of `{}`",
                        file.path, first.position, first.file
                    ),
                ));
                continue;
            }
            let added = match item {
                Item::Policy(p) => set.add(p.new_id(PolicyId::new(&id))),
                Item::Template(t) => set.add_template(t.new_id(PolicyId::new(&id))),
            };
            if let Err(e) = added {
                diagnostics.push(Diagnostic::plain(
                    Some(&file.path),
                    format!("policy `{id}`: {}", diagnostic::full_message(&e)),
                ));
                continue;
            }
            origins.insert(
                id,
                PolicyOrigin {
                    file: file.path.clone(),
                    position,
                },
            );
        }
    }
    parsed_cache.retain(|k, _| seen.contains(k));
    (set, origins)
}

enum Item {
    Policy(cedar_policy::Policy),
    Template(cedar_policy::Template),
}

impl Item {
    fn annotation(&self, key: &str) -> Option<&str> {
        match self {
            Item::Policy(p) => p.annotation(key),
            Item::Template(t) => t.annotation(key),
        }
    }
}

fn parser_position(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Parses every entity file against the schema into one entity store.
/// An entity defined in two files is reported with both files.
fn parse_entities(
    sources: &BundleSources,
    schema: &Schema,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Entities> {
    let before = diagnostics.len();
    let mut all = Vec::new();
    let mut defined_in: HashMap<EntityUid, String> = HashMap::new();
    for file in &sources.entities {
        let json: serde_json::Value = match serde_json::from_str(&file.text) {
            Ok(json) => json,
            Err(e) => {
                let (line, column) = (e.line(), e.column());
                let mut d = Diagnostic::plain(Some(&file.path), format!("invalid JSON: {e}"));
                d.line = Some(line);
                d.column = Some(column);
                d.rendered = format!("{}:{line}:{column}: error: invalid JSON: {e}\n", file.path);
                diagnostics.push(d);
                continue;
            }
        };
        let Some(items) = json.as_array() else {
            diagnostics.push(Diagnostic::plain(
                Some(&file.path),
                "an entities file holds a JSON array of entities",
            ));
            continue;
        };
        match Entities::from_json_value(json.clone(), Some(schema)) {
            Ok(parsed) => {
                let actions: HashSet<EntityUid> = action_uids(schema);
                for entity in parsed.iter() {
                    let uid = entity.uid();
                    if actions.contains(&uid) {
                        continue;
                    }
                    if let Some(residual) = reach::first_residual(entity) {
                        diagnostics.push(Diagnostic::plain(
                            Some(&file.path),
                            format!(
                                "{residual}; a policy reading it could not be decided (Cedar \
                                 leaves it out of its decision with an error), so entity data \
                                 must be concrete"
                            ),
                        ));
                    }
                    if let Some(first) = defined_in.get(&uid) {
                        diagnostics.push(Diagnostic::plain(
                            Some(&file.path),
                            format!("entity `{uid}` is also defined in `{first}`"),
                        ));
                    } else {
                        defined_in.insert(uid, file.path.clone());
                    }
                }
                all.extend(items.iter().cloned());
            }
            Err(e) => diagnostics.push(Diagnostic::plain(
                Some(&file.path),
                diagnostic::full_message(&e),
            )),
        }
    }
    if diagnostics.len() > before {
        return None;
    }
    match Entities::from_json_value(serde_json::Value::Array(all), Some(schema)) {
        Ok(entities) => Some(entities),
        Err(e) => {
            diagnostics.push(Diagnostic::plain(None, diagnostic::full_message(&e)));
            None
        }
    }
}

fn action_uids(schema: &Schema) -> HashSet<EntityUid> {
    schema.actions().cloned().collect()
}

/// The snapshot requests are decided with. Readers never wait: a reload
/// publishes a whole new snapshot with one atomic store, and requests in
/// flight finish on the one they started with.
#[derive(Debug, Default)]
pub struct LiveBundle {
    current: arc_swap::ArcSwapOption<Snapshot>,
}

impl LiveBundle {
    /// An empty cell: requests get `UNAVAILABLE` until a bundle is published.
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn current(&self) -> Option<std::sync::Arc<Snapshot>> {
        self.current.load_full()
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Some(std::sync::Arc::new(snapshot)));
    }

    /// Publishes `snapshot` and hands back the one it replaces, so that the
    /// caller (not a request) decides where the old one is freed.
    pub fn replace(&self, snapshot: Snapshot) -> Option<std::sync::Arc<Snapshot>> {
        self.current.swap(Some(std::sync::Arc::new(snapshot)))
    }
}

/// Where a bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleLocation {
    /// The example bundle compiled into the binary.
    Embedded,
    /// A policies directory and a schemas directory, watched for changes.
    Dirs {
        policies: std::path::PathBuf,
        schemas: std::path::PathBuf,
    },
}

impl BundleLocation {
    /// For messages: the directories, or "built-in example bundle".
    pub fn describe(&self) -> String {
        match self {
            BundleLocation::Embedded => "built-in example bundle".to_owned(),
            BundleLocation::Dirs { policies, schemas } => {
                format!("{} + {}", policies.display(), schemas.display())
            }
        }
    }
}

/// `src` with its policies renamed `p0`, `p1`, … in order, for the
/// annotation scanners' tests.
#[cfg(test)]
pub(crate) fn numbered_policies(src: &str) -> PolicySet {
    let parsed: PolicySet = src.parse().expect("policies");
    let mut set = PolicySet::new();
    for (i, p) in parsed.policies().enumerate() {
        set.add(p.new_id(cedar_policy::PolicyId::new(format!("p{i}"))))
            .expect("add");
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(base: &BundleSources, path: &str, text: &str) -> BundleSources {
        let mut next = base.clone();
        let file = SourceFile {
            path: path.to_owned(),
            text: text.to_owned(),
        };
        if path.starts_with("schemas/") {
            next.schemas.retain(|(_, f)| f.path != path);
            next.schemas.push((SchemaFormat::Cedar, file));
        } else if path.ends_with(".entities.json") {
            next.entities.retain(|f| f.path != path);
            next.entities.push(file);
        } else {
            next.policies.retain(|f| f.path != path);
            next.policies.push(file);
        }
        next
    }

    /// Entities named but not defined are found in parents, attribute and
    /// tag values (nested too) and conditions; one named several ways is
    /// reported by the first in precedence, whatever the visiting order.
    #[test]
    fn undefined_named_entities_are_found_with_a_fixed_precedence() {
        let uid = |t: &str| t.parse::<EntityUid>().expect("uid");
        // Many holders, so that the hash order of visits varies between
        // the ways `Group::"x"` is named.
        let mut items = vec![serde_json::json!({
            "uid": {"type": "User", "id": "defined"}, "attrs": {}, "parents": []
        })];
        for i in 0..64 {
            items.push(serde_json::json!({
                "uid": {"type": "User", "id": format!("v{i}")},
                "attrs": {"deep": {"list": [{"__entity": {"type": "Group", "id": "x"}}]},
                          "boss": {"__entity": {"type": "User", "id": "m"}},
                          "known": {"__entity": {"type": "User", "id": "defined"}}},
                "parents": []
            }));
        }
        items.push(serde_json::json!({
            "uid": {"type": "User", "id": "p"}, "attrs": {},
            "parents": [{"type": "Group", "id": "x"}]
        }));
        let entities =
            Entities::from_json_value(serde_json::Value::Array(items), None).expect("entities");
        let policies = numbered_policies(
            "forbid (principal, action, resource) when { Config::\"k\".on || User::\"m\".on };\n\
             permit (principal, action, resource) when { action == Action::\"read\" };",
        );
        let named = undefined_named(&reach::condition_literals(&policies), &entities);
        assert_eq!(named.get(&uid("Group::\"x\"")), Some(&Named::Parent));
        assert_eq!(named.get(&uid("User::\"m\"")), Some(&Named::Value));
        assert_eq!(named.get(&uid("Config::\"k\"")), Some(&Named::Policy));
        assert_eq!(named.len(), 3, "{named:?}");
    }

    /// A cached build gives exactly what a fresh build gives, through
    /// added, changed, broken and fixed policy files, schema and entity
    /// changes, and back.
    #[test]
    fn cached_builds_equal_fresh_builds() {
        let base = BundleSources::embedded();
        let schema_path = base.schemas[0].1.path.clone();
        let schema_text = base.schemas[0].1.text.clone();
        let entity_path = base.entities[0].path.clone();
        let entity_text = base.entities[0].text.clone();
        let impossible = "@id(\"never\")\nforbid (principal, action, resource) when { false };\n";
        let uses_extra = "permit (principal is Extra, action, resource);\n";
        let variants = vec![
            base.clone(),
            with(&base, "policies/zz-extra.cedar", impossible),
            with(
                &base,
                "policies/zz-extra.cedar",
                "permit (principal, action == Action::\"no-such-action\", resource);\n",
            ),
            with(&base, "policies/zz-extra.cedar", "// nothing\n"),
            with(
                &base,
                &schema_path,
                &format!("{schema_text}\nentity Extra;\n"),
            ),
            with(
                &with(
                    &base,
                    &schema_path,
                    &format!("{schema_text}\nentity Extra;\n"),
                ),
                "policies/zz-extra.cedar",
                impossible,
            ),
            // Valid only with the schema that declares `Extra`: a cache kept
            // across the schema change would wrongly pass it below.
            with(
                &with(
                    &base,
                    &schema_path,
                    &format!("{schema_text}\nentity Extra;\n"),
                ),
                "policies/zz-extra.cedar",
                uses_extra,
            ),
            with(&base, "policies/zz-extra.cedar", uses_extra),
            // `b` repeats `a`'s id and is invalid: refused for the
            // duplicate, so `b` was never validated; once `a` is renamed,
            // `b` must be validated (and refused), not taken from the cache.
            with(
                &with(&base, "policies/zz-a.cedar", "@id(\"dup\")\npermit (principal, action, resource) when { false };\n"),
                "policies/zz-b.cedar",
                "@id(\"dup\")\npermit (principal, action == Action::\"no-such-action\", resource);\n",
            ),
            with(
                &with(&base, "policies/zz-a.cedar", "@id(\"renamed\")\npermit (principal, action, resource) when { false };\n"),
                "policies/zz-b.cedar",
                "@id(\"dup\")\npermit (principal, action == Action::\"no-such-action\", resource);\n",
            ),
            with(&base, &entity_path, &entity_text.replacen('[', "[ ", 1)),
            with(&base, &entity_path, "[{\"uid\": 1}]"),
            base.clone(),
        ];
        let mut cache = BuildCache::default();
        let (mut warned, mut refused) = (0, 0);
        // Twice over, so that the second pass meets a warm cache.
        for (i, sources) in variants.iter().chain(variants.iter()).enumerate() {
            let fresh = Snapshot::build(sources);
            let cached = Snapshot::build_cached(sources, &mut cache);
            match (fresh, cached) {
                (Ok(a), Ok(b)) => {
                    warned += usize::from(!a.warnings.is_empty());
                    assert_eq!(a.version, b.version, "variant {i}");
                    assert_eq!(a.warnings, b.warnings, "variant {i}");
                    assert_eq!(a.policy_origins, b.policy_origins, "variant {i}");
                    assert_eq!(a.entity_count(), b.entity_count(), "variant {i}");
                    assert_eq!(a.files, b.files, "variant {i}");
                    assert_eq!(a.policies.to_cedar(), b.policies.to_cedar(), "variant {i}");
                }
                (Err(a), Err(b)) => {
                    refused += 1;
                    assert_eq!(a.diagnostics, b.diagnostics, "variant {i}");
                }
                (a, b) => panic!(
                    "variant {i}: fresh {:?} but cached {:?}",
                    a.map(|s| s.version),
                    b.map(|s| s.version)
                ),
            }
        }
        assert!(!cache.validated.is_empty(), "the cache was used");
        assert_eq!(
            (warned, refused),
            (6, 10),
            "the variants cover warnings and refusals"
        );
    }
}
