//! The audit trail against real parts: a real server writing real files,
//! verified by the chain checker; tampering done to copies; a write failure
//! made real with `/dev/full`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use leash::audit::chain::{self, Verdict};
use leash::audit::{AuditOptions, AuditTarget, SyncMode};
use leash::proto::v1 as pb;
use leash::server::ServerOptions;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Bound on waiting for the trail to recover.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

fn audited(path: &Path, sync: SyncMode) -> ServerOptions {
    ServerOptions {
        audit: AuditOptions {
            target: AuditTarget::File(path.to_owned()),
            sync,
            ..AuditOptions::default()
        },
        ..ServerOptions::default()
    }
}

/// A temp dir and the trail's path in it.
fn trail_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    (dir, trail)
}

/// The example bundle served with its trail at `trail` (`disk` sync), and a
/// Unix socket when `with_uds`.
async fn example_audited(trail: &Path, with_uds: bool) -> TestServer {
    TestServer::start(
        Some(example_snapshot()),
        audited(trail, SyncMode::Disk),
        with_uds,
    )
    .await
}

fn allow() -> pb::IsAuthorizedRequest {
    example(
        "support-bot",
        Some("omar"),
        "tickets:read",
        "Ticket::\"T-1\"",
    )
}

async fn health(server: &TestServer) -> i32 {
    grpc_health(&server.addr.to_string()).await
}

/// Polls health until it is `want` (bounded by [`RECOVERY_WAIT`]).
async fn wait_health(server: &TestServer, want: ServingStatus) {
    wait_grpc_health(&server.addr.to_string(), want).await;
}

/// A server whose trail reaches its file through a link to a device that is
/// always full (`/dev/full`); returns it and the link, to repoint later.
async fn server_on_full_disk(dir: &Path, sync: SyncMode, fail_open: bool) -> (TestServer, PathBuf) {
    let link = dir.join("audit.log");
    std::os::unix::fs::symlink("/dev/full", &link).expect("symlink");
    let mut options = audited(&link, sync);
    options.audit.fail_open = fail_open;
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    (server, link)
}

