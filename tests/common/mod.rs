//! A real leash server for integration tests: bound on 127.0.0.1:0 (and a
//! Unix socket in a temp dir when asked), called through the generated client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use leash::bundle::Snapshot;
use leash::proto::v1 as pb;
use leash::proto::v1::authorizer_client::AuthorizerClient;
use leash::server::{bind_tcp, bind_uds, Server, ServerOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn example_snapshot() -> Snapshot {
    Snapshot::load_dirs(&repo_path("policies"), &repo_path("schemas"))
        .expect("example bundle loads")
}

pub fn plain_snapshot() -> Snapshot {
    Snapshot::load_dirs(
        &repo_path("tests/fixtures/plain/policies"),
        &repo_path("tests/fixtures/plain/schemas"),
    )
    .expect("plain bundle loads")
}

/// A TCP listener on a free loopback port, and its address.
pub async fn bind_loopback() -> (leash::server::Listener, SocketAddr) {
    let tcp = bind_tcp("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind tcp");
    let addr = match &tcp {
        leash::server::Listener::Tcp(l) => l.local_addr().expect("local addr"),
        _ => unreachable!(),
    };
    (tcp, addr)
}

/// The admin HTTP listener on a free loopback port, and its address.
pub async fn bind_admin_loopback() -> (leash::server::Listener, SocketAddr) {
    let admin = leash::server::bind_admin("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind admin");
    let addr = match &admin {
        leash::server::Listener::Admin(l) => l.local_addr().expect("local addr"),
        _ => unreachable!(),
    };
    (admin, addr)
}

/// One plain HTTP/1.1 request to the admin listener: (status, body).
pub async fn http_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    leash::bench::child::http_get(addr, method, path)
        .await
        .expect("admin listener answers")
}

/// The value of a series that must be present in a `/metrics` text.
pub fn metric(text: &str, series: &str) -> f64 {
    leash::bench::child::metric(text, series)
        .unwrap_or_else(|| panic!("series `{series}` missing from:\n{text}"))
}

/// The value of a series, 0 when it has not been created yet (a labelled
/// counter appears on first use).
pub fn metric_or_zero(text: &str, series: &str) -> f64 {
    leash::bench::child::metric(text, series).unwrap_or(0.0)
}

/// One IsAuthorized call.
pub async fn decide_with(
    client: &AuthorizerClient<Channel>,
    req: pb::IsAuthorizedRequest,
) -> Result<pb::IsAuthorizedResponse, tonic::Status> {
    client
        .clone()
        .is_authorized(req)
        .await
        .map(tonic::Response::into_inner)
}

pub struct TestServer {
    pub server: Arc<Server>,
    pub addr: SocketAddr,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    pub uds: Option<PathBuf>,
    pub client: AuthorizerClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), leash::server::ServeError>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// The example bundle over TCP.
    pub async fn example() -> Self {
        Self::start(Some(example_snapshot()), ServerOptions::default(), false).await
    }

    pub async fn plain() -> Self {
        Self::start(Some(plain_snapshot()), ServerOptions::default(), false).await
    }

    /// Starts serving; publishes `snapshot` if given (else health stays
    /// NOT_SERVING until the test publishes one).
    pub async fn start(snapshot: Option<Snapshot>, options: ServerOptions, with_uds: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (tcp, addr) = bind_loopback().await;
        let (admin, admin_addr) = bind_admin_loopback().await;
        let mut listeners = vec![tcp, admin];
        let uds = if with_uds {
            let path = dir.path().join("leash.sock");
            listeners.push(bind_uds(&path).expect("bind uds"));
            Some(path)
        } else {
            None
        };
        let server = Arc::new(Server::new(options).await.expect("server starts"));
        if let Some(snapshot) = snapshot {
            server.publish(snapshot).await;
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let running = server.clone();
        let task = tokio::spawn(async move {
            running
                .run(listeners, async {
                    let _ = stopped.await;
                })
                .await
        });
        let client = leash::check::connect_tcp(&addr.to_string())
            .await
            .expect("connect");
        Self {
            server,
            addr,
            admin_addr,
            uds,
            client,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops the server the way SIGTERM does and waits for it to finish.
    pub async fn shutdown(self) {
        self.stop().await.expect("server ran cleanly");
    }

    /// As [`Self::shutdown`], returning how the run ended.
    pub async fn stop(mut self) -> Result<(), leash::server::ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("server task"),
            None => Ok(()),
        }
    }

    pub async fn decide(
        &self,
        req: pb::IsAuthorizedRequest,
    ) -> Result<pb::IsAuthorizedResponse, tonic::Status> {
        decide_with(&self.client, req).await
    }
}

