//! Serving: the gRPC services on already-bound listeners (so tests bind
//! `127.0.0.1:0` and pass the listener in), health, reflection, and the
//! shutdown sequence.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::audit::{Audit, AuditError, AuditOptions};
use crate::bundle::{LiveBundle, Snapshot};
use crate::proto::v1::admin_server::AdminServer;
use crate::proto::v1::authorizer_server::AuthorizerServer;
use crate::quota::Quota;
use crate::reload::ReloadStatus;
use crate::service::admin::AdminService;
use crate::service::Limiting;
use crate::service::{AuthorizerService, DEFAULT_MAX_BATCH};
use crate::telemetry::admin_http::{self, AdminState};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{Telemetry, TelemetryError, TelemetryOptions};

pub mod accept;
pub mod health;
pub mod uds;

/// The service name health checks ask about, besides "" (the whole server).
pub const AUTHORIZER_SERVICE: &str = "leash.v1.Authorizer";

/// The `grpc.health.v1` service name for liveness: SERVING as long as the
/// process answers at all. Readiness (`""`, `leash.v1.Authorizer`) also
/// drops while the audit trail cannot be written, which a restart would not
/// mend, and a restart would forget the rate and budget counters.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Limits and timings of a running server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest `BatchIsAuthorized` batch.
    pub max_batch: usize,
    /// Largest request message; larger ones get `RESOURCE_EXHAUSTED`.
    pub max_message_bytes: usize,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// Spans, metrics and their settings.
    pub telemetry: TelemetryOptions,
    /// The audit trail (off by default in the library; `serve` turns it on).
    pub audit: AuditOptions,
    /// The time decisions are made at (`context.leash.now`, limit windows).
    pub clock: crate::engine::Clock,
    /// Most live rate and budget counters (keys) held at once.
    pub max_limit_keys: usize,
    /// Longest approval grant lifetime accepted.
    pub max_approval_ttl: Duration,
    /// Longest elevation grant window accepted.
    pub max_elevation: Duration,
}

/// Longest wait for the audit writer to write what is queued at shutdown.
pub const AUDIT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for the last spans to reach the collector at shutdown
/// (also bounded by the drain timeout).
pub const SPAN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the admin and health listeners may take to close, last of all.
pub const ADMIN_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections the health listener holds at once. It is open to the pod
/// network; the kubelet's probes take one short connection each.
pub const HEALTH_MAX_CONNECTIONS: usize = 64;

/// After this long a health-listener connection is asked to go (HTTP/2
/// GOAWAY: calls in progress finish, new ones go to a new connection)...
pub const HEALTH_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// ...and after this long it is closed, whatever the peer is doing.
pub const HEALTH_CONNECTION_LIFETIME: Duration = Duration::from_secs(70);

/// Calls one health-listener connection may have open at once.
pub const HEALTH_MAX_STREAMS: u32 = 16;

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            max_message_bytes: 4 * 1024 * 1024,
            drain_timeout: Duration::from_secs(15),
            telemetry: TelemetryOptions::default(),
            audit: AuditOptions::default(),
            clock: crate::engine::Clock::System,
            max_limit_keys: crate::quota::DEFAULT_MAX_LIMIT_KEYS,
            max_approval_ttl: crate::grants::DEFAULT_MAX_APPROVAL_TTL,
            max_elevation: crate::grants::DEFAULT_MAX_ELEVATION,
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// A Unix socket and its path, removed again at shutdown if the path
    /// is still this socket.
    Unix(UnixListener, BoundSocket),
    /// The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
    Admin(TcpListener),
    /// gRPC serving `grpc.health.v1` only: for the kubelet's probes, which
    /// dial the pod IP.
    Health(TcpListener),
}

