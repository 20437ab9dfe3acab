//! The `leash` binary: parses the command line and hands off to the library.
//! Exit codes: 0 success/allow, 1 failure/invalid bundle, 2 deny (`check`;
//! `status`: the last change was refused), 3 approval required (`check`),
//! 64 bad configuration.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use leash::bundle::Snapshot;
use leash::config::{
    AuditArgs, AuditCommand, BenchArgs, BenchCommand, BenchFloorArgs, CheckArgs, Cli, Command,
    GenerateArgs, LogFormat, ServeArgs, StatusArgs, ValidateArgs,
};
use leash::proto::v1::Decision;
use leash::reload::Reloader;
use leash::server::{bind_admin, bind_health, bind_tcp, bind_uds, Server};
use leash::telemetry::log_writer::{FlushOnExit, QueuedStderr};
use tracing::error;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// mimalloc: the decision path allocates many small, short-lived values
/// (Cedar's expressions and values), where it costs less than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and the version are answers (stdout, 0). A usage mistake
            // exits 64 like every other bad setting: clap's own 2 would read
            // as DENY from `check` and as a partial trail from `audit verify`.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Validate(args)) => validate(&args),
        Some(Command::Check(args)) => check(&args),
        Some(Command::Status(args)) => status(&args),
        Some(Command::Audit(args)) => audit(&args),
        Some(Command::Keygen(args)) => keygen(&args),
        Some(Command::Grant(args)) => grant(&args),
        Some(Command::Bench(args)) => bench(&args),
        Some(Command::BenchFloor(args)) => bench_floor(&args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// The multi-threaded runtime with `workers` threads, or one per CPU the
/// process may use (std's count, which honours affinity and cgroup quotas).
/// Set explicitly either way: tokio would otherwise read
/// `TOKIO_WORKER_THREADS` and panic on a value it cannot parse.
fn runtime_with(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(problems) => {
            for p in problems {
                eprintln!("error: {p}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Held to the end of `serve`: dropping it writes out queued log lines.
    let _logs = init_logging(config.log_format, &config.log);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let result = runtime_with(config.worker_threads).and_then(|rt| {
        let served = rt.block_on(serve_async(config));
        // A blocking task may still be stamping a hung network file system;
        // exiting must not wait for it.
        rt.shutdown_timeout(std::time::Duration::from_secs(1));
        served
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_async(config: leash::config::ServeConfig) -> anyhow::Result<()> {
    // What this sidecar was sized to, for whoever reads its first lines.
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "starting"
    );
    // Handled from here on: a signal's default action would end the process
    // on the spot (during the bind, the used-grants scan or a long first
    // load), leaving the socket file and the queued log lines behind.
    let shutdown = shutdown_signal();
    // SIGHUP's default action ends the process too; a reload request sent
    // at startup (a sync tool's hook) must not.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let mut listeners = Vec::new();
    if let Some(addr) = config.tcp {
        listeners.push(bind_tcp(addr).await?);
    }
    if let Some(path) = &config.uds {
        listeners.push(bind_uds(path)?);
    }
    if let Some(addr) = config.admin {
        listeners.push(bind_admin(addr).await?);
    }
    if let Some(addr) = config.health {
        listeners.push(bind_health(addr).await?);
    }
    let server = Arc::new(Server::new(config.options.clone()).await?);
    let reloader = Reloader::new(server.clone(), config.bundle.clone(), config.reload);

    // Load off the runtime threads; serve meanwhile so that health checks
    // see NOT_SERVING rather than a refused connection.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let serving = async {
        let served = server.run(listeners, stop(stop_rx.clone())).await;
        // A listener failure ends the reloader too.
        let _ = stop_tx.send(true);
        served
    };
    let working = async {
        let hangups = forward_hangups(reloader.clone(), hangups);
        let mut shutdown = std::pin::pin!(shutdown);
        let loaded = tokio::select! {
            loaded = reloader.load_initial() => Some(loaded),
            () = &mut shutdown => None,
        };
        match loaded {
            None => {
                tracing::info!("shutdown requested before the bundle loaded; stopping");
                hangups.abort();
                let _ = stop_tx.send(true);
                return Ok(());
            }
            Some(Err(bundle_error)) => {
                hangups.abort();
                eprint!("{}", bundle_error.render());
                let _ = stop_tx.send(true);
                return Err(anyhow::anyhow!("{bundle_error}; not serving"));
            }
            Some(Ok(())) => {}
        }
        tokio::select! {
            () = &mut shutdown => {}
            () = reloader.clone().run(stop(stop_rx.clone())) => {}
        }
        hangups.abort();
        let _ = stop_tx.send(true);
        Ok(())
    };
    let (served, worked) = tokio::join!(serving, working);
    worked?;
    served.map_err(Into::into)
}

/// SIGHUP forces a reload, whether or not a change was seen; `hangups` was
/// registered at the start of serve, so none since is missed.
fn forward_hangups(
    reloader: Arc<Reloader>,
    hangups: std::io::Result<tokio::signal::unix::Signal>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangups = match hangups {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; reloads come from watching only");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the policy bundle");
            reloader.force();
        }
    })
}

/// Completes on SIGTERM or SIGINT. Both handlers are registered before it
/// returns, so a signal from then on is never handled by its default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = [SignalKind::terminate(), SignalKind::interrupt()].map(|kind| {
        signal(kind)
            .inspect_err(|e| {
                tracing::warn!(error = %e, signal = ?kind, "cannot handle a shutdown signal");
            })
            .ok()
    });
    async move {
        let [term, int] = handlers;
        // A handler that could not be registered never fires (it does not
        // count as a signal received).
        let received = |handler: Option<tokio::signal::unix::Signal>| async move {
            match handler {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = received(term) => {}
            () = received(int) => {}
        }
    }
}