/// Points the symlink `link` at `target`, atomically.
fn repoint(link: &Path, target: &Path) {
    let swap = link.with_extension("swap");
    std::os::unix::fs::symlink(target, &swap).expect("symlink");
    std::fs::rename(&swap, link).expect("swap the link");
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("trail readable")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    lines(path)
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

/// Writes `lines` to a copy and verifies it.
fn verify_copy(dir: &Path, name: &str, lines: &[String]) -> Verdict {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").expect("write copy");
    chain::verify(&[path]).expect("readable")
}

fn broken_at(verdict: &Verdict) -> (Option<u64>, String) {
    match verdict {
        Verdict::Broken { seq, problem, .. } => (*seq, problem.clone()),
        other => panic!("tampering not detected: {other:?}"),
    }
}

#[tokio::test]
async fn every_decision_is_a_chained_record_and_tampering_is_named() {
    let (dir, trail) = trail_dir();
    let server = example_audited(&trail, false).await;
    let mut invoice = with_context_json(
        example(
            "billing-agent",
            Some("bob"),
            "invoices:create",
            "BillingAccount::\"BA-100\"",
        ),
        r#"{"amount_cents": 424242}"#,
    );
    invoice.request_id = "invoice-1".to_owned();
    server.decide(invoice).await.expect("decides");
    server
        .decide(example(
            "support-bot",
            Some("omar"),
            "secrets:read",
            "SystemResource::\"vault\"",
        ))
        .await
        .expect("decides");
    let invalid = server
        .decide(example("support-bot", None, "rm:rf", "Ticket::\"T-1\""))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    // An empty batch has nothing to record, and is answered all the same.
    let empty = server
        .client
        .clone()
        .batch_is_authorized(pb::BatchIsAuthorizedRequest { requests: vec![] })
        .await
        .expect("an empty batch is answered")
        .into_inner();
    assert!(empty.results.is_empty());
    server
        .client
        .clone()
        .batch_is_authorized(pb::BatchIsAuthorizedRequest {
            requests: vec![allow(); 5],
        })
        .await
        .expect("batch");
    for _ in 0..4 {
        server.decide(allow()).await.expect("decides");
    }
    server.shutdown().await;

    // Every decision and attempt, answered ⇒ recorded, in order.
    let recs = records(&trail);
    assert_eq!(recs.len(), 12);
    let decisions: Vec<&str> = recs
        .iter()
        .map(|r| r["decision"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(&decisions[..3], ["allow", "deny", "invalid"]);
    let first = &recs[0];
    assert_eq!(first["request_id"], "invoice-1");
    assert_eq!(first["agent"], "Agent::\"billing-agent\"");
    assert_eq!(first["on_behalf_of"], "User::\"bob\"");
    assert_eq!(first["action"], "Action::\"invoices:create\"");
    assert_eq!(first["resource"], "BillingAccount::\"BA-100\"");
    assert!(first["caller"]
        .as_str()
        .is_some_and(|c| c.starts_with("tcp:127.0.0.1:")));
    assert!(first["policy_version"]
        .as_str()
        .is_some_and(|v| !v.is_empty()));
    assert!(first["agent_side"]["determining_policies"].is_array());
    assert!(first["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    // Context values are redacted by default.
    assert_eq!(first["context"]["amount_cents"], "[redacted]");
    assert!(!lines(&trail).join("\n").contains("424242"));
    assert_eq!(
        recs[1]["agent_side"]["determining_policies"][0],
        "baseline-never-by-default"
    );
    assert_eq!(recs[2]["invalid"]["field"], "action");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64);
    }

    let intact = chain::verify(std::slice::from_ref(&trail)).expect("readable");
    match &intact {
        Verdict::Intact(summary) => {
            assert_eq!(
                (summary.records, summary.first_seq, summary.last_seq),
                (12, Some(0), Some(11))
            );
        }
        other => panic!("a real trail must verify: {other:?}"),
    }

    let original = lines(&trail);
    let copies = dir.path();
    // Edited: a DENY turned into an ALLOW.
    let mut edited = original.clone();
    edited[1] = edited[1].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    let (seq, problem) = broken_at(&verify_copy(copies, "edited", &edited));
    assert_eq!(seq, Some(1));
    assert!(problem.contains("edited"), "{problem}");
    // Deleted.
    let mut deleted = original.clone();
    deleted.remove(5);
    let (seq, problem) = broken_at(&verify_copy(copies, "deleted", &deleted));
    assert_eq!(seq, Some(6));
    assert!(problem.contains("expected seq 5"), "{problem}");
    // Inserted: a copy of a record placed again.
    let mut inserted = original.clone();
    inserted.insert(4, original[3].clone());
    let (seq, _) = broken_at(&verify_copy(copies, "inserted", &inserted));
    assert_eq!(seq, Some(3));
    // Reordered.
    let mut reordered = original.clone();
    reordered.swap(7, 8);
    let (seq, _) = broken_at(&verify_copy(copies, "reordered", &reordered));
    assert_eq!(seq, Some(8));
    // Edited and re-hashed: the record itself verifies, the next one's
    // link does not.
    let mut resealed = original.clone();
    let mut record: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&original[9]).expect("record");
    record.insert("decision".into(), "deny".into());
    let mut head = chain::Head {
        next_seq: 9,
        prev_hash: recs[8]["hash"].as_str().expect("hash").to_owned(),
    };
    resealed[9] = chain::seal(record, &mut head).trim_end().to_owned();
    let (seq, problem) = broken_at(&verify_copy(copies, "resealed", &resealed));
    assert_eq!(seq, Some(10));
    assert!(problem.contains("prev_hash"), "{problem}");
    // Not the form leash writes: whitespace added, a key repeated, bytes
    // that are not UTF-8.
    let mut spaced = original.clone();
    spaced[4] = spaced[4].replacen(',', ", ", 1);
    let (seq, problem) = broken_at(&verify_copy(copies, "spaced", &spaced));
    assert_eq!(seq, Some(4));
    assert!(problem.contains("canonical"), "{problem}");
    let mut doubled = original.clone();
    doubled[4] = doubled[4].replacen('{', "{\"decision\":\"deny\",", 1);
    assert!(matches!(
        verify_copy(copies, "doubled", &doubled),
        Verdict::Broken { .. }
    ));
    let bytes = dir.path().join("bytes");
    let mut raw = (original[..6].join("\n") + "\n").into_bytes();
    raw.extend_from_slice(b"\xff\xfe\n");
    std::fs::write(&bytes, raw).expect("write");
    match chain::verify(&[bytes]).expect("readable") {
        Verdict::Broken { line, problem, .. } => {
            assert_eq!(line, 7);
            assert!(problem.contains("UTF-8"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
    // A torn final line: a crash mid-write, not tampering.
    let torn = dir.path().join("torn");
    let whole = original.join("\n") + "\n";
    std::fs::write(&torn, &whole[..whole.len() - 40]).expect("write");
    match chain::verify(&[torn]).expect("readable") {
        Verdict::TornTail {
            after_seq, summary, ..
        } => {
            assert_eq!(after_seq, Some(10));
            assert_eq!(summary.records, 11);
        }
        other => panic!("a torn tail is its own verdict: {other:?}"),
    }
    // A cut inside a character (`é` is two bytes) is a torn tail too, not
    // bytes that are not UTF-8.
    let cut_in_char = dir.path().join("cut-in-char");
    let mut raw = (original[..6].join("\n") + "\n").into_bytes();
    raw.extend_from_slice("{\"resource\":\"Doc::\\\"r\u{e9}".as_bytes());
    raw.pop();
    std::fs::write(&cut_in_char, raw).expect("write");
    match chain::verify(&[cut_in_char]).expect("readable") {
        Verdict::TornTail { after_seq, .. } => assert_eq!(after_seq, Some(5)),
        other => panic!("a cut inside a character is a torn tail: {other:?}"),
    }
    // A partial line ending a file that is not the newest: leash leaves one
    // only in a file it set aside at restart after that record
    // (`PATH.<seq>.torn`), which `verify` notes (exit 0: the chain is
    // whole); in any other file, or one named for another record, it is
    // text added after the last record, which tools reading the file would
    // take for a record.
    let partial = original[..6].join("\n") + "\n{\"decision\":\"allow\"";
    let rest = original[6..].join("\n") + "\n";
    let next = dir.path().join("next.log");
    std::fs::write(&next, &rest).expect("write");
    let rotated = dir.path().join("trail.log.00000000000000000005");
    std::fs::write(&rotated, &partial).expect("write");
    match chain::verify(&[rotated.clone(), next.clone()]).expect("readable") {
        Verdict::Broken {
            file,
            line,
            problem,
            verified_to,
            ..
        } => {
            assert_eq!((file, line), (rotated.clone(), 7));
            assert!(problem.contains("added"), "{problem}");
            assert_eq!(verified_to.map(|(seq, _)| seq), Some(5));
        }
        other => panic!("text added to a rotated file: {other:?}"),
    }
    assert_eq!(verify_cli(&[], &[rotated, next.clone()]).0, 1);
    let misnamed = dir.path().join("trail.log.00000000000000000004.torn");
    std::fs::write(&misnamed, &partial).expect("write");
    assert!(matches!(
        chain::verify(&[misnamed, next.clone()]).expect("readable"),
        Verdict::Broken { line: 7, .. }
    ));
    let aside = dir.path().join("trail.log.00000000000000000005.torn2");
    std::fs::write(&aside, &partial).expect("write");
    match chain::verify(&[aside.clone(), next.clone()]).expect("readable") {
        Verdict::Intact(summary) => {
            assert_eq!(summary.records, 12);
            assert_eq!(summary.torn_earlier, [(aside.clone(), Some(5))]);
        }
        other => panic!("a file set aside after a crash: {other:?}"),
    }
    let (code, out) = verify_cli(&[], &[aside.clone(), next]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "`{}` ends in a partial record after seq 5",
            aside.display()
        )),
        "{out}"
    );
}

#[tokio::test]
async fn an_unwritable_trail_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The trail reaches its file through a link: first to a device that is
    // always full, then to a real file.
    let (server, link) = server_on_full_disk(dir.path(), SyncMode::Disk, false).await;
    let resp = server.decide(allow()).await.expect("answers");
    assert_eq!(resp.decision, DENY, "an unrecorded decision is a DENY");
    let error = resp.error.expect("says why");
    assert_eq!(error.code, tonic::Code::Unavailable as i32);
    assert!(
        error.message.contains("audit trail unavailable"),
        "{}",
        error.message
    );
    wait_health(&server, ServingStatus::NotServing).await;
    // It stays so while the device is full, whatever the retries do (a
    // stretch of time is the point here, not a wait for a condition).
    tokio::time::sleep(leash::audit::writer::PROBE_INTERVAL * 3).await;
    assert_eq!(health(&server).await, ServingStatus::NotServing as i32);
    // Not ready, but alive: a restart would not mend the disk.
    assert_eq!(
        grpc_health_of(&server.addr.to_string(), "liveness").await,
        ServingStatus::Serving as i32
    );
    let (code, body) = http_get(server.admin_addr, "GET", "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("audit trail"), "{body}");
    let (_, text) = http_get(server.admin_addr, "GET", "/metrics").await;
    assert_eq!(metric(&text, "leash_audit_available"), 0.0);
    assert!(metric(&text, "leash_audit_write_errors_total") >= 1.0);
    // A batch is refused the same way, item by item.
    let batch = server
        .client
        .clone()
        .batch_is_authorized(pb::BatchIsAuthorizedRequest {
            requests: vec![allow(); 2],
        })
        .await
        .expect("answers")
        .into_inner();
    assert!(batch
        .results
        .iter()
        .all(|r| r.decision == DENY && r.error.is_some()));

    // Writing works again: leash notices on its own, without traffic.
    let real = dir.path().join("real.log");
    repoint(&link, &real);
    wait_health(&server, ServingStatus::Serving).await;
    assert_eq!(http_get(server.admin_addr, "GET", "/readyz").await.0, 200);
    let resp = server.decide(allow()).await.expect("answers");
    assert_eq!(resp.decision, ALLOW);
    assert!(resp.error.is_none());
    server.shutdown().await;
    // The trail records the outage itself, then the decision; it verifies.
    let recs = records(&real);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["event"], "audit_unavailable");
    assert!(
        recs[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{recs:?}"
    );
    assert_eq!(
        recs[0]["refused_records"], 3,
        "one decision and a batch of two"
    );
    assert_eq!(recs[1]["decision"], "allow");
    assert!(matches!(
        chain::verify(&[real]).expect("readable"),
        Verdict::Intact(_)
    ));
}

#[tokio::test]
async fn fail_open_answers_when_the_trail_cannot_be_written() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, link) = server_on_full_disk(dir.path(), SyncMode::Disk, true).await;
    let resp = server.decide(allow()).await.expect("answers");
    assert_eq!(resp.decision, ALLOW, "fail-open was chosen");
    assert_eq!(health(&server).await, ServingStatus::Serving as i32);
    // When writing works again, the outage record counts the decision as
    // answered without a record, not as refused.
    let real = dir.path().join("real.log");
    repoint(&link, &real);
    let deadline = tokio::time::Instant::now() + RECOVERY_WAIT;
    while !real.exists() || lines(&real).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trail never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.shutdown().await;
    let recs = records(&real);
    assert_eq!(recs[0]["event"], "audit_unavailable");
    assert_eq!(recs[0]["unrecorded_answered"], 1, "{:?}", recs[0]);
    assert!(recs[0].get("refused_records").is_none(), "{:?}", recs[0]);
}

#[tokio::test]
async fn rotation_and_restarts_continue_one_chain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    let mut decided = 0u64;
    for sync in [SyncMode::Disk, SyncMode::Queued, SyncMode::Disk] {
        let mut options = audited(&trail, sync);
        options.audit.max_file_bytes = 4096;
        let server = TestServer::start(Some(example_snapshot()), options, false).await;
        for _ in 0..15 {
            server.decide(allow()).await.expect("decides");
            decided += 1;
        }
        server.shutdown().await;
    }
    let files = trail_files(dir.path(), &trail);
    assert!(files.len() >= 3, "rotated at 4 KiB: {files:?}");
    match chain::verify(&files).expect("readable") {
        Verdict::Intact(summary) => {
            assert_eq!(summary.records, decided);
            assert_eq!(summary.first_seq, Some(0));
            assert!(!summary.starts_mid_chain);
        }
        other => panic!("rotated, restarted trail must verify: {other:?}"),
    }
    // Without the oldest file the rest still verifies, from the middle.
    match chain::verify(&files[1..]).expect("readable") {
        Verdict::Intact(summary) => assert!(summary.starts_mid_chain),
        other => panic!("{other:?}"),
    }
    // Out of order, it does not.
    let mut swapped = files.clone();
    swapped.swap(0, 1);
    assert!(matches!(
        chain::verify(&swapped).expect("readable"),
        Verdict::Broken { .. }
    ));
}

/// A real trail of `n` decisions in `dir`, rotated at 4 KiB: its files in
/// chain order.
async fn rotated_trail(dir: &Path, n: usize) -> Vec<PathBuf> {
    let trail = dir.join("audit.log");
    let mut options = audited(&trail, SyncMode::Disk);
    options.audit.max_file_bytes = 4096;
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    for _ in 0..n {
        server.decide(allow()).await.expect("decides");
    }
    server.shutdown().await;
    trail_files(dir, &trail)
}

/// `leash audit verify ARGS... FILES...`: exit code and stdout.
fn verify_cli(args: &[&str], files: &[PathBuf]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
        .args(["audit", "verify"])
        .args(args)
        .args(files)
        .output()
        .expect("runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn anchors_and_from_start_catch_a_trail_cut_short_or_rewritten() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = rotated_trail(dir.path(), 30).await;
    assert!(files.len() >= 3, "rotated at 4 KiB: {files:?}");
    let all: Vec<serde_json::Value> = files.iter().flat_map(|f| records(f)).collect();
    assert_eq!(all.len(), 30);
    let anchor = |r: &serde_json::Value| {
        format!(
            "{}:{}",
            r["seq"].as_u64().expect("seq"),
            r["hash"].as_str().expect("hash")
        )
    };
    let head = anchor(&all[29]);
    let middle = anchor(&all[12]);

    // The whole trail reaches every anchor, from its start.
    let (code, out) = verify_cli(
        &["--anchor", &head, "--anchor", &middle, "--from-start"],
        &files,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("30 records"), "{out}");
    // The head verify prints is an anchor as it stands.
    assert!(out.contains(&format!("; head {head}")), "{out}");

    // Records cut from the end: still a valid chain, but short of the head.
    let cut = dir.path().join("cut.log");
    let every: Vec<String> = files.iter().flat_map(|f| lines(f)).collect();
    std::fs::write(&cut, every[..28].join("\n") + "\n").expect("write");
    let shortened = [cut];
    assert_eq!(verify_cli(&[], &shortened).0, 0);
    let (code, out) = verify_cli(&["--anchor", &head], &shortened);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does not reach anchor seq 29") && out.contains("cut from the end"),
        "{out}"
    );

    // A trail rewritten from scratch is a valid chain too, but not the one
    // anchored.
    let other = tempfile::tempdir().expect("temp dir");
    let rewritten = rotated_trail(other.path(), 30).await;
    assert_eq!(verify_cli(&[], &rewritten).0, 0);
    let (code, out) = verify_cli(&["--anchor", &middle], &rewritten);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("(seq 12)") && out.contains("not the anchored one"),
        "{out}"
    );

    // Without the oldest file: noted, or a failure with --from-start; the
    // first link can be anchored by the record before it.
    let later = &files[1..];
    let first = records(&later[0])[0]["seq"].as_u64().expect("seq");
    let (code, out) = verify_cli(&[], later);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("start is not among these files"), "{out}");
    let (code, out) = verify_cli(&["--from-start"], later);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("start at seq {first}")), "{out}");
    let before = anchor(&all[first as usize - 1]);
    assert_eq!(verify_cli(&["--anchor", &before], later).0, 0);
    let wrong = format!("{}:{}", first - 1, "ab".repeat(32));
    let (code, out) = verify_cli(&["--anchor", &wrong], later);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not the anchored hash of seq"), "{out}");
    let (code, out) = verify_cli(&["--anchor", &anchor(&all[0])], later);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("give the older files"), "{out}");

    // An empty trail is not the whole trail, and reaches no anchor.
    let empty = dir.path().join("empty.log");
    std::fs::write(&empty, "").expect("write");
    let (code, out) = verify_cli(&["--from-start"], std::slice::from_ref(&empty));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("hold no records"), "{out}");
    let (code, out) = verify_cli(&["--anchor", &head], &[empty]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("holds no records"), "{out}");
    // A trail ending in a record cut short by a crash, anchored past it:
    // short of the anchor (1), not merely torn (2).
    let torn = dir.path().join("torn.log");
    std::fs::write(&torn, every[..28].join("\n") + "\n" + &every[28][..20]).expect("write");
    assert_eq!(verify_cli(&[], std::slice::from_ref(&torn)).0, 2);
    let (code, out) = verify_cli(&["--anchor", &head], &[torn]);
    assert_eq!(code, 1, "{out}");

    // A malformed anchor is a usage error naming the flag.
    let (code, out) = verify_cli(&["--anchor", "12:xyz"], &files);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("--anchor") && out.contains("64 hex digits"),
        "{out}"
    );
}

