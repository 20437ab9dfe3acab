//! The command line. Every `serve` flag also reads a `LEASH_*` environment
//! variable. All values are checked, and every bad one reported, before
//! anything binds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::reload::{ReloadOptions, WatchMode, DEFAULT_SETTLE};
use crate::server::ServerOptions;
use crate::telemetry::{BatchOptions, Protocol, SamplerChoice, TelemetryOptions, TraceOptions};

/// Default TCP listen address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Default audit trail: a file in the working directory (`serve` in a
/// container should point it at a volume, or at `-`).
pub const DEFAULT_AUDIT_LOG: &str = "leash-audit.log";

/// Default admin HTTP address (loopback only). The pod's containers share
/// one network namespace, so the port stays clear of those an agent's own
/// container is likely to use (8080, 9090, and 9464, OpenTelemetry's
/// Prometheus exporter).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9557";

#[derive(Debug, Parser)]
#[command(
    name = "leash",
    version,
    about = "Cedar authorization sidecar for AI agents",
    long_about = "Cedar authorization sidecar for AI agents: may this agent, acting for this user, \
                  do this action on this resource? With no subcommand, `leash` serves.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` flags, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at startup; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve IsAuthorized over gRPC (the default).
    Serve(ServeArgs),
    /// Check a bundle as `serve` would, for a GitOps CI job (exit 0 valid, 1 invalid).
    Validate(ValidateArgs),
    /// Ask a running sidecar for one decision (exit 0 allow, 2 deny, 3
    /// approval required, 1 error).
    Check(CheckArgs),
    /// Show what a running sidecar serves and how its last reload went
    /// (exit 0, 2 when the last change was refused, 1 error).
    Status(StatusArgs),
    /// Audit trail tools: `leash audit verify FILE...`.
    Audit(AuditArgs),
    /// Make an approver's Ed25519 key pair: the private key to a file, the
    /// public key (for an `*.approvers.json` file) to standard output.
    Keygen(KeygenArgs),
    /// Approval and elevation grants: `leash grant approve ...`, `leash grant
    /// elevate ...`, `leash grant inspect TOKEN`.
    Grant(GrantArgs),
    /// Measure leash against the floor (in-process decision, empty gRPC call)
    /// on this machine; `leash bench generate` writes a generated bundle.
    Bench(BenchArgs),
    /// The benchmark's floor server: one empty gRPC method (started by
    /// `leash bench`; exits when its stdin closes).
    #[command(hide = true)]
    BenchFloor(BenchFloorArgs),
}

/// What a boolean flag's environment variable may say: `true`/`false`,
/// `yes`/`no`, `on`/`off`, `1`/`0`, `t`/`f`, `y`/`n`, in any case (anything
/// else is refused, so a typo never turns a switch such as
/// `LEASH_AUDIT_FAIL_OPEN` on).
fn boolish() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory of `*.cedar` policies and `*.entities.json` entity data
    /// (recursive). Without --policies/--schemas, the built-in example bundle.
    #[arg(long, env = "LEASH_POLICIES", value_name = "DIR", requires = "schemas")]
    pub policies: Option<PathBuf>,
    /// Directory of the schema: `*.cedarschema` (Cedar syntax), or
    /// `*.cedarschema.json` or any other `*.json` (Cedar JSON).
    #[arg(long, env = "LEASH_SCHEMAS", value_name = "DIR", requires = "policies")]
    pub schemas: Option<PathBuf>,
    /// TCP address to serve on; port 0 picks one (logged). `none` disables TCP.
    #[arg(long, env = "LEASH_LISTEN", value_name = "HOST:PORT", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Also (or, with `--listen none`, only) serve on this Unix socket, mode 0600.
    #[arg(long, env = "LEASH_UDS", value_name = "PATH")]
    pub uds: Option<PathBuf>,
    /// Allow --listen and --admin-listen on an address other than loopback.
    #[arg(long, env = "LEASH_ALLOW_NON_LOOPBACK", value_parser = boolish())]
    pub allow_non_loopback: bool,
    /// Largest number of requests in one BatchIsAuthorized call.
    #[arg(long, env = "LEASH_MAX_BATCH", value_name = "N", default_value_t = 100)]
    pub max_batch: usize,
    /// Threads that decide requests. Default: one per CPU the process may
    /// use (its affinity and its container's CPU limit); set it to the
    /// CPUs the sidecar is meant to have when that is fewer.
    #[arg(long, env = "LEASH_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Most rate and budget counters (one per limit and agent, or agent and
    /// user) held at once; idle ones make room. When every one is live, a
    /// limited decision is denied (`limit_capacity`) rather than uncounted.
    #[arg(long, env = "LEASH_MAX_LIMIT_KEYS", value_name = "N", default_value_t = crate::quota::DEFAULT_MAX_LIMIT_KEYS)]
    pub max_limit_keys: usize,
    /// Longest lifetime (expiry minus issue time) of an approval grant leash
    /// accepts; longer ones are refused (`grant_lifetime_too_long`).
    #[arg(
        long,
        env = "LEASH_MAX_APPROVAL_TTL",
        value_name = "DURATION",
        default_value = "15m"
    )]
    pub max_approval_ttl: String,
    /// Longest window (expiry minus issue time) of an elevation grant leash
    /// accepts; longer ones are refused (`grant_lifetime_too_long`).
    #[arg(
        long,
        env = "LEASH_MAX_ELEVATION",
        value_name = "DURATION",
        default_value = "4h"
    )]
    pub max_elevation: String,
    /// Largest request message in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "LEASH_MAX_MESSAGE_BYTES", value_name = "BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// How long in-flight requests get to finish after SIGTERM/SIGINT
    /// (`15`, `15s`, `500ms`; a bare number is seconds).
    #[arg(
        long,
        env = "LEASH_DRAIN_TIMEOUT",
        value_name = "DURATION",
        default_value = "15"
    )]
    pub drain_timeout: String,
    /// Poll the bundle directories every INTERVAL (`2s`, `500ms`) instead of
    /// using inotify: for NFS, EFS and other file systems without events.
    #[arg(long, env = "LEASH_WATCH_POLL", value_name = "INTERVAL")]
    pub watch_poll: Option<String>,
    /// Do not watch the bundle; reload only on SIGHUP.
    // Not `conflicts_with`: the parser counts a switch set from its variable
    // as given even when the value is `false`; `resolve` checks the pair.
    #[arg(long, env = "LEASH_NO_WATCH", value_parser = boolish())]
    pub no_watch: bool,
    /// Quiet time that ends a burst of file events before a reload starts.
    #[arg(
        long,
        env = "LEASH_WATCH_SETTLE",
        value_name = "DURATION",
        default_value = "50ms"
    )]
    pub watch_settle: String,
    /// Narrow each request to the policies whose scope can match it, and a
    /// request that brings entities to the bundle entities it can reach,
    /// before Cedar evaluates it (same answers, flat latency in bundle
    /// size). `off` evaluates every policy on every request, on a full copy
    /// of the entities: for comparison, or as a safety valve.
    #[arg(long, env = "LEASH_POLICY_INDEX", value_enum, default_value_t = Switch::On)]
    pub policy_index: Switch,
    /// Log format: `json` (one object per line), `text`, or `auto`: text on
    /// a terminal, JSON otherwise (in a container).
    #[arg(long, env = "LEASH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Log filter: a level (`info`, `debug`) or per-module directives
    /// (`leash=debug,info`); falls back to RUST_LOG, then `info`.
    #[arg(long, env = "LEASH_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// The audit trail: a file, `-` for stdout, or `none`.
    #[arg(long, env = "LEASH_AUDIT_LOG", value_name = "PATH|-|none", default_value = DEFAULT_AUDIT_LOG)]
    pub audit_log: String,
    /// `disk`: a decision is answered once its record is written and synced;
    /// `queued`: once it is queued for the writer (faster; a crash may lose
    /// the last batch).
    #[arg(long, env = "LEASH_AUDIT_SYNC", value_enum, default_value_t = AuditSync::Disk)]
    pub audit_sync: AuditSync,
    /// Rotate the audit file when it reaches this many bytes.
    #[arg(long, env = "LEASH_AUDIT_MAX_BYTES", value_name = "BYTES", default_value_t = 100 * 1024 * 1024)]
    pub audit_max_bytes: u64,
    /// Requests (a batch counts as one) queued for the audit writer at
    /// most; beyond, callers wait for a place, for at most 10 s, then are
    /// refused.
    #[arg(long, env = "LEASH_AUDIT_QUEUE_SIZE", value_name = "N", default_value_t = crate::audit::DEFAULT_QUEUE_SIZE)]
    pub audit_queue_size: usize,
    /// Answer decisions even when their records cannot be written (logged
    /// loudly). By default leash fails closed: such decisions are DENY.
    #[arg(long, env = "LEASH_AUDIT_FAIL_OPEN", value_parser = boolish())]
    pub audit_fail_open: bool,
    /// Context attributes recorded in clear; others are redacted.
    #[arg(
        long,
        env = "LEASH_AUDIT_CONTEXT_KEYS",
        value_name = "KEY,...",
        value_delimiter = ','
    )]
    pub audit_context_keys: Vec<String>,
    /// Context attributes recorded as HMAC-SHA256 with --audit-hash-key-file.
    #[arg(
        long,
        env = "LEASH_AUDIT_HASH_CONTEXT_KEYS",
        value_name = "KEY,...",
        value_delimiter = ',',
        requires = "audit_hash_key_file"
    )]
    pub audit_hash_context_keys: Vec<String>,
    /// File holding the key of those hashes (at least 16 bytes).
    #[arg(long, env = "LEASH_AUDIT_HASH_KEY_FILE", value_name = "PATH")]
    pub audit_hash_key_file: Option<PathBuf>,
    /// Admin HTTP listener: `/metrics`, `/healthz`, `/readyz`. `none` turns
    /// it, and metrics, off.
    #[arg(long, env = "LEASH_ADMIN_LISTEN", value_name = "HOST:PORT", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: String,
    /// A plain gRPC listener that serves `grpc.health.v1` and nothing else,
    /// for the kubelet's native gRPC probes (they dial the pod IP, so a
    /// loopback listener cannot answer them). Any address is allowed: no
    /// decision, status or reflection is served on it. Off by default.
    #[arg(
        long,
        env = "LEASH_HEALTH_LISTEN",
        value_name = "HOST:PORT",
        default_value = "none"
    )]
    pub health_listen: String,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuditSync {
    Disk,
    Queued,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

/// OpenTelemetry settings: each flag reads the standard `OTEL_*` variable.
/// Spans are exported only when an endpoint is set. As the specification
/// asks, an empty variable counts as unset; defaults are applied in
/// [`TelemetryArgs::resolve`].
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// OTLP collector base URL (`http://collector:4318`); with
    /// http/protobuf, `/v1/traces` is appended.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP URL for spans, used as given (overrides --otlp-endpoint).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,
    /// OTLP transport: `http/protobuf` (default) or `grpc`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// OTLP transport for spans (overrides --otlp-protocol).
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        value_name = "PROTOCOL"
    )]
    pub otlp_traces_protocol: Option<String>,
    /// Longest one export request may take, in milliseconds (or `2s`)
    /// [default: 10000].
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TIMEOUT", value_name = "MS")]
    pub otlp_timeout: Option<String>,
    /// Longest one span export request may take (overrides
    /// --otlp-timeout).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", value_name = "MS")]
    pub otlp_traces_timeout: Option<String>,
    /// `service.name` of leash's spans [default: `service.name` of the
    /// resource attributes, else `leash`].
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME")]
    pub otel_service_name: Option<String>,
    /// More resource attributes: `key=value,key2=value2` (values may be
    /// percent-encoded).
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_name = "KEY=VALUE,...")]
    pub otel_resource_attributes: Option<String>,
    /// Sampler: parentbased_always_on (the default: follow the caller's
    /// decision, sample all without one), always_on, always_off,
    /// traceidratio, parentbased_always_off, parentbased_traceidratio.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_name = "SAMPLER")]
    pub otel_traces_sampler: Option<String>,
    /// The sampler's ratio (0 to 1) for the *traceidratio samplers.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_name = "RATIO")]
    pub otel_traces_sampler_arg: Option<String>,
    /// `otlp` (the default) or `none`; a list such as `otlp,console` is
    /// read for `otlp`, and exporters leash lacks are ignored with a warning.
    #[arg(long, env = "OTEL_TRACES_EXPORTER", value_name = "EXPORTER")]
    pub otel_traces_exporter: Option<String>,
    /// Turn span export off whatever else is set (`true`, any case).
    #[arg(
        long,
        env = "OTEL_SDK_DISABLED",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub otel_sdk_disabled: Option<String>,
    /// Spans held while the collector is busy; beyond, spans are dropped
    /// (and counted), never waited for [default: 2048].
    #[arg(long, env = "OTEL_BSP_MAX_QUEUE_SIZE", value_name = "N")]
    pub otel_bsp_max_queue_size: Option<String>,
    /// Longest a span waits before its batch is sent, in milliseconds
    /// [default: 5000].
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", value_name = "MS")]
    pub otel_bsp_schedule_delay: Option<String>,
    /// Spans per export request; at most the queue size [default: 512].
    #[arg(long, env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", value_name = "N")]
    pub otel_bsp_max_export_batch_size: Option<String>,
    /// Longest one batch may take to export, retries included, in
    /// milliseconds [default: 30000].
    #[arg(long, env = "OTEL_BSP_EXPORT_TIMEOUT", value_name = "MS")]
    pub otel_bsp_export_timeout: Option<String>,
    /// Context attributes recorded on spans (`leash.context.<key>`);
    /// none by default, as context values may be personal data.
    #[arg(
        long,
        env = "LEASH_TRACE_CONTEXT_KEYS",
        value_name = "KEY,...",
        value_delimiter = ','
    )]
    pub trace_context_keys: Vec<String>,
    /// Baggage entries recorded on spans (`leash.baggage.<key>`).
    #[arg(
        long,
        env = "LEASH_TRACE_BAGGAGE_KEYS",
        value_name = "KEY,...",
        value_delimiter = ','
    )]
    pub trace_baggage_keys: Vec<String>,
}

