//! Signed approval grants over the real gRPC server: the example bundle plus
//! an approvers file in a temp directory, leash's clock held by the test.
//! The whole flow (APPROVAL_REQUIRED → grant → ALLOW, once), every rejection
//! class, replay against other requests, single use under concurrent
//! retries, key rotation through a reload, the CLI, and malformed approvers
//! files refusing the bundle.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use ed25519_dalek::SigningKey;
use leash::audit::{AuditOptions, AuditTarget};
use leash::engine::Clock;
use leash::grants::{self, Claims};
use leash::proto::v1 as pb;
use leash::server::ServerOptions;

const APPROVAL_REQUIRED: i32 = pb::Decision::ApprovalRequired as i32;
/// leash's time in these tests: 2026-11-23T09:30:00Z.
const NOW: u64 = 1_795_426_200;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// `(kid, key seed)` per approver: dana approves refunds, eve only email.
fn approvers_json(dana: &[(&str, u8)], eve: &[(&str, u8)]) -> String {
    let keys = |ks: &[(&str, u8)]| {
        ks.iter()
            .map(|(kid, seed)| {
                serde_json::json!({"kid": kid, "public_key": grants::public_key_text(&key(*seed))})
            })
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "approvers": [
            {"id": "dana", "keys": keys(dana), "may_approve": ["Action::\"payments:refund\""]},
            {"id": "eve", "keys": keys(eve), "may_approve": ["Action::\"email\""],
             "may_elevate": ["AgentRole::\"ticket-escalation\""]}
        ]
    })
    .to_string()
}

/// The example bundle with approvers, in a temp directory.
fn bundle(dir: &Path) -> (PathBuf, PathBuf) {
    let (policies, schemas) = (dir.join("policies"), dir.join("schemas"));
    copy_dir(&repo_path("policies"), &policies);
    copy_dir(&repo_path("schemas"), &schemas);
    std::fs::write(
        policies.join("finance.approvers.json"),
        approvers_json(&[("dana-1", 1)], &[("eve-1", 2)]),
    )
    .expect("write");
    (policies, schemas)
}

async fn server(dir: &Path, audit: Option<&Path>) -> ReloadingServer {
    let (policies, schemas) = bundle(dir);
    let options = ServerOptions {
        clock: held_clock(),
        audit: match audit {
            Some(path) => AuditOptions {
                target: AuditTarget::File(path.to_owned()),
                ..AuditOptions::default()
            },
            None => AuditOptions::default(),
        },
        ..ServerOptions::default()
    };
    serve(&policies, &schemas, options).await
}

/// The clock leash's decisions read in these tests, held at `NOW`.
fn held_clock() -> Clock {
    Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW))
}

/// Default options with leash's clock held at `NOW`.
fn held_options() -> ServerOptions {
    ServerOptions {
        clock: held_clock(),
        ..ServerOptions::default()
    }
}

/// A server on `policies` and `schemas` with leash's clock held at `NOW`,
/// and that clock, to move.
async fn serve_held(policies: &Path, schemas: &Path) -> (ReloadingServer, Clock) {
    let clock = held_clock();
    let options = ServerOptions {
        clock: clock.clone(),
        ..ServerOptions::default()
    };
    (serve(policies, schemas, options).await, clock)
}

/// A server on `policies` and `schemas` with `options` (whose clock the
/// caller sets, usually `held_clock()`).
async fn serve(policies: &Path, schemas: &Path, options: ServerOptions) -> ReloadingServer {
    ReloadingServer::start_with(
        policies,
        schemas,
        leash::reload::ReloadOptions::default(),
        options,
    )
    .await
}

fn refund(user: &str, account: &str, cents: i64) -> pb::IsAuthorizedRequest {
    with_context_json(
        example(
            "billing-agent",
            Some(user),
            "payments:refund",
            &format!("BillingAccount::\"{account}\""),
        ),
        &format!(r#"{{"amount_cents": {cents}}}"#),
    )
}

/// The Support Bot opening a ticket for C-100 while working for `user`:
/// allowed only in the escalation role.
fn open_ticket(user: &str, grant: Option<&str>) -> pb::IsAuthorizedRequest {
    let mut req = example(
        "support-bot",
        Some(user),
        "tickets:create",
        "Customer::\"C-100\"",
    );
    req.grants.extend(grant.map(str::to_owned));
    req
}

fn with_grant(mut req: pb::IsAuthorizedRequest, token: &str) -> pb::IsAuthorizedRequest {
    req.grants.push(token.to_owned());
    req
}

struct Grant<'a> {
    seed: u8,
    kid: &'a str,
    approver: &'a str,
    fingerprint: &'a str,
    jti: &'a str,
    iat: u64,
    exp: u64,
}

impl Grant<'_> {
    fn token(&self) -> String {
        grants::sign(
            &key(self.seed),
            self.kid,
            &Claims {
                grant: "approve".to_owned(),
                approver: self.approver.to_owned(),
                fingerprint: self.fingerprint.to_owned(),
                agent: String::new(),
                role: String::new(),
                user: String::new(),
                jti: self.jti.to_owned(),
                iat: self.iat,
                exp: self.exp,
            },
        )
        .expect("signs")
    }
}

async fn ask(server: &ReloadingServer, req: pb::IsAuthorizedRequest) -> pb::IsAuthorizedResponse {
    server.decide(req).await.expect("decides")
}

async fn fingerprint_of(server: &ReloadingServer, req: pb::IsAuthorizedRequest) -> String {
    let r = ask(server, req).await;
    assert_eq!(r.decision, APPROVAL_REQUIRED, "{r:?}");
    r.approval.expect("approval").fingerprint
}

/// An approval-gated permit with a rate: APPROVAL_REQUIRED answers do not
/// count against the rate (they allow nothing); a grant's call that the
/// spent rate then refuses gives the grant back, good for a retry once the
/// rate has room.
#[tokio::test]
async fn approvals_do_not_spend_a_rate_and_a_grant_the_rate_refuses_is_given_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = bundle(dir.path());
    let agent_file = policies.join("agents/billing-agent.cedar");
    let text = std::fs::read_to_string(&agent_file).expect("read");
    let gated = "@id(\"billing-agent-refunds-approved\")\n@approval(\"required\")\n";
    assert!(text.contains(gated));
    std::fs::write(
        &agent_file,
        text.replace(gated, &format!("{gated}@rate(\"1/minute\")\n")),
    )
    .expect("write");
    let (server, clock) = serve_held(&policies, &schemas).await;
    let fp = |cents| {
        let server = &server;
        async move { fingerprint_of(server, refund("bob", "BA-100", cents)).await }
    };
    // Asked for approval again and again: nothing is counted.
    let (first, second) = (fp(25_000).await, fp(26_000).await);
    for _ in 0..3 {
        assert_eq!(fp(25_000).await, first);
    }
    let grant = |fingerprint: &str, jti: &str| {
        Grant {
            seed: 1,
            kid: "dana-1",
            approver: "dana",
            fingerprint,
            jti,
            iat: NOW,
            exp: NOW + 600,
        }
        .token()
    };
    let used = ask(
        &server,
        with_grant(refund("bob", "BA-100", 25_000), &grant(&first, "g-first")),
    )
    .await;
    assert_eq!(used.decision, ALLOW, "the rate had room: {used:?}");
    assert_eq!(used.grant.expect("grant").outcome, "used");
    // The rate is spent: the second grant's call is refused, the grant
    // given back.
    let second_grant = grant(&second, "g-second");
    let call = || with_grant(refund("bob", "BA-100", 26_000), &second_grant);
    let refused = ask(&server, call()).await;
    assert_eq!(refused.decision, DENY, "{refused:?}");
    assert_eq!(refused.limited.expect("limited").reason, "rate_limited");
    assert_eq!(refused.grant.expect("grant").outcome, "not_used");
    clock.advance(Duration::from_secs(61));
    let retried = ask(&server, call()).await;
    assert_eq!(retried.decision, ALLOW, "{retried:?}");
    assert_eq!(retried.grant.expect("grant").outcome, "used");
    server.shutdown().await;
}