impl Listener {
    /// Where the listener can be reached, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp (address unknown)".to_owned()),
            Listener::Unix(_, socket) => format!("unix:{}", socket.path.display()),
            Listener::Admin(l) => l
                .local_addr()
                .map(|a| format!("http://{a} (admin)"))
                .unwrap_or_else(|_| "admin http (address unknown)".to_owned()),
            Listener::Health(l) => l
                .local_addr()
                .map(|a| format!("{a} (grpc.health.v1 only)"))
                .unwrap_or_else(|_| "health (address unknown)".to_owned()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // `error`, not `source`: the cause is in the message already, and
    // would otherwise be printed twice in an error chain.
    /// `flag` names the listener: `--listen`, `--admin-listen`,
    /// `--health-listen`.
    #[error("{flag}: cannot bind `{addr}`: {error}")]
    BindTcp {
        flag: &'static str,
        addr: SocketAddr,
        error: io::Error,
    },
    #[error("--uds: cannot bind Unix socket `{}`: {error}", path.display())]
    BindUnix { path: PathBuf, error: io::Error },
    #[error("--uds: `{}` exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error(
        "--uds: `{}` is a socket another process is serving on (a second leash?); refusing to \
         take it over",
        .0.display()
    )]
    SocketInUse(PathBuf),
    #[error(
        "--uds: `{}` appeared while leash was binding it (another process starting?); refusing \
         to replace it",
        .0.display()
    )]
    Appeared(PathBuf),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    AuditClose(crate::audit::CloseError),
    #[error("serving failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("a listener task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Binds a TCP listener (port 0 picks a free port).
pub async fn bind_tcp(addr: SocketAddr) -> Result<Listener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map(Listener::Tcp)
        .map_err(|error| ServeError::BindTcp {
            flag: "--listen",
            addr,
            error,
        })
}

/// Binds the admin HTTP listener (port 0 picks a free port).
pub async fn bind_admin(addr: SocketAddr) -> Result<Listener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map(Listener::Admin)
        .map_err(|error| ServeError::BindTcp {
            flag: "--admin-listen",
            addr,
            error,
        })
}

/// Binds the health-only gRPC listener (port 0 picks a free port).
pub async fn bind_health(addr: SocketAddr) -> Result<Listener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map(Listener::Health)
        .map_err(|error| ServeError::BindTcp {
            flag: "--health-listen",
            addr,
            error,
        })
}

/// The longest path a Unix socket can be bound at (`sun_path` is 108
/// bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// What the staging directory adds to the socket's directory:
/// `/.leash-XXXXXX/s`.
const STAGING_EXTRA: usize = "/.leash-XXXXXX/s".len();

/// Why `path` cannot be bound as a Unix socket (too long, as it is or as
/// staged beside itself); `None` if it can.
pub fn socket_path_problem(path: &Path) -> Option<String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Some(format!(
            "`{}` is {len} bytes; a Unix socket's path can be at most {MAX_SOCKET_PATH}",
            path.display()
        ));
    }
    let dir = staging_parent(path).as_os_str().len();
    (dir + STAGING_EXTRA > MAX_SOCKET_PATH).then(|| {
        format!(
            "`{}`: its directory's path is {dir} bytes; the socket is bound in a directory \
             beside it first, so that can be at most {}",
            path.display(),
            MAX_SOCKET_PATH - STAGING_EXTRA
        )
    })
}

/// A new directory in `parent` only this user may enter (0700), removed
/// when dropped.
fn staging_dir(parent: &Path) -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(".leash-")
        // Set at creation: the builder otherwise leaves a directory's mode
        // to the umask (0755 with the usual 022, 0777 with 000).
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
}

/// The directory a socket at `path` is staged in.
fn staging_parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// A Unix socket's path and the file bound there, so that shutdown removes
/// the path only while it is still this socket (not one a newer process
/// put there since).
#[derive(Debug)]
pub struct BoundSocket {
    pub path: PathBuf,
    /// Device and inode of the socket file.
    identity: (u64, u64),
}

/// Removed when dropped: at the end of a drain, and on every way out of
/// startup after the bind (another listener that cannot bind, say).
impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