/// A `leash serve` process with its audit trail at `trail`; returns it and
/// its gRPC address once its bundle is loaded.
fn spawn_serving(trail: &Path, sync: &str) -> (KillOnDrop, String) {
    spawn_serving_to(trail.as_os_str(), sync, std::process::Stdio::inherit(), &[])
}

/// [`spawn_serving`] with the trail on stdout, a pipe nobody reads until
/// the test says: once the pipe's buffer is full, the trail's write blocks
/// as on a hung disk.
fn spawn_serving_to_pipe(sync: &str, more: &[&str]) -> (KillOnDrop, String) {
    spawn_serving_to("-".as_ref(), sync, std::process::Stdio::piped(), more)
}

fn spawn_serving_to(
    trail: &std::ffi::OsStr,
    sync: &str,
    stdout: std::process::Stdio,
    more: &[&str],
) -> (KillOnDrop, String) {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--audit-sync".as_ref(), sync.as_ref()];
    args.extend(["--audit-log".as_ref(), trail]);
    args.extend(more.iter().map(|m| m.as_ref() as &std::ffi::OsStr));
    serve_process(&args, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_under_load_keeps_every_answered_decision_and_the_chain_goes_on() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const CLIENTS: u64 = 8;
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    let (mut child, addr) = spawn_serving(&trail, "disk");
    let client = leash::check::connect_tcp(&addr).await.expect("connect");
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, answered, stop) = (client.clone(), answered.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match decide_with(&client, allow()).await {
                    Ok(resp) if resp.error.is_none() => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::SeqCst) < 300 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "load never got going"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.0.kill().expect("SIGKILL");
    child.0.wait().expect("reaped");
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let answered = answered.load(Ordering::SeqCst);

    // A clean prefix: intact, or intact up to a record cut short.
    let (summary, torn) = match chain::verify(std::slice::from_ref(&trail)).expect("readable") {
        Verdict::Intact(summary) => (summary, false),
        Verdict::TornTail { summary, .. } => (summary, true),
        broken => panic!("a crash must not break the chain: {broken:?}"),
    };
    // Every answered decision is on disk; at most the ones in flight at
    // the kill were written without being answered.
    assert!(
        summary.records >= answered,
        "{} records < {answered} answered",
        summary.records
    );
    assert!(
        summary.records <= answered + CLIENTS,
        "{} records for {answered} answered",
        summary.records
    );

    // A restart continues the chain from the last good record.
    let (mut child, addr) = spawn_serving(&trail, "disk");
    let client = leash::check::connect_tcp(&addr).await.expect("connect");
    for _ in 0..5 {
        decide_with(&client, allow()).await.expect("decides");
    }
    terminate(&mut child);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p != &trail)
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        usize::from(torn),
        "a torn file is set aside: {files:?}"
    );
    files.push(trail.clone());
    match chain::verify(&files).expect("readable") {
        Verdict::Intact(after) => assert_eq!(after.records, summary.records + 5),
        other => panic!("the chain must go on after a restart: {other:?}"),
    }
}

