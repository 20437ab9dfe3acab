//! The servers under test run as child processes of `leash bench`, as a
//! sidecar runs beside its agent: `leash serve` itself, and `leash
//! bench-floor`, a server of one empty method built the same way. Each is
//! killed when its handle drops.

use std::io::{BufRead as _, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::BenchError;
use crate::proto::bench::v1 as floor;

/// A server process under test, killed on drop.
pub struct ServerProcess {
    /// What it is, for messages: "leash" or "floor".
    pub name: &'static str,
    child: Child,
    /// Held open: the floor server exits when it closes, so it cannot
    /// outlive a bench that was killed.
    _stdin: Option<ChildStdin>,
    pub tcp: SocketAddr,
    pub uds: PathBuf,
    /// The last lines the process wrote to stderr, for error reports.
    stderr_tail: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// What the process logged about itself: its admin address and
    /// worker threads.
    announced: std::sync::Arc<std::sync::Mutex<Announced>>,
}

/// Read from a server's log as it starts.
#[derive(Debug, Default)]
struct Announced {
    /// The admin HTTP address (`listening ... (admin)`).
    admin: Option<SocketAddr>,
    /// The sidecar's worker threads (its `starting` line).
    worker_threads: Option<usize>,
}

impl ServerProcess {
    /// The worker threads a sidecar said it runs (its `starting` line).
    pub fn worker_threads(&self) -> Option<usize> {
        self.announced.lock().ok().and_then(|a| a.worker_threads)
    }

    /// The admin HTTP listener's address, if it has one and logged it.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.announced.lock().ok().and_then(|a| a.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident and peak resident memory, in KiB, from `/proc` (Linux).
    pub fn memory(&self) -> Option<Memory> {
        Memory::of(self.child.id())
    }

    /// CPU time the process has used so far (user + system), from
    /// `/proc/PID/stat`; `None` where that cannot be read.
    pub fn cpu_time(&self) -> Option<Duration> {
        super::machine::process_cpu(self.child.id())
    }

    /// CPU time per call over `calls` calls, given the CPU time read
    /// before them; `None` where `/proc` cannot be read or no call was made.
    pub fn cpu_us_per_call(&self, before: Option<Duration>, calls: u64) -> Option<f64> {
        let after = self.cpu_time()?;
        let before = before?;
        (calls > 0).then(|| after.saturating_sub(before).as_secs_f64() * 1e6 / calls as f64)
    }

    /// The last lines the process wrote to stderr.
    pub fn tail(&self) -> String {
        self.stderr_tail
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }

    /// Fails if the process has exited, with what it said.
    fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(BenchError::ServerExited {
                name: self.name,
                status: status.to_string(),
                stderr: self.tail(),
            }),
            _ => Ok(()),
        }
    }
}

impl ServerProcess {
    /// Stops the process as SIGTERM does in production (drain, flush
    /// spans, exit), waiting up to `limit`; killed if it takes longer.
    pub async fn terminate(mut self, limit: Duration) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Drop kills it.
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size now and at its peak, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl Memory {
    /// Reads `/proc/PID/status`; `None` where there is no procfs.
    pub fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        Some(Self {
            rss_kib: field("VmRSS:")?,
            peak_rss_kib: field("VmHWM:")?,
        })
    }
}

/// The `leash` executable the bench starts as its sidecars, and how they
/// are sized.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    pub exe: PathBuf,
    /// `--worker-threads` for every sidecar; `None` for the sidecar's own
    /// default (one per usable CPU).
    pub worker_threads: Option<usize>,
}

/// Starts `leash serve` on the bundle in `policies`/`schemas` (or the
/// built-in example), on loopback port 0 and a Unix socket in `dir`.
/// Returns once the listeners are bound; [`wait_serving`] waits for the bundle.
///
/// `extra` flags are passed on; unless they set `--admin-listen`, the admin
/// listener (and so metrics, as in production) is on, on a free port.
pub fn spawn_leash(
    server: &ServerCommand,
    bundle: Option<(&Path, &Path)>,
    dir: &Path,
    extra: &[String],
) -> Result<ServerProcess, BenchError> {
    let uds = dir.join("leash.sock");
    let mut cmd = Command::new(&server.exe);
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(
            server
                .worker_threads
                .map(|n| ["--worker-threads".to_owned(), n.to_string()])
                .into_iter()
                .flatten(),
        )
        .arg("--uds")
        .arg(&uds);
    if !extra.iter().any(|a| a == "--admin-listen") {
        cmd.args(["--admin-listen", "127.0.0.1:0"]);
    }
    // The audit trail's cost is measured on its own; elsewhere it is off.
    if !extra.iter().any(|a| a == "--audit-log") {
        cmd.args(["--audit-log", "none"]);
    }
    cmd.args(extra);
    if let Some((policies, schemas)) = bundle {
        cmd.arg("--policies")
            .arg(policies)
            .arg("--schemas")
            .arg(schemas);
    }
    // The bench decides the logging: the sidecar's own defaults, not
    // whatever the calling shell exported.
    for var in CONTROLLED_ENV {
        cmd.env_remove(var);
    }
    spawn(cmd, "leash", uds, false)
}