impl BoundSocket {
    /// Removes the socket file if the path still names it.
    fn remove(&self) {
        use std::os::unix::fs::MetadataExt as _;
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a Unix socket readable and writable by this user only (0600).
/// A stale socket from an earlier run is replaced; one another process is
/// serving on, or any other file, is not.
///
/// The socket is bound in a private directory (0700) beside the path,
/// given its mode there, and then renamed into place: a socket accepts
/// connections from the moment it is bound, so one bound at the path and
/// tightened afterwards would be open to anyone the umask let in, for a
/// moment.
pub fn bind_uds(path: &Path) -> Result<Listener, ServeError> {
    use std::os::unix::fs::MetadataExt as _;
    let unix_err = |error| ServeError::BindUnix {
        path: path.to_owned(),
        error,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServeError::SocketInUse(path.to_owned())),
                // Nobody listening: left by a process that did not exit
                // cleanly.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(unix_err)?;
                }
                Err(e) => return Err(unix_err(e)),
            }
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(unix_err(e)),
    }
    if let Some(problem) = socket_path_problem(path) {
        return Err(unix_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            problem,
        )));
    }
    let parent = staging_parent(path);
    let private = staging_dir(parent).map_err(unix_err)?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(unix_err)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(unix_err)?;
    let identity = std::fs::symlink_metadata(&staged)
        .map(|meta| (meta.dev(), meta.ino()))
        .map_err(unix_err)?;
    // Not over anything that appeared at the path since it was checked
    // (a second sidecar starting at the same moment, a file).
    crate::audit::writer::move_noreplace(&staged, path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            ServeError::Appeared(path.to_owned())
        } else {
            unix_err(e)
        }
    })?;
    Ok(Listener::Unix(
        listener,
        BoundSocket {
            path: path.to_owned(),
            identity,
        },
    ))
}

/// The leash gRPC server: the `Authorizer`, `Admin`, `grpc.health.v1` and
/// reflection.
pub struct Server {
    live: Arc<LiveBundle>,
    status: Arc<ReloadStatus>,
    health: HealthReporter,
    options: ServerOptions,
    /// Spans, metrics and decision logs.
    telemetry: Arc<Telemetry>,
    /// The audit trail every decision is recorded in before it is answered.
    audit: Arc<Audit>,
    /// Rate and budget counters, for the server's life.
    quota: Arc<Quota>,
    /// Approval grants used, for the server's life (and from the trail).
    used_grants: Arc<crate::grants::UsedGrants>,
    /// Set when shutdown begins, for `/readyz`.
    draining: Arc<AtomicBool>,
    /// Turns true when the drain begins (after health went NOT_SERVING):
    /// ends every `Health/Watch` stream.
    drain_signal: watch::Sender<bool>,
    /// Serializes health updates.
    health_lock: tokio::sync::Mutex<()>,
}