#[tokio::test]
async fn context_keys_are_kept_in_clear_or_as_a_keyed_hash_when_configured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    let mut options = audited(&trail, SyncMode::Disk);
    options.audit.context_keys = vec!["amount_cents".to_owned()];
    options.audit.hash_context_keys = vec!["recipient".to_owned()];
    options.audit.hash_key = b"a key of sixteen bytes or more".to_vec();
    let server = TestServer::start(Some(example_snapshot()), options, false).await;
    let invoice = || {
        with_context_json(
            example(
                "billing-agent",
                Some("bob"),
                "invoices:create",
                "BillingAccount::\"BA-100\"",
            ),
            r#"{"amount_cents": 1200}"#,
        )
    };
    let email = |customer: &str| {
        with_context_json(
            example(
                "billing-agent",
                Some("bob"),
                "email:send",
                "EmailTemplate::\"invoice-reminder\"",
            ),
            &format!(
                r#"{{"recipient": {{"__entity": {{"type": "Customer", "id": "{customer}"}}}}}}"#
            ),
        )
    };
    server.decide(invoice()).await.expect("decides");
    for customer in ["C-100", "C-100", "C-200"] {
        server.decide(email(customer)).await.expect("decides");
    }
    server.shutdown().await;
    let recs = records(&trail);
    assert_eq!(recs[0]["context"]["amount_cents"], 1200);
    let hashes: Vec<&str> = recs[1..]
        .iter()
        .map(|r| r["context"]["recipient"].as_str().expect("hashed"))
        .collect();
    assert!(hashes
        .iter()
        .all(|h| h.starts_with("hmac-sha256:") && h.len() == 12 + 64));
    // Equal values match across records without being readable.
    assert_eq!(hashes[0], hashes[1]);
    assert_ne!(hashes[1], hashes[2]);
    assert!(!lines(&trail).join("\n").contains("C-100"));
    assert!(matches!(
        chain::verify(&[trail]).expect("readable"),
        Verdict::Intact(_)
    ));
}

/// The approval fingerprint is an unkeyed hash over the request's values:
/// with it, a reader of the trail could confirm a guess of a redacted
/// amount. It is recorded as is only when the record shows every value it
/// covers; else keyed with the hash key; else redacted.
#[tokio::test]
async fn an_approval_fingerprint_is_recorded_only_as_far_as_the_record_shows_its_values() {
    let refund = || {
        with_context_json(
            example(
                "billing-agent",
                Some("bob"),
                "payments:refund",
                "BillingAccount::\"BA-100\"",
            ),
            r#"{"amount_cents": 25000}"#,
        )
    };
    // (clear keys, hash key) -> what the record holds, given the answer's
    // fingerprint and the records' own fingerprints.
    type Expect = fn(&str, &[String]);
    let cases: [(&[&str], &[u8], Expect); 3] = [
        (&[], b"", |_, recorded| {
            assert!(recorded.iter().all(|f| f == "[redacted]"), "{recorded:?}");
        }),
        (&["amount_cents"], b"", |answered, recorded| {
            assert!(recorded.iter().all(|f| f == answered), "{recorded:?}");
        }),
        (
            &[],
            b"a key of sixteen bytes or more",
            |answered, recorded| {
                assert!(
                    recorded[0].starts_with("hmac-sha256:") && recorded[0].len() == 12 + 64,
                    "{recorded:?}"
                );
                assert_eq!(recorded[0], recorded[1], "equal approvals still match");
                assert!(!recorded[0].contains(&answered["sha256:".len()..]));
            },
        ),
    ];
    for (clear, key, expect) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let trail = dir.path().join("audit.log");
        let mut options = audited(&trail, SyncMode::Disk);
        options.audit.context_keys = clear.iter().map(|k| (*k).to_owned()).collect();
        options.audit.hash_key = key.to_vec();
        let server = TestServer::start(Some(example_snapshot()), options, false).await;
        let mut answered = Vec::new();
        for _ in 0..2 {
            let answer = server.decide(refund()).await.expect("decides");
            answered.push(answer.approval.expect("approval required").fingerprint);
        }
        server.shutdown().await;
        assert_eq!(answered[0], answered[1]);
        let recorded: Vec<String> = records(&trail)
            .iter()
            .map(|r| {
                r["approval"]["fingerprint"]
                    .as_str()
                    .expect("fingerprint")
                    .to_owned()
            })
            .collect();
        assert_eq!(recorded.len(), 2);
        expect(&answered[0], &recorded);
        if clear.is_empty() {
            assert!(!lines(&trail)
                .join("\n")
                .contains(&answered[0]["sha256:".len()..]));
        }
    }
}