/// A caller that goes away (its deadline passes) while the record of its
/// grant-using decision waits for room in a full audit queue: the record is
/// written all the same once the trail moves on, so the grant is used with
/// a record that says so, and a retry is refused as reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_caller_went_away_while_its_record_waited_is_recorded_used() {
    let plain = tempfile::tempdir().expect("temp dir");
    let asking = server(plain.path(), None).await;
    let fp = fingerprint_of(&asking, refund("bob", "BA-100", 25_000)).await;
    asking.shutdown().await;

    // The trail on stdout, a pipe unread for now, and a queue of one place.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = bundle(dir.path());
    let (mut child, addr) = serve_process(
        &[
            "--policies".as_ref(),
            policies.as_os_str(),
            "--schemas".as_ref(),
            schemas.as_os_str(),
            "--audit-log".as_ref(),
            "-".as_ref(),
            "--audit-sync".as_ref(),
            "queued".as_ref(),
            "--audit-queue-size".as_ref(),
            "1".as_ref(),
        ],
        std::process::Stdio::piped(),
    );
    let pipe = child.0.stdout.take().expect("stdout");
    let client = leash::check::connect_tcp(&addr).await.expect("connect");
    let within = |limit: Duration, req: pb::IsAuthorizedRequest| {
        let mut client = client.clone();
        async move {
            let mut req = tonic::Request::new(req);
            req.set_timeout(limit);
            match tokio::time::timeout(limit, client.is_authorized(req)).await {
                Ok(Ok(answer)) => Some(answer.into_inner()),
                // The deadline, seen by tonic or by the timer first.
                Ok(Err(status)) if status.code() == tonic::Code::Cancelled => None,
                Ok(Err(status)) => panic!("{status:?}"),
                Err(_) => None,
            }
        }
    };
    // Allowed calls until the pipe is full, the writer's write blocks, the
    // queue's place is taken and a call waits for room (its client gives
    // up after 2 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    while let Some(r) = within(
        Duration::from_secs(2),
        example(
            "support-bot",
            Some("omar"),
            "tickets:read",
            "Ticket::\"T-1\"",
        ),
    )
    .await
    {
        assert_eq!(r.decision, ALLOW, "{r:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trail never stalled"
        );
        n += 1;
    }
    assert!(n > 0);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let token = Grant {
        seed: 1,
        kid: "dana-1",
        approver: "dana",
        fingerprint: &fp,
        jti: "g-gone",
        iat: now,
        exp: now + 600,
    }
    .token();
    let mut granted = with_grant(refund("bob", "BA-100", 25_000), &token);
    granted.request_id = "granted".to_owned();
    assert!(
        within(Duration::from_secs(1), granted.clone())
            .await
            .is_none(),
        "the grant's call waits for room in the queue, and its client gives up"
    );

    // The trail moves on: the record of the grant's use is written.
    let read = drain(pipe);
    let deadline = std::time::Instant::now() + RELOAD_WAIT;
    let record = loop {
        let text = String::from_utf8_lossy(&read.lock().expect("lock")).into_owned();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["request_id"] == "granted");
        if let Some(record) = found {
            break record;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the grant was taken, but no record of its use was written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(record["decision"], "allow", "{record}");
    assert_eq!(record["grant"]["outcome"], "used", "{record}");
    assert_eq!(record["grant"]["grant_id"], "g-gone", "{record}");
    let retry = within(Duration::from_secs(30), granted)
        .await
        .expect("answered");
    assert_eq!(retry.decision, DENY, "{retry:?}");
    assert_eq!(retry.grant.expect("grant").outcome, "grant_reused");
}