impl TelemetryArgs {
    /// Checks every value; problems are appended to `problems`, things
    /// worth a warning (but not a refusal) to `warnings`.
    pub fn resolve(
        &self,
        metrics: bool,
        problems: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> TelemetryOptions {
        let keys = |flag: &str, values: &[String], problems: &mut Vec<String>| -> Vec<String> {
            let mut keys = Vec::new();
            for v in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
                if v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                {
                    keys.push(v.to_owned());
                } else {
                    problems.push(format!(
                        "{flag}: `{v}` is not a key (letters, digits, `_`, `-`, `.`)"
                    ));
                }
            }
            keys
        };
        let context_keys = keys("--trace-context-keys", &self.trace_context_keys, problems);
        let baggage_keys = keys("--trace-baggage-keys", &self.trace_baggage_keys, problems);
        TelemetryOptions {
            traces: self.traces(problems, warnings),
            metrics,
            context_keys,
            baggage_keys,
        }
    }

    fn exporting(&self, warnings: &mut Vec<String>) -> bool {
        if let Some(value) = given(&self.otel_sdk_disabled) {
            if value.eq_ignore_ascii_case("true") {
                return false;
            }
            if !value.eq_ignore_ascii_case("false") {
                warnings.push(format!(
                    "--otel-sdk-disabled: `{value}` is neither `true` nor `false`; read as false"
                ));
            }
        }
        let Some(list) = given(&self.otel_traces_exporter) else {
            return true;
        };
        let names: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        if names.contains(&"none") {
            return false;
        }
        for name in names.iter().filter(|n| **n != "otlp") {
            warnings.push(format!(
                "--otel-traces-exporter: `{name}` is not an exporter leash has; ignored"
            ));
        }
        names.contains(&"otlp") || names.is_empty()
    }

