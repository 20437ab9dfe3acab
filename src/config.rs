//! The command line. Every `serve` flag also reads a `LEASH_*` environment
//! variable. All values are checked, and every bad one reported, before
//! anything binds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::server::ServerOptions;

/// Default TCP listen address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve IsAuthorized over gRPC (the default).
    Serve(ServeArgs),
    /// Check a bundle as `serve` would, for a GitOps CI job (exit 0 valid, 1 invalid).
    Validate(ValidateArgs),
    /// Ask a running sidecar for one decision (exit 0 allow, 2 deny, 1 error).
    Check(CheckArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory of `*.cedar` policies and `*.entities.json` entity data
    /// (recursive). Without --policies/--schemas, the built-in example bundle.
    #[arg(long, env = "LEASH_POLICIES", value_name = "DIR", requires = "schemas")]
    pub policies: Option<PathBuf>,
    /// Directory of the schema: `*.cedarschema` or `*.cedarschema.json`.
    #[arg(long, env = "LEASH_SCHEMAS", value_name = "DIR", requires = "policies")]
    pub schemas: Option<PathBuf>,
    /// TCP address to serve on; port 0 picks one (logged). `none` disables TCP.
    #[arg(long, env = "LEASH_LISTEN", value_name = "HOST:PORT", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Also (or, with `--listen none`, only) serve on this Unix socket, mode 0600.
    #[arg(long, env = "LEASH_UDS", value_name = "PATH")]
    pub uds: Option<PathBuf>,
    /// Allow --listen on an address other than loopback.
    #[arg(long, env = "LEASH_ALLOW_NON_LOOPBACK")]
    pub allow_non_loopback: bool,
    /// Largest number of requests in one BatchIsAuthorized call.
    #[arg(long, env = "LEASH_MAX_BATCH", value_name = "N", default_value_t = 100)]
    pub max_batch: usize,
    /// Largest request message in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "LEASH_MAX_MESSAGE_BYTES", value_name = "BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(
        long,
        env = "LEASH_DRAIN_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 15.0
    )]
    pub drain_timeout: f64,
    /// Log format.
    #[arg(long, env = "LEASH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter: a level (`info`, `debug`) or per-module directives.
    #[arg(long, env = "LEASH_LOG", value_name = "FILTER", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
    #[arg(long, env = "LEASH_ADDR", default_value = DEFAULT_LISTEN, conflicts_with = "uds")]
    pub addr: String,
    /// Unix socket of a running sidecar (instead of --addr).
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
}

/// Where the bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleLocation {
    /// The example bundle compiled into the binary.
    Embedded,
    Dirs {
        policies: PathBuf,
        schemas: PathBuf,
    },
}

/// A checked `serve` configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bundle: BundleLocation,
    pub tcp: Option<SocketAddr>,
    pub uds: Option<PathBuf>,
    pub options: ServerOptions,
    pub log_format: LogFormat,
    pub log: String,
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
        if self.max_batch == 0 {
            problems.push("--max-batch: must be at least 1".to_owned());
        }
        if self.max_message_bytes < 1024 {
            problems.push("--max-message-bytes: must be at least 1024".to_owned());
        }
        if !(self.drain_timeout.is_finite() && self.drain_timeout >= 0.0) {
            problems.push(format!(
                "--drain-timeout: `{}` is not a number of seconds",
                self.drain_timeout
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            problems.push(format!("--log: `{}` is not a log filter: {e}", self.log));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ServeConfig {
            bundle,
            tcp,
            uds: self.uds.clone(),
            options: ServerOptions {
                max_batch: self.max_batch,
                max_message_bytes: self.max_message_bytes,
                drain_timeout: Duration::from_secs_f64(self.drain_timeout),
            },
            log_format: self.log_format,
            log: self.log.clone(),
        })
    }
}

/// `HOST:PORT`, `localhost:PORT` or `none`. A non-loopback address is
/// refused unless explicitly allowed: a sidecar serves its own pod.
pub fn parse_listen(value: &str, allow_non_loopback: bool) -> Result<Option<SocketAddr>, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let addr = match value.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
            .map_err(|_| format!("--listen: `{value}` has no valid port")),
        None => value.parse::<SocketAddr>().map_err(|_| {
            format!("--listen: `{value}` is not an address such as `127.0.0.1:50051`, `[::1]:50051` or `none`")
        }),
    }?;
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(format!(
            "--listen: `{addr}` is not a loopback address; a sidecar serves its own pod \
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
}