impl Server {
    /// A server with no bundle yet: health says NOT_SERVING and decisions
    /// are `UNAVAILABLE` until [`Server::publish`]. Starts span export (on
    /// the current runtime) when configured.
    pub async fn new(options: ServerOptions) -> Result<Self, ServeError> {
        let health = HealthReporter::new();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_service_status(AUTHORIZER_SERVICE, ServingStatus::NotServing)
            .await;
        health
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        let live = Arc::new(LiveBundle::empty());
        let status = Arc::new(ReloadStatus::default());
        let audit = Arc::new(Audit::start(&options.audit)?);
        if audit.enabled() && audit.fail_open() {
            warn!(
                "audit trail is fail-open (--audit-fail-open): decisions are answered even when \
                 their records cannot be written"
            );
        }
        // For the server's life: reloads swap the bundle, not the counters.
        let quota = Arc::new(Quota::new(options.max_limit_keys));
        let used_grants = Arc::new(crate::grants::UsedGrants::default());
        // Grants used before a restart stay used: the trail says which.
        if let crate::audit::AuditTarget::File(path) = &options.audit.target {
            let now = options
                .clock
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // A grant lives at most this long after it was issued, and is
            // used at most a minute (the allowed skew) before that.
            let horizon = options.max_approval_ttl.as_secs() + 60;
            let used = crate::audit::writer::used_grants(path, now, horizon);
            for (approver, jti, exp) in &used {
                used_grants.remember(approver, jti, *exp);
            }
            if !used.is_empty() {
                info!(
                    grants = used.len(),
                    "approval grants the audit trail records as used are remembered as used"
                );
            }
        }
        let telemetry = Telemetry::start(
            &options.telemetry,
            live.clone(),
            status.clone(),
            audit.enabled().then(|| audit.status()),
            quota.clone(),
        )?;
        Ok(Self {
            live,
            status,
            health,
            options,
            telemetry: Arc::new(telemetry),
            audit,
            quota,
            used_grants,
            draining: Arc::new(AtomicBool::new(false)),
            drain_signal: watch::Sender::new(false),
            health_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The server's telemetry (metrics registry, span queue).
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// The cell requests read their snapshot from.
    pub fn live(&self) -> Arc<LiveBundle> {
        self.live.clone()
    }

    /// Reload attempts and counters, as the `Admin/Status` RPC reports them.
    pub fn reload_status(&self) -> Arc<ReloadStatus> {
        self.status.clone()
    }

    /// Makes `snapshot` the one decisions use, and reports SERVING.
    pub async fn publish(&self, snapshot: Snapshot) {
        self.announce(&snapshot);
        self.live.publish(snapshot);
        self.mark_serving().await;
    }

    /// Logs a bundle about to be served (its version, size, warnings).
    pub fn announce(&self, snapshot: &Snapshot) {
        info!(
            policy_version = %snapshot.version,
            origin = %snapshot.origin,
            policies = snapshot.policy_count(),
            entities = snapshot.entity_count(),
            leash_context_actions = snapshot.reserved.action_count(),
            parse_ms = crate::reload::ms(snapshot.timings.parse),
            validate_ms = crate::reload::ms(snapshot.timings.validate),
            index_ms = crate::reload::ms(snapshot.timings.index),
            index = if snapshot.index.is_some() { "on" } else { "off" },
            unindexed_policies = snapshot
                .index
                .as_ref()
                .map_or(snapshot.policy_count(), |i| i.stats().unkeyed),
            "policy bundle loaded"
        );
        for warning in &snapshot.warnings {
            warn!(warning = %warning, "policy validation warning");
        }
    }

    /// Reports SERVING on `grpc.health.v1` (a bundle is loaded), unless the
    /// audit trail cannot be written (and leash fails closed).
    pub async fn mark_serving(&self) {
        self.refresh_health().await;
    }

    /// Health from the state: SERVING when a bundle is loaded, the audit
    /// trail is writable (or fail-open was chosen) and leash is not draining.
    async fn refresh_health(&self) {
        // Computing and setting as one step: two refreshes racing could
        // otherwise leave the older state in place.
        let _one_at_a_time = self.health_lock.lock().await;
        let audit_ok =
            !self.audit.enabled() || self.audit.fail_open() || self.audit.status().available();
        let serving =
            self.live.current().is_some() && audit_ok && !self.draining.load(Ordering::SeqCst);
        self.set_health(if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        })
        .await;
    }

    /// The audit trail's state (for tests and metrics).
    pub fn audit(&self) -> Arc<Audit> {
        self.audit.clone()
    }

    async fn set_health(&self, status: ServingStatus) {
        self.health.set_service_status("", status).await;
        self.health
            .set_service_status(AUTHORIZER_SERVICE, status)
            .await;
    }

    /// Serves on every listener until `shutdown` completes, then drains.
    ///
    /// Shutdown sequence: health and `/readyz` turn NOT_SERVING (so probes
    /// and load balancers stop sending), listeners stop accepting, requests
    /// in flight finish (bounded by `drain_timeout`), Unix socket files are
    /// removed, queued spans are exported (bounded by [`SPAN_FLUSH_TIMEOUT`]
    /// and the drain timeout),
    /// and the admin listener closes last so metrics can be read throughout.
    pub async fn run(
        &self,
        listeners: Vec<Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let authorizer = AuthorizerServer::new(AuthorizerService::new(
            self.live.clone(),
            self.options.max_batch,
            self.telemetry.clone(),
            self.audit.clone(),
            Limiting {
                quota: self.quota.clone(),
                used_grants: self.used_grants.clone(),
                lifetimes: crate::grants::Lifetimes {
                    approval: self.options.max_approval_ttl,
                    elevation: self.options.max_elevation,
                },
                clock: self.options.clock.clone(),
            },
        ))
        .max_decoding_message_size(self.options.max_message_bytes);
        let admin = AdminServer::new(AdminService::new(self.live.clone(), self.status.clone()));
        let health =
            tonic_health::pb::health_server::HealthServer::new(health::DrainingHealth::new(
                HealthService::from_health_reporter(self.health.clone()),
                self.drain_signal.subscribe(),
            ));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut admin_tasks = JoinSet::new();
        let mut socket_paths = Vec::new();
        let metrics_layer = GrpcMetricsLayer(self.telemetry.metrics());
        for listener in listeners {
            info!(address = %listener.describe(), "listening");
            if let Listener::Admin(l) = listener {
                let state = AdminState {
                    metrics: self.telemetry.metrics(),
                    live: self.live.clone(),
                    draining: self.draining.clone(),
                    audit: (self.audit.enabled() && !self.audit.fail_open())
                        .then(|| self.audit.status()),
                };
                admin_tasks.spawn(admin_http::serve(l, state, stopped(admin_stop_rx.clone())));
                continue;
            }
            if let Listener::Health(l) = listener {
                // Closed last with the admin listener: probes see
                // NOT_SERVING while the sidecar drains, not a refusal.
                // Open to the pod network, so bounded: connections at
                // once, their age and their calls (`accept::capped`).
                let router = tonic::transport::Server::builder()
                    .max_connection_age(HEALTH_CONNECTION_AGE)
                    .max_concurrent_streams(HEALTH_MAX_STREAMS)
                    .add_service(health.clone());
                let stop = stopped(admin_stop_rx.clone());
                admin_tasks.spawn(async move {
                    let incoming = accept::capped(
                        TcpListenerStream::new(l),
                        HEALTH_MAX_CONNECTIONS,
                        HEALTH_CONNECTION_LIFETIME,
                        "health".to_owned(),
                    );
                    let incoming = accept::pausing_on_errors(incoming, "health".to_owned());
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                        warn!(error = %e, "health listener ended with an error");
                    }
                });
                continue;
            }
            let router = tonic::transport::Server::builder()
                // Outside the size-limit fix, so it counts the corrected
                // code. (tonic's own deadline handling sits further out; a
                // call it cuts short is counted as CANCELLED.)
                .layer(metrics_layer.clone())
                .layer(tower::util::MapResponseLayer::new(
                    oversize_is_resource_exhausted as fn(HttpResponse) -> HttpResponse,
                ))
                .add_service(health.clone())
                .add_service(reflection.clone())
                .add_service(reflection_alpha.clone())
                .add_service(authorizer.clone())
                .add_service(admin.clone());
            let stopped = stopped(stop_rx.clone());
            let name = listener.describe();
            match listener {
                Listener::Tcp(l) => {
                    // Decisions are small and latency-bound: no Nagle delay.
                    let incoming = TcpListenerStream::new(l).map(|s| {
                        s.inspect(|s| {
                            let _ = s.set_nodelay(true);
                        })
                    });
                    let incoming = accept::pausing_on_errors(incoming, name);
                    tasks.spawn(router.serve_with_incoming_shutdown(incoming, stopped));
                }
                Listener::Unix(l, socket) => {
                    socket_paths.push(socket);
                    let incoming = accept::pausing_on_errors(uds::incoming(l), name);
                    tasks.spawn(router.serve_with_incoming_shutdown(incoming, stopped));
                }
                Listener::Admin(_) | Listener::Health(_) => {}
            }
        }

        // Health follows the audit trail's availability while serving.
        let mut audit_changes = self.audit.status().subscribe();
        // A write stuck while no decision waits on it is noticed too.
        let mut stall_check = tokio::time::interval(Duration::from_secs(1));
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failure = None;
        let shutdown = std::pin::pin!(shutdown);
        let mut shutdown = shutdown;
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    info!("shutdown requested; draining");
                    break;
                }
                Some(ended) = tasks.join_next() => {
                    failure = Some(flatten(ended));
                    break;
                }
                Ok(()) = audit_changes.changed(), if self.audit.enabled() => {
                    self.refresh_health().await;
                }
                _ = stall_check.tick(), if self.audit.enabled() => {
                    self.audit.check_stall();
                }
            }
        }

        self.draining.store(true, Ordering::SeqCst);
        self.refresh_health().await;
        // After NOT_SERVING is set: watchers get it, then their streams end
        // (`health::DrainingHealth`), so none holds up the drain.
        self.drain_signal.send_replace(true);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.options.drain_timeout, async {
            while let Some(ended) = tasks.join_next().await {
                if let Err(e) = flatten(ended) {
                    warn!(error = %e, "listener ended with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                timeout_secs = self.options.drain_timeout.as_secs_f64(),
                "drain timed out; closing down with requests still in flight (each is answered \
                 without a record once the audit trail closes, or cut off at exit)"
            );
            tasks.abort_all();
        }
        // Each removes its file if the path is still its socket.
        drop(socket_paths);
        // Every answered decision's record is already written (or queued,
        // in the queued mode); let the writer finish the queue.
        let audit = self.audit.clone();
        let audit_closed = tokio::task::spawn_blocking(move || audit.shutdown(AUDIT_CLOSE_TIMEOUT))
            .await
            .unwrap_or(Err(crate::audit::CloseError::WriterStopped));
        self.telemetry
            .shutdown(SPAN_FLUSH_TIMEOUT.min(self.options.drain_timeout))
            .await;
        let _ = admin_stop_tx.send(true);
        let closed = tokio::time::timeout(ADMIN_CLOSE_TIMEOUT, async {
            while admin_tasks.join_next().await.is_some() {}
        })
        .await;
        if closed.is_err() {
            warn!(
                timeout_secs = ADMIN_CLOSE_TIMEOUT.as_secs_f64(),
                "the admin and health listeners did not close in time; closing them anyway"
            );
            admin_tasks.abort_all();
        }
        info!("stopped");
        match failure {
            Some(Err(e)) => {
                // Returned is the failure that ended the run; this is said.
                if let Err(close) = audit_closed {
                    error!("{close}");
                }
                Err(e)
            }
            // A trail short of what was decided is a failed run, though
            // every step of the shutdown went as planned.
            _ => audit_closed.map_err(ServeError::AuditClose),
        }
    }
}