#[tokio::test]
async fn a_grant_used_by_a_call_that_could_not_be_recorded_stays_good() {
    // The fingerprint, from a server without a trail on the same bundle.
    let plain = tempfile::tempdir().expect("temp dir");
    let asking = server(plain.path(), None).await;
    let fp = fingerprint_of(&asking, refund("bob", "BA-100", 25_000)).await;
    asking.shutdown().await;

    // The trail reaches its file through a link to a device that is always
    // full, then to a real file.
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("audit.log");
    std::os::unix::fs::symlink("/dev/full", &link).expect("symlink");
    let server = server(dir.path(), Some(&link)).await;
    let token = Grant {
        seed: 1,
        kid: "dana-1",
        approver: "dana",
        fingerprint: &fp,
        jti: "g-unrecorded",
        iat: NOW - 30,
        exp: NOW + 570,
    }
    .token();
    let call = || with_grant(refund("bob", "BA-100", 25_000), &token);
    let unrecorded = ask(&server, call()).await;
    assert_eq!(unrecorded.decision, DENY, "{unrecorded:?}");
    let error = unrecorded.error.expect("says why");
    assert!(
        error.message.contains("audit trail unavailable"),
        "{}",
        error.message
    );
    // Counted as what happened: the grant was given back, not used.
    let (_, metrics) = http_get(server.admin_addr, "GET", "/metrics").await;
    assert_eq!(
        metric_or_zero(&metrics, "leash_grants_total{outcome=\"used\"}"),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "leash_grants_total{outcome=\"not_used\"}"),
        1.0
    );

    let real = dir.path().join("real.log");
    let swap = dir.path().join("swap");
    std::os::unix::fs::symlink(&real, &swap).expect("symlink");
    std::fs::rename(&swap, &link).expect("swap the link");
    // Until leash finds the trail writable again, calls are still refused
    // (and give the grant back each time); then the grant is used, once.
    let deadline = tokio::time::Instant::now() + RELOAD_WAIT;
    let allowed = loop {
        let r = ask(&server, call()).await;
        if r.error.is_none() {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "trail never came back: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(allowed.decision, ALLOW, "{allowed:?}");
    assert_eq!(allowed.grant.expect("grant result").outcome, "used");
    let again = ask(&server, call()).await;
    assert_eq!(
        (again.decision, again.grant.expect("grant result").outcome),
        (DENY, "grant_reused".to_owned())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_approved_request_is_allowed_once_and_every_bad_grant_is_denied_saying_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    let server = server(dir.path(), Some(&trail)).await;

    // The agent asks; leash wants a person's approval.
    let asked = ask(&server, refund("bob", "BA-100", 25_000)).await;
    assert_eq!(asked.decision, APPROVAL_REQUIRED);
    let approval = asked.approval.expect("approval");
    assert_eq!(approval.max_grant_ttl_seconds, 900);
    let fp = approval.fingerprint.as_str();
    let good = |jti: &'static str| Grant {
        seed: 1,
        kid: "dana-1",
        approver: "dana",
        fingerprint: fp,
        jti,
        iat: NOW - 30,
        exp: NOW + 570,
    };

    // A person approves; the agent retries with the grant: ALLOW, once.
    let token = good("g-1").token();
    let allowed = ask(&server, with_grant(refund("bob", "BA-100", 25_000), &token)).await;
    assert_eq!(allowed.decision, ALLOW, "{allowed:?}");
    let used = allowed.grant.expect("grant result");
    assert_eq!(
        (
            used.outcome.as_str(),
            used.grant_id.as_str(),
            used.approver.as_str()
        ),
        ("used", "g-1", "dana")
    );
    assert_eq!(used.expires_at, NOW + 570);
    assert!(allowed.approval.is_none());

    let mut refused = Vec::new();
    let mut expect = |r: pb::IsAuthorizedResponse, outcome: &str| {
        assert_eq!(r.decision, DENY, "{outcome}: {r:?}");
        let grant = r.grant.expect("grant result");
        assert_eq!(grant.outcome, outcome, "{}", grant.detail);
        assert!(r.determining_policies.is_empty());
        refused.push(outcome.to_owned());
    };
    let retry = |token: String| with_grant(refund("bob", "BA-100", 25_000), &token);

    expect(ask(&server, retry(token.clone())).await, "grant_reused");
    let expired = Grant {
        iat: NOW - 700,
        exp: NOW - 100,
        ..good("g-2")
    };
    expect(ask(&server, retry(expired.token())).await, "grant_expired");
    let early = Grant {
        iat: NOW + 600,
        exp: NOW + 900,
        ..good("g-3")
    };
    expect(
        ask(&server, retry(early.token())).await,
        "grant_not_yet_valid",
    );
    let long = Grant {
        exp: NOW + 3600,
        ..good("g-4")
    };
    expect(
        ask(&server, retry(long.token())).await,
        "grant_lifetime_too_long",
    );
    // Expiring before it was issued: no lifetime is valid, and the detail
    // says so (it used to read "lives 0 s").
    let backwards = Grant {
        iat: NOW - 30,
        exp: NOW - 60,
        ..good("g-4b")
    };
    let r = ask(&server, retry(backwards.token())).await;
    let detail = r.grant.as_ref().expect("grant result").detail.clone();
    assert!(detail.contains("at or before it was issued"), "{detail}");
    expect(r, "grant_lifetime_too_long");
    // Signed by another key under dana's kid; and a good grant whose
    // claims were edited after signing.
    let forged = Grant {
        seed: 9,
        ..good("g-5")
    };
    expect(ask(&server, retry(forged.token())).await, "grant_forged");
    let honest = good("g-6").token();
    let mut parts: Vec<&str> = honest.split('.').collect();
    let edited = {
        use base64::Engine as _;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .expect("b64");
        let text = String::from_utf8(claims)
            .expect("utf8")
            .replace("g-6", "g-7");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    };
    parts[1] = &edited;
    expect(ask(&server, retry(parts.join("."))).await, "grant_forged");
    expect(
        ask(&server, retry("not.a-grant".to_owned())).await,
        "grant_forged",
    );
    let unknown = Grant {
        kid: "zed-1",
        ..good("g-8")
    };
    expect(
        ask(&server, retry(unknown.token())).await,
        "grant_unknown_key",
    );
    let eve = Grant {
        seed: 2,
        kid: "eve-1",
        approver: "eve",
        ..good("g-9")
    };
    expect(
        ask(&server, retry(eve.token())).await,
        "grant_unauthorized_approver",
    );

    // A grant for one request replayed against another: a different
    // resource, context or user.
    for other in [
        refund("bob", "BA-200", 25_000),
        refund("bob", "BA-100", 25_001),
        refund("omar", "BA-100", 25_000),
    ] {
        let replay = good("g-10").token();
        let r = ask(&server, with_grant(other, &replay)).await;
        // The detail is logged and recorded: no fingerprint in it (a hash
        // of the request's values would let readers confirm guesses).
        let detail = &r.grant.as_ref().expect("grant result").detail;
        assert!(
            detail.contains("approves another request") && !detail.contains("sha256:"),
            "{detail}"
        );
        expect(r, "grant_wrong_fingerprint");
    }
    // A request the policies deny outright (carol may not refund) never
    // reaches the grant: DENY, and the grant is not looked at.
    let denied = ask(
        &server,
        with_grant(refund("carol", "BA-100", 25_000), &good("g-10").token()),
    )
    .await;
    assert_eq!((denied.decision, denied.grant), (DENY, None));
    assert_eq!(
        refused
            .iter()
            .filter(|o| *o == "grant_wrong_fingerprint")
            .count(),
        3
    );
    // None of the refused grants was spent: a valid one still works.
    let fresh = ask(&server, retry(good("g-10").token())).await;
    assert_eq!(fresh.decision, ALLOW, "{fresh:?}");

    let (_, metrics) = http_get(server.admin_addr, "GET", "/metrics").await;
    assert_eq!(
        metric(&metrics, "leash_grants_total{outcome=\"used\"}"),
        2.0
    );
    assert_eq!(
        metric(&metrics, "leash_grants_total{outcome=\"grant_forged\"}"),
        3.0
    );
    server.shutdown().await;

    let records = verified_audit_records(&trail);
    let used: Vec<_> = records
        .iter()
        .filter(|r| r["grant"]["outcome"] == "used")
        .collect();
    assert_eq!(used.len(), 2);
    assert_eq!(used[0]["decision"], "allow");
    assert_eq!(used[0]["grant"]["approver"], "dana");
    assert_eq!(used[0]["grant"]["grant_id"], "g-1");
    assert_eq!(used[0]["grant"]["expires_at"], NOW + 570);
    let expired: Vec<_> = records
        .iter()
        .filter(|r| r["grant"]["outcome"] == "grant_expired")
        .collect();
    assert_eq!(expired[0]["grant"]["grant_id"], "g-2");
    assert_eq!(expired[0]["decision"], "deny");
}

// Two worker threads and a connection per retry, so the retries are decided
// at the same time, not one after another on the test's thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_with_one_grant_get_exactly_one_allow() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = server(dir.path(), None).await;
    let fp = fingerprint_of(&server, refund("bob", "BA-100", 30_000)).await;
    let token = Grant {
        seed: 1,
        kid: "dana-1",
        approver: "dana",
        fingerprint: &fp,
        jti: "once",
        iat: NOW,
        exp: NOW + 600,
    }
    .token();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let client = leash::check::connect_tcp(&server.addr.to_string())
            .await
            .expect("connect");
        let token = token.clone();
        tasks.spawn(async move {
            let r = decide_with(&client, with_grant(refund("bob", "BA-100", 30_000), &token))
                .await
                .expect("decides");
            (r.decision, r.grant.map(|g| g.outcome).unwrap_or_default())
        });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        outcomes.push(r.expect("task"));
    }
    let allowed = outcomes.iter().filter(|(d, _)| *d == ALLOW).count();
    assert_eq!(allowed, 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|(d, o)| (*d == ALLOW && o == "used") || (*d == DENY && o == "grant_reused")));
    server.shutdown().await;
}

#[tokio::test]
async fn approver_keys_rotate_through_a_reload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = server(dir.path(), None).await;
    let fp = fingerprint_of(&server, refund("bob", "BA-100", 40_000)).await;
    let grant = |seed, kid, jti| {
        Grant {
            seed,
            kid,
            approver: "dana",
            fingerprint: &fp,
            jti,
            iat: NOW,
            exp: NOW + 600,
        }
        .token()
    };
    let try_grant = |token: String| {
        let server = &server;
        async move {
            let r = ask(server, with_grant(refund("bob", "BA-100", 40_000), &token)).await;
            r.grant.expect("grant result").outcome
        }
    };
    assert_eq!(
        try_grant(grant(3, "dana-2", "r-1")).await,
        "grant_unknown_key"
    );
    // The new key is added beside the old one: both work.
    ship_approvers(
        &server,
        dir.path(),
        &[("dana-1", 1), ("dana-2", 3)],
        &[("eve-1", 2)],
    )
    .await;
    assert_eq!(try_grant(grant(3, "dana-2", "r-2")).await, "used");
    assert_eq!(try_grant(grant(1, "dana-1", "r-3")).await, "used");
    // Then the old one is removed: its grants are refused at once.
    ship_approvers(&server, dir.path(), &[("dana-2", 3)], &[("eve-1", 2)]).await;
    assert_eq!(
        try_grant(grant(1, "dana-1", "r-4")).await,
        "grant_unknown_key"
    );
    assert_eq!(try_grant(grant(3, "dana-2", "r-5")).await, "used");
    // Used ids outlive the reload.
    assert_eq!(try_grant(grant(3, "dana-2", "r-2")).await, "grant_reused");

    // An elevation, used again and again, has its verified signature
    // remembered; a reload that takes the key away, or puts another key
    // under the same kid, is still obeyed at once.
    let window = elevation(
        2,
        "eve",
        "Agent::\"support-bot\"",
        "",
        "e-r",
        NOW,
        NOW + 3600,
    );
    let elevate = |token: String| {
        let server = &server;
        async move {
            let r = ask(server, open_ticket("alice", Some(&token))).await;
            (r.decision, r.grant.expect("grant result").outcome)
        }
    };
    for _ in 0..3 {
        assert_eq!(
            elevate(window.clone()).await,
            (ALLOW, "elevated".to_owned())
        );
    }
    ship_approvers(&server, dir.path(), &[("dana-2", 3)], &[("eve-1", 5)]).await;
    assert_eq!(
        elevate(window.clone()).await,
        (DENY, "grant_forged".to_owned())
    );
    ship_approvers(&server, dir.path(), &[("dana-2", 3)], &[("eve-2", 2)]).await;
    assert_eq!(
        elevate(window.clone()).await,
        (DENY, "grant_unknown_key".to_owned())
    );
    server.shutdown().await;
}