/// Variables of the calling shell the bench must not pass to the sidecar:
/// it decides logging, listeners, telemetry and worker threads itself (the
/// sidecar's default unless `leash bench --worker-threads` says), as its
/// figures say.
const CONTROLLED_ENV: [&str; 31] = [
    "LEASH_WORKER_THREADS",
    "LEASH_LOG",
    "LEASH_LOG_FORMAT",
    "LEASH_LISTEN",
    "LEASH_UDS",
    "LEASH_ADMIN_LISTEN",
    "LEASH_TRACE_CONTEXT_KEYS",
    "LEASH_TRACE_BAGGAGE_KEYS",
    "LEASH_AUDIT_LOG",
    "LEASH_AUDIT_SYNC",
    "LEASH_AUDIT_FAIL_OPEN",
    "LEASH_AUDIT_QUEUE_SIZE",
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
];

/// Starts `leash bench-floor` on loopback port 0 and a Unix socket in `dir`.
pub fn spawn_floor(exe: &Path, dir: &Path) -> Result<ServerProcess, BenchError> {
    let uds = dir.join("floor.sock");
    let mut cmd = Command::new(exe);
    cmd.arg("bench-floor").arg("--uds").arg(&uds);
    spawn(cmd, "floor", uds, true)
}

fn spawn(
    mut cmd: Command,
    name: &'static str,
    uds: PathBuf,
    hold_stdin: bool,
) -> Result<ServerProcess, BenchError> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.stdin(if hold_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .map_err(|source| BenchError::Spawn { name, source })?;
    let stdin = child.stdin.take();
    let stderr = child.stderr.take();
    let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let announced = std::sync::Arc::new(std::sync::Mutex::new(Announced::default()));
    let (tx, rx) = mpsc::channel::<SocketAddr>();
    if let Some(stderr) = stderr {
        let (tail, announced) = (tail.clone(), announced.clone());
        // Drains stderr for the life of the process (a full pipe would
        // block the server), picks out the addresses it bound, and keeps
        // the last lines for error reports.
        std::thread::spawn(move || drain(stderr, &tx, &tail, &announced));
    }
    let mut process = ServerProcess {
        name,
        child,
        _stdin: stdin,
        tcp: SocketAddr::from(([127, 0, 0, 1], 0)),
        uds,
        stderr_tail: tail,
        announced,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(addr) => {
                process.tcp = addr;
                return Ok(process);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                process.check_alive()?;
                if Instant::now() > deadline {
                    return Err(BenchError::Timeout {
                        what: format!("{name} to bind its listeners"),
                        stderr: process.tail(),
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                process.check_alive()?;
                return Err(BenchError::ServerExited {
                    name,
                    status: "closed its stderr".to_owned(),
                    stderr: process.tail(),
                });
            }
        }
    }
}

fn drain(
    stderr: impl Read,
    tx: &mpsc::Sender<SocketAddr>,
    tail: &std::sync::Mutex<Vec<String>>,
    announced: &std::sync::Mutex<Announced>,
) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        match listening_address(&line) {
            Some(Listening::Grpc(addr)) => {
                let _ = tx.send(addr);
            }
            Some(Listening::Admin(addr)) => {
                if let Ok(mut announced) = announced.lock() {
                    announced.admin = Some(addr);
                }
            }
            None => {
                if let Some(n) = worker_threads(&line) {
                    if let Ok(mut announced) = announced.lock() {
                        announced.worker_threads = Some(n);
                    }
                }
            }
        }
        if let Ok(mut tail) = tail.lock() {
            if tail.len() >= 40 {
                tail.remove(0);
            }
            tail.push(line);
        }
    }
}

