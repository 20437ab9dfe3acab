//! Server lifecycle and the command line: health, reflection, the Unix
//! socket, shutdown, `leash validate`, `leash check` and `leash serve`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use leash::proto::v1 as pb;
use leash::server::ServerOptions;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(server: &TestServer, service: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[tokio::test]
async fn health_is_serving_only_once_a_bundle_is_loaded() {
    let server = TestServer::start(None, ServerOptions::default(), false).await;
    assert_eq!(health(&server, "").await, ServingStatus::NotServing as i32);
    // Alive while it loads: the startup probe waits for the bundle.
    assert_eq!(
        health(&server, "liveness").await,
        ServingStatus::Serving as i32
    );
    assert_eq!(
        health(&server, "leash.v1.Authorizer").await,
        ServingStatus::NotServing as i32
    );
    let status = server
        .decide(request(
            "Agent::\"support-bot\"",
            None,
            "Action::\"kb:read\"",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect_err("no bundle yet");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "no valid policy bundle is loaded yet");

    server.server.publish(example_snapshot()).await;
    assert_eq!(health(&server, "").await, ServingStatus::Serving as i32);
    assert_eq!(
        health(&server, "leash.v1.Authorizer").await,
        ServingStatus::Serving as i32
    );
    let resp = server
        .decide(request(
            "Agent::\"support-bot\"",
            None,
            "Action::\"kb:read\"",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect("decides");
    assert_eq!(resp.decision, ALLOW);
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::example().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let ask = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "leash.v1.Admin".to_owned(),
        )),
        // Admin/Status uses Timestamp: a client must be able to resolve it.
        ask(MessageRequest::FileByFilename(
            "google/protobuf/timestamp.proto".to_owned(),
        )),
    ];
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let reply = stream.message().await.expect("reply").expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "leash.v1.Authorizer",
        "leash.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&service.to_owned()), "{service}: {names:?}");
    }
    for what in ["leash.v1.Admin", "google/protobuf/timestamp.proto"] {
        let reply = stream.message().await.expect("reply").expect("a message");
        match reply.message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                assert!(!files.file_descriptor_proto.is_empty(), "{what}")
            }
            other => panic!("{what}: unexpected reply {other:?}"),
        }
    }
}

// Multi-threaded: the test blocks on a child process while the in-process
// server must keep answering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_is_private_and_serves_decisions() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start(Some(example_snapshot()), ServerOptions::default(), true).await;
    let path = server.uds.clone().expect("socket");
    let mode = std::fs::metadata(&path)
        .expect("socket exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let mut client = leash::check::connect_uds(path.clone())
        .await
        .expect("connect over uds");
    let resp = client
        .is_authorized(request(
            "Agent::\"support-bot\"",
            Some("User::\"alice\""),
            "Action::\"tickets:read\"",
            "Ticket::\"T-1\"",
        ))
        .await
        .expect("decides")
        .into_inner();
    assert_eq!(resp.decision, ALLOW);

    // `leash check` over the socket, as a separate process; `--uds` wins
    // over a `LEASH_ADDR` the shell happens to set.
    let out = Command::new(env!("CARGO_BIN_EXE_leash"))
        .env("LEASH_ADDR", "127.0.0.1:1")
        .args(["check", "--uds"])
        .arg(&path)
        .args([
            "--agent",
            "Agent::\"support-bot\"",
            "--user",
            "User::\"alice\"",
            "--action",
            "Action::\"tickets:read\"",
            "--resource",
            "Ticket::\"T-2\"",
        ])
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("DENY: Agent::\"support-bot\" for User::\"alice\""),
        "{stdout}"
    );

    // Graceful shutdown removes the socket file.
    server.shutdown().await;
    assert!(!path.exists(), "socket removed at shutdown");
}

/// A second sidecar given the same socket path refuses it while the first
/// serves there; a socket nobody serves on (a crash) is taken over; and a
/// sidecar removes the path at shutdown only if it is still its own.
#[tokio::test]
async fn a_socket_in_use_is_refused_and_only_ones_own_is_removed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("leash.sock");
    let first = leash::server::bind_uds(&path).expect("binds");
    match leash::server::bind_uds(&path) {
        Err(e @ leash::server::ServeError::SocketInUse(_)) => {
            assert!(e.to_string().contains("another process"), "{e}")
        }
        other => panic!("a socket in use must be refused: {other:?}"),
    }
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_ok(),
        "still the first one's"
    );
    // Dropped, it removes its own file; a socket file left by a process
    // that died (nobody accepting) is then replaced.
    drop(first);
    assert!(!path.exists(), "a bound socket's file goes with it");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("a stale socket"));
    assert!(path.exists());
    // A server started on it now, then its path taken by a newer one.
    let server = std::sync::Arc::new(
        leash::server::Server::new(ServerOptions::default())
            .await
            .expect("server"),
    );
    server.publish(example_snapshot()).await;
    let listener = leash::server::bind_uds(&path).expect("a stale socket is replaced");
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("leash.sock")]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = server.clone();
    let task = tokio::spawn(async move {
        running
            .run(vec![listener], async {
                let _ = stopped.await;
            })
            .await
    });
    leash::check::connect_uds(path.clone())
        .await
        .expect("serves on it");
    std::fs::remove_file(&path).expect("rm");
    let newer = leash::server::bind_uds(&path).expect("binds the free path");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("stops")
        .expect("task")
        .expect("ran cleanly");
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_ok(),
        "the newer socket was left in place"
    );
    drop(newer);
}