/// Writes the approvers file and waits until the sidecar serves it.
async fn ship_approvers(
    server: &ReloadingServer,
    dir: &Path,
    dana: &[(&str, u8)],
    eve: &[(&str, u8)],
) {
    let (policies, schemas) = (dir.join("policies"), dir.join("schemas"));
    std::fs::write(
        policies.join("finance.approvers.json"),
        approvers_json(dana, eve),
    )
    .expect("write");
    server.wait_version(&version_of(&policies, &schemas)).await;
}

fn leash(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
        .args(args)
        .output()
        .expect("runs")
}

#[tokio::test]
async fn the_cli_makes_keys_and_grants_that_leash_accepts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("dana.key");
    let made = leash(&["keygen", "--out", key_file.to_str().expect("utf8")]);
    assert!(made.status.success(), "{made:?}");
    let public = String::from_utf8(made.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert!(public.starts_with("ed25519:"), "{public}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&key_file)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never overwrites a key.
    assert!(
        !leash(&["keygen", "--out", key_file.to_str().expect("utf8")])
            .status
            .success()
    );

    // A key file that names its kid and approver: signing needs only it.
    let named_file = dir.path().join("dana-named.key");
    let named = leash(&[
        "keygen",
        "--out",
        named_file.to_str().expect("utf8"),
        "--kid",
        "dana-named",
        "--approver",
        "dana",
    ]);
    assert!(named.status.success(), "{named:?}");
    assert!(
        String::from_utf8_lossy(&named.stderr).contains("\"kid\":\"dana-named\""),
        "{named:?}"
    );
    let named_public = String::from_utf8(named.stdout)
        .expect("utf8")
        .trim()
        .to_owned();

    // A bundle whose approver keys are the ones just made; the CLI signs
    // with the wall clock, so this server runs on it too.
    let (policies, schemas) = bundle(dir.path());
    let file = serde_json::json!({"approvers": [{
        "id": "dana", "keys": [{"kid": "dana-cli", "public_key": public},
                               {"kid": "dana-named", "public_key": named_public}],
        "may_approve": ["Action::\"billing\""]
    }]});
    std::fs::write(policies.join("finance.approvers.json"), file.to_string()).expect("write");
    let server = serve(&policies, &schemas, ServerOptions::default()).await;
    let fp = fingerprint_of(&server, refund("bob", "BA-100", 12_345)).await;
    let signed = leash(&[
        "grant",
        "approve",
        "--key",
        key_file.to_str().expect("utf8"),
        "--kid",
        "dana-cli",
        "--approver",
        "dana",
        "--fingerprint",
        &fp,
        "--ttl",
        "5m",
        "--id",
        "cli-1",
    ]);
    assert!(signed.status.success(), "{signed:?}");
    let token = String::from_utf8(signed.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let inspected = leash(&["grant", "inspect", &token]);
    let shown = String::from_utf8(inspected.stdout).expect("utf8");
    assert!(
        shown.contains("\"kid\": \"dana-cli\"")
            && shown.contains("\"jti\": \"cli-1\"")
            && shown.contains(&fp),
        "{shown}"
    );
    let r = ask(&server, with_grant(refund("bob", "BA-100", 12_345), &token)).await;
    assert_eq!(r.decision, ALLOW, "{r:?}");
    // `leash grant approve --key … --fingerprint … --ttl …`, as an approver
    // types it, with the names from the key file.
    let fp2 = fingerprint_of(&server, refund("bob", "BA-100", 23_456)).await;
    let short = leash(&[
        "grant",
        "approve",
        "--key",
        named_file.to_str().expect("utf8"),
        "--fingerprint",
        &fp2,
        "--ttl",
        "10m",
    ]);
    assert!(short.status.success(), "{short:?}");
    let token2 = String::from_utf8(short.stdout).expect("utf8");
    let r = ask(
        &server,
        with_grant(refund("bob", "BA-100", 23_456), token2.trim()),
    )
    .await;
    assert_eq!(r.decision, ALLOW, "{r:?}");
    assert_eq!(r.grant.expect("grant").approver, "dana");
    // An elevation grant from the CLI says what it grants.
    let elevated = leash(&[
        "grant",
        "elevate",
        "--key",
        key_file.to_str().expect("utf8"),
        "--kid",
        "dana-cli",
        "--approver",
        "dana",
        "--agent",
        "Agent::\"support-bot\"",
        "--role",
        "AgentRole::\"ticket-escalation\"",
        "--ttl",
        "4h",
    ]);
    assert!(elevated.status.success(), "{elevated:?}");
    let token = String::from_utf8(elevated.stdout).expect("utf8");
    let shown = leash(&["grant", "inspect", token.trim()]);
    let shown = String::from_utf8(shown.stdout).expect("utf8");
    assert!(
        shown.contains("\"grant\": \"elevate\"") && shown.contains("ticket-escalation"),
        "{shown}"
    );
    // Bad input to the CLI is named.
    let approve = |fingerprint: &str| {
        leash(&[
            "grant",
            "approve",
            "--key",
            key_file.to_str().expect("utf8"),
            "--kid",
            "k",
            "--approver",
            "dana",
            "--fingerprint",
            fingerprint,
        ])
    };
    let bad = approve("abc");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--fingerprint"));
    // The right length but not as leash prints it (upper case): it could
    // never match, so it is not signed.
    let bad = approve(&format!("sha256:{}", fp2["sha256:".len()..].to_uppercase()));
    assert!(!bad.status.success(), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--fingerprint: expected `sha256:`"),
        "{bad:?}"
    );
    // A key file without names needs --kid and --approver.
    let unnamed = leash(&[
        "grant",
        "approve",
        "--key",
        key_file.to_str().expect("utf8"),
        "--fingerprint",
        &fp2,
    ]);
    assert!(
        !unnamed.status.success()
            && String::from_utf8_lossy(&unnamed.stderr).contains("--kid: not given"),
        "{unnamed:?}"
    );
    // A file that is not a key file is named, with the line at fault.
    let not_a_key = dir.path().join("notes.txt");
    std::fs::write(&not_a_key, "# mine\nhello\n").expect("write");
    let refused = leash(&[
        "grant",
        "approve",
        "--key",
        not_a_key.to_str().expect("utf8"),
        "--fingerprint",
        &fp2,
    ]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("line 2: expected `kid:`"),
        "{refused:?}"
    );
    server.shutdown().await;
}

#[test]
fn malformed_approvers_files_refuse_the_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = bundle(dir.path());
    let good_key = grants::public_key_text(&key(1));
    for (file, expected) in [
        ("{\"approvers\": [".to_owned(), "not a valid approvers file"),
        (
            serde_json::json!({"approvers": [{"id": "dana", "keys": [{"kid": "k", "public_key": "ed25519:AAAA"}], "may_approve": ["Action::\"payments:refund\""]}]}).to_string(),
            "3 bytes; an Ed25519 public key has 32",
        ),
        (
            serde_json::json!({"approvers": [{"id": "dana", "keys": [{"kid": "k", "public_key": good_key}], "may_approve": ["Action::\"payments:refnud\""]}]}).to_string(),
            "is not an action or action group of the schema",
        ),
        (
            serde_json::json!({"approvers": [{"id": "dana", "keys": [{"kid": "k", "public_key": good_key}], "may_aprove": []}]}).to_string(),
            "unknown field `may_aprove`",
        ),
        (
            serde_json::json!({"approvers": [{"id": "dana", "keys": [], "may_approve": ["Action::\"billing\""]}]}).to_string(),
            "needs at least one key",
        ),
    ] {
        std::fs::write(policies.join("finance.approvers.json"), &file).expect("write");
        let out = leash(&[
            "validate",
            "--policies",
            policies.to_str().expect("utf8"),
            "--schemas",
            schemas.to_str().expect("utf8"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains("finance.approvers.json") && stderr.contains(expected),
            "{file}: {stderr}"
        );
    }
}

/// eve's elevation of `agent` into `role`, for an hour from `NOW`.
fn eve_elevates(agent: &str, role: &str, jti: &str) -> String {
    grants::sign(
        &key(2),
        "eve-1",
        &Claims {
            grant: "elevate".to_owned(),
            approver: "eve".to_owned(),
            fingerprint: String::new(),
            agent: agent.to_owned(),
            role: role.to_owned(),
            user: String::new(),
            jti: jti.to_owned(),
            iat: NOW,
            exp: NOW + 3600,
        },
    )
    .expect("signs")
}

fn elevation(
    seed: u8,
    approver: &str,
    agent: &str,
    user: &str,
    jti: &str,
    iat: u64,
    exp: u64,
) -> String {
    grants::sign(
        &key(seed),
        if seed == 2 { "eve-1" } else { "dana-1" },
        &Claims {
            grant: "elevate".to_owned(),
            approver: approver.to_owned(),
            fingerprint: String::new(),
            agent: agent.to_owned(),
            role: "AgentRole::\"ticket-escalation\"".to_owned(),
            user: user.to_owned(),
            jti: jti.to_owned(),
            iat,
            exp,
        },
    )
    .expect("signs")
}

#[tokio::test]
async fn an_elevation_holds_only_within_its_window_for_its_agent_and_user() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = bundle(dir.path());
    let (server, clock) = serve_held(&policies, &schemas).await;
    // The Support Bot may not open tickets; in the escalation role it may.
    let open = open_ticket;
    let bot = "Agent::\"support-bot\"";
    // Issued two minutes ahead (beyond the 60 s forgiven for clock skew).
    let window = elevation(2, "eve", bot, "", "e-1", NOW + 120, NOW + 120 + 4 * 3600);
    let before = ask(&server, open("alice", Some(&window))).await;
    assert_eq!(before.decision, DENY);
    assert_eq!(before.grant.expect("grant").outcome, "grant_not_yet_valid");
    assert_eq!(ask(&server, open("alice", None)).await.decision, DENY);

    clock.advance(Duration::from_secs(120));
    let during = ask(&server, open("alice", Some(&window))).await;
    assert_eq!(during.decision, ALLOW, "{during:?}");
    let agent_side = during.agent.expect("agent side");
    assert_eq!(
        agent_side.determining_policies,
        ["agent-role-ticket-escalation"]
    );
    let grant = during.grant.expect("grant");
    assert_eq!(
        (grant.outcome.as_str(), grant.approver.as_str()),
        ("elevated", "eve")
    );
    assert_eq!(grant.expires_at, NOW + 120 + 4 * 3600);
    // Not single use: the window is the limit.
    assert_eq!(
        ask(&server, open("alice", Some(&window))).await.decision,
        ALLOW
    );
    // Without the grant, the agent is back to its own permissions.
    assert_eq!(ask(&server, open("alice", None)).await.decision, DENY);

    // Another agent cannot borrow it; one bound to a user holds only for them.
    let other = ask(
        &server,
        with_grant(
            example(
                "onboarding-agent",
                Some("alice"),
                "tickets:read",
                "Ticket::\"T-1\"",
            ),
            &window,
        ),
    )
    .await;
    assert_eq!(
        other.grant.expect("grant").outcome,
        "grant_wrong_fingerprint"
    );
    let for_omar = elevation(2, "eve", bot, "User::\"omar\"", "e-2", NOW, NOW + 3600);
    let r = ask(&server, open("alice", Some(&for_omar))).await;
    assert_eq!(
        (r.decision, r.grant.expect("grant").outcome.as_str()),
        (DENY, "grant_wrong_fingerprint")
    );
    // Dana may approve refunds but not grant roles; windows over 4 h are refused.
    let by_dana = elevation(1, "dana", bot, "", "e-3", NOW, NOW + 3600);
    assert_eq!(
        ask(&server, open("alice", Some(&by_dana)))
            .await
            .grant
            .expect("grant")
            .outcome,
        "grant_unauthorized_approver"
    );
    let too_long = elevation(2, "eve", bot, "", "e-4", NOW, NOW + 5 * 3600);
    assert_eq!(
        ask(&server, open("alice", Some(&too_long)))
            .await
            .grant
            .expect("grant")
            .outcome,
        "grant_lifetime_too_long"
    );

    clock.advance(Duration::from_secs(4 * 3600));
    let after = ask(&server, open("alice", Some(&window))).await;
    assert_eq!(after.decision, DENY);
    assert_eq!(after.grant.expect("grant").outcome, "grant_expired");
    server.shutdown().await;
}

#[tokio::test]
async fn an_elevated_agent_keeps_its_attributes_tags_and_the_roles_ancestors() {
    // The bundle tags the Support Bot as under review and forbids opening
    // tickets to agents so tagged, and to unvetted agents: the role must not
    // lift either, so the elevated agent has to keep its tags and attributes.
    // And the escalation role sits in a restricted one whose members may not
    // change a ticket's status: the agent is in it too while elevated.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = bundle(dir.path());
    let schema_file = schemas.join("support-desk.cedarschema");
    let schema = std::fs::read_to_string(&schema_file).expect("schema");
    let tagged = schema.replacen(
        "  serves_departments: Set<String>,\n};",
        "  serves_departments: Set<String>,\n} tags String;",
        1,
    );
    assert_ne!(tagged, schema, "the schema's Agent declaration moved");
    let tagged = tagged.replacen("entity AgentRole;", "entity AgentRole in [AgentRole];", 1);
    std::fs::write(&schema_file, tagged).expect("write schema");
    let agents_file = policies.join("entities/agents.entities.json");
    let mut agents: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&agents_file).expect("agents"))
            .expect("json");
    let bot = agents
        .as_array_mut()
        .expect("array")
        .iter_mut()
        .find(|e| e["uid"]["id"] == "support-bot")
        .expect("support-bot");
    bot["tags"] = serde_json::json!({"status": "under_review"});
    bot["attrs"]["vetted"] = serde_json::json!(false);
    let list = agents.as_array_mut().expect("array");
    list.push(
        serde_json::json!({"uid": {"type": "AgentRole", "id": "ticket-escalation"},
        "attrs": {}, "parents": [{"type": "AgentRole", "id": "restricted"}]}),
    );
    list.push(
        serde_json::json!({"uid": {"type": "AgentRole", "id": "restricted"},
        "attrs": {}, "parents": []}),
    );
    std::fs::write(&agents_file, agents.to_string()).expect("write agents");
    std::fs::write(
        policies.join("review.cedar"),
        r#"@id("no-new-tickets-under-review")
forbid (principal is Agent, action == Action::"tickets:create", resource)
when { principal.hasTag("status") && principal.getTag("status") == "under_review" };

@id("no-new-tickets-unvetted")
forbid (principal is Agent, action == Action::"tickets:create", resource)
when { !principal.vetted };

@id("restricted-roles-keep-status")
forbid (principal in AgentRole::"restricted", action == Action::"tickets:update_status", resource);
"#,
    )
    .expect("write policy");
    let server = serve(&policies, &schemas, held_options()).await;
    let bot = "Agent::\"support-bot\"";
    let window = elevation(2, "eve", bot, "", "e-tags", NOW, NOW + 3600);
    // Elevated, the bot may read a ticket through the role (the grant works)...
    let read = ask(
        &server,
        with_grant(
            example(
                "support-bot",
                Some("alice"),
                "tickets:read",
                "Ticket::\"T-1\"",
            ),
            &window,
        ),
    )
    .await;
    assert_eq!(read.grant.expect("grant").outcome, "elevated");
    // ...but opening one stays forbidden by both rules.
    let open = ask(&server, open_ticket("alice", Some(&window))).await;
    assert_eq!(open.decision, DENY, "{open:?}");
    assert_eq!(open.grant.expect("grant").outcome, "elevated");
    assert_eq!(
        open.agent.expect("agent side").determining_policies,
        ["no-new-tickets-under-review", "no-new-tickets-unvetted"]
    );
    // The same with an entity the request brings (that set is elevated per
    // request, not kept with the bundle's).
    let brought = ask(
        &server,
        with_grant(
            with_entities_json(
                example(
                    "support-bot",
                    Some("alice"),
                    "tickets:create",
                    "Customer::\"C-900\"",
                ),
                r#"[{"uid": {"type": "Customer", "id": "C-900"},
                     "attrs": {"region": "EMEA", "segment": "enterprise"}, "parents": []}]"#,
            ),
            &window,
        ),
    )
    .await;
    assert_eq!(brought.grant.expect("grant").outcome, "elevated");
    assert_eq!(
        brought.agent.expect("agent side").determining_policies,
        ["no-new-tickets-under-review", "no-new-tickets-unvetted"]
    );
    // The bot may change a status on its own; elevated it is in the
    // restricted role through the escalation role, with or without an
    // entity the request brings.
    let status = |grant: Option<&str>, bring: bool| {
        let mut req = example(
            "support-bot",
            Some("alice"),
            "tickets:update_status",
            "Ticket::\"T-1\"",
        );
        if bring {
            req = with_entities_json(
                req,
                r#"[{"uid": {"type": "Customer", "id": "C-901"},
                     "attrs": {"region": "EMEA", "segment": "smb"}, "parents": []}]"#,
            );
        }
        req.grants.extend(grant.map(str::to_owned));
        ask(&server, req)
    };
    assert_eq!(status(None, false).await.decision, ALLOW);
    assert_eq!(status(None, true).await.decision, ALLOW);
    for bring in [false, true] {
        let r = status(Some(&window), bring).await;
        assert_eq!(r.decision, DENY, "bring {bring}: {r:?}");
        assert_eq!(
            r.agent.expect("agent side").determining_policies,
            ["restricted-roles-keep-status"],
            "bring {bring}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn grant_uses_and_refusals_are_in_the_decisions_span() {
    use leash::bench::collector::SpanCollector;
    use leash::telemetry::{Protocol, TelemetryOptions, TraceOptions};

    let collector = SpanCollector::start(true).await.expect("collector");
    let mut trace = TraceOptions::new(collector.grpc_endpoint(), Protocol::Grpc);
    trace.batch.schedule_delay = Duration::from_millis(20);
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = bundle(dir.path());
    let server = serve(
        &policies,
        &schemas,
        ServerOptions {
            clock: held_clock(),
            telemetry: TelemetryOptions {
                traces: Some(trace),
                ..TelemetryOptions::default()
            },
            ..ServerOptions::default()
        },
    )
    .await;
    let fp = fingerprint_of(&server, refund("bob", "BA-100", 30_000)).await;
    let approval = |jti: &'static str, seed: u8| Grant {
        seed,
        kid: "dana-1",
        approver: "dana",
        fingerprint: &fp,
        jti,
        iat: NOW,
        exp: NOW + 600,
    };
    let retry = |jti, seed| {
        ask(
            &server,
            with_grant(
                refund("bob", "BA-100", 30_000),
                &approval(jti, seed).token(),
            ),
        )
    };
    assert_eq!(retry("s-used", 1).await.decision, ALLOW);
    // Signed with another key than dana-1's: forged.
    assert_eq!(retry("s-forged", 9).await.decision, DENY);
    let window = elevation(
        2,
        "eve",
        "Agent::\"support-bot\"",
        "",
        "s-up",
        NOW,
        NOW + 3600,
    );
    let up = ask(&server, open_ticket("alice", Some(&window))).await;
    assert_eq!(up.decision, ALLOW);
    // An approval used on an elevated request: the span names both.
    let lift = elevation(
        2,
        "eve",
        "Agent::\"billing-agent\"",
        "",
        "s-lift",
        NOW,
        NOW + 3600,
    );
    let lift_again = elevation(
        2,
        "eve",
        "Agent::\"billing-agent\"",
        "",
        "s-lift2",
        NOW,
        NOW + 1800,
    );
    let lifted = with_grant(
        with_grant(refund("bob", "BA-100", 30_000), &lift),
        &lift_again,
    );
    let both = ask(&server, with_grant(lifted, &approval("s-both", 1).token())).await;
    assert_eq!(both.decision, ALLOW, "{both:?}");

    let spans = flushed_spans(&server.server, &collector, 5).await;
    let by_grant = |id: &str| {
        spans
            .iter()
            .find(|s| s.attribute("leash.grant.id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no span for grant {id}"))
    };
    for (id, decision, outcome, approver, expires) in [
        ("s-used", "allow", "used", "dana", NOW + 600),
        ("s-forged", "deny", "grant_forged", "dana", NOW + 600),
        ("s-up", "allow", "elevated", "eve", NOW + 3600),
        ("s-both", "allow", "used", "dana", NOW + 600),
    ] {
        let span = by_grant(id);
        for (key, want) in [
            ("leash.decision", decision.to_owned()),
            ("leash.grant.outcome", outcome.to_owned()),
            ("leash.grant.approver", approver.to_owned()),
            ("leash.grant.expires_at", expires.to_string()),
        ] {
            assert_eq!(span.attribute(key), Some(want), "{id}: {key}");
        }
        let elevated_by = match id {
            "s-up" => Some("s-up".to_owned()),
            "s-both" => Some("s-lift,s-lift2".to_owned()),
            _ => None,
        };
        assert_eq!(span.attribute("leash.elevated_by"), elevated_by, "{id}");
    }
    // The request that asked for approval carries no grant attributes.
    let asked = spans
        .iter()
        .find(|s| s.attribute("leash.decision").as_deref() == Some("approval_required"))
        .expect("the approval request's span");
    assert_eq!(asked.attribute("leash.grant.outcome"), None);
    server.shutdown().await;
}