fn flatten(
    ended: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServeError> {
    ended?.map_err(ServeError::from)
}

type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

/// tonic reports a request over the size limit as OUT_OF_RANGE; gRPC's
/// convention (and every other gRPC server) says RESOURCE_EXHAUSTED, which is
/// what clients retry-classify on. The error is raised while decoding, before
/// the service runs, so it is corrected on the way out.
fn oversize_is_resource_exhausted(mut response: HttpResponse) -> HttpResponse {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    // The message is percent-encoded on the wire.
    let too_large = headers.get("grpc-message").is_some_and(|v| {
        v.as_bytes()
            .starts_with(b"Error,%20decoded%20message%20length%20too%20large")
    });
    if out_of_range && too_large {
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("8"),
        );
    }
    response
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Counts every answered gRPC call by method and status code. A unary
/// call's status is in the response headers when it failed (tonic answers
/// errors "trailers-only") and absent when it succeeded.
#[derive(Debug, Clone)]
struct GrpcMetricsLayer(Option<Arc<Metrics>>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct GrpcMetrics<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>, Response = HttpResponse>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = BoxFuture<Result<HttpResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let answer = self.inner.call(request);
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(answer);
        };
        Box::pin(async move {
            // A call whose client gave up (deadline, reset) is dropped
            // unanswered; the guard counts it.
            let mut pending = Unanswered {
                metrics,
                method,
                answered: false,
            };
            let answered = answer.await;
            let code = match &answered {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Internal,
            };
            pending.answered = true;
            pending.metrics.grpc_request(method, code);
            answered
        })
    }
}

/// Counts a call as CANCELLED if it is dropped before its answer.
struct Unanswered {
    metrics: Arc<Metrics>,
    method: &'static str,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics
                .grpc_request(self.method, tonic::Code::Cancelled);
        }
    }
}

/// The methods leash serves, by name; anything else is `other`, so unknown
/// paths cannot create series.
fn method_label(path: &str) -> &'static str {
    const METHODS: [&str; 7] = [
        "leash.v1.Authorizer/IsAuthorized",
        "leash.v1.Authorizer/BatchIsAuthorized",
        "leash.v1.Admin/Status",
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    let name = path.strip_prefix('/').unwrap_or(path);
    METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staging_directory_is_private_whatever_the_umask_allows() {
        let parent = tempfile::tempdir().expect("temp dir");
        let staging = staging_dir(parent.path()).expect("created");
        let mode = std::fs::metadata(staging.path())
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