// Multi-threaded: the test blocks on a child process while the in-process
// server must keep answering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_both_sides_and_exits_by_decision() {
    let server = TestServer::example().await;
    let addr = server.addr.to_string();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_leash"))
            .args(["check", "--addr", &addr])
            .args(args)
            .output()
            .expect("runs")
    };
    let out = run(&[
        "--agent",
        "Agent::\"support-bot\"",
        "--user",
        "User::\"alice\"",
        "--action",
        "Action::\"tickets:read\"",
        "--resource",
        "Ticket::\"T-1\"",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "ALLOW: Agent::\"support-bot\" for User::\"alice\" -> Action::\"tickets:read\" on Ticket::\"T-1\"");
    assert!(
        lines[1].contains("agent") && lines[1].contains("permitted by support-bot-tickets"),
        "{stdout}"
    );
    assert!(
        lines[2].contains("user") && lines[2].contains("permitted by role-support-tickets"),
        "{stdout}"
    );
    assert!(lines[3].starts_with("policy version "), "{stdout}");

    let out = run(&[
        "--agent",
        "Agent::\"research-agent\"",
        "--user",
        "User::\"bob\"",
        "--action",
        "Action::\"kb:read\"",
        "--resource",
        "KbArticle::\"reset-password\"",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("forbidden by finance-requires-vetted-agent"),
        "{stdout}"
    );

    // A refund over the threshold waits for a person: exit 3, with what to
    // put before them.
    let out = run(&[
        "--agent",
        "Agent::\"billing-agent\"",
        "--user",
        "User::\"bob\"",
        "--action",
        "Action::\"payments:refund\"",
        "--resource",
        "BillingAccount::\"BA-100\"",
        "--context",
        r#"{"amount_cents": 25000}"#,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.starts_with("APPROVAL_REQUIRED: "), "{stdout}");
    assert!(stdout.contains("  fingerprint sha256:"), "{stdout}");

    let out = run(&[
        "--agent",
        "Agent::\"support-bot\"",
        "--action",
        "Action::\"nope\"",
        "--resource",
        "Ticket::\"T-1\"",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("action: `Action::\"nope\"` is not an action of the schema"),
        "{stderr}"
    );

    let out = run(&[
        "--agent",
        "support-bot",
        "--action",
        "Action::\"kb:read\"",
        "--resource",
        "Ticket::\"T-1\"",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "--agent: `support-bot` is not a Cedar entity reference such as `Agent::\"support-bot\"`"
    ));
    let out = run(&[
        "--agent",
        "Agent::\"support-bot\"",
        "--action",
        "tickets:read",
        "--resource",
        "Ticket::\"T-1\"",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "--action: `tickets:read` is not a Cedar entity reference such as `Action::\"tickets:read\"`"
    ));
    // The socket URL agents are given is not an address: it says so.
    let out = Command::new(env!("CARGO_BIN_EXE_leash"))
        .args(["check", "--addr", "unix:///run/leash/leash.sock"])
        .args(["--agent", "Agent::\"a\"", "--action", "Action::\"b\""])
        .args(["--resource", "Ticket::\"T-1\""])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "--addr: `unix:///run/leash/leash.sock` names a Unix socket; give its path with --uds PATH"
        ),
        "{out:?}"
    );
}

/// A bundle directory pair in a temp dir, built from the example with edits.
struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    fn example() -> Self {
        let dir = tempfile::tempdir().expect("temp");
        copy_dir(&repo_path("policies"), &dir.path().join("policies"));
        copy_dir(&repo_path("schemas"), &dir.path().join("schemas"));
        Self { dir }
    }
    fn write(&self, rel: &str, text: &str) -> &Self {
        let path = self.dir.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
        self
    }
    fn validate(&self) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_leash"))
            .current_dir(self.dir.path())
            .args(["validate", "--policies", "policies", "--schemas", "schemas"])
            .output()
            .expect("runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

#[test]
fn validate_accepts_the_example_bundle() {
    let (code, stdout, stderr) = Bundle::example().validate();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("bundle valid: 33 policies, "),
        "{stdout}"
    );
}

#[test]
fn validate_reports_every_problem_with_file_line_and_column() {
    let bundle = Bundle::example();
    bundle
        .write("policies/broken.cedar", "@id(\"broken\")\npermit (principal, action, resource)\nwhen { principal.vetted == };\n")
        .write(
            "policies/typo.cedar",
            "@id(\"typo\")\npermit (principal == Agent::\"support-bot\", action == Action::\"kb:read\", resource)\nwhen { resource.visiblity == \"public\" };\n",
        )
        .write("policies/dup.cedar", "@id(\"support-bot-kb-read\")\npermit (principal, action == Action::\"kb:read\", resource);\n")
        .write("policies/entities/more.entities.json", "[{\"uid\": {\"type\": \"Agent\", \"id\": \"x\"}, \"attrs\": {\"vetted\": \"yes\"}, \"parents\": []}]");
    let (code, stdout, stderr) = bundle.validate();
    assert_eq!(code, 1, "{stdout}");
    // Parse error, with the offending text shown.
    assert!(stderr.contains("policies/broken.cedar:3:"), "{stderr}");
    assert!(stderr.contains("when { principal.vetted == };"), "{stderr}");
    // Strict validation against the schema, located in its file.
    assert!(stderr.contains("policies/typo.cedar:3:"), "{stderr}");
    assert!(stderr.contains("visiblity"), "{stderr}");
    // Duplicate ids name both places.
    assert!(
        stderr.contains("duplicate policy id `support-bot-kb-read`: policy 1 of `policies/dup.cedar` and policy 3 of `policies/agents/support-bot.cedar`"),
        "{stderr}"
    );
    // Entity data against the schema.
    assert!(
        stderr.contains("policies/entities/more.entities.json: error: "),
        "{stderr}"
    );
    assert!(stderr.contains("is invalid (4 problems)"), "{stderr}");
}

#[test]
fn validate_refuses_a_missing_schema_and_misdeclared_leash_context() {
    let bundle = Bundle::example();
    std::fs::remove_file(bundle.dir.path().join("schemas/support-desk.cedarschema")).expect("rm");
    let (code, _, stderr) = bundle.validate();
    assert_eq!(code, 1);
    assert!(stderr.contains("error: no schema found"), "{stderr}");

    let bundle = Bundle::example();
    let schema =
        std::fs::read_to_string(bundle.dir.path().join("schemas/support-desk.cedarschema"))
            .expect("read");
    bundle.write(
        "schemas/support-desk.cedarschema",
        &schema.replace("user?: User,", "usr?: User,"),
    );
    let (code, _, stderr) = bundle.validate();
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown attribute `leash.usr`"), "{stderr}");
}

#[test]
fn serve_exits_non_zero_on_an_invalid_bundle_and_bad_flags() {
    let bundle = Bundle::example();
    bundle.write(
        "policies/broken.cedar",
        "permit (principal, action, resource) when {",
    );
    // `leash serve` on loopback with `more`, in the bundle's directory.
    let serve = |more: &[&str]| {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_leash"))
                .current_dir(bundle.dir.path())
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(more),
        )
    };
    let out = serve(&[
        "--admin-listen",
        "127.0.0.1:0",
        "--policies",
        "policies",
        "--schemas",
        "schemas",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("policies/broken.cedar:1:"));

    let out =
        output_within(Command::new(env!("CARGO_BIN_EXE_leash")).args(["--listen", "0.0.0.0:0"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a loopback address"));

    // An address already taken: the error names the listener's flag.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = serve(&["--admin-listen", &addr, "--audit-log", "none"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--admin-listen: cannot bind `{addr}`")),
        "{stderr}"
    );
}

#[test]
fn usage_mistakes_exit_64_never_a_decisions_code() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_leash"))
                .args(args)
                .envs(env.iter().copied()),
        )
    };
    // `check` exits 2 for DENY and `audit verify` 2 for a partial trail:
    // a typo must not read as either.
    for (args, says) in [
        (
            &["check", "--usr", "bob"][..],
            "unexpected argument '--usr'",
        ),
        (&["audit", "verify"][..], "required"),
        (&["serve", "--max-batch", "lots"][..], "--max-batch"),
    ] {
        let out = run(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // A boolean switch's variable takes 1/0, yes/no, on/off, true/false
    // (and t/f, y/n); anything else, empty too, is refused rather than
    // read as on.
    for value in ["banana", ""] {
        let out = run(&["--listen", "none"], &[("LEASH_AUDIT_FAIL_OPEN", value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{value:?}: {stderr}");
        assert!(stderr.contains("--audit-fail-open"), "{value:?}: {stderr}");
    }
    // A switch turned off by its variable does not conflict with the flag
    // it excludes (here the only problem left is `--listen none`); turned
    // on, it does.
    let out = run(
        &["--listen", "none", "--watch-poll", "2s"],
        &[("LEASH_NO_WATCH", "false")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("needs --uds") && !stderr.contains("--no-watch"),
        "{stderr}"
    );
    let out = run(
        &["--listen", "none", "--watch-poll", "2s"],
        &[("LEASH_NO_WATCH", "true")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--no-watch, --watch-poll: choose one"),
        "{stderr}"
    );
    let out = run(
        &["--listen", "0.0.0.0:0"],
        &[("LEASH_ALLOW_NON_LOOPBACK", "0")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a loopback address"));
    // Help is an answer.
    let out = run(&["check", "--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--agent"));
}

/// The JSON log lines of a started `leash` child (stderr piped), one by
/// one, each within 30 s.
fn json_log_lines(child: &mut std::process::Child) -> impl FnMut() -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    move || {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server logs in time");
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
    }
}

#[test]
fn serve_with_no_flags_serves_the_example_until_sigterm() {
    // Port 0 so parallel runs do not collide; the bound address is logged.
    // The default audit trail goes to the working directory: a temp one.
    let cwd = tempfile::tempdir().expect("temp dir");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_leash"))
            .current_dir(cwd.path())
            .env("LEASH_LISTEN", "127.0.0.1:0")
            .env("LEASH_ADMIN_LISTEN", "127.0.0.1:0")
            .env_remove("LEASH_LOG_FORMAT")
            .env_remove("LEASH_LOG")
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starts"),
    );
    // Not a terminal: the log is JSON, one object per line.
    let mut next_line = json_log_lines(&mut child.0);
    let mut addr = None;
    let mut loaded = false;
    while addr.is_none() || !loaded {
        let line = next_line();
        if line["message"] == "listening" {
            let address = line["address"].as_str().expect("address").to_owned();
            if !address.starts_with("http://") {
                addr = Some(address);
            }
        }
        loaded |= line["message"] == "policy bundle loaded"
            && line["origin"] == "built-in example bundle";
    }
    let addr = addr.expect("address logged");
    let check = |action: &str, resource: &str| {
        Command::new(env!("CARGO_BIN_EXE_leash"))
            .args([
                "check",
                "--addr",
                &addr,
                "--agent",
                "Agent::\"onboarding-agent\"",
                "--user",
                "User::\"carol\"",
                "--action",
                action,
                "--resource",
                resource,
            ])
            .output()
            .expect("runs")
    };
    let out = check("Action::\"kb:write\"", "KbArticle::\"refund-runbook\"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A deny is one info line with its reasons, naming policies.
    let out = check("Action::\"secrets:read\"", "SystemResource::\"vault\"");
    assert_eq!(out.status.code(), Some(2));
    let deny = loop {
        let line = next_line();
        if line["message"] == "decision" {
            break line;
        }
    };
    assert_eq!(deny["level"], "INFO");
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["agent"], "Agent::\"onboarding-agent\"");
    assert_eq!(deny["on_behalf_of"], "User::\"carol\"");
    assert_eq!(deny["action"], "Action::\"secrets:read\"");
    assert_eq!(deny["determining_policies"], "baseline-never-by-default");
    assert!(
        deny["reason"]
            .as_str()
            .is_some_and(|r| r.contains("forbidden by baseline-never-by-default")),
        "{deny}"
    );
    assert!(deny["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    // The layout of every other line: RFC 3339 to the microsecond, target.
    assert_eq!(deny["target"], "leash::telemetry");
    assert!(
        deny["timestamp"]
            .as_str()
            .is_some_and(|t| t.len() == 27 && t.ends_with('Z')),
        "{deny}"
    );
    assert!(deny["policy_version"]
        .as_str()
        .is_some_and(|v| !v.is_empty()));
    assert!(
        deny.get("trace_id").is_none(),
        "no trace, no trace_id: {deny}"
    );

    let status = terminate(&mut child);
    assert_eq!(status.code(), Some(0));
    // Logged before it exited (the log ends there, so a missing line fails
    // here rather than waiting).
    while !next_line()["message"]
        .as_str()
        .is_some_and(|m| m.contains("shutdown requested"))
    {}
    // The default audit trail: both decisions, chained, in the working
    // directory.
    let trail = cwd.path().join("leash-audit.log");
    let out = Command::new(env!("CARGO_BIN_EXE_leash"))
        .args(["audit", "verify"])
        .arg(&trail)
        .output()
        .expect("runs");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.starts_with("audit trail intact: 2 records, seq 0 to 1"),
        "{said}"
    );
}

/// `leash serve` in `cwd` with JSON logs on stderr (piped), no admin
/// listener and no audit trail, and `args`; run through `shell` when given
/// (`ulimit -n 32 && exec "$0" "$@"`). Killed when dropped.
fn serve_json(cwd: &std::path::Path, shell: Option<&str>, args: &[&str]) -> KillOnDrop {
    let leash = env!("CARGO_BIN_EXE_leash");
    let fixed = [
        "serve",
        "--admin-listen",
        "none",
        "--audit-log",
        "none",
        "--log-format",
        "json",
    ];
    let mut cmd = match shell {
        Some(script) => {
            let mut cmd = Command::new("bash");
            cmd.args(["-c", script, leash]);
            cmd
        }
        None => Command::new(leash),
    };
    KillOnDrop(
        cmd.current_dir(cwd)
            .args(fixed)
            .args(args)
            .env_remove("LEASH_LOG")
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starts"),
    )
}

/// `leash serve` (as [`serve_json`]) on a loopback decision listener and
/// a health listener at `health`, with `extra` flags, once its bundle is
/// loaded: the process, its log, and the two listeners' addresses.
fn serve_with_health(
    cwd: &std::path::Path,
    health: &str,
    extra: &[&str],
) -> (
    KillOnDrop,
    impl FnMut() -> serde_json::Value,
    String,
    String,
) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--health-listen", health];
    args.extend_from_slice(extra);
    let mut child = serve_json(cwd, None, &args);
    let mut next_line = json_log_lines(&mut child.0);
    let (decisions, health_only) = listeners_once_loaded(&mut next_line);
    (child, next_line, decisions, health_only)
}

/// Reads `leash serve`'s log until the bundle is loaded and both its
/// decision listener (TCP) and its health listener are named; returns
/// their addresses.
fn listeners_once_loaded(next_line: &mut impl FnMut() -> serde_json::Value) -> (String, String) {
    let (mut decisions, mut health_only) = (None, None);
    let mut loaded = false;
    while decisions.is_none() || health_only.is_none() || !loaded {
        let line = next_line();
        if line["message"] == "listening" {
            let address = line["address"].as_str().expect("address").to_owned();
            match address.strip_suffix(" (grpc.health.v1 only)") {
                Some(addr) => health_only = Some(addr.to_owned()),
                None if !address.contains("(admin)") => decisions = Some(address),
                None => {}
            }
        }
        loaded |= line["message"] == "policy bundle loaded";
    }
    (
        decisions.expect("decision listener"),
        health_only.expect("health listener"),
    )
}

/// A `Health/Watch` stream for `service`, followed until it says SERVING
/// (within 30 s), as the kubelet would poll; the stream stays open.
async fn watch_until_serving(
    channel: &tonic::transport::Channel,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut updates = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health answers")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.message().await.expect("health stream") {
            if update.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("health stream ended before SERVING");
    })
    .await
    .unwrap_or_else(|_| panic!("service {service:?} not SERVING within 30 s"));
    updates
}

/// Sends SIGTERM to `child`.
fn sigterm(child: &std::process::Child) {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success());
}

/// Waits (at most 60 s) for `child`, sent SIGTERM, to exit.
async fn exit_status(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leash did not exit within 60 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The kubelet's native gRPC probes dial the pod IP, so a sidecar that
/// serves decisions on loopback only needs a second listener for them: it
/// may bind any address, and it answers health and nothing else.
#[tokio::test]
async fn health_listener_answers_probes_on_any_address_and_nothing_else() {
    let cwd = tempfile::tempdir().expect("temp dir");
    let (_child, _, _, health_only) = serve_with_health(cwd.path(), "0.0.0.0:0", &[]);
    let addr: std::net::SocketAddr = health_only.parse().expect("socket address");
    assert!(addr.ip().is_unspecified(), "{addr}");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", addr.port()))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
    // The load is logged a moment before health turns SERVING: follow the
    // health stream until it does (bounded), as the kubelet would poll.
    for service in ["", "leash.v1.Authorizer"] {
        watch_until_serving(&channel, service).await;
    }
    let refused = leash::proto::v1::authorizer_client::AuthorizerClient::new(channel)
        .is_authorized(request(
            "Agent::\"support-bot\"",
            None,
            "Action::\"kb:read\"",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect_err("no decisions on the health listener");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
}

/// A client-side health watcher (a `Health/Watch` stream, as gRPC's
/// client health checking opens) must not hold up shutdown: the stream
/// sees NOT_SERVING, then ends, and the drain does not wait for it.
#[tokio::test]
async fn health_watchers_see_not_serving_and_do_not_hold_up_shutdown() {
    let cwd = tempfile::tempdir().expect("temp dir");
    // A drain timeout far past the test's bound: a drain that waited for
    // the watchers would fail it rather than end on time.
    let (mut child, mut next_line, decisions, health_only) =
        serve_with_health(cwd.path(), "127.0.0.1:0", &["--drain-timeout", "600"]);
    let mut watches = Vec::new();
    for addr in [decisions, health_only] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        for service in ["", "leash.v1.Authorizer", "liveness"] {
            let updates = watch_until_serving(&channel, service).await;
            watches.push((addr.clone(), service, updates));
        }
    }
    sigterm(&child.0);
    for (addr, service, mut updates) in watches {
        let last = tokio::time::timeout(Duration::from_secs(60), async {
            let mut last = None;
            while let Some(update) = updates.message().await.ok().flatten() {
                last = Some(update.status);
            }
            last
        })
        .await
        .unwrap_or_else(|_| panic!("{addr} {service:?}: the watch did not end within 60 s"));
        // Not ready while draining, but alive to the end (nothing new to
        // say before the stream ends).
        if service == "liveness" {
            assert_eq!(last, None, "{addr} {service:?}");
        } else {
            assert_eq!(
                last,
                Some(ServingStatus::NotServing as i32),
                "{addr} {service:?}"
            );
        }
    }
    assert_eq!(exit_status(&mut child.0).await.code(), Some(0));
    // Its log to the end: drained without timing out, then stopped.
    loop {
        let line = next_line();
        let message = line["message"].as_str().unwrap_or_default().to_owned();
        assert!(!message.contains("timed out"), "{line}");
        assert!(!message.contains("in time"), "{line}");
        if message == "stopped" {
            break;
        }
    }
}

/// The health listener is open to the pod network, so it holds a bounded
/// number of connections: peers that connect and say nothing fill it, the
/// cap is logged, and a probe waiting behind them is answered as soon as
/// one goes (each would also be closed at its lifetime; unit-tested in
/// `server::accept`). The decision listener is not capped.
#[tokio::test]
async fn the_health_listener_caps_its_connections() {
    let cwd = tempfile::tempdir().expect("temp dir");
    let (_child, mut next_line, decisions, health_only) =
        serve_with_health(cwd.path(), "127.0.0.1:0", &[]);
    let mut idle = Vec::new();
    for _ in 0..leash::server::HEALTH_MAX_CONNECTIONS {
        idle.push(
            tokio::net::TcpStream::connect(&health_only)
                .await
                .expect("connect"),
        );
    }
    loop {
        let line = next_line();
        if line["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("connection cap reached")
        {
            assert_eq!(line["listener"], "health", "{line}");
            assert_eq!(
                line["max_connections"],
                leash::server::HEALTH_MAX_CONNECTIONS,
                "{line}"
            );
            break;
        }
    }
    // Decisions go on meanwhile: the cap is the health listener's alone.
    let mut client = leash::proto::v1::authorizer_client::AuthorizerClient::connect(format!(
        "http://{decisions}"
    ))
    .await
    .expect("connect");
    client
        .is_authorized(request(
            "Agent::\"support-bot\"",
            None,
            "Action::\"kb:read\"",
            "KbArticle::\"reset-password\"",
        ))
        .await
        .expect("a decision");
    // A probe behind the idle peers: its connection waits in the backlog
    // until one of them goes.
    let probe = tokio::spawn(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{health_only}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        watch_until_serving(&channel, "").await;
    });
    drop(idle.pop());
    tokio::time::timeout(Duration::from_secs(60), probe)
        .await
        .expect("the probe is answered once a slot frees")
        .expect("probe task");
    loop {
        let line = next_line();
        if line["message"] == "below the connection cap again" {
            break;
        }
    }
}

/// SIGTERM while the first bundle is still loading (a large bundle takes
/// seconds) stops leash cleanly: exit 0, its socket file removed, its log
/// saying why; the signal's default action used to end it on the spot.
#[tokio::test]
async fn sigterm_during_the_first_load_stops_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let generated = Command::new(env!("CARGO_BIN_EXE_leash"))
        .args(["bench", "generate", "--policy-count", "3000", "--out"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(generated.status.success(), "{generated:?}");
    let socket = dir.path().join("leash.sock");
    let mut child = serve_json(
        dir.path(),
        None,
        &[
            "--policies",
            "policies",
            "--schemas",
            "schemas",
            "--listen",
            "none",
            "--uds",
            "leash.sock",
        ],
    );
    let mut next_line = json_log_lines(&mut child.0);
    // Bound first, then the load begins: seconds for 3,000 policies.
    while next_line()["message"] != "listening" {}
    assert!(socket.exists());
    sigterm(&child.0);
    let status = exit_status(&mut child.0).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!socket.exists(), "the socket file is removed");
    loop {
        let line = next_line();
        assert_ne!(line["message"], "policy bundle loaded", "{line}");
        if line["message"] == "shutdown requested before the bundle loaded; stopping" {
            break;
        }
    }
}

/// Out of file descriptors, a listener cannot accept: leash says so and
/// pauses between tries (it used to retry at once, silently, spinning a
/// worker), and accepts again once descriptors are free.
#[tokio::test]
async fn out_of_file_descriptors_is_logged_and_accepting_resumes() {
    let cwd = tempfile::tempdir().expect("temp dir");
    let mut child = serve_json(
        cwd.path(),
        Some(r#"ulimit -n 32 && exec "$0" "$@""#),
        &["--listen", "127.0.0.1:0"],
    );
    let mut next_line = json_log_lines(&mut child.0);
    let mut addr = None;
    let mut loaded = false;
    while addr.is_none() || !loaded {
        let line = next_line();
        if line["message"] == "listening" {
            addr = line["address"].as_str().map(str::to_owned);
        }
        loaded |= line["message"] == "policy bundle loaded";
    }
    let addr = addr.expect("address");
    // More connections than the process may hold descriptors for: the
    // kernel completes each handshake; leash runs out accepting them.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(std::net::TcpStream::connect(&addr).expect("connect"));
    }
    loop {
        let line = next_line();
        if line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("cannot accept connections"))
        {
            assert_eq!(line["level"], "WARN", "{line}");
            assert_eq!(line["listener"], addr.as_str(), "{line}");
            break;
        }
    }
    drop(held);
    // Descriptors free again: a decision is served (bounded retries while
    // leash closes the connections it did accept).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answered = async {
            let mut client = leash::check::connect_tcp(&addr).await.ok()?;
            client
                .is_authorized(request(
                    "Agent::\"support-bot\"",
                    Some("User::\"alice\""),
                    "Action::\"kb:read\"",
                    "KbArticle::\"reset-password\"",
                ))
                .await
                .ok()
        };
        if let Some(answer) = tokio::time::timeout(Duration::from_secs(10), answered)
            .await
            .ok()
            .flatten()
        {
            assert_eq!(answer.into_inner().decision, pb::Decision::Allow as i32);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no decision within 60 s of freeing the descriptors"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        if next_line()["message"] == "accepting connections again" {
            break;
        }
    }
}

#[test]
fn only_bundle_files_can_refuse_a_bundle_and_a_huge_one_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = (dir.path().join("policies"), dir.path().join("schemas"));
    copy_dir(&repo_path("policies"), &policies);
    copy_dir(&repo_path("schemas"), &schemas);
    // A dangling link of another name, and a volume's `lost+found` (only
    // root may read it; here it even holds a broken policy): neither is
    // part of the bundle.
    std::os::unix::fs::symlink(dir.path().join("gone/NOTES.md"), policies.join("NOTES.md"))
        .expect("link");
    let lost = policies.join("lost+found");
    std::fs::create_dir(&lost).expect("mkdir");
    std::fs::write(lost.join("broken.cedar"), "permit (").expect("write");
    let loaded = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect("loads");
    assert_eq!(
        loaded.version,
        version_of(&repo_path("policies"), &repo_path("schemas"))
    );
    // A dangling link with a bundle file's name is a missing bundle file;
    // so is one without an extension (it could be a directory of policies),
    // and one whose name has a dot but whose target could be a directory of
    // policies (a mount that is missing).
    for (name, target) in [
        ("extra.cedar", "gone"),
        ("more", "gone"),
        ("team.payments", "payments"),
    ] {
        std::os::unix::fs::symlink(dir.path().join(target), policies.join(name)).expect("link");
        let err = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect_err("refused");
        assert!(
            err.diagnostics.iter().any(|d| d.message.contains(name)),
            "{name}: {err:?}"
        );
        std::fs::remove_file(policies.join(name)).expect("rm");
    }
    // A file past the limit is refused without being read (a sparse file:
    // no disk is used).
    let huge = std::fs::File::create(policies.join("dump.entities.json")).expect("create");
    huge.set_len(leash::bundle::MAX_FILE_BYTES + 1)
        .expect("sparse");
    let err = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect_err("refused");
    assert!(
        err.diagnostics
            .iter()
            .any(|d| d.file.as_deref() == Some("policies/dump.entities.json")
                && d.message.contains("bundle files over 256 MiB are refused")),
        "{err:?}"
    );
}

/// Files that look meant for the bundle but are not read are named in the
/// load's warnings (an entity file without its `.entities.json` suffix
/// would otherwise be left out in silence, and every policy reading its
/// entities deny); where the two directories are one, each file is read
/// as what it is and nothing is warned about.
#[test]
fn files_passed_over_are_warned_about_and_one_directory_serves_as_both() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = (dir.path().join("policies"), dir.path().join("schemas"));
    copy_dir(&repo_path("policies"), &policies);
    copy_dir(&repo_path("schemas"), &schemas);
    let clean = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect("loads");
    assert_eq!(clean.warnings, Vec::<String>::new());
    // The example built into the binary is the same bundle, version and all.
    assert_eq!(
        leash::bundle::Snapshot::load_embedded()
            .expect("loads")
            .version,
        clean.version
    );
    std::fs::write(policies.join("entities.json"), "[]").expect("write");
    std::fs::write(policies.join("Roles.CEDAR"), "").expect("write");
    std::fs::write(policies.join("extra.cedarschema"), "").expect("write");
    std::fs::write(schemas.join("stray.cedar"), "").expect("write");
    std::fs::write(schemas.join("users.entities.json"), "[]").expect("write");
    std::fs::write(policies.join("README.md"), "notes").expect("write");
    let warned = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect("loads");
    assert_eq!(warned.version, clean.version, "none of them is read");
    for (file, why) in [
        ("policies/entities.json", "`*.entities.json` (entities)"),
        ("policies/Roles.CEDAR", "lowercase"),
        (
            "policies/extra.cedarschema",
            "read from the schemas directory",
        ),
        ("schemas/stray.cedar", "read from the policies directory"),
        (
            "schemas/users.entities.json",
            "read from the policies directory",
        ),
    ] {
        let expected = format!("`{file}` is not read: ");
        assert!(
            warned
                .warnings
                .iter()
                .any(|w| w.starts_with(&expected) && w.contains(why)),
            "{file}: {:?}",
            warned.warnings
        );
    }
    assert_eq!(warned.warnings.len(), 5, "{:?}", warned.warnings);

    // One directory for both: the schema is read as a schema, the entity
    // and approver files as such, and nothing is warned about.
    let both = dir.path().join("both");
    copy_dir(&repo_path("policies"), &both);
    copy_dir(&repo_path("schemas"), &both);
    let one = leash::bundle::Snapshot::load_dirs(&both, &both).expect("loads");
    assert_eq!(one.warnings, Vec::<String>::new());
    assert_eq!(one.entity_count(), clean.entity_count());
    assert_eq!(one.policy_count(), clean.policy_count());
    // A file both readers pass over is warned about once.
    std::fs::write(both.join("Roles.CEDAR"), "").expect("write");
    let one = leash::bundle::Snapshot::load_dirs(&both, &both).expect("loads");
    assert_eq!(one.warnings.len(), 1, "{:?}", one.warnings);
}

/// Spawns `leash serve` on loopback with `envs` set and returns its
/// `starting` line's `worker_threads`, once the bundle is loaded.
fn worker_threads_with(envs: &[(&str, &str)]) -> u64 {
    let cwd = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leash"));
    cmd.current_dir(cwd.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "none"])
        .args(["--audit-log", "none", "--log-format", "json"])
        .env_remove("LEASH_WORKER_THREADS")
        .env_remove("TOKIO_WORKER_THREADS")
        .env_remove("LEASH_LOG")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped());
    for (key, value) in envs {
        cmd.env(key, value);
    }
    let mut child = KillOnDrop(cmd.spawn().expect("starts"));
    let mut next_line = json_log_lines(&mut child.0);
    let mut workers = None;
    loop {
        let line = next_line();
        if line["message"] == "starting" {
            workers = line["worker_threads"].as_u64();
        }
        if line["message"] == "policy bundle loaded" {
            break;
        }
    }
    child.0.kill().expect("kill");
    child.0.wait().expect("wait");
    workers.expect("the starting line says how many workers")
}