    fn traces(
        &self,
        problems: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> Option<TraceOptions> {
        let traces_endpoint = given(&self.otlp_traces_endpoint);
        let base_endpoint = given(&self.otlp_endpoint);
        // Checked even when export is off, so a bad value is reported now,
        // not when export is turned on later; but then only as a warning:
        // turning export off is how an operator opts out of values set for
        // the whole platform that leash cannot use (TLS, `http/json`).
        let exporting = self.exporting(warnings);
        let first = problems.len();
        let (protocol_flag, protocol_text) = match (
            given(&self.otlp_traces_protocol),
            given(&self.otlp_protocol),
        ) {
            (Some(p), _) => ("--otlp-traces-protocol", p),
            (None, Some(p)) => ("--otlp-protocol", p),
            (None, None) => ("--otlp-protocol", "http/protobuf"),
        };
        let protocol = match protocol_text {
            "http/protobuf" => Protocol::HttpProtobuf,
            "grpc" => Protocol::Grpc,
            other => {
                problems.push(format!(
                    "{protocol_flag}: `{other}` is not supported (use `http/protobuf` or `grpc`)"
                ));
                Protocol::HttpProtobuf
            }
        };
        // The specification's rule: a signal's own endpoint is used as
        // given; the base endpoint gets the signal's path over HTTP.
        // Without an endpoint nothing is exported, but the other values
        // are still checked: a bad one is reported now, not when an
        // endpoint is added later.
        let endpoint = match (traces_endpoint, base_endpoint) {
            (Some(url), _) => Some(("--otlp-traces-endpoint", url, url.to_owned())),
            (None, Some(base)) if protocol == Protocol::HttpProtobuf => Some((
                "--otlp-endpoint",
                base,
                format!("{}/v1/traces", base.trim_end_matches('/')),
            )),
            (None, Some(base)) => Some(("--otlp-endpoint", base, base.to_owned())),
            (None, None) => None,
        };
        if let Some((flag, given_url, _)) = &endpoint {
            if let Err(problem) = check_endpoint(given_url) {
                problems.push(format!("{flag}: {problem}"));
            }
        }
        let millis =
            |flag: &str, value: &Option<String>, default: u64, problems: &mut Vec<String>| {
                let Some(text) = given(value) else {
                    return Duration::from_millis(default);
                };
                match parse_millis(text) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        problems.push(format!("{flag}: must be more than 0"));
                        Duration::from_millis(default)
                    }
                    Err(e) => {
                        problems.push(format!("{flag}: {e}"));
                        Duration::from_millis(default)
                    }
                }
            };
        let count =
            |flag: &str, value: &Option<String>, default: usize, problems: &mut Vec<String>| {
                let Some(text) = given(value) else {
                    return default;
                };
                match text.parse::<usize>() {
                    Ok(n) if (1..=1 << 20).contains(&n) => n,
                    _ => {
                        problems.push(format!(
                            "{flag}: `{text}` is not a number from 1 to 1048576"
                        ));
                        default
                    }
                }
            };
        let defaults = BatchOptions::default();
        // Both read, so a bad general value is reported too.
        let general = millis("--otlp-timeout", &self.otlp_timeout, 10_000, problems);
        let timeout = match given(&self.otlp_traces_timeout) {
            Some(_) => millis(
                "--otlp-traces-timeout",
                &self.otlp_traces_timeout,
                10_000,
                problems,
            ),
            None => general,
        };
        let schedule_delay = millis(
            "--otel-bsp-schedule-delay",
            &self.otel_bsp_schedule_delay,
            5_000,
            problems,
        );
        let export_timeout = millis(
            "--otel-bsp-export-timeout",
            &self.otel_bsp_export_timeout,
            30_000,
            problems,
        );
        let max_queue = count(
            "--otel-bsp-max-queue-size",
            &self.otel_bsp_max_queue_size,
            defaults.max_queue,
            problems,
        );
        // The specification: a batch larger than the queue is the queue.
        let max_batch = count(
            "--otel-bsp-max-export-batch-size",
            &self.otel_bsp_max_export_batch_size,
            defaults.max_batch,
            problems,
        )
        .min(max_queue);
        let sampler = match SamplerChoice::parse(
            given(&self.otel_traces_sampler).unwrap_or("parentbased_always_on"),
            given(&self.otel_traces_sampler_arg),
        ) {
            Ok(sampler) => sampler,
            Err(e) => {
                // A bad ratio is the argument's fault, not the sampler's.
                let flag = if e.contains("is not a sampling ratio") {
                    "--otel-traces-sampler-arg"
                } else {
                    "--otel-traces-sampler"
                };
                problems.push(format!("{flag}: {e}"));
                SamplerChoice::ParentBasedAlwaysOn
            }
        };
        let resource = match given(&self.otel_resource_attributes) {
            None => Vec::new(),
            Some(text) => parse_resource_attributes(text).unwrap_or_else(|e| {
                problems.push(format!("--otel-resource-attributes: {e}"));
                Vec::new()
            }),
        };
        // The specification's order: OTEL_SERVICE_NAME, then `service.name`
        // of the resource attributes, then the product's own name.
        let service_name = given(&self.otel_service_name)
            .map(str::to_owned)
            .or_else(|| {
                resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| "leash".to_owned());
        if !exporting {
            for problem in problems.drain(first..) {
                warnings.push(format!("{problem} (ignored: span export is off)"));
            }
            return None;
        }
        if problems.len() > first {
            return None;
        }
        let (_, _, endpoint) = endpoint?;
        Some(TraceOptions {
            endpoint,
            protocol,
            timeout,
            batch: BatchOptions {
                max_queue,
                schedule_delay,
                max_batch,
                export_timeout,
            },
            sampler,
            service_name,
            resource,
        })
    }
}

/// A flag's value, if given and not blank.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// An OTLP endpoint leash can reach: `http://host:port[/path]`.
fn check_endpoint(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Err(format!(
            "`{url}`: TLS to the collector is not supported; export over plain HTTP to a \
             collector in the pod or on the node (which may forward over TLS)"
        ));
    }
    let uri = url.parse::<tonic::codegen::http::Uri>().ok();
    match uri {
        Some(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => Ok(()),
        _ => Err(format!(
            "`{url}` is not an http:// URL with a host, such as `http://localhost:4318`"
        )),
    }
}

/// OpenTelemetry's durations: a bare number is milliseconds (`250` and
/// `250.0` alike); `2s`, `500ms` are accepted too.
pub fn parse_millis(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let trimmed = trimmed.strip_prefix('+').unwrap_or(trimmed);
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // A bare number: the same reading and bounds as `…ms`.
        return parse_duration(&format!("{trimmed}ms"))
            .map_err(|_| format!("`{text}` is not a number of milliseconds up to a day"));
    }
    parse_duration(trimmed)
}