#[tokio::test]
async fn an_elevated_request_that_brings_entities_sees_every_entity_below_the_agent() {
    // `worker` is in `team`, which is in the agent `lead`. Elevating `lead`
    // into `admin` makes `worker` a member of `admin` too, through `team`,
    // which nothing in the request names. A forbid on documents written by
    // members of `admin` must hold whether or not the request brings an
    // entity of its own.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = empty_bundle_dirs(dir.path());
    std::fs::write(
        schemas.join("s.cedarschema"),
        r#"entity Role;
entity Agent in [Agent, Role];
entity Note;
entity Doc = { author: Agent };
action "read" appliesTo { principal: Agent, resource: Doc };
"#,
    )
    .expect("schema");
    std::fs::write(
        policies.join("p.cedar"),
        r#"@id("read-team-docs")
permit (principal, action == Action::"read", resource) when { resource.author in principal };

@id("admins-docs-stay-closed")
forbid (principal, action == Action::"read", resource) when { resource.author in Role::"admin" };
"#,
    )
    .expect("policies");
    let entity = |ty: &str, id: &str, parents: serde_json::Value| serde_json::json!({"uid": {"type": ty, "id": id}, "attrs": {}, "parents": parents});
    std::fs::write(
        policies.join("e.entities.json"),
        serde_json::json!([
            entity("Role", "staff", serde_json::json!([])),
            entity("Role", "admin", serde_json::json!([])),
            entity("Agent", "lead", serde_json::json!([{"type": "Role", "id": "staff"}])),
            entity("Agent", "team", serde_json::json!([{"type": "Agent", "id": "lead"}])),
            entity("Agent", "worker", serde_json::json!([{"type": "Agent", "id": "team"}])),
            {"uid": {"type": "Doc", "id": "d"}, "attrs": {"author": {"__entity": {"type": "Agent", "id": "worker"}}}, "parents": []},
        ])
        .to_string(),
    )
    .expect("entities");
    std::fs::write(
        policies.join("a.approvers.json"),
        serde_json::json!({"approvers": [{
            "id": "eve", "keys": [{"kid": "eve-1", "public_key": grants::public_key_text(&key(2))}],
            "may_approve": ["Action::\"read\""], "may_elevate": ["Role::\"admin\""]
        }]})
        .to_string(),
    )
    .expect("approvers");
    let server = serve(&policies, &schemas, held_options()).await;
    let token = eve_elevates("Agent::\"lead\"", "Role::\"admin\"", "e-below");
    let read = |grant: Option<&str>, bring: bool| {
        let mut req = request("Agent::\"lead\"", None, "Action::\"read\"", "Doc::\"d\"");
        if bring {
            req = with_entities_json(
                req,
                r#"[{"uid": {"type": "Note", "id": "n"}, "attrs": {}, "parents": []}]"#,
            );
        }
        req.grants.extend(grant.map(str::to_owned));
        ask(&server, req)
    };
    for bring in [false, true] {
        let plain = read(None, bring).await;
        assert_eq!(plain.decision, ALLOW, "bring {bring}: {plain:?}");
        let elevated = read(Some(&token), bring).await;
        assert_eq!(elevated.decision, DENY, "bring {bring}: {elevated:?}");
        assert_eq!(
            elevated.agent.expect("agent side").determining_policies,
            ["admins-docs-stay-closed"],
            "bring {bring}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_cannot_define_the_role_its_elevation_grants() {
    // Were the request to bring `AgentRole::"escalation"` inside `admin`,
    // the elevation into `escalation` would make the agent an admin.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = empty_bundle_dirs(dir.path());
    std::fs::write(
        schemas.join("s.cedarschema"),
        "entity AgentRole in [AgentRole];\nentity Agent in [AgentRole];\nentity Doc;\n\
         action \"read\", \"admin\" appliesTo { principal: Agent, resource: Doc };\n",
    )
    .expect("schema");
    std::fs::write(
        policies.join("p.cedar"),
        "@id(\"esc\")\npermit (principal in AgentRole::\"escalation\", action == Action::\"read\", resource);\n\
         @id(\"adm\")\npermit (principal in AgentRole::\"admin\", action == Action::\"admin\", resource);\n",
    )
    .expect("policies");
    std::fs::write(
        policies.join("e.entities.json"),
        r#"[{"uid": {"type": "Agent", "id": "bot"}, "attrs": {}, "parents": []}]"#,
    )
    .expect("entities");
    std::fs::write(
        policies.join("a.approvers.json"),
        serde_json::json!({"approvers": [{
            "id": "eve", "keys": [{"kid": "eve-1", "public_key": grants::public_key_text(&key(2))}],
            "may_elevate": ["AgentRole::\"escalation\""]
        }]})
        .to_string(),
    )
    .expect("approvers");
    let server = serve(&policies, &schemas, held_options()).await;
    let token = eve_elevates("Agent::\"bot\"", "AgentRole::\"escalation\"", "e-role");
    let ask_for = |action: &str, grant: bool, bring: bool| {
        let mut req = request(
            "Agent::\"bot\"",
            None,
            &format!("Action::\"{action}\""),
            "Doc::\"d\"",
        );
        if bring {
            req = with_entities_json(
                req,
                r#"[{"uid": {"type": "AgentRole", "id": "escalation"}, "attrs": {}, "parents": [{"type": "AgentRole", "id": "admin"}]}]"#,
            );
        }
        if grant {
            req.grants.push(token.clone());
        }
        req
    };
    // The elevation does what it grants, and no more.
    assert_eq!(
        ask(&server, ask_for("read", true, false)).await.decision,
        ALLOW
    );
    assert_eq!(
        ask(&server, ask_for("admin", true, false)).await.decision,
        DENY
    );
    let refused = server
        .decide(ask_for("admin", true, true))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "entities_json[0]: entity `AgentRole::\"escalation\"` is a role this request's elevation \
         grant puts the agent in; a request may not define it (its parents would become the \
         agent's)"
    );
    // Without the grant the same entity is only a role the agent is not in.
    assert_eq!(
        ask(&server, ask_for("admin", false, true)).await.decision,
        DENY
    );
    server.shutdown().await;
}

#[tokio::test]
async fn every_approval_grant_is_checked_before_one_is_used_and_ids_are_each_approvers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = server(dir.path(), None).await;
    let fp = fingerprint_of(&server, refund("bob", "BA-100", 25_000)).await;
    let by_dana = |jti: &'static str| Grant {
        seed: 1,
        kid: "dana-1",
        approver: "dana",
        fingerprint: &fp,
        jti,
        iat: NOW - 30,
        exp: NOW + 570,
    };
    let good = by_dana("d-1").token();
    // A bad grant after a good one denies as it does before it, and the
    // good one is not used up.
    let mut forged = by_dana("d-2").token();
    forged.push('A');
    for order in [[&good, &forged], [&forged, &good]] {
        let mut req = refund("bob", "BA-100", 25_000);
        req.grants = order.iter().map(|t| (*t).clone()).collect();
        let r = ask(&server, req).await;
        assert_eq!(r.decision, DENY, "{r:?}");
        assert_eq!(r.grant.expect("grant result").outcome, "grant_forged");
    }
    // A grant without an id is not a leash grant.
    let r = ask(
        &server,
        with_grant(refund("bob", "BA-100", 25_000), &by_dana("").token()),
    )
    .await;
    let grant = r.grant.expect("grant result");
    assert_eq!(
        (r.decision, grant.outcome.as_str()),
        (DENY, "grant_forged"),
        "{}",
        grant.detail
    );

    // eve uses the id `shared` on an email approval; dana's grant of the
    // same id is still good: ids are each approver's own.
    let draft = with_context_json(
        example(
            "billing-agent",
            Some("bob"),
            "email:send",
            "EmailTemplate::\"promo-draft\"",
        ),
        r#"{"recipient": {"__entity": {"type": "Customer", "id": "C-100"}}}"#,
    );
    let email_fp = fingerprint_of(&server, draft.clone()).await;
    let by_eve = Grant {
        seed: 2,
        kid: "eve-1",
        approver: "eve",
        fingerprint: &email_fp,
        jti: "shared",
        iat: NOW - 30,
        exp: NOW + 570,
    };
    assert_eq!(
        ask(&server, with_grant(draft, &by_eve.token()))
            .await
            .decision,
        ALLOW
    );
    let shared = by_dana("shared").token();
    let r = ask(
        &server,
        with_grant(refund("bob", "BA-100", 25_000), &shared),
    )
    .await;
    assert_eq!(r.decision, ALLOW, "{r:?}");
    let r = ask(&server, with_grant(refund("bob", "BA-100", 25_000), &good)).await;
    assert_eq!(
        r.decision, ALLOW,
        "the good grant was not used by the refused calls: {r:?}"
    );
    // A used grant denies wherever it sits, and a fresh one beside it is
    // not used up.
    let fresh = by_dana("d-3").token();
    for order in [[&fresh, &good], [&good, &fresh]] {
        let mut req = refund("bob", "BA-100", 25_000);
        req.grants = order.iter().map(|t| (*t).clone()).collect();
        let r = ask(&server, req).await;
        let grant = r.grant.expect("grant result");
        assert_eq!(
            (r.decision, grant.outcome.as_str(), grant.grant_id.as_str()),
            (DENY, "grant_reused", "d-1"),
            "{}",
            grant.detail
        );
    }
    let r = ask(&server, with_grant(refund("bob", "BA-100", 25_000), &fresh)).await;
    assert_eq!(r.decision, ALLOW, "{r:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_grant_used_before_a_restart_stays_used() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    let first = server(dir.path(), Some(&trail)).await;
    let fp = fingerprint_of(&first, refund("bob", "BA-100", 25_000)).await;
    let token = Grant {
        seed: 1,
        kid: "dana-1",
        approver: "dana",
        fingerprint: &fp,
        jti: "before-restart",
        iat: NOW - 30,
        exp: NOW + 570,
    }
    .token();
    let call = || with_grant(refund("bob", "BA-100", 25_000), &token);
    assert_eq!(ask(&first, call()).await.decision, ALLOW);
    first.shutdown().await;

    // A new sidecar on the same trail: the trail says the grant was used.
    let second = server(dir.path(), Some(&trail)).await;
    let again = ask(&second, call()).await;
    assert_eq!(
        (again.decision, again.grant.expect("grant result").outcome),
        (DENY, "grant_reused".to_owned())
    );
    second.shutdown().await;

    // Without the trail's word (another file), it would have been taken.
    let elsewhere = dir.path().join("other.log");
    let third = server(dir.path(), Some(&elsewhere)).await;
    assert_eq!(ask(&third, call()).await.decision, ALLOW);
    third.shutdown().await;
}