#[tokio::test]
async fn a_caller_on_the_unix_socket_is_named_by_its_process_and_user() {
    let (_dir, trail) = trail_dir();
    let server = example_audited(&trail, true).await;
    let socket = server.uds.clone().expect("socket");
    // A caller that sends garbage and hangs up costs the others nothing.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut rude = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connects");
        rude.write_all(b"not HTTP/2 at all\r\n\r\n")
            .await
            .expect("writes");
    }
    let mut client = leash::check::connect_uds(socket).await.expect("connects");
    let answer = client
        .is_authorized(allow())
        .await
        .expect("decides")
        .into_inner();
    assert_eq!(answer.decision, pb::Decision::Allow as i32);
    // A batch over the same connection: every decision names the caller.
    let batch = client
        .batch_is_authorized(pb::BatchIsAuthorizedRequest {
            requests: vec![allow(); 100],
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.results.len(), 100);
    server.shutdown().await;
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .expect("own uid");
    let recs = records(&trail);
    assert_eq!(recs.len(), 101);
    let expected = format!("unix:pid={},uid={uid}", std::process::id());
    for record in &recs {
        assert_eq!(record["caller"], expected.as_str());
    }
}

#[test]
fn the_trail_can_go_to_stdout_for_a_log_collector() {
    let (mut child, addr) = serve_process(&["--audit-log", "-"], std::process::Stdio::piped());
    let mut stdout = child.0.stdout.take().expect("stdout");
    for _ in 0..3 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
            .args([
                "check",
                "--addr",
                &addr,
                "--agent",
                "Agent::\"support-bot\"",
            ])
            .args([
                "--user",
                "User::\"omar\"",
                "--action",
                "Action::\"tickets:read\"",
            ])
            .args(["--resource", "Ticket::\"T-1\""])
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(0));
    }
    // To its end: the sidecar closes stdout when it exits.
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut text).expect("read stdout");
        text
    });
    assert!(terminate(&mut child).success());
    let captured_text = reader.join().expect("reader");
    let dir = tempfile::tempdir().expect("temp dir");
    let captured = dir.path().join("stdout.log");
    std::fs::write(&captured, &captured_text).expect("write");
    match chain::verify(&[captured]).expect("readable") {
        Verdict::Intact(summary) => assert_eq!(summary.records, 3),
        other => panic!("stdout carries the same chain: {other:?}"),
    }
}

#[tokio::test]
async fn records_follow_the_path_when_the_file_is_removed() {
    let (dir, trail) = trail_dir();
    let server = example_audited(&trail, false).await;
    server.decide(allow()).await.expect("decides");
    let moved = dir.path().join("moved-away.log");
    std::fs::rename(&trail, &moved).expect("move the file away");
    server.decide(allow()).await.expect("decides");
    server.decide(allow()).await.expect("decides");
    server.shutdown().await;
    // The later records are at the path, continuing the chain.
    let recs = records(&trail);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["seq"], 1);
    assert!(matches!(
        chain::verify(&[moved, trail]).expect("readable"),
        Verdict::Intact(_)
    ));
}

#[tokio::test]
async fn an_outage_ended_by_traffic_is_recorded_before_the_decisions_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, link) = server_on_full_disk(dir.path(), SyncMode::Disk, false).await;
    assert_eq!(
        server.decide(allow()).await.expect("answers").decision,
        DENY
    );
    let real = dir.path().join("real.log");
    repoint(&link, &real);
    // Whichever comes first, this decision or the writer's own retry, the
    // outage is written before any decision after it.
    let resp = server.decide(allow()).await.expect("answers");
    assert_eq!(resp.decision, ALLOW, "{resp:?}");
    server.shutdown().await;
    let recs = records(&real);
    assert_eq!(recs[0]["event"], "audit_unavailable", "{recs:?}");
    assert_eq!(recs[0]["refused_records"], 1);
    assert_eq!(recs.last().expect("a record")["decision"], "allow");
    assert!(matches!(
        chain::verify(&[real]).expect("readable"),
        Verdict::Intact(_)
    ));
}

/// A queued-mode server on a full disk that has answered one decision
/// (`answered-before-the-failure`, whose write then failed) and refused the
/// next, as the trail is known to be unavailable; and the trail's link.
async fn answered_then_refused_on_a_full_disk(dir: &Path) -> (TestServer, PathBuf) {
    let (server, link) = server_on_full_disk(dir, SyncMode::Queued, false).await;
    let mut first = allow();
    first.request_id = "answered-before-the-failure".to_owned();
    assert_eq!(server.decide(first).await.expect("answers").decision, ALLOW);
    wait_health(&server, ServingStatus::NotServing).await;
    let refused = server.decide(allow()).await.expect("answers");
    assert_eq!(refused.decision, DENY);
    (server, link)
}

#[tokio::test]
async fn queued_records_whose_write_failed_are_written_once_it_works() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, link) = answered_then_refused_on_a_full_disk(dir.path()).await;
    let real = dir.path().join("real.log");
    repoint(&link, &real);
    wait_health(&server, ServingStatus::Serving).await;
    server.shutdown().await;
    let recs = records(&real);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["event"], "audit_unavailable");
    assert_eq!(recs[0]["refused_records"], 1);
    assert_eq!(recs[1]["request_id"], "answered-before-the-failure");
    assert!(matches!(
        chain::verify(&[real]).expect("readable"),
        Verdict::Intact(_)
    ));
}

/// A shutdown while writes fail: with the disk back just before it (no
/// wait for health to say so), the answered record and the outage's are
/// written; still full, the run ends in an error that says what the trail
/// is missing, so the process exits non-zero.
#[tokio::test]
async fn a_shutdown_writes_what_is_owed_or_ends_in_an_error() {
    for recovers in [true, false] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (server, link) = answered_then_refused_on_a_full_disk(dir.path()).await;
        let real = dir.path().join("real.log");
        if recovers {
            // No wait for the writer to notice: the shutdown follows at once.
            repoint(&link, &real);
        }
        let ended = server.stop().await;
        if recovers {
            assert!(ended.is_ok(), "{ended:?}");
            let recs = records(&real);
            assert_eq!(recs.len(), 2, "{recs:?}");
            assert_eq!(recs[0]["event"], "audit_unavailable");
            assert_eq!(recs[0]["refused_records"], 1);
            assert_eq!(recs[1]["request_id"], "answered-before-the-failure");
        } else {
            let error = ended
                .expect_err("the trail is missing a record")
                .to_string();
            assert_eq!(
                error,
                "audit trail closed with the records of 1 answered decision and the record of \
                 its outage (1 decision refused) unwritten: writes were failing"
            );
            assert!(!real.exists());
        }
    }
}