/// `Type::"id"` → wire entity reference.
pub fn uid(s: &str) -> pb::EntityUid {
    let (ty, id) = s.split_once("::\"").expect("Type::\"id\"");
    pb::EntityUid {
        r#type: ty.to_owned(),
        id: id.trim_end_matches('"').to_owned(),
    }
}

pub fn request(
    agent: &str,
    user: Option<&str>,
    action: &str,
    resource: &str,
) -> pb::IsAuthorizedRequest {
    pb::IsAuthorizedRequest {
        request_id: String::new(),
        principal: Some(pb::Principal {
            agent: Some(uid(agent)),
            on_behalf_of: user.map(uid),
        }),
        action: Some(uid(action)),
        resource: Some(uid(resource)),
        context_input: None,
        entities_input: None,
        grants: Vec::new(),
    }
}

/// A request against the example bundle: `example("support-bot",
/// Some("omar"), "tickets:read", "Ticket::\"T-1\"")`.
pub fn example(
    agent: &str,
    user: Option<&str>,
    action: &str,
    resource: &str,
) -> pb::IsAuthorizedRequest {
    request(
        &format!("Agent::\"{agent}\""),
        user.map(|u| format!("User::\"{u}\"")).as_deref(),
        &format!("Action::\"{action}\""),
        resource,
    )
}

pub fn with_context_json(mut req: pb::IsAuthorizedRequest, json: &str) -> pb::IsAuthorizedRequest {
    req.context_input = Some(pb::is_authorized_request::ContextInput::ContextJson(
        json.to_owned(),
    ));
    req
}

pub fn with_entities_json(mut req: pb::IsAuthorizedRequest, json: &str) -> pb::IsAuthorizedRequest {
    req.entities_input = Some(pb::is_authorized_request::EntitiesInput::EntitiesJson(
        json.to_owned(),
    ));
    req
}

pub const ALLOW: i32 = pb::Decision::Allow as i32;
pub const DENY: i32 = pb::Decision::Deny as i32;

pub fn name(decision: i32) -> &'static str {
    match decision {
        ALLOW => "ALLOW",
        DENY => "DENY",
        _ => "UNSPECIFIED",
    }
}

/// A real server that loads its bundle from directories and hot-reloads it,
/// as `leash serve --policies --schemas` does.
pub struct ReloadingServer {
    pub server: Arc<Server>,
    pub addr: SocketAddr,
    /// The admin HTTP listener.
    pub admin_addr: SocketAddr,
    pub client: AuthorizerClient<Channel>,
    pub admin: leash::proto::v1::admin_client::AdminClient<Channel>,
    stop: tokio::sync::watch::Sender<bool>,
    serving: Option<JoinHandle<Result<(), leash::server::ServeError>>>,
    reloading: Option<JoinHandle<()>>,
}