#[tokio::test]
async fn an_approval_used_on_an_elevated_request_is_recorded_with_every_elevation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.log");
    let server = server(dir.path(), Some(&trail)).await;
    // The Billing Agent elevated twice by eve (the same role, two grants;
    // one of them presented twice), asking for a refund dana must approve.
    let billing = "Agent::\"billing-agent\"";
    let first = elevation(2, "eve", billing, "", "e-first", NOW, NOW + 3600);
    let second = elevation(2, "eve", billing, "", "e-second", NOW, NOW + 1800);
    // Another grant under the first one's id (reissued with a shorter
    // window): a grant of its own, recorded too.
    let reissued = elevation(2, "eve", billing, "", "e-first", NOW, NOW + 900);
    let elevated = || {
        let mut req = refund("bob", "BA-100", 25_000);
        req.grants = vec![
            first.clone(),
            second.clone(),
            first.clone(),
            reissued.clone(),
        ];
        req
    };
    fn ids(r: &pb::IsAuthorizedResponse) -> Vec<(&str, &str, u64)> {
        r.elevated_by
            .iter()
            .map(|g| (g.grant_id.as_str(), g.outcome.as_str(), g.expires_at))
            .collect()
    }
    let both = [
        ("e-first", "elevated", NOW + 3600),
        ("e-second", "elevated", NOW + 1800),
        ("e-first", "elevated", NOW + 900),
    ];
    let asked = ask(&server, elevated()).await;
    assert_eq!(asked.decision, APPROVAL_REQUIRED, "{asked:?}");
    assert_eq!(ids(&asked), both);
    // With no approval yet, the first elevation is the grant shown.
    assert_eq!(asked.grant.as_ref().expect("grant").grant_id, "e-first");
    let fp = asked.approval.expect("approval").fingerprint;

    let approval = Grant {
        seed: 1,
        kid: "dana-1",
        approver: "dana",
        fingerprint: &fp,
        jti: "a-refund",
        iat: NOW,
        exp: NOW + 600,
    }
    .token();
    let approved = ask(&server, with_grant(elevated(), &approval)).await;
    assert_eq!(approved.decision, ALLOW, "{approved:?}");
    let used = approved.grant.as_ref().expect("grant");
    assert_eq!(
        (used.grant_id.as_str(), used.outcome.as_str()),
        ("a-refund", "used")
    );
    assert_eq!(ids(&approved), both);
    let again = ask(&server, with_grant(elevated(), &approval)).await;
    assert_eq!(
        (
            again.decision,
            again.grant.as_ref().expect("grant").outcome.as_str()
        ),
        (DENY, "grant_reused")
    );
    assert_eq!(ids(&again), both);
    // Without elevations, nothing is listed.
    let plain = ask(&server, refund("bob", "BA-100", 25_000)).await;
    assert!(
        plain.elevated_by.is_empty() && plain.grant.is_none(),
        "{plain:?}"
    );
    // Each grant is counted once per decision: three elevations in each of
    // three, the approval used once and refused once.
    let (_, metrics) = http_get(server.admin_addr, "GET", "/metrics").await;
    for (outcome, count) in [("elevated", 9.0), ("used", 1.0), ("grant_reused", 1.0)] {
        let series = format!("leash_grants_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(&metrics, &series), count, "{series}");
    }
    server.shutdown().await;

    // The trail keeps the approval and both elevations of each decision.
    let records = verified_audit_records(&trail);
    assert_eq!(records.len(), 4, "{records:?}");
    let elevations = |r: &serde_json::Value| {
        r["elevated_by"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|g| {
                        format!(
                            "{}/{}/{}",
                            g["approver"].as_str().unwrap_or("?"),
                            g["grant_id"].as_str().unwrap_or("?"),
                            g["outcome"].as_str().unwrap_or("?")
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let recorded_both = [
        "eve/e-first/elevated",
        "eve/e-second/elevated",
        "eve/e-first/elevated",
    ];
    for (record, decision, grant, outcome) in [
        (&records[0], "approval_required", "e-first", "elevated"),
        (&records[1], "allow", "a-refund", "used"),
        (&records[2], "deny", "a-refund", "grant_reused"),
    ] {
        assert_eq!(record["decision"], decision, "{record}");
        assert_eq!(record["grant"]["grant_id"], grant, "{record}");
        assert_eq!(record["grant"]["outcome"], outcome, "{record}");
        assert_eq!(elevations(record), recorded_both, "{record}");
    }
    assert!(records[1]["elevated_by"][0]["detail"]
        .as_str()
        .is_some_and(|d| d.contains("AgentRole::\"ticket-escalation\"")));
    assert_eq!(records[3].get("elevated_by"), None, "{}", records[3]);
}

#[tokio::test]
async fn elevated_requests_are_decided_alike_with_and_without_the_index() {
    // A forbid the agent reaches only through the role an elevation puts it
    // in: the index must look the agent's ancestors up in the elevated
    // entities, or it would leave the forbid out and allow.
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = bundle(dir.path());
    std::fs::write(
        policies.join("escalated-read.cedar"),
        "@id(\"escalated-may-not-read-t1\")\n\
         forbid (principal in AgentRole::\"ticket-escalation\", \
         action == Action::\"tickets:read\", resource == Ticket::\"T-1\");\n",
    )
    .expect("write");
    let serve_with = |policy_index: bool| {
        ReloadingServer::start_with(
            &policies,
            &schemas,
            leash::reload::ReloadOptions {
                policy_index,
                ..Default::default()
            },
            held_options(),
        )
    };
    let indexed = serve_with(true).await;
    let full = serve_with(false).await;
    let bot = "Agent::\"support-bot\"";
    let window = elevation(2, "eve", bot, "", "e-index", NOW, NOW + 3600);
    let read = |grant: Option<&str>| {
        let mut req = example(
            "support-bot",
            Some("omar"),
            "tickets:read",
            "Ticket::\"T-1\"",
        );
        req.grants.extend(grant.map(str::to_owned));
        req
    };
    let cases = [
        (read(None), ALLOW, ""),
        (read(Some(&window)), DENY, "escalated-may-not-read-t1"),
        (
            open_ticket("omar", Some(&window)),
            ALLOW,
            "agent-role-ticket-escalation",
        ),
        (open_ticket("omar", None), DENY, ""),
    ];
    for (i, (mut req, want, policy)) in cases.into_iter().enumerate() {
        req.request_id = format!("case-{i}");
        let a = ask(&indexed, req.clone()).await;
        let b = ask(&full, req).await;
        assert_eq!(a, b, "case {i}: the index changed the answer");
        assert_eq!(a.decision, want, "case {i}: {a:?}");
        if !policy.is_empty() {
            let agent = a.agent.expect("agent side");
            assert!(
                agent.determining_policies.iter().any(|p| p == policy),
                "case {i}: {agent:?}"
            );
        }
    }
    indexed.shutdown().await;
    full.shutdown().await;
}