/// The trail's files in `dir`, in chain order: rotated and set-aside files
/// by name, then the active one.
fn trail_files(dir: &Path, active: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p != active)
        .collect();
    files.sort();
    files.push(active.to_owned());
    files
}

/// A server on the trail at `path` that answers `n` decisions, then stops.
async fn decide_on(path: &Path, n: usize) {
    let server = TestServer::start(
        Some(example_snapshot()),
        audited(path, SyncMode::Disk),
        false,
    )
    .await;
    for _ in 0..n {
        let resp = server.decide(allow()).await.expect("decides");
        assert!(resp.error.is_none(), "{resp:?}");
    }
    server.shutdown().await;
}

fn append(path: &Path, text: &str) {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open")
        .write_all(text.as_bytes())
        .expect("append");
}

/// The last line of `path` that is a record (lines after it are damage).
fn records_before_damage(path: &Path) -> serde_json::Value {
    lines(path)
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r.get("hash").is_some())
        .expect("a record")
}

#[tokio::test]
async fn restarts_after_repeated_crashes_and_damage_keep_one_chain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    decide_on(&trail, 3).await;
    // Two crashes mid-write at the same point, with no record between.
    append(&trail, r#"{"seq":3,"pre"#);
    decide_on(&trail, 0).await;
    append(&trail, r#"{"seq":3,"pr"#);
    decide_on(&trail, 2).await;
    let files = trail_files(dir.path(), &trail);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "audit.log.00000000000000000002.torn",
            "audit.log.00000000000000000002.torn2",
            "audit.log",
        ]
    );
    // Each set-aside file ends in its partial line; the chain goes on.
    let seqs: Vec<u64> = records(&trail)
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [3, 4]);
    assert!(matches!(
        chain::verify(&files[..1]).expect("readable"),
        Verdict::TornTail { .. }
    ));

    // A complete line that is not a record: set aside too, not written
    // after, and the chain continues from the last record.
    append(&trail, "not a record\n");
    decide_on(&trail, 1).await;
    assert_eq!(records(&trail)[0]["seq"], 5);
    let aside = dir.path().join("audit.log.00000000000000000004.torn");
    assert!(lines(&aside).last().is_some_and(|l| l == "not a record"));
    // So is a line that is JSON but not a record (it used to be taken for
    // the last record, and leash refused to start).
    append(&trail, "{}\n");
    decide_on(&trail, 1).await;
    assert_eq!(records(&trail)[0]["seq"], 6);
    let aside = dir.path().join("audit.log.00000000000000000005.torn");
    assert!(lines(&aside).last().is_some_and(|l| l == "{}"));
    // It links to the last record, not to the line set aside.
    let record_5 = records_before_damage(&aside);
    assert_eq!(records(&trail)[0]["prev_hash"], record_5["hash"]);
    // The damage stays in the set-aside files, so verify stops at the first
    // and names the head before it; anchored there, the files after it
    // verify, up to the next damage, and so on to the end.
    let files = trail_files(dir.path(), &trail);
    let after = |name: &str| {
        files
            .iter()
            .position(|f| f.ends_with(name))
            .expect("set aside")
            + 1
    };
    let head_before = |out: &str| {
        out.split("up to head ")
            .nth(1)
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| panic!("no head before the damage: {out}"))
    };
    let mut anchor: Option<String> = None;
    let mut from = 0;
    for seq in [4u64, 5] {
        let damaged = format!("audit.log.{seq:020}.torn");
        let args = match &anchor {
            Some(head) => vec!["--anchor", head.as_str()],
            None => Vec::new(),
        };
        let (code, out) = verify_cli(&args, &files[from..]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(&damaged), "{out}");
        let head = head_before(&out);
        assert!(head.starts_with(&format!("{seq}:")), "{out}");
        from = after(&damaged);
        anchor = Some(head);
    }
    let head = anchor.expect("the head before the last damage");
    let (code, out) = verify_cli(&["--anchor", &head], &files[from..]);
    assert_eq!(code, 0, "{out}");

    // A move cut short between its link and unlink: the active file is
    // also a rotated one. It is kept under the rotated name only.
    let rotated = dir.path().join("audit.log.00000000000000000006");
    std::fs::hard_link(&trail, &rotated).expect("link");
    decide_on(&trail, 1).await;
    assert_eq!(records(&rotated).len(), 1);
    let seqs: Vec<u64> = records(&trail)
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [7]);
}

/// The records a drained trail holds, once its chain verifies.
fn drained_records(dir: &Path, read: &std::sync::Mutex<Vec<u8>>) -> Vec<serde_json::Value> {
    let path = dir.join("drained.log");
    std::fs::write(&path, &*read.lock().expect("lock")).expect("write");
    assert!(
        matches!(
            chain::verify(std::slice::from_ref(&path)).expect("readable"),
            Verdict::Intact(_)
        ),
        "the trail's chain must verify"
    );
    records(&path)
}