/// Bound on every wait for the server to catch up with the files.
pub const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl ReloadingServer {
    pub async fn start(
        policies: &Path,
        schemas: &Path,
        options: leash::reload::ReloadOptions,
    ) -> Self {
        Self::start_with(policies, schemas, options, ServerOptions::default()).await
    }

    pub async fn start_with(
        policies: &Path,
        schemas: &Path,
        options: leash::reload::ReloadOptions,
        server_options: ServerOptions,
    ) -> Self {
        let (tcp, addr) = bind_loopback().await;
        let server = Arc::new(Server::new(server_options).await.expect("server starts"));
        let reloader = leash::reload::Reloader::new(
            server.clone(),
            leash::bundle::BundleLocation::Dirs {
                policies: policies.to_owned(),
                schemas: schemas.to_owned(),
            },
            options,
        );
        reloader.load_initial().await.expect("initial bundle loads");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let running = server.clone();
        let stop_serving = wait(stopped.clone());
        let (admin_listener, admin_addr) = bind_admin_loopback().await;
        let serving =
            tokio::spawn(async move { running.run(vec![tcp, admin_listener], stop_serving).await });
        let reloading = tokio::spawn(reloader.run(wait(stopped)));
        let channel = leash::check::channel_tcp(&addr.to_string())
            .await
            .expect("connect");
        Self {
            server,
            addr,
            admin_addr,
            client: AuthorizerClient::new(channel.clone()),
            admin: leash::proto::v1::admin_client::AdminClient::new(channel),
            stop,
            serving: Some(serving),
            reloading: Some(reloading),
        }
    }

    pub async fn status(&self) -> pb::StatusResponse {
        self.admin
            .clone()
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    pub async fn serving_version(&self) -> String {
        self.status()
            .await
            .serving
            .map(|b| b.version)
            .unwrap_or_default()
    }

    /// Polls Status until `done` holds (bounded by [`RELOAD_WAIT`]).
    pub async fn wait_until(
        &self,
        what: &str,
        mut done: impl FnMut(&pb::StatusResponse) -> bool,
    ) -> pb::StatusResponse {
        let deadline = tokio::time::Instant::now() + RELOAD_WAIT;
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last status: {status:#?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Waits until `version` is served.
    pub async fn wait_version(&self, version: &str) -> pb::StatusResponse {
        self.wait_until(&format!("version {version}"), |s| {
            s.serving.as_ref().is_some_and(|b| b.version == version)
        })
        .await
    }

    /// Waits until more than `before` attempts were refused; returns the
    /// status with the refusal.
    pub async fn wait_refused(&self, before: u64) -> pb::StatusResponse {
        self.wait_until("a refused reload", |s| {
            s.counters.as_ref().is_some_and(|c| c.refused > before)
        })
        .await
    }

    pub async fn decide(
        &self,
        req: pb::IsAuthorizedRequest,
    ) -> Result<pb::IsAuthorizedResponse, tonic::Status> {
        decide_with(&self.client, req).await
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.serving.take() {
            task.await.expect("server task").expect("served cleanly");
        }
        if let Some(task) = self.reloading.take() {
            task.await.expect("reloader task");
        }
    }
}

/// The version a bundle directory pair holds, as leash computes it.
pub fn version_of(policies: &Path, schemas: &Path) -> String {
    leash::bundle::BundleSources::read_dirs(policies, schemas)
        .expect("bundle readable")
        .version()
}

/// The records of the audit trail at `trail`, after `leash audit verify`
/// has found its hash chain intact.
pub fn verified_audit_records(trail: &Path) -> Vec<serde_json::Value> {
    let verified = std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
        .args(["audit", "verify"])
        .arg(trail)
        .output()
        .expect("runs");
    assert!(verified.status.success(), "{verified:?}");
    std::fs::read_to_string(trail)
        .expect("audit trail")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

/// Flushes `server`'s spans, waits until `collector` has received at least
/// `n` (within 30 s), and returns every span received.
pub async fn flushed_spans(
    server: &Server,
    collector: &leash::bench::collector::SpanCollector,
    n: u64,
) -> Vec<leash::bench::collector::ReceivedSpan> {
    let wait = std::time::Duration::from_secs(30);
    assert!(server.telemetry().flush(wait).await, "flush finished");
    let got = collector.wait_for(n, wait).await;
    assert!(got >= n, "expected {n} spans, received {got}");
    collector.spans()
}

/// `policies/` and `schemas/` under `dir`, created empty, for a test that
/// writes its own bundle.
pub fn empty_bundle_dirs(dir: &Path) -> (PathBuf, PathBuf) {
    let (policies, schemas) = (dir.join("policies"), dir.join("schemas"));
    std::fs::create_dir_all(&policies).expect("mkdir");
    std::fs::create_dir_all(&schemas).expect("mkdir");
    (policies, schemas)
}

/// A child process killed (and reaped) when the test ends, even by a failed
/// assertion, so no server outlives its test.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `leash serve` process on 127.0.0.1:0 (admin listener off, JSON logs)
/// with `args` added and `stdout` as given; returns it and its gRPC address
/// once its bundle is loaded (within 30 s).
pub fn serve_process<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    stdout: std::process::Stdio,
) -> (KillOnDrop, String) {
    use std::io::{BufRead, BufReader};
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "none"])
            .args(["--log-format", "json"])
            .args(args)
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starts"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the server logs in time");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if value["message"] == "listening" {
            addr = value["address"].as_str().map(str::to_owned);
        }
        if value["message"] == "policy bundle loaded" {
            break;
        }
    }
    (child, addr.expect("address logged"))
}

/// Runs `cmd` to its exit, within 60 s (killed, and the test failed, after
/// that), in a temporary working directory unless it names one: a
/// regression that starts serving instead of exiting then neither hangs the
/// test nor writes a trail into the source tree.
pub fn output_within(cmd: &mut std::process::Command) -> std::process::Output {
    let cwd = tempfile::tempdir().expect("temp dir");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(cwd.path());
    }
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(output) => output.expect("runs"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not exit within 60 s");
        }
    }
}

/// Sends `child` SIGTERM and waits for it to exit (failing the test after
/// 60 s).
pub fn terminate(child: &mut KillOnDrop) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "SIGTERM not sent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leash did not exit within 60 s of SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Reads `pipe` (a child's stdout) to its end on a thread of its own;
/// what was read so far is in the buffer returned.
pub fn drain(mut pipe: std::process::ChildStdout) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::io::Read as _;
    let read = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = read.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().expect("lock").extend_from_slice(&buf[..n]);
        }
    });
    read
}