/// Logs go to stderr through a queue, so a slow log reader never holds up a
/// decision (see `telemetry::log_writer`).
fn init_logging(format: LogFormat, filter: &str) -> Option<FlushOnExit> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
        LogFormat::Json => true,
    };
    let (writer, flush) = match QueuedStderr::start() {
        Ok((writer, flush)) => {
            if json {
                leash::telemetry::log_writer::set_json_lines(&writer);
            }
            (BoxMakeWriter::new(writer), Some(flush))
        }
        Err(e) => {
            eprintln!("warning: cannot start the log writer thread ({e}); logging directly");
            (BoxMakeWriter::new(std::io::stderr), None)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Auto if terminal => builder.init(),
        LogFormat::Json | LogFormat::Auto => builder.json().flatten_event(true).init(),
    }
    flush
}

fn keygen(args: &leash::config::KeygenArgs) -> ExitCode {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let result = (|| -> anyhow::Result<String> {
        let key = leash::grants::generate_key()
            .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&args.out)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                    "{} exists; refusing to overwrite a key (remove it, or choose another --out)",
                    args.out.display()
                ),
                _ => anyhow::anyhow!("{}: {e}", args.out.display()),
            })?;
        file.write_all(
            leash::grants::key_file_text(&key, args.kid.as_deref(), args.approver.as_deref())
                .as_bytes(),
        )?;
        file.sync_all()?;
        Ok(leash::grants::public_key_text(&key))
    })();
    match result {
        Ok(public) => {
            println!("{public}");
            eprintln!(
                "private key written to {} (mode 0600); put the line above in an approvers \
                 file's `public_key`",
                args.out.display()
            );
            if let (Some(kid), Some(approver)) = (&args.kid, &args.approver) {
                let entry = serde_json::json!({
                    "id": approver,
                    "keys": [{"kid": kid, "public_key": public}],
                    "may_approve": ["Action::\"…\""],
                });
                eprintln!("an approvers file entry for it: {entry}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn grant(args: &leash::config::GrantArgs) -> ExitCode {
    use leash::config::GrantCommand;
    let result = match &args.command {
        GrantCommand::Approve {
            key,
            kid,
            approver,
            fingerprint,
            ttl,
            id,
        } => {
            let digits = fingerprint.strip_prefix("sha256:").unwrap_or_default();
            // Lowercase, as leash prints it: anything else never matches.
            if digits.len() != 64 || !digits.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                Err(anyhow::anyhow!(
                    "--fingerprint: expected `sha256:` and 64 lowercase hex digits, as leash answered"
                ))
            } else {
                sign_grant(
                    key,
                    kid.as_deref(),
                    approver.as_deref(),
                    ttl,
                    leash::grants::Claims {
                        grant: "approve".to_owned(),
                        // Filled in from --approver or the key file.
                        approver: String::new(),
                        fingerprint: fingerprint.clone(),
                        agent: String::new(),
                        role: String::new(),
                        user: String::new(),
                        jti: id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                        iat: 0,
                        exp: 0,
                    },
                )
            }
        }
        GrantCommand::Elevate {
            key,
            kid,
            approver,
            agent,
            role,
            user,
            ttl,
            id,
        } => (|| {
            let uid = |flag: &str, text: &str| -> anyhow::Result<String> {
                let example = match flag {
                    "--agent" => "Agent::\"support-bot\"",
                    "--user" => "User::\"alice\"",
                    _ => "AgentRole::\"ticket-escalation\"",
                };
                text.parse::<cedar_policy::EntityUid>()
                    .map(|u| u.to_string())
                    .map_err(|_| anyhow::anyhow!("{flag}: `{text}` is not an entity uid such as `{example}`"))
            };
            sign_grant(
                key,
                kid.as_deref(),
                approver.as_deref(),
                ttl,
                leash::grants::Claims {
                    grant: "elevate".to_owned(),
                    // Filled in from --approver or the key file.
                    approver: String::new(),
                    fingerprint: String::new(),
                    agent: uid("--agent", agent)?,
                    role: uid("--role", role)?,
                    user: user.as_deref().map(|u| uid("--user", u)).transpose()?.unwrap_or_default(),
                    jti: id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                    iat: 0,
                    exp: 0,
                },
            )
        })(),
        GrantCommand::Inspect { token } => leash::grants::decode(token)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|d| {
                Ok(format!(
                    "{}\n{}\n(not verified: leash verifies a grant against its bundle's approver keys)",
                    serde_json::to_string_pretty(&d.header)?,
                    serde_json::to_string_pretty(&d.claims)?
                ))
            }),
    };
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Signs `claims` with the key in `key_file`, issued now and valid for `ttl`.
/// Signs `claims` with the key in `key_file`; `kid` and the approver
/// default to the ones the key file names.
fn sign_grant(
    key_file: &std::path::Path,
    kid: Option<&str>,
    approver: Option<&str>,
    ttl: &str,
    mut claims: leash::grants::Claims,
) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(key_file)
        .map_err(|e| anyhow::anyhow!("--key {}: {e}", key_file.display()))?;
    let file = leash::grants::parse_key_file(&text)
        .map_err(|e| anyhow::anyhow!("--key {}: {e}", key_file.display()))?;
    let missing = |flag: &str| {
        anyhow::anyhow!(
            "--{flag}: not given, and {} names none (`leash keygen --kid … --approver …` \
             keeps both in the key file)",
            key_file.display()
        )
    };
    let kid = kid
        .map(str::to_owned)
        .or(file.kid)
        .ok_or_else(|| missing("kid"))?;
    claims.approver = approver
        .map(str::to_owned)
        .or(file.approver)
        .ok_or_else(|| missing("approver"))?;
    let signing = file.key;
    let ttl = leash::config::parse_duration(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    if ttl.as_secs() == 0 {
        anyhow::bail!("--ttl: a grant must be valid for at least a second, e.g. `10m`");
    }
    claims.iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    claims.exp = claims.iat + ttl.as_secs().max(1);
    Ok(leash::grants::sign(&signing, &kid, &claims)?)
}

fn audit(args: &AuditArgs) -> ExitCode {
    use leash::audit::chain::{verify_anchored, Verdict};
    let AuditCommand::Verify {
        files,
        anchors,
        from_start,
    } = &args.command;
    let verdict = verify_anchored(files, anchors);
    // Asked for the whole trail: a missing start fails, whatever else.
    if let Ok(Verdict::Intact(summary) | Verdict::TornTail { summary, .. }) = &verdict {
        if *from_start && summary.first_seq != Some(0) {
            match summary.first_seq {
                Some(first) => println!(
                    "audit trail INCOMPLETE: the files start at seq {first}, not at the trail's \
                     first record (seq 0): older files are missing"
                ),
                None => println!("audit trail INCOMPLETE: the files hold no records"),
            }
            return ExitCode::FAILURE;
        }
    }
    match verdict {
        Ok(Verdict::Intact(summary)) => {
            println!(
                "audit trail intact: {} records{}",
                summary.records,
                describe(&summary)
            );
            // Still intact: the crash was handled when leash restarted, and
            // the note stays for as long as the file is verified; monitoring
            // that alerts on failure is not kept alerting.
            note_torn_earlier(&summary);
            ExitCode::SUCCESS
        }
        Ok(Verdict::Unanchored { seq, problem }) => {
            println!("audit trail does not reach anchor seq {seq}: {problem}");
            ExitCode::FAILURE
        }
        Ok(Verdict::TornTail {
            summary,
            file,
            after_seq,
        }) => {
            println!(
                "audit trail intact: {} records{}",
                summary.records,
                describe(&summary)
            );
            note_torn_earlier(&summary);
            println!(
                "note: `{}` ends in a partial record after seq {}: a write cut short by a crash, \
                 not tampering (that decision was not answered in the disk sync mode)",
                file.display(),
                after_seq.map_or_else(|| "(none)".to_owned(), |s| s.to_string())
            );
            ExitCode::from(2)
        }
        Ok(Verdict::Broken {
            file,
            line,
            seq,
            problem,
            verified_to,
        }) => {
            println!(
                "audit trail BROKEN at `{}` line {line}{}: {problem}",
                file.display(),
                seq.map_or_else(String::new, |s| format!(" (seq {s})"))
            );
            if let Some((seq, hash)) = verified_to {
                println!("the records before it verify, up to head {seq}:{hash}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Notes each earlier file a crash left a partial record in.
fn note_torn_earlier(summary: &leash::audit::chain::Summary) {
    for (file, after_seq) in &summary.torn_earlier {
        println!(
            "note: `{}` ends in a partial record after seq {}: a write cut short by a crash, set \
             aside at restart; the chain continues in the next file",
            file.display(),
            after_seq.map_or_else(|| "(none)".to_owned(), |s| s.to_string())
        );
    }
}

fn describe(summary: &leash::audit::chain::Summary) -> String {
    match (summary.first_seq, summary.last_seq, &summary.last_hash) {
        (Some(first), Some(last), Some(hash)) => format!(
            ", seq {first} to {last}{}; head {last}:{hash}",
            if summary.starts_mid_chain {
                " (the trail's start is not among these files; the first link was taken on trust)"
            } else {
                ""
            }
        ),
        _ => String::new(),
    }
}

fn validate(args: &ValidateArgs) -> ExitCode {
    match Snapshot::load_dirs(&args.policies, &args.schemas) {
        Ok(snapshot) => {
            for warning in &snapshot.warnings {
                eprintln!("warning: {warning}");
            }
            println!(
                "bundle valid: {} policies, {} entities, {} files, version {}",
                snapshot.policy_count(),
                snapshot.entity_count(),
                snapshot.files.len(),
                snapshot.version
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{}", e.render());
            ExitCode::FAILURE
        }
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let result = runtime().and_then(|rt| rt.block_on(leash::check::run(args)).map_err(Into::into));
    match result {
        Ok(response) => {
            print!("{}", leash::check::render(args, &response));
            if response.decision == Decision::Allow as i32 {
                ExitCode::SUCCESS
            } else if response.decision == Decision::ApprovalRequired as i32 {
                ExitCode::from(3)
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status(args: &StatusArgs) -> ExitCode {
    let result =
        runtime().and_then(|rt| rt.block_on(leash::check::status(args)).map_err(Into::into));
    match result {
        Ok(status) => {
            if args.json {
                println!("{}", leash::check::status_json(&status));
            } else {
                print!("{}", leash::check::render_status(&status));
            }
            if leash::check::last_refused(&status) {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &BenchArgs) -> ExitCode {
    if let Some(BenchCommand::Generate(generate)) = &args.command {
        return bench_generate(generate);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find the leash executable to start the sidecar: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = match args.resolve(exe) {
        Ok(options) => options,
        Err(problems) => {
            for p in problems {
                eprintln!("error: {p}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result =
        runtime().and_then(|rt| rt.block_on(leash::bench::run(&options)).map_err(Into::into));
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", leash::bench::report::render(&report));
    if let Some(path) = &args.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(|text| {
                std::fs::write(path, text + "\n")
                    .with_context(|| format!("--json: cannot write `{}`", path.display()))
            });
        if let Err(e) = written {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
        eprintln!("bench: figures written to {}", path.display());
    }
    ExitCode::SUCCESS
}

fn bench_generate(args: &GenerateArgs) -> ExitCode {
    use leash::bench::workload::{generate, WorkloadSpec, MIN_POLICIES};
    if args.policy_count < MIN_POLICIES {
        eprintln!(
            "error: --policy-count: {} is below the generator's minimum of {MIN_POLICIES}",
            args.policy_count
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let workload = generate(WorkloadSpec {
        policies: args.policy_count,
        seed: args.seed,
    });
    if let Err(e) = workload.write_to(&args.out) {
        eprintln!("error: cannot write to `{}`: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let s = workload.shape;
    println!(
        "wrote {}: {} policies ({} agent grants, {} user entitlements, {} role policies, 8 baseline), \
         {} agents, {} users, {} roles, {} tenants, {} tools, {} records; {} requests in requests.jsonl",
        args.out.display(),
        s.policies,
        s.agent_grants,
        s.user_entitlements,
        s.role_policies,
        s.agents,
        s.users,
        s.roles,
        s.tenants,
        s.tools,
        s.records,
        workload.requests.len()
    );
    ExitCode::SUCCESS
}

fn bench_floor(args: &BenchFloorArgs) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(leash::bench::child::serve_floor(&args.uds))
            .map_err(Into::into)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
