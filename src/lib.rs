//! leash: a Cedar authorization sidecar for AI agents.
//!
//! An agent's tool gateway asks leash, before every tool call: may this agent,
//! acting for this user, do this action on this resource, in this context?
//! leash answers over gRPC on loopback TCP or a Unix socket, from a Cedar
//! policy bundle (policies, schema, entity data) kept in Git.
//!
//! # Module map
//!
//! A request flows one way:
//!
//! ```text
//! proto (generated)  →  service (proto ↔ domain, errors → gRPC status)
//!                    →  engine  (pure, synchronous: delegation and decision)
//!                    →  bundle  (immutable Snapshot: loaded, validated, published)
//!
//! files → reload (watch, coalesce, build off the request path) → bundle → one ArcSwap store
//!
//! each decision → audit (a hash-chained record, written before the answer)
//!               → telemetry (span in the caller's trace, metrics, deny log line)
//! ```
//!
//! - [`proto`]: the generated `leash.v1` types, client and server traits.
//! - [`service`]: the `Authorizer` gRPC service; converts typed and JSON inputs
//!   into Cedar values and maps [`engine::RequestError`] to `INVALID_ARGUMENT`;
//!   `service::admin` answers `Admin/Status` (what is served, the last reload).
//! - [`engine`]: decides a request against a [`bundle::Snapshot`]: both sides of
//!   a delegated request (each narrowed by the scope index), the trusted
//!   `context.leash` record, fail-closed rules, and the approval gate
//!   (`@approval("required")` permits, read in `bundle::approvals`, turn an
//!   ALLOW into APPROVAL_REQUIRED with the request's fingerprint).
//! - [`bundle`]: finds, parses and validates a bundle; every problem becomes a
//!   [`bundle::Diagnostic`] with file:line:column; a valid bundle becomes a
//!   [`bundle::Snapshot`] with a content-hash version. Reads are stable (a tree
//!   changing mid-read is read again; ConfigMap volumes through `..data`), and
//!   a [`bundle::BuildCache`] lets a rebuild validate only changed files. Each
//!   snapshot carries a [`bundle::PolicyIndex`]: policies filed by their scope,
//!   so a request evaluates only those that could apply to it; and
//!   `bundle::reach`, the entity references that let a request bringing
//!   entities be decided on the bundle entities it can reach; and
//!   `bundle::elevated`, elevated entity sets built once per snapshot; and
//!   `bundle::context_check`, the context shapes that passed the schema
//!   check, so a context of the same shape is not checked again; and
//!   `bundle::printed`, Cedar's printed forms of entity references and
//!   policy ids, written without the formatting machinery.
//! - [`grants`]: signed grants (Ed25519 JWS) verified offline against the
//!   approvers' keys in the bundle (`bundle::approvers`): a valid approval
//!   grant for a gated request's fingerprint allows it once; a valid
//!   elevation grant puts the agent in a role for a time-boxed window; every
//!   other grant is a DENY saying why.
//! - [`quota`]: the counters of the `@rate`/`@budget` limits declared on
//!   permits (parsed in `bundle::limits`): GCRA cells, exact under
//!   concurrency, bounded, kept across reloads for unchanged limits.
//! - [`reload`]: hot reload: inotify (or polling) over the bundle directories,
//!   bursts coalesced, snapshots built on a low-priority thread and published
//!   with one store; invalid changes refused with the last good one serving.
//! - [`audit`]: the tamper-evident trail: one hash-chained record per
//!   decision, written (and in the default mode synced) by a writer thread
//!   before the decision is answered; when it cannot write, decisions are
//!   DENY and health NOT_SERVING until it can (`audit::chain` seals and
//!   verifies, `audit::writer` batches, syncs, rotates and recovers).
//! - [`telemetry`]: one OpenTelemetry span per decision, parented by the
//!   caller's `traceparent` and exported over OTLP through a bounded queue
//!   that drops (and counts) rather than waits; Prometheus metrics and
//!   `/healthz`, `/readyz` on the admin HTTP listener; deny log lines, written
//!   to stderr through a queue so a slow log reader never holds up a decision.
//! - [`server`]: listeners (loopback TCP, Unix socket 0600, admin HTTP, and a
//!   health-only gRPC listener for the kubelet's probes),
//!   health, reflection, gRPC status metrics, graceful drain; takes
//!   already-bound listeners so tests bind port 0. `server::uds` holds
//!   Unix-socket connections registered for reading only, so a client
//!   reading its answer does not wake the sidecar; `server::accept` pauses
//!   accepting after an error such as running out of file descriptors;
//!   `server::health` ends `Health/Watch` streams when leash drains.
//! - [`config`]: the command line and `LEASH_*` environment of the binary.
//! - [`check`]: the client behind `leash check`.
//! - [`bench`]: `leash bench`, the benchmark harness: a workload generator,
//!   in-process timing, and a real sidecar child process measured against an
//!   empty gRPC floor over the same transport, with the machine's load in
//!   each open-loop round (`bench::machine`); an OTLP span collector for
//!   measuring (and testing) tracing.

pub mod audit;
pub mod bench;
pub mod bundle;
pub mod check;
pub mod config;
pub mod engine;
pub mod grants;
pub mod proto;
pub mod quota;
pub mod reload;
pub mod server;
pub mod service;
pub mod telemetry;