/// `line` as JSON when it is the log line with this `message`. Every deny
/// is a line too: only the few that can be this one are parsed, so reading
/// the sidecar's log takes little of the CPU it measures.
fn log_line(line: &str, message: &str) -> Option<serde_json::Value> {
    if !line.contains(message) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    (value.get("message")?.as_str()? == message).then_some(value)
}

/// The worker threads in a sidecar's `starting` log line (JSON).
fn worker_threads(line: &str) -> Option<usize> {
    let value = log_line(line, "starting")?;
    usize::try_from(value.get("worker_threads")?.as_u64()?).ok()
}

enum Listening {
    Grpc(SocketAddr),
    Admin(SocketAddr),
}

/// The address in a `listening` log line (JSON, as both servers are
/// started with JSON logs): gRPC TCP, or the admin listener
/// (`http://ADDR (admin)`).
fn listening_address(line: &str) -> Option<Listening> {
    let value = log_line(line, "listening")?;
    let address = value.get("address")?.as_str()?;
    match address.strip_prefix("http://") {
        Some(rest) => rest
            .strip_suffix(" (admin)")?
            .parse()
            .ok()
            .map(Listening::Admin),
        None => address.parse().ok().map(Listening::Grpc),
    }
}

/// One HTTP/1.1 GET (or other `method`) to an admin listener:
/// (status code, body).
pub async fn http_get(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: leash\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line in the answer"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one series in a `/metrics` text, e.g.
/// `leash_spans_dropped_total{reason="queue_full"}`; `None` when absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
    })
}

/// Waits until the server's health says SERVING (its bundle is loaded),
/// within `limit`. Returns how long that took.
pub async fn wait_serving(
    process: &mut ServerProcess,
    limit: Duration,
) -> Result<Duration, BenchError> {
    let began = Instant::now();
    let channel = super::connect_uds(&process.uds).await?;
    let mut health = HealthClient::new(channel);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.is_ok_and(|s| s == ServingStatus::Serving as i32) {
            return Ok(began.elapsed());
        }
        process.check_alive()?;
        if began.elapsed() > limit {
            return Err(BenchError::Timeout {
                what: format!("{} to load its bundle", process.name),
                stderr: process.tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The floor service: answers at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct FloorService;

#[tonic::async_trait]
impl floor::floor_server::Floor for FloorService {
    async fn empty(
        &self,
        _request: tonic::Request<floor::EmptyRequest>,
    ) -> Result<tonic::Response<floor::EmptyResponse>, tonic::Status> {
        Ok(tonic::Response::new(floor::EmptyResponse {}))
    }
}

/// Serves the floor on loopback port 0 and `uds`, with the same transport
/// settings as `leash serve` (TCP_NODELAY, tonic defaults), until stdin
/// closes. Logs its TCP address as a JSON `listening` line on stderr.
pub async fn serve_floor(uds: &Path) -> Result<(), BenchError> {
    let tcp = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|source| BenchError::Io {
            what: "binding the floor's TCP listener".to_owned(),
            source,
        })?;
    let addr = tcp.local_addr().map_err(|source| BenchError::Io {
        what: "reading the floor's TCP address".to_owned(),
        source,
    })?;
    let _ = std::fs::remove_file(uds);
    let unix = tokio::net::UnixListener::bind(uds).map_err(|source| BenchError::Io {
        what: format!("binding `{}`", uds.display()),
        source,
    })?;
    eprintln!(
        "{}",
        serde_json::json!({"message": "listening", "address": addr.to_string()})
    );
    let service = floor::floor_server::FloorServer::new(FloorService);
    let incoming = TcpListenerStream::new(tcp).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let stdin_closed = async {
        // Reading stdin blocks, so it runs on a blocking thread.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
    };
    let tcp_server = tonic::transport::Server::builder()
        .add_service(service.clone())
        .serve_with_incoming(incoming);
    let uds_server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(crate::server::uds::incoming(unix));
    let result = tokio::select! {
        r = tcp_server => r,
        r = uds_server => r,
        () = stdin_closed => Ok(()),
    };
    let _ = std::fs::remove_file(uds);
    result.map_err(|e| BenchError::Task(format!("floor server: {e}")))
}

/// A floor client on `channel`.
pub fn floor_client(channel: Channel) -> floor::floor_client::FloorClient<Channel> {
    floor::floor_client::FloorClient::new(channel)
}