/// `key=value,key2=value2`, values percent-decoded (W3C baggage format).
pub fn parse_resource_attributes(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut attributes = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("`{item}` is not `key=value`"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("`{item}` has an empty key"));
        }
        let value = percent_decode(value.trim())
            .ok_or_else(|| format!("`{item}`: the value is not valid percent-encoded UTF-8"))?;
        attributes.push((key.to_owned(), value));
    }
    Ok(attributes)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Directory of policies and entity data.
    #[arg(long, env = "LEASH_POLICIES", value_name = "DIR")]
    pub policies: PathBuf,
    /// Directory of the schema.
    #[arg(long, env = "LEASH_SCHEMAS", value_name = "DIR")]
    pub schemas: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Address of a running sidecar.
    // Not `conflicts_with = "uds"`: the parser counts `LEASH_ADDR` from the
    // environment as given, and a shell that sets it could not use --uds.
    #[arg(long, env = "LEASH_ADDR", default_value = DEFAULT_LISTEN)]
    pub addr: String,
    /// Unix socket of a running sidecar (instead of --addr, which it overrides).
    #[arg(long, value_name = "PATH")]
    pub uds: Option<PathBuf>,
    /// The agent, as a Cedar entity reference: `Agent::"support-bot"`.
    #[arg(long)]
    pub agent: String,
    /// The user the agent acts for: `User::"alice"`. Omit for an autonomous agent.
    #[arg(long)]
    pub user: Option<String>,
    /// The action: `Action::"tickets:read"`.
    #[arg(long)]
    pub action: String,
    /// The resource: `Ticket::"T-1"`.
    #[arg(long)]
    pub resource: String,
    /// Context as Cedar JSON: `{"amount_cents": 1200}`.
    #[arg(long, value_name = "JSON")]
    pub context: Option<String>,
    /// Request-scoped entities as a Cedar JSON array.
    #[arg(long, value_name = "JSON")]
    pub entities: Option<String>,
    /// Request id to send (leash makes one when absent).
    #[arg(long)]
    pub request_id: Option<String>,
    /// A signed grant to present (`leash grant approve` makes one); may be
    /// given more than once.
    #[arg(long = "grant", value_name = "TOKEN")]
    pub grants: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Check a trail's hash chain: exit 0 intact, 1 broken (the first bad
    /// record is named) or short of an anchor, 2 intact but ending in a
    /// partial record (a crash mid-write).
    Verify {
        /// The trail's files in chain order: rotated files oldest first
        /// (`audit.log.*` sorts so), then the active one.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// A head kept outside the trail (the `audit trail head` log line's
        /// seq and hash, or an earlier verify's): the trail must hold that
        /// record with that hash, so records cut from the end or a trail
        /// rewritten from scratch fail. May be given more than once.
        #[arg(long = "anchor", value_name = "SEQ:HASH")]
        anchors: Vec<crate::audit::chain::Anchor>,
        /// The files must begin with the trail's first record (seq 0): fail
        /// when older files are missing instead of noting it.
        #[arg(long)]
        from_start: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// File to write the private key to (created with mode 0600; an existing
    /// file is never overwritten).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// The key's id in the approvers file, kept in the key file so
    /// `leash grant` needs no --kid.
    #[arg(long)]
    pub kid: Option<String>,
    /// The approver's id in the approvers file, kept in the key file so
    /// `leash grant` needs no --approver.
    #[arg(long)]
    pub approver: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GrantArgs {
    #[command(subcommand)]
    pub command: GrantCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum GrantCommand {
    /// Sign an approval of one request (its fingerprint, from the
    /// APPROVAL_REQUIRED answer); prints the grant.
    Approve {
        /// The approver's private key file (`leash keygen`).
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
        /// The key's id in the approvers file [default: the key file's `kid:`].
        #[arg(long)]
        kid: Option<String>,
        /// The approver's id in the approvers file [default: the key file's
        /// `approver:`].
        #[arg(long)]
        approver: Option<String>,
        /// The request's fingerprint, `sha256:...`.
        #[arg(long)]
        fingerprint: String,
        /// How long the grant is valid, e.g. `10m` (leash refuses grants
        /// longer than its --max-approval-ttl, 15m by default).
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// The grant's id (default: a random UUID). Each id is good once.
        #[arg(long)]
        id: Option<String>,
    },
    /// Sign a time-boxed membership of an agent in a role; prints the grant.
    Elevate {
        /// The approver's private key file (`leash keygen`).
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
        /// The key's id in the approvers file [default: the key file's `kid:`].
        #[arg(long)]
        kid: Option<String>,
        /// The approver's id in the approvers file [default: the key file's
        /// `approver:`].
        #[arg(long)]
        approver: Option<String>,
        /// The agent, e.g. `Agent::"support-bot"`.
        #[arg(long)]
        agent: String,
        /// The role it joins, e.g. `AgentRole::"ticket-escalation"`.
        #[arg(long)]
        role: String,
        /// Only while acting for this user, e.g. `User::"alice"`.
        #[arg(long)]
        user: Option<String>,
        /// The window, e.g. `4h` (leash refuses windows longer than its
        /// --max-elevation, 4h by default).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The grant's id (default: a random UUID).
        #[arg(long)]
        id: Option<String>,
    },
    /// Print a grant's header and claims, without verifying it.
    Inspect {
        /// The grant (compact JWS).
        token: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Address of a running sidecar.
    // Not `conflicts_with = "uds"`: the parser counts `LEASH_ADDR` from the
    // environment as given, and a shell that sets it could not use --uds.
    #[arg(long, env = "LEASH_ADDR", default_value = DEFAULT_LISTEN)]
    pub addr: String,
    /// Unix socket of a running sidecar (instead of --addr, which it overrides).
    #[arg(long, value_name = "PATH")]
    pub uds: Option<PathBuf>,
    /// Print the status as JSON (the `Admin/Status` response).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// Smoke mode: two in-flight counts, short runs, a small scale curve;
    /// under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write every figure as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Measure your own bundle (with --schemas and --requests) instead of a
    /// generated one.
    #[arg(long, value_name = "DIR", requires_all = ["schemas", "requests"], conflicts_with = "example")]
    pub policies: Option<PathBuf>,
    /// The schema directory of your bundle.
    #[arg(long, value_name = "DIR", requires = "policies")]
    pub schemas: Option<PathBuf>,
    /// The request mix for your bundle: JSON lines of
    /// `{"agent", "user"?, "action", "resource", "context"?, "entities"?}`.
    #[arg(long, value_name = "FILE", requires = "policies")]
    pub requests: Option<PathBuf>,
    /// Measure the built-in example bundle with its built-in request mix.
    #[arg(long)]
    pub example: bool,
    /// Policies in the generated bundle of the main measurement.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub policy_count: usize,
    /// In-flight requests at each sweep point [default: 1,4,16,64; quick: 1,16].
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub concurrency: Option<Vec<usize>>,
    /// Seconds measured at each point [default: 3; quick: 0.4].
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Seconds of warm-up before each point [default: 0.5; quick: 0.1].
    #[arg(long, value_name = "SECONDS")]
    pub warmup: Option<f64>,
    /// Requests per BatchIsAuthorized call (at most the sidecar's --max-batch, 100).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub batch_size: usize,
    /// Policy counts of the scale curve, or `none`
    /// [default: 10,100,1000,10000,100000; quick: 10,100,1000].
    #[arg(long, value_name = "N,N,...|none", value_delimiter = ',')]
    pub scale: Option<Vec<String>>,
    /// Seed of the workload generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hot reload: changes timed from file write to first decision on the
    /// new version; 0 skips the reload phase [default: 50; quick: 5].
    #[arg(long, value_name = "N")]
    pub reload_changes: Option<usize>,
    /// Telemetry cost: interleaved rounds of off / metrics / traces runs;
    /// 0 skips the phase [default: 3; quick: 1].
    #[arg(long, value_name = "N")]
    pub telemetry_rounds: Option<usize>,
    /// Hot reload: policies in the generated bundle whose reloads decisions
    /// are measured against, or `main` for the main bundle
    /// [default: 10000; quick: main].
    #[arg(long, value_name = "N|main")]
    pub reload_policies: Option<String>,
    /// Latency at half of maximum throughput: policies in the generated
    /// bundle, or `none` to skip the phase [default: 10000; quick: 1000].
    #[arg(long, value_name = "N|none")]
    pub capacity_policies: Option<String>,
    /// Latency at half of maximum throughput: open-loop rounds, each
    /// followed by the floor call at the same rate; the round of median p99
    /// is reported [default: 3; quick: 1].
    #[arg(long, value_name = "N")]
    pub capacity_rounds: Option<usize>,
    /// Grants: users added to the example bundle for the elevation
    /// measurements, or `none` to skip the phase
    /// [default: 0,10000,100000; quick: 0].
    #[arg(long, value_name = "N,N,...|none", value_delimiter = ',')]
    pub grant_entities: Option<Vec<String>>,
    /// `--worker-threads` for every sidecar the bench starts, to measure a
    /// sidecar sized smaller than the machine [default: the sidecar's own,
    /// one per usable CPU].
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Write a generated bundle (policies/, schemas/) and its request mix
    /// (requests.jsonl) to a directory.
    Generate(GenerateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Number of policies.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub policy_count: usize,
    /// Seed of the generator: the same seed gives the same bundle.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory to write; created if missing.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct BenchFloorArgs {
    /// Unix socket to serve on (TCP is on a free loopback port, logged).
    #[arg(long, value_name = "PATH")]
    pub uds: PathBuf,
}

/// Most `--worker-threads`: far more than a sidecar has CPUs.
const MAX_WORKER_THREADS: usize = 1024;

/// `--worker-threads`, for `serve` and `bench` alike.
fn check_worker_threads(value: Option<usize>, problems: &mut Vec<String>) {
    if value.is_some_and(|n| n == 0 || n > MAX_WORKER_THREADS) {
        problems.push(format!(
            "--worker-threads: must be between 1 and {MAX_WORKER_THREADS}"
        ));
    }
}

/// Longest `--drain-timeout`, in seconds: an hour is past any pod's grace
/// period, and the bound keeps the value a `Duration` can hold.
const MAX_DRAIN_TIMEOUT: f64 = 3600.0;

/// The largest batch the sidecar accepts by default, and so the largest
/// batch `leash bench` sends.
const BENCH_MAX_BATCH: usize = crate::service::DEFAULT_MAX_BATCH;

impl BenchArgs {
    /// Checks every value and fills mode-dependent defaults; returns all
    /// problems at once.
    pub fn resolve(&self, server_exe: PathBuf) -> Result<crate::bench::BenchOptions, Vec<String>> {
        use crate::bench::workload::MIN_POLICIES;
        use crate::bench::{BenchBundle, BenchOptions};
        let mut problems = Vec::new();
        let quick = self.quick;
        let bundle = match (&self.policies, &self.schemas, &self.requests) {
            (Some(policies), Some(schemas), Some(requests)) => BenchBundle::Dirs {
                policies: policies.clone(),
                schemas: schemas.clone(),
                requests: requests.clone(),
            },
            _ if self.example => BenchBundle::Example,
            _ => BenchBundle::Generated {
                policies: self.policy_count,
            },
        };
        if self.policy_count < MIN_POLICIES {
            problems.push(format!(
                "--policy-count: {} is below the generator's minimum of {MIN_POLICIES}",
                self.policy_count
            ));
        }
        let concurrency = self.concurrency.clone().unwrap_or_else(|| {
            if quick {
                vec![1, 16]
            } else {
                vec![1, 4, 16, 64]
            }
        });
        if concurrency.is_empty() || concurrency.iter().any(|&c| c == 0 || c > 4096) {
            problems.push("--concurrency: each value must be between 1 and 4096".to_owned());
        }
        let seconds = |flag: &str, value: Option<f64>, default: f64, problems: &mut Vec<String>| {
            let v = value.unwrap_or(default);
            if v.is_finite() && (0.0..=3600.0).contains(&v) {
                Duration::from_secs_f64(v)
            } else {
                problems.push(format!(
                    "{flag}: `{v}` is not a number of seconds up to 3600"
                ));
                Duration::ZERO
            }
        };
        let measure = seconds(
            "--duration",
            self.duration,
            if quick { 0.4 } else { 3.0 },
            &mut problems,
        );
        let warmup = seconds(
            "--warmup",
            self.warmup,
            if quick { 0.1 } else { 0.5 },
            &mut problems,
        );
        if measure.is_zero() && problems.is_empty() {
            problems.push("--duration: must be more than 0".to_owned());
        }
        if self.batch_size == 0 || self.batch_size > BENCH_MAX_BATCH {
            problems.push(format!(
                "--batch-size: must be between 1 and {BENCH_MAX_BATCH} (the sidecar's --max-batch)"
            ));
        }
        let scale = match &self.scale {
            None if quick => vec![10, 100, 1000],
            None => vec![10, 100, 1_000, 10_000, 100_000],
            Some(values) if values.len() == 1 && values[0].eq_ignore_ascii_case("none") => vec![],
            Some(values) => values
                .iter()
                .filter_map(|v| match v.trim().parse::<usize>() {
                    Ok(n) if n >= MIN_POLICIES => Some(n),
                    _ => {
                        problems.push(format!(
                            "--scale: `{v}` is not a policy count of at least {MIN_POLICIES} (or `none`)"
                        ));
                        None
                    }
                })
                .collect(),
        };
        let reload_changes = self.reload_changes.unwrap_or(if quick { 5 } else { 50 });
        let reload_policies = match self.reload_policies.as_deref() {
            None if quick => None,
            None => Some(10_000),
            Some(v) if v.eq_ignore_ascii_case("main") => None,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n >= MIN_POLICIES => Some(n),
                _ => {
                    problems.push(format!(
                        "--reload-policies: `{v}` is not a policy count of at least {MIN_POLICIES} (or `main`)"
                    ));
                    None
                }
            },
        };
        let capacity_policies = match self.capacity_policies.as_deref() {
            None if quick => Some(1_000),
            None => Some(10_000),
            Some(v) if v.eq_ignore_ascii_case("none") => None,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n >= MIN_POLICIES => Some(n),
                _ => {
                    problems.push(format!(
                        "--capacity-policies: `{v}` is not a policy count of at least {MIN_POLICIES} (or `none`)"
                    ));
                    None
                }
            },
        };
        check_worker_threads(self.worker_threads, &mut problems);
        if self.capacity_rounds == Some(0) {
            problems.push(
                "--capacity-rounds: 0 rounds measure nothing; give at least 1 (or --capacity-policies none to skip the phase)"
                    .to_owned(),
            );
        }
        let grant_entities = match &self.grant_entities {
            None => crate::bench::grants::sizes(quick).to_vec(),
            Some(values) if values.len() == 1 && values[0].eq_ignore_ascii_case("none") => vec![],
            Some(values) => values
                .iter()
                .filter_map(|v| match v.trim().parse::<usize>() {
                    Ok(n) if n <= 1_000_000 => Some(n),
                    _ => {
                        problems.push(format!(
                            "--grant-entities: `{v}` is not a number of users up to 1000000 (or `none`)"
                        ));
                        None
                    }
                })
                .collect(),
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let scale_timing = crate::bench::driver::Timing {
            warmup: if quick {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(200)
            },
            measure: if quick {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(2)
            },
        };
        Ok(BenchOptions {
            bundle,
            seed: self.seed,
            quick,
            concurrency,
            timing: crate::bench::driver::Timing { warmup, measure },
            batch_size: self.batch_size,
            scale,
            scale_timing,
            server: crate::bench::child::ServerCommand {
                exe: server_exe,
                worker_threads: self.worker_threads,
            },
            reload_changes,
            reload_policies,
            telemetry_rounds: self.telemetry_rounds.unwrap_or(if quick { 1 } else { 3 }),
            capacity_policies,
            capacity_rounds: self.capacity_rounds.unwrap_or(if quick { 1 } else { 3 }),
            grant_entities,
        })
    }
}

pub use crate::bundle::BundleLocation;

/// A checked `serve` configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Runtime worker threads; `None` for one per usable CPU.
    pub worker_threads: Option<usize>,
    pub bundle: BundleLocation,
    pub tcp: Option<SocketAddr>,
    pub uds: Option<PathBuf>,
    /// The admin HTTP listener; `None` with `--admin-listen none`.
    pub admin: Option<SocketAddr>,
    /// The health-only gRPC listener; `None` unless `--health-listen` is set.
    pub health: Option<SocketAddr>,
    pub options: ServerOptions,
    pub reload: ReloadOptions,
    pub log_format: LogFormat,
    pub log: String,
    /// Values that were read but deserve a warning once logging is up.
    pub warnings: Vec<String>,
}

impl ServeArgs {
    /// Checks every value; returns all problems at once.
    pub fn resolve(&self) -> Result<ServeConfig, Vec<String>> {
        let mut problems = Vec::new();
        let bundle = match (&self.policies, &self.schemas) {
            (Some(policies), Some(schemas)) => BundleLocation::Dirs {
                policies: policies.clone(),
                schemas: schemas.clone(),
            },
            _ => BundleLocation::Embedded,
        };
        let tcp = match parse_listen(&self.listen, self.allow_non_loopback) {
            Ok(addr) => addr,
            Err(problem) => {
                problems.push(problem);
                None
            }
        };
        if tcp.is_none() && self.uds.is_none() && problems.is_empty() {
            problems.push("--listen: `none` needs --uds, or leash would serve nothing".to_owned());
        }
        // (An empty path is refused by the argument parser.)
        if let Some(problem) = self
            .uds
            .as_deref()
            .and_then(crate::server::socket_path_problem)
        {
            problems.push(format!("--uds: {problem}"));
        }
        if self.max_limit_keys == 0 {
            problems.push("--max-limit-keys: must be at least 1".to_owned());
        }
        if self.max_batch == 0 {
            problems.push("--max-batch: must be at least 1".to_owned());
        }
        check_worker_threads(self.worker_threads, &mut problems);
        if self.max_message_bytes < 1024 {
            problems.push("--max-message-bytes: must be at least 1024".to_owned());
        }
        let drain_timeout = match parse_duration(&self.drain_timeout) {
            Ok(d) if d.as_secs_f64() <= MAX_DRAIN_TIMEOUT => d,
            Ok(_) => {
                problems.push(format!(
                    "--drain-timeout: `{}` is longer than the {MAX_DRAIN_TIMEOUT}s limit",
                    self.drain_timeout
                ));
                Duration::ZERO
            }
            Err(e) => {
                problems.push(format!("--drain-timeout: {e}"));
                Duration::ZERO
            }
        };
        let (log_source, log) = match (
            self.log.clone().filter(|l| !l.trim().is_empty()),
            std::env::var("RUST_LOG")
                .ok()
                .filter(|l| !l.trim().is_empty()),
        ) {
            (Some(log), _) => ("--log", log),
            (None, Some(log)) => ("RUST_LOG", log),
            (None, None) => ("--log", "info".to_owned()),
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
            problems.push(format!("{log_source}: `{log}` is not a log filter: {e}"));
        }
        let admin = match parse_listen_flag(
            "--admin-listen",
            DEFAULT_ADMIN_LISTEN,
            &self.admin_listen,
            self.allow_non_loopback,
        ) {
            Ok(addr) => addr,
            Err(problem) => {
                problems.push(problem);
                None
            }
        };
        // Health only, so any address: the kubelet probes the pod IP.
        let health =
            match parse_listen_flag("--health-listen", "0.0.0.0:9558", &self.health_listen, true) {
                Ok(addr) => addr,
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            };
        // One address for two listeners would fail to bind, with the second
        // flag's name only; say it here with both.
        let listeners = [
            ("--listen", tcp),
            ("--admin-listen", admin),
            ("--health-listen", health),
        ];
        for (i, (flag, addr)) in listeners.iter().enumerate() {
            let Some(addr) = addr.filter(|a| a.port() != 0) else {
                continue;
            };
            if let Some((earlier, _)) = listeners[..i].iter().find(|(_, a)| *a == Some(addr)) {
                problems.push(format!(
                    "{flag}: `{addr}` is {earlier}'s address too; each listener needs its own"
                ));
            }
        }
        let audit = self.audit_options(&mut problems);
        let mut warnings = Vec::new();
        let telemetry = self
            .telemetry
            .resolve(admin.is_some(), &mut problems, &mut warnings);
        let watch = match (&self.watch_poll, self.no_watch) {
            (Some(_), true) => {
                problems.push(
                    "--no-watch, --watch-poll: choose one (no watching, or polling)".to_owned(),
                );
                WatchMode::Off
            }
            (None, true) => WatchMode::Off,
            (None, false) => WatchMode::Events,
            (Some(text), false) => match parse_duration(text) {
                Ok(d) if d >= Duration::from_millis(10) => WatchMode::Poll(d),
                Ok(_) => {
                    problems.push(format!(
                        "--watch-poll: `{text}` is too short; polls must be at least 10ms apart"
                    ));
                    WatchMode::Events
                }
                Err(e) => {
                    problems.push(format!("--watch-poll: {e}"));
                    WatchMode::Events
                }
            },
        };
        let settle = match parse_duration(&self.watch_settle) {
            Ok(d) if d <= MAX_SETTLE => d,
            Ok(_) => {
                problems.push(format!(
                    "--watch-settle: `{}` is longer than the {}s limit",
                    self.watch_settle,
                    MAX_SETTLE.as_secs()
                ));
                DEFAULT_SETTLE
            }
            Err(e) => {
                problems.push(format!("--watch-settle: {e}"));
                DEFAULT_SETTLE
            }
        };
        let max_approval_ttl = match parse_duration(&self.max_approval_ttl) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            Ok(_) => {
                problems.push("--max-approval-ttl: must be at least 1s".to_owned());
                crate::grants::DEFAULT_MAX_APPROVAL_TTL
            }
            Err(e) => {
                problems.push(format!("--max-approval-ttl: {e}"));
                crate::grants::DEFAULT_MAX_APPROVAL_TTL
            }
        };
        let max_elevation = match parse_duration(&self.max_elevation) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            Ok(_) => {
                problems.push("--max-elevation: must be at least 1s".to_owned());
                crate::grants::DEFAULT_MAX_ELEVATION
            }
            Err(e) => {
                problems.push(format!("--max-elevation: {e}"));
                crate::grants::DEFAULT_MAX_ELEVATION
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ServeConfig {
            worker_threads: self.worker_threads,
            bundle,
            tcp,
            uds: self.uds.clone(),
            admin,
            health,
            options: ServerOptions {
                max_batch: self.max_batch,
                max_message_bytes: self.max_message_bytes,
                drain_timeout,
                telemetry,
                audit,
                clock: crate::engine::Clock::System,
                max_limit_keys: self.max_limit_keys,
                max_approval_ttl,
                max_elevation,
            },
            reload: ReloadOptions {
                watch,
                settle,
                policy_index: self.policy_index == Switch::On,
            },
            log_format: self.log_format,
            log,
            warnings,
        })
    }
}

impl ServeArgs {
    fn audit_options(&self, problems: &mut Vec<String>) -> crate::audit::AuditOptions {
        use crate::audit::{AuditOptions, AuditTarget, SyncMode};
        let target = match self.audit_log.trim() {
            "" => {
                problems.push("--audit-log: give a path, `-` for stdout, or `none`".to_owned());
                AuditTarget::Off
            }
            "none" => AuditTarget::Off,
            "-" => AuditTarget::Stdout,
            path => AuditTarget::File(PathBuf::from(path)),
        };
        if self.audit_max_bytes < 4096 {
            problems.push("--audit-max-bytes: must be at least 4096".to_owned());
        }
        if !(1..=crate::audit::MAX_QUEUE_SIZE).contains(&self.audit_queue_size) {
            problems.push(format!(
                "--audit-queue-size: {} is out of range; give 1 to {}",
                self.audit_queue_size,
                crate::audit::MAX_QUEUE_SIZE
            ));
        }
        let hash_key = match &self.audit_hash_key_file {
            None => Vec::new(),
            Some(path) => match std::fs::read(path) {
                Ok(key) if key.len() >= 16 => key,
                Ok(_) => {
                    problems.push(format!(
                        "--audit-hash-key-file: `{}` holds fewer than 16 bytes",
                        path.display()
                    ));
                    Vec::new()
                }
                Err(e) => {
                    problems.push(format!(
                        "--audit-hash-key-file: cannot read `{}`: {e}",
                        path.display()
                    ));
                    Vec::new()
                }
            },
        };
        let keys = |values: &[String]| -> Vec<String> {
            values
                .iter()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect()
        };
        let context_keys = keys(&self.audit_context_keys);
        let hash_context_keys = keys(&self.audit_hash_context_keys);
        if let Some(both) = context_keys.iter().find(|k| hash_context_keys.contains(k)) {
            problems.push(format!(
                "--audit-hash-context-keys: `{both}` is also in --audit-context-keys; record it in clear or hashed, not both"
            ));
        }
        AuditOptions {
            target,
            sync: match self.audit_sync {
                AuditSync::Disk => SyncMode::Disk,
                AuditSync::Queued => SyncMode::Queued,
            },
            max_file_bytes: self.audit_max_bytes,
            queue_size: self.audit_queue_size,
            fail_open: self.audit_fail_open,
            context_keys,
            hash_context_keys,
            hash_key,
        }
    }
}

/// Longest accepted `--watch-settle`: longer would make hot reload slow.
const MAX_SETTLE: Duration = Duration::from_secs(10);

/// A duration such as `250ms`, `2s`, `1.5s`, `1m`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    if trimmed.starts_with('-') {
        return Err(format!("`{text}`: a duration cannot be negative"));
    }
    let (number, unit) = trimmed.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use ms, s, m or h, e.g. `500ms`, `2s`, `10m`)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as `500ms` or `2s`"))?;
    let secs = value * scale;
    if !secs.is_finite() || secs > 86_400.0 {
        return Err(format!("`{text}` is longer than any duration may be (24h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `HOST:PORT`, `localhost:PORT` or `none`. A non-loopback address is
/// refused unless explicitly allowed: a sidecar serves its own pod.
pub fn parse_listen(value: &str, allow_non_loopback: bool) -> Result<Option<SocketAddr>, String> {
    parse_listen_flag("--listen", DEFAULT_LISTEN, value, allow_non_loopback)
}

fn parse_listen_flag(
    flag: &str,
    example: &str,
    value: &str,
    allow_non_loopback: bool,
) -> Result<Option<SocketAddr>, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let addr = match value.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
            .map_err(|_| format!("{flag}: `{value}` has no valid port")),
        None => value.parse::<SocketAddr>().map_err(|_| {
            format!(
                "{flag}: `{value}` is not an address such as `{example}`, `[::1]:{}` or `none`",
                example.rsplit(':').next().unwrap_or("0")
            )
        }),
    }?;
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(format!(
            "{flag}: `{addr}` is not a loopback address; a sidecar serves its own pod \
             (pass --allow-non-loopback to serve other hosts)"
        ));
    }
    Ok(Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["leash", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Some(Command::Serve(args)) => args,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_loopback_and_the_example_bundle() {
        let config = serve(&[]).resolve().expect("valid");
        assert_eq!(config.bundle, BundleLocation::Embedded);
        assert_eq!(config.tcp, Some("127.0.0.1:50051".parse().expect("addr")));
        assert_eq!(config.options.max_batch, 100);
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert!(parse_duration("2d")
            .expect_err("unit")
            .contains("unknown unit `d`"));
        assert_eq!(
            parse_duration("25h"),
            Err("`25h` is longer than any duration may be (24h)".to_owned())
        );
        assert_eq!(
            parse_duration("-5s"),
            Err("`-5s`: a duration cannot be negative".to_owned())
        );
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn watch_flags_choose_the_mode() {
        let events = serve(&[]).resolve().expect("valid");
        assert_eq!(events.reload.watch, WatchMode::Events);
        assert_eq!(events.reload.settle, DEFAULT_SETTLE);
        let poll = serve(&["--watch-poll", "2s", "--watch-settle", "10ms"])
            .resolve()
            .expect("valid");
        assert_eq!(poll.reload.watch, WatchMode::Poll(Duration::from_secs(2)));
        assert_eq!(poll.reload.settle, Duration::from_millis(10));
        let off = serve(&["--no-watch"]).resolve().expect("valid");
        assert_eq!(off.reload.watch, WatchMode::Off);
        let problems = serve(&["--watch-poll", "1ms", "--watch-settle", "soon"])
            .resolve()
            .expect_err("refused");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("--watch-poll:"), "{problems:?}");
        assert!(problems[1].starts_with("--watch-settle:"), "{problems:?}");
    }

    #[test]
    fn non_loopback_needs_the_flag() {
        let problems = serve(&["--listen", "0.0.0.0:7000"])
            .resolve()
            .expect_err("refused");
        assert_eq!(
            problems,
            vec![
                "--listen: `0.0.0.0:7000` is not a loopback address; a sidecar serves its own pod \
                  (pass --allow-non-loopback to serve other hosts)"
                    .to_owned()
            ]
        );
        let config = serve(&["--listen", "0.0.0.0:7000", "--allow-non-loopback"])
            .resolve()
            .expect("allowed");
        assert_eq!(config.tcp, Some("0.0.0.0:7000".parse().expect("addr")));
    }

    #[test]
    fn two_listeners_on_one_address_are_refused_but_port_0_is_not() {
        let problems = serve(&[
            "--listen",
            "127.0.0.1:7000",
            "--admin-listen",
            "127.0.0.1:7000",
        ])
        .resolve()
        .expect_err("refused");
        assert_eq!(
            problems,
            ["--admin-listen: `127.0.0.1:7000` is --listen's address too; each listener needs its own"]
        );
        assert!(serve(&[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0"
        ])
        .resolve()
        .is_ok());
    }

    #[test]
    fn a_socket_path_too_long_to_bind_is_refused_before_binding() {
        let long = format!("/tmp/{}", "s".repeat(103));
        assert!(serve(&["--uds", &long[..107]]).resolve().is_ok());
        let problems = serve(&["--uds", &long]).resolve().expect_err("refused");
        assert_eq!(
            problems,
            [format!(
                "--uds: `{long}` is 108 bytes; a Unix socket's path can be at most 107"
            )]
        );
        // Staged in a directory beside itself: the directory's path counts.
        let dir = format!("/{}", "d".repeat(90));
        assert!(serve(&["--uds", &format!("{dir}/s")]).resolve().is_ok());
        let deeper = format!("{dir}d/s");
        let problems = serve(&["--uds", &deeper]).resolve().expect_err("refused");
        assert_eq!(
            problems,
            [format!(
                "--uds: `{deeper}`: its directory's path is 92 bytes; the socket is bound in a \
                 directory beside it first, so that can be at most 91"
            )]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = serve(&["--listen", "none", "--max-batch", "0", "--log", "=[bad"])
            .resolve()
            .expect_err("refused");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("--listen: `none` needs --uds"));
        assert!(problems[1].starts_with("--max-batch"));
        assert!(problems[2].starts_with("--log"));
    }

    #[test]
    fn policies_and_schemas_go_together() {
        let err =
            Cli::try_parse_from(["leash", "serve", "--policies", "p"]).expect_err("needs schemas");
        assert!(err.to_string().contains("--schemas"), "{err}");
    }

    #[test]
    fn listen_accepts_localhost_and_ipv6() {
        assert_eq!(
            parse_listen("localhost:0", false),
            Ok(Some("127.0.0.1:0".parse().expect("addr")))
        );
        assert_eq!(
            parse_listen("[::1]:9", false),
            Ok(Some("[::1]:9".parse().expect("addr")))
        );
        assert!(parse_listen("nonsense", false).is_err());
    }

    fn traces(args: &[&str]) -> Result<Option<TraceOptions>, Vec<String>> {
        serve(args).resolve().map(|c| c.options.telemetry.traces)
    }

    #[test]
    fn spans_are_off_without_an_endpoint_and_metrics_follow_the_admin_listener() {
        let config = serve(&[]).resolve().expect("valid");
        assert_eq!(config.options.telemetry.traces, None);
        assert!(config.options.telemetry.metrics);
        assert_eq!(config.admin, Some("127.0.0.1:9557".parse().expect("addr")));
        let off = serve(&["--admin-listen", "none"]).resolve().expect("valid");
        assert_eq!(off.admin, None);
        assert!(!off.options.telemetry.metrics);
        let problems = serve(&["--admin-listen", "0.0.0.0:9557"])
            .resolve()
            .expect_err("refused");
        assert_eq!(
            problems,
            vec![
                "--admin-listen: `0.0.0.0:9557` is not a loopback address; a sidecar serves its own pod \
                 (pass --allow-non-loopback to serve other hosts)"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn otlp_endpoints_follow_the_specification() {
        // The base endpoint gets the signal path over HTTP, not over gRPC.
        let http = traces(&["--otlp-endpoint", "http://collector:4318/"])
            .expect("valid")
            .expect("on");
        assert_eq!(http.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(http.protocol, Protocol::HttpProtobuf);
        let grpc = traces(&[
            "--otlp-endpoint",
            "http://collector:4317",
            "--otlp-protocol",
            "grpc",
        ])
        .expect("valid")
        .expect("on");
        assert_eq!(grpc.endpoint, "http://collector:4317");
        assert_eq!(grpc.protocol, Protocol::Grpc);
        // The signal's own endpoint and protocol win, and are used as given.
        let own = traces(&[
            "--otlp-endpoint",
            "http://base:4317",
            "--otlp-protocol",
            "grpc",
            "--otlp-traces-endpoint",
            "http://traces:4318/custom",
            "--otlp-traces-protocol",
            "http/protobuf",
        ])
        .expect("valid")
        .expect("on");
        assert_eq!(own.endpoint, "http://traces:4318/custom");
        assert_eq!(own.protocol, Protocol::HttpProtobuf);
        // Defaults are the specification's.
        assert_eq!(own.timeout, Duration::from_secs(10));
        assert_eq!(own.batch, BatchOptions::default());
        assert_eq!(own.sampler, SamplerChoice::ParentBasedAlwaysOn);
        assert_eq!(own.service_name, "leash");
        // Turned off whatever the endpoint.
        let none = [
            "--otlp-endpoint",
            "http://c:4318",
            "--otel-traces-exporter",
            "none",
        ];
        assert_eq!(traces(&none).expect("valid"), None);
        let disabled = ["--otlp-endpoint", "http://c:4318", "--otel-sdk-disabled"];
        assert_eq!(traces(&disabled).expect("valid"), None);
    }

    #[test]
    fn otel_values_are_read_as_the_specification_says() {
        let resolve = |args: &[&str]| {
            let mut argv = vec!["--otlp-endpoint", "http://c:4318"];
            argv.extend_from_slice(args);
            serve(&argv).resolve().expect("valid")
        };
        // Booleans are `true` in any case; anything else is false, with a
        // warning unless it is `false`.
        assert_eq!(
            resolve(&["--otel-sdk-disabled", "TRUE"])
                .options
                .telemetry
                .traces,
            None
        );
        let one = resolve(&["--otel-sdk-disabled", "1"]);
        assert!(one.options.telemetry.traces.is_some());
        assert_eq!(one.warnings.len(), 1, "{:?}", one.warnings);
        // Empty values are unset: the defaults apply.
        let empty = resolve(&[
            "--otel-sdk-disabled=",
            "--otel-traces-sampler=",
            "--otlp-protocol=",
            "--otel-bsp-max-queue-size=",
        ]);
        let trace = empty.options.telemetry.traces.expect("on");
        assert_eq!(trace.sampler, SamplerChoice::ParentBasedAlwaysOn);
        assert_eq!(trace.protocol, Protocol::HttpProtobuf);
        assert!(empty.warnings.is_empty(), "{:?}", empty.warnings);
        // An exporter list is read for `otlp`; unknown exporters warn.
        let list = resolve(&["--otel-traces-exporter", "otlp,console"]);
        assert!(list.options.telemetry.traces.is_some());
        assert_eq!(list.warnings.len(), 1, "{:?}", list.warnings);
        // A batch larger than the queue is the queue.
        let clamped = resolve(&[
            "--otel-bsp-max-queue-size",
            "10",
            "--otel-bsp-max-export-batch-size",
            "20",
        ]);
        let batch = clamped.options.telemetry.traces.expect("on").batch;
        assert_eq!((batch.max_queue, batch.max_batch), (10, 10));
        // service.name: the flag, then the resource attributes, then leash.
        let from_resource = resolve(&[
            "--otel-resource-attributes",
            "service.name=billing-agent-authz",
        ]);
        assert_eq!(
            from_resource
                .options
                .telemetry
                .traces
                .expect("on")
                .service_name,
            "billing-agent-authz"
        );
        let flag = resolve(&[
            "--otel-service-name",
            "authz",
            "--otel-resource-attributes",
            "service.name=x",
        ]);
        assert_eq!(
            flag.options.telemetry.traces.expect("on").service_name,
            "authz"
        );
    }

    #[test]
    fn bad_telemetry_values_are_named() {
        let problems = traces(&[
            "--otlp-endpoint",
            "https://collector:4318",
            "--otlp-protocol",
            "http/json",
            "--otlp-timeout",
            "soon",
            "--otel-traces-sampler",
            "traceidratio",
            "--otel-traces-sampler-arg",
            "1.5",
            "--otel-resource-attributes",
            "team",
            "--trace-context-keys",
            "amount cents",
        ])
        .expect_err("refused");
        let starts: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            starts,
            [
                "--trace-context-keys",
                "--otlp-protocol",
                "--otlp-endpoint",
                "--otlp-timeout",
                "--otel-traces-sampler-arg",
                "--otel-resource-attributes",
            ],
            "{problems:#?}"
        );
        // Without an endpoint nothing is exported, yet a bad value is
        // still reported at startup.
        let unexported = traces(&[
            "--otel-traces-sampler",
            "traceidratio",
            "--otel-traces-sampler-arg",
            "2",
            "--otel-bsp-max-queue-size",
            "0",
        ])
        .expect_err("refused without an endpoint too");
        assert_eq!(unexported.len(), 2, "{unexported:?}");
        assert!(
            unexported[1].starts_with("--otel-traces-sampler-arg: `2`"),
            "{unexported:?}"
        );
        assert!(traces(&[]).expect("no telemetry").is_none());
        assert!(
            problems[2].contains("TLS to the collector is not supported"),
            "{problems:?}"
        );
        assert!(
            problems[4].contains("`1.5` is not a sampling ratio"),
            "{problems:?}"
        );
        assert!(
            traces(&["--otlp-endpoint", "collector:4318"]).expect_err("no scheme")[0]
                .contains("is not an http:// URL")
        );
    }

    #[test]
    fn samplers_and_resource_attributes_parse() {
        assert_eq!(
            SamplerChoice::parse("parentbased_traceidratio", Some("0.25")),
            Ok(SamplerChoice::ParentBasedTraceIdRatio(0.25))
        );
        assert_eq!(
            SamplerChoice::parse("traceidratio", None),
            Ok(SamplerChoice::TraceIdRatio(1.0))
        );
        assert!(SamplerChoice::parse("jaeger_remote", None)
            .expect_err("unsupported")
            .contains("not a sampler leash supports"));
        assert_eq!(
            parse_resource_attributes("k8s.pod.name=agent-1, team=a%20b%2Cc,,"),
            Ok(vec![
                ("k8s.pod.name".to_owned(), "agent-1".to_owned()),
                ("team".to_owned(), "a b,c".to_owned()),
            ])
        );
        assert!(parse_resource_attributes("x=%zz").is_err());
        assert_eq!(parse_millis("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_millis("2s"), Ok(Duration::from_secs(2)));
        // A bare number is milliseconds with or without a fraction.
        assert_eq!(parse_millis("250.0"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_millis(" 2.5 "), Ok(Duration::from_micros(2500)));
        assert!(parse_millis("86400001").is_err(), "more than a day");
        assert!(parse_millis("1.2.3").is_err());
        assert_eq!(parse_millis("+250"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn the_span_timeout_overrides_the_general_one_and_off_still_checks() {
        let endpoint = ["--otlp-endpoint", "http://c:4318"];
        let with = |args: &[&str]| {
            let mut argv = endpoint.to_vec();
            argv.extend_from_slice(args);
            traces(&argv).expect("valid").expect("on").timeout
        };
        assert_eq!(with(&[]), Duration::from_secs(10));
        assert_eq!(with(&["--otlp-timeout", "3000"]), Duration::from_secs(3));
        assert_eq!(
            with(&["--otlp-timeout", "3000", "--otlp-traces-timeout", "500.0"]),
            Duration::from_millis(500)
        );
        let bad = traces(&["--otlp-traces-timeout", "soon"]).expect_err("refused");
        assert!(bad[0].starts_with("--otlp-traces-timeout: "), "{bad:?}");
        // A bad general timeout is reported beside a good span one.
        let both = traces(&["--otlp-timeout", "soon", "--otlp-traces-timeout", "1s"])
            .expect_err("refused");
        assert!(both[0].starts_with("--otlp-timeout: "), "{both:?}");
        // Export turned off: values are still checked, and a bad one is a
        // warning, not a refusal (turning export off is how a pod opts out
        // of platform-wide values leash cannot use).
        for off in [
            &["--otel-sdk-disabled"][..],
            &["--otel-traces-exporter", "none"][..],
        ] {
            let mut argv = off.to_vec();
            argv.extend_from_slice(&["--otlp-endpoint", "https://collector:4318"]);
            argv.extend_from_slice(&["--otel-traces-sampler-arg", "2"]);
            argv.extend_from_slice(&["--otel-traces-sampler", "traceidratio"]);
            let config = serve(&argv).resolve().expect("starts while off");
            assert_eq!(config.options.telemetry.traces, None);
            assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
            assert!(
                config
                    .warnings
                    .iter()
                    .all(|w| w.ends_with("(ignored: span export is off)")),
                "{:?}",
                config.warnings
            );
        }
    }

    #[test]
    fn the_drain_timeout_is_bounded() {
        for bad in ["1e20", "-1", "3601", "NaN", "61m", "1 fortnight"] {
            let flag = format!("--drain-timeout={bad}");
            let problems = serve(&[flag.as_str()])
                .resolve()
                .expect_err("refused, not a panic");
            assert!(
                problems[0].starts_with("--drain-timeout: "),
                "{bad}: {problems:?}"
            );
        }
        let config = serve(&["--drain-timeout", "3600"])
            .resolve()
            .expect("valid");
        assert_eq!(config.options.drain_timeout, Duration::from_secs(3600));
        // A duration like every other flag's.
        for (text, want) in [("30s", 30_000), ("500ms", 500), ("1m", 60_000), ("0", 0)] {
            let config = serve(&["--drain-timeout", text]).resolve().expect("valid");
            assert_eq!(
                config.options.drain_timeout,
                Duration::from_millis(want),
                "{text}"
            );
        }
    }

    #[test]
    fn the_log_filter_falls_back_to_rust_log_then_info() {
        let given = serve(&["--log", "leash=debug"]).resolve().expect("valid");
        assert_eq!(given.log, "leash=debug");
        // RUST_LOG is read only when --log/LEASH_LOG is absent; the test
        // process does not set it, so the default is info.
        if std::env::var_os("RUST_LOG").is_none() && std::env::var_os("LEASH_LOG").is_none() {
            assert_eq!(serve(&[]).resolve().expect("valid").log, "info");
        }
    }

    #[test]
    fn the_audit_trail_is_on_by_default_and_each_target_is_read() {
        use crate::audit::{AuditTarget, SyncMode};
        let config = serve(&[]).resolve().expect("valid");
        assert_eq!(
            config.options.audit.target,
            AuditTarget::File(PathBuf::from("leash-audit.log"))
        );
        assert_eq!(config.options.audit.sync, SyncMode::Disk);
        assert!(!config.options.audit.fail_open);
        let stdout = serve(&["--audit-log", "-", "--audit-sync", "queued"])
            .resolve()
            .expect("valid");
        assert_eq!(stdout.options.audit.target, AuditTarget::Stdout);
        assert_eq!(stdout.options.audit.sync, SyncMode::Queued);
        let off = serve(&["--audit-log", "none"]).resolve().expect("valid");
        assert_eq!(off.options.audit.target, AuditTarget::Off);
        // A hash key must exist and be long enough.
        let dir = tempfile::tempdir().expect("temp dir");
        let short = dir.path().join("key");
        std::fs::write(&short, "short").expect("write");
        let problems = serve(&[
            "--audit-hash-context-keys",
            "recipient",
            "--audit-hash-key-file",
            short.to_str().expect("utf-8"),
            "--audit-max-bytes",
            "10",
        ])
        .resolve()
        .expect_err("refused");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("--audit-max-bytes:"),
            "{problems:?}"
        );
        assert!(problems[1].contains("fewer than 16 bytes"), "{problems:?}");
        assert!(Cli::try_parse_from(["leash", "serve", "--audit-hash-context-keys", "x"]).is_err());
    }

    #[test]
    fn the_audit_queue_size_is_bounded() {
        let default = serve(&[]).resolve().expect("valid");
        assert_eq!(default.options.audit.queue_size, 8192);
        let small = serve(&["--audit-queue-size", "16"])
            .resolve()
            .expect("valid");
        assert_eq!(small.options.audit.queue_size, 16);
        for bad in ["0", "1048577"] {
            let problems = serve(&["--audit-queue-size", bad])
                .resolve()
                .expect_err("refused");
            assert_eq!(
                problems,
                [format!(
                    "--audit-queue-size: {bad} is out of range; give 1 to 1048576"
                )]
            );
        }
        assert!(Cli::try_parse_from(["leash", "serve", "--audit-queue-size", "-1"]).is_err());
    }
}