#[test]
fn worker_threads_default_to_the_usable_cpus_and_follow_the_flag_only() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) as u64;
    assert_eq!(worker_threads_with(&[]), cpus);
    // tokio's own variable is not read: not a bad value (tokio would
    // panic), nor a good one.
    assert_eq!(
        worker_threads_with(&[("TOKIO_WORKER_THREADS", "lots")]),
        cpus
    );
    let other = (cpus + 1).to_string();
    assert_eq!(
        worker_threads_with(&[("TOKIO_WORKER_THREADS", &other)]),
        cpus
    );
    // Ours is, whatever the CPU count.
    assert_eq!(
        worker_threads_with(&[
            ("LEASH_WORKER_THREADS", &other),
            ("TOKIO_WORKER_THREADS", "lots")
        ]),
        cpus + 1
    );
    let out = output_within(Command::new(env!("CARGO_BIN_EXE_leash")).args([
        "serve",
        "--worker-threads",
        "0",
    ]));
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--worker-threads: must be between 1 and"),
        "{out:?}"
    );
}

#[tokio::test]
async fn text_logs_quote_caller_text_so_it_cannot_forge_a_line() {
    use std::io::{BufRead, BufReader};
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_leash"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "none"])
            .args([
                "--audit-log",
                "none",
                "--log-format",
                "text",
                "--log",
                "info",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starts"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the server logs in time")
    };
    let mut addr = None;
    let mut loaded = false;
    while addr.is_none() || !loaded {
        let line = next();
        if let Some((_, rest)) = line.split_once("listening address=") {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        loaded |= line.contains("policy bundle loaded");
    }
    let client = leash::check::connect_tcp(&addr.expect("address logged"))
        .await
        .expect("connect");
    // A context key with a line break and a fake log line in it, on a
    // value with no kind: the request is invalid and its field path (the
    // key) is logged.
    let key = "a\n2026-11-24T00:00:00.000000Z  INFO leash::telemetry: forged decision=allow";
    let mut req = example("support-bot", None, "tickets:read", "Ticket::\"T-1\"");
    req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
        pb::Record {
            fields: [(key.to_owned(), pb::Value { kind: None })].into(),
        },
    ));
    let refused = decide_with(&client, req).await.expect_err("invalid");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // Then a plain deny, whose line ends what the invalid one wrote.
    let deny = example(
        "support-bot",
        None,
        "secrets:read",
        "SystemResource::\"vault\"",
    );
    assert_eq!(
        decide_with(&client, deny).await.expect("decides").decision,
        DENY
    );
    let mut invalid_line = None;
    loop {
        let line = next();
        assert!(
            !line.contains("forged") || line.contains("invalid request"),
            "a caller's text began a line of its own: {line}"
        );
        if line.contains("invalid request") {
            invalid_line = Some(line);
        } else if line.contains("secrets:read") {
            break;
        }
    }
    let invalid_line = invalid_line.expect("the invalid request is logged");
    assert!(invalid_line.contains(r"a\n2026"), "{invalid_line}");
}

/// Schema files that parse one by one but clash together are refused with
/// every file named; Cedar's own schema warnings are the load's warnings.
#[test]
fn schema_clashes_name_their_files_and_schema_warnings_are_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = (dir.path().join("policies"), dir.path().join("schemas"));
    copy_dir(&repo_path("policies"), &policies);
    copy_dir(&repo_path("schemas"), &schemas);
    std::fs::write(
        schemas.join("extra.cedarschema"),
        "namespace Extra { entity Thing; type Thing = { amount: Long }; }",
    )
    .expect("write");
    let loaded = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect("loads");
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.starts_with("schemas/extra.cedarschema: ") && w.contains("Thing")),
        "{:?}",
        loaded.warnings
    );
    std::fs::copy(
        schemas.join("support-desk.cedarschema"),
        schemas.join("support-desk-copy.cedarschema"),
    )
    .expect("copy");
    let err = leash::bundle::Snapshot::load_dirs(&policies, &schemas).expect_err("refused");
    assert!(
        err.diagnostics.iter().any(
            |d| d.message.starts_with("the schema files do not combine (")
                && d.message.contains("schemas/support-desk.cedarschema")
                && d.message.contains("schemas/support-desk-copy.cedarschema")
        ),
        "{err:?}"
    );
}