/// Polls `addr`'s health until it is `want` (bounded by
/// [`RECOVERY_WAIT`]): the server flips it just after it answers.
async fn wait_grpc_health(addr: &str, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + RECOVERY_WAIT;
    while grpc_health(addr).await != want as i32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never became {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn grpc_health(addr: &str) -> i32 {
    grpc_health_of(addr, "").await
}

async fn grpc_health_of(addr: &str, service: &str) -> i32 {
    let channel = leash::check::channel_tcp(addr).await.expect("connect");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

/// Asks `r-{n}` until it is answered without an audit error (within
/// [`RECOVERY_WAIT`]): the trail has come back. It must then be an ALLOW.
async fn retry_until_recorded(
    client: &mut pb::authorizer_client::AuthorizerClient<tonic::transport::Channel>,
    n: u64,
) {
    let deadline = tokio::time::Instant::now() + RECOVERY_WAIT;
    loop {
        let r = ask_numbered(client, n).await;
        if r.error.is_none() {
            assert_eq!(r.decision, ALLOW, "{r:?}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The records drained from a stopped sidecar's trail, once the record of
/// `r-{last}` has been read (within [`RECOVERY_WAIT`]).
fn drained_through(
    dir: &Path,
    read: &std::sync::Mutex<Vec<u8>>,
    last: u64,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + RECOVERY_WAIT;
    let id = format!("\"r-{last}\"");
    while !String::from_utf8_lossy(&read.lock().expect("lock")).contains(&id) {
        assert!(
            std::time::Instant::now() < deadline,
            "the last record never arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drained_records(dir, read)
}

/// Stops a queued-mode sidecar and reads its trail through `r-{last}`.
/// SIGKILL would lose what is queued (the queued mode's documented risk):
/// SIGTERM writes the queue first.
fn terminated_and_drained(
    child: &mut KillOnDrop,
    dir: &Path,
    read: &std::sync::Mutex<Vec<u8>>,
    last: u64,
) -> Vec<serde_json::Value> {
    terminate(child);
    drained_through(dir, read, last)
}

/// Asks `r-0`, `r-1`, ... (each an ALLOW) until one is refused with an
/// error, calls after the first `unpaced` 20 ms apart, for at most two
/// minutes: the refused call's number and answer.
async fn ask_until_refused(
    client: &mut pb::authorizer_client::AuthorizerClient<tonic::transport::Channel>,
    unpaced: u64,
) -> (u64, pb::IsAuthorizedResponse) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    loop {
        let r = ask_numbered(client, n).await;
        if r.error.is_some() {
            return (n, r);
        }
        assert_eq!(r.decision, ALLOW, "{r:?}");
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        if n >= unpaced {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n += 1;
    }
}

async fn ask_numbered(
    client: &mut pb::authorizer_client::AuthorizerClient<tonic::transport::Channel>,
    n: u64,
) -> pb::IsAuthorizedResponse {
    client
        .is_authorized(numbered(n))
        .await
        .expect("answers")
        .into_inner()
}

fn numbered(n: u64) -> pb::IsAuthorizedRequest {
    let mut req = allow();
    req.request_id = format!("r-{n}");
    req
}

#[tokio::test]
async fn disk_mode_a_write_stalled_past_the_bound_is_refused_then_its_record_is_marked_late() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = spawn_serving_to_pipe("disk", &[]);
    let pipe = child.0.stdout.take().expect("stdout");
    let mut client = leash::check::connect_tcp(&addr).await.expect("connect");
    // One call at a time until the pipe is full and a write stalls: that
    // call waits out the 10 s bound and is refused.
    let (n, stalled) = ask_until_refused(&mut client, u64::MAX).await;
    assert_eq!(stalled.decision, DENY);
    let message = stalled.error.expect("error").message;
    assert!(
        message.contains("audit trail unavailable") && message.contains("has not completed in 10s"),
        "{message}"
    );
    wait_grpc_health(&addr, ServingStatus::NotServing).await;
    // A call made during the stall waits behind it and is refused too.
    let behind = ask_numbered(&mut client, n + 1).await;
    assert_eq!(behind.decision, DENY, "{behind:?}");
    assert!(behind.error.is_some(), "{behind:?}");

    // The disk answers again: the stalled write completes, and the next
    // decision is recorded after an outage record saying one record before
    // it was written after its caller had been answered DENY, and one was
    // refused.
    let drained_at = chrono::Utc::now();
    let read = drain(pipe);
    let last = n + 2;
    retry_until_recorded(&mut client, last).await;
    wait_grpc_health(&addr, ServingStatus::Serving).await;
    child.0.kill().expect("kill");
    child.0.wait().expect("wait");
    // The reader reaches the pipe's end once the child is gone.
    let recs = drained_through(dir.path(), &read, last);
    let position = |id: &str| {
        recs.iter()
            .position(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no record of {id}"))
    };
    let late = position(&format!("r-{n}"));
    assert_eq!(recs[late]["decision"], "allow");
    let outage = recs
        .iter()
        .position(|r| r["event"] == "audit_unavailable")
        .expect("an outage record");
    assert!(
        late < outage,
        "the late record comes before the outage record"
    );
    assert_eq!(recs[outage]["late_records"], 1, "{}", recs[outage]);
    assert_eq!(recs[outage]["refused_records"], 1, "{}", recs[outage]);
    // It began when the first call was refused, before the write
    // completed and the writer could learn of it.
    let since = recs[outage]["since"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("since");
    assert!(since < drained_at, "{}", recs[outage]);
    assert_eq!(position(&format!("r-{last}")), outage + 1);
    // The call refused behind the stall is not recorded as if allowed.
    let behind = format!("r-{}", n + 1);
    assert!(recs.iter().all(|r| r["request_id"] != behind.as_str()));
    // Every call answered ALLOW before the stall has its record.
    for i in 0..n {
        position(&format!("r-{i}"));
    }
}

#[tokio::test]
async fn queued_mode_a_write_stalled_past_the_bound_refuses_until_it_completes_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = spawn_serving_to_pipe("queued", &[]);
    let pipe = child.0.stdout.take().expect("stdout");
    let mut client = leash::check::connect_tcp(&addr).await.expect("connect");
    // Calls are answered once queued; paced after the first 2,000 (the
    // pipe is full by then), so the queue never fills and what ends them is
    // the write in progress for over 10 s.
    let (n, refused) = ask_until_refused(&mut client, 2_000).await;
    assert_eq!(refused.decision, DENY);
    let message = refused.error.expect("error").message;
    assert!(message.contains("has not completed in 10s"), "{message}");
    wait_grpc_health(&addr, ServingStatus::NotServing).await;

    let read = drain(pipe);
    let last = n + 1;
    retry_until_recorded(&mut client, last).await;
    let recs = terminated_and_drained(&mut child, dir.path(), &read, last);
    // Nothing answered is lost: every call answered ALLOW has its record,
    // the refused one has none, and the outage record counts it.
    let ids: std::collections::HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    for i in 0..n {
        assert!(ids.contains(format!("r-{i}").as_str()), "r-{i} lost");
    }
    let refused_id = format!("r-{n}");
    assert!(
        !ids.contains(refused_id.as_str()),
        "a refused call was recorded"
    );
    let outage = recs
        .iter()
        .find(|r| r["event"] == "audit_unavailable")
        .expect("an outage record");
    assert!(
        outage["refused_records"].as_u64().is_some_and(|c| c >= 1),
        "{outage}"
    );
    // It says why, though the trail had recovered when it was written.
    assert!(
        outage["error"]
            .as_str()
            .is_some_and(|e| e.contains("has not completed in 10s")),
        "{outage}"
    );
}

/// A call still in flight when the drain times out (its record's write is
/// stuck behind an unread pipe) is answered all the same, DENY with the
/// reason, never an unrecorded ALLOW; and as the writer could not finish,
/// the process exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_past_the_drain_timeout_is_answered_deny() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let (mut child, addr) = spawn_serving_to_pipe("disk", &["--drain-timeout", "1"]);
    let _pipe = child.0.stdout.take().expect("stdout");
    let client = leash::check::connect_tcp(&addr).await.expect("connect");
    // One call after another until one hangs: the pipe is full and its
    // record's write blocks.
    let answered = Arc::new(AtomicU64::new(0));
    let counter = answered.clone();
    let calls = tokio::spawn(async move {
        let mut client = client;
        loop {
            let r = ask_numbered(&mut client, counter.load(Ordering::SeqCst)).await;
            if r.decision != ALLOW {
                return r;
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = (u64::MAX, tokio::time::Instant::now());
    loop {
        let now = answered.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, tokio::time::Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no call hung");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last.0 > 0);
    let status = tokio::task::spawn_blocking(move || terminate(&mut child))
        .await
        .expect("waited");
    let in_flight = tokio::time::timeout(Duration::from_secs(60), calls)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(in_flight.decision, DENY, "{in_flight:?}");
    let message = in_flight.error.expect("says why").message;
    assert!(message.contains("audit trail unavailable"), "{message}");
    assert_eq!(status.code(), Some(1), "the writer did not finish");
}

/// A write stuck with nobody waiting on it (queued mode, the calls that
/// filled the pipe all answered): health turns NOT_SERVING all the same
/// once it has been stuck 10 s, and SERVING again when it completes.
#[tokio::test]
async fn a_write_stuck_without_traffic_turns_health_not_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = spawn_serving_to_pipe("queued", &["--audit-queue-size", "65536"]);
    let pipe = child.0.stdout.take().expect("stdout");
    let mut client = leash::check::connect_tcp(&addr).await.expect("connect");
    // More than the pipe holds (about 500 bytes each), each answered once
    // queued; then none.
    for n in 0..400 {
        let r = ask_numbered(&mut client, n).await;
        assert_eq!((r.decision, r.error), (ALLOW, None));
    }
    wait_grpc_health(&addr, ServingStatus::NotServing).await;
    let read = drain(pipe);
    wait_grpc_health(&addr, ServingStatus::Serving).await;
    let recs = terminated_and_drained(&mut child, dir.path(), &read, 399);
    // Nothing answered was lost, and no decision was refused, so there is
    // no outage to record.
    let ids: std::collections::HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 400);
    assert!(recs.iter().all(|r| r["event"] != "audit_unavailable"));
}

#[tokio::test]
async fn queued_mode_a_queue_full_past_the_bound_refuses_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr) = spawn_serving_to_pipe("queued", &["--audit-queue-size", "256"]);
    let pipe = child.0.stdout.take().expect("stdout");
    let client = leash::check::connect_tcp(&addr).await.expect("connect");
    // 64 callers, unpaced: once the pipe is full the write in progress
    // stalls, and the queue's 256 places fill at once, well inside the
    // 10 s that write may take before the trail counts as stalled. What
    // ends the callers is then waiting 10 s for a place.
    let callers: Vec<_> = (0..64u64)
        .map(|k| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let mut allowed = Vec::new();
                let mut n = k * 1_000_000;
                loop {
                    let r = ask_numbered(&mut client, n).await;
                    if let Some(error) = r.error {
                        assert_eq!(r.decision, DENY, "{}", error.message);
                        return (allowed, n, error.message);
                    }
                    assert_eq!(r.decision, ALLOW, "{r:?}");
                    allowed.push(n);
                    assert!(tokio::time::Instant::now() < deadline, "never refused");
                    n += 1;
                }
            })
        })
        .collect();
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for caller in callers {
        let (ok, n, message) = caller.await.expect("caller");
        assert!(
            message.contains("the audit queue has been full for 10s"),
            "{message}"
        );
        allowed.extend(ok);
        refused.push(n);
    }
    assert!(allowed.len() > 256, "{} answered", allowed.len());
    wait_grpc_health(&addr, ServingStatus::NotServing).await;

    // The writer is stuck until the pipe is read: it learns of the outage
    // after this, but the outage began before.
    let drained_at = chrono::Utc::now();
    let read = drain(pipe);
    let last = 99_000_000;
    let mut client = client.clone();
    retry_until_recorded(&mut client, last).await;
    wait_grpc_health(&addr, ServingStatus::Serving).await;
    let recs = terminated_and_drained(&mut child, dir.path(), &read, last);
    // Every call answered ALLOW has its record (those queued when the
    // queue was full included), no refused call has one, and the outage
    // record counts the refused.
    let ids: std::collections::HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    for n in &allowed {
        assert!(ids.contains(format!("r-{n}").as_str()), "r-{n} lost");
    }
    for n in &refused {
        assert!(!ids.contains(format!("r-{n}").as_str()), "r-{n} recorded");
    }
    let outage = recs
        .iter()
        .find(|r| r["event"] == "audit_unavailable")
        .expect("an outage record");
    assert!(
        outage["refused_records"].as_u64().is_some_and(|c| c >= 64),
        "{outage}"
    );
    assert!(
        outage["error"]
            .as_str()
            .is_some_and(|e| e.contains("queue has been full")),
        "{outage}"
    );
    let since = outage["since"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("since");
    assert!(since < drained_at, "{outage}");
}

#[tokio::test]
async fn overlong_references_are_refused_and_recorded_cut() {
    let (_dir, trail) = trail_dir();
    let server = example_audited(&trail, false).await;
    // A four-byte character across the 256-byte cut, and a resource id
    // past the 4,096-byte limit (the request id is refused first).
    let mut req = example(
        "support-bot",
        Some("omar"),
        "tickets:read",
        "Ticket::\"T-1\"",
    );
    req.request_id = format!("{}😀{}", "r".repeat(253), "x".repeat(100));
    req.resource = Some(uid(&format!("Ticket::\"{}\"", "t".repeat(5_000))));
    let refused = server.decide(req).await.expect_err("invalid");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("request_id: longer than 256 bytes"),
        "{}",
        refused.message()
    );
    server.shutdown().await;

    let recs = records(&trail);
    assert_eq!(recs.len(), 1);
    let rec = &recs[0];
    assert_eq!(rec["decision"], "invalid");
    assert_eq!(rec["invalid"]["field"], "request_id");
    assert_eq!(rec["request_id"], format!("{}…(cut)", "r".repeat(253)));
    assert_eq!(
        rec["resource"],
        format!("Ticket::\"{}…(cut)\"", "t".repeat(4_096))
    );
    assert!(matches!(
        chain::verify(std::slice::from_ref(&trail)).expect("readable"),
        Verdict::Intact(_)
    ));
}

/// A field path inside a context attribute names the caller's nested keys
/// (an email as a record key): the answer has it whole, the record only up
/// to the attribute.
#[tokio::test]
async fn a_nested_context_key_in_a_field_path_is_not_recorded() {
    use pb::value::Kind;
    let (_dir, trail) = trail_dir();
    let server = example_audited(&trail, false).await;
    let mut req = example(
        "billing-agent",
        Some("bob"),
        "invoices:create",
        "BillingAccount::\"BA-100\"",
    );
    let bad = pb::Value {
        kind: Some(Kind::Extension(pb::ExtensionValue {
            r#fn: "sqrt".into(),
            arg: "2".into(),
        })),
    };
    req.context_input = Some(pb::is_authorized_request::ContextInput::Context(
        pb::Record {
            fields: [(
                "amount_cents".to_owned(),
                pb::Value {
                    kind: Some(Kind::Record(pb::Record {
                        fields: [("alice@example.com".to_owned(), bad)].into(),
                    })),
                },
            )]
            .into(),
        },
    ));
    let refused = server.decide(req).await.expect_err("invalid");
    assert!(
        refused
            .message()
            .starts_with("context.amount_cents.alice@example.com.fn: "),
        "{}",
        refused.message()
    );
    server.shutdown().await;
    let recs = records(&trail);
    assert_eq!(recs[0]["invalid"]["field"], "context.amount_cents…");
    assert!(!lines(&trail).join("\n").contains("alice@example.com"));
}
