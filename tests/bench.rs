//! `leash bench` as a user runs it: the real binary, which starts a real
//! sidecar and floor server as child processes. The figures are checked for
//! sanity (complete, consistent, plausible), never for speed.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn leash(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leash"))
        .args(args)
        .output()
        .expect("leash runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("JSON written")).expect("valid JSON")
}

/// Latency figures are ordered and throughput is positive.
fn assert_sane_stats(what: &str, s: &Value) {
    let n = |k: &str| {
        s[k].as_f64()
            .unwrap_or_else(|| panic!("{what}: `{k}` missing in {s}"))
    };
    assert!(n("calls") >= 1.0, "{what}: no calls: {s}");
    assert!(
        n("per_sec") > 0.0 && n("per_sec").is_finite(),
        "{what}: {s}"
    );
    assert!(n("p50_ns") > 0.0, "{what}: {s}");
    assert!(n("p50_ns") <= n("p99_ns"), "{what}: {s}");
    assert!(n("p99_ns") <= n("p999_ns"), "{what}: {s}");
    assert!(n("p999_ns") <= n("max_ns"), "{what}: {s}");
}

#[test]
fn quick_mode_completes_with_sane_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    // A smaller generated bundle than the default keeps the unoptimised
    // test build quick; everything else is the quick mode as users run it.
    let out = leash(&[
        "bench",
        "--quick",
        "--policy-count",
        "200",
        "--capacity-policies",
        "200",
        "--capacity-rounds",
        "2",
        "--json",
        json.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "bench failed:\n{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for heading in [
        "in-process (conversion + decision, one thread)",
        "against the empty floor call",
        "BatchIsAuthorized over the Unix socket",
        "policy-scale curve",
        "in-process p50 at 1000 ÷ at 100 policies",
        "latency at half of maximum throughput (200 policies",
        "hot reload (200 policies)",
        "p99 reloading ÷ at rest",
        "share its cores",
        "ratios: tcp_vs_floor",
        "telemetry and audit cost (Unix socket, 16 in flight, median of 1 interleaved rounds",
        "grants (in-process; the example bundle with more users)",
    ] {
        assert!(table.contains(heading), "`{heading}` missing:\n{table}");
    }

    let report = read_json(&json);
    let ratios = &report["ratios"];
    for key in ["tcp_vs_floor", "uds_vs_floor"] {
        let ratio = ratios[key].as_f64().unwrap_or(-1.0);
        // Both sides were measured (no bound on the value: it is the
        // machine's speed, which tests do not judge).
        assert!(ratio.is_finite() && ratio > 0.0, "{key} = {ratio}");
    }
    assert!(
        ratios["in_process_ns_p50"].as_u64().unwrap_or(0) > 0,
        "{ratios}"
    );

    // Quick mode measures grants on the example bundle alone; the bench
    // itself refuses to report an elevation that did not elevate.
    let grants = &report["grants"];
    assert!(
        grants["verify_ns"].as_f64().unwrap_or(0.0) > 0.0,
        "{grants}"
    );
    assert!(
        grants["verify_remembered_ns"].as_f64().unwrap_or(0.0) > 0.0,
        "{grants}"
    );
    let points = grants["points"].as_array().expect("grant points");
    assert_eq!(points.len(), 1, "{grants}");
    for key in [
        "first_use_ns",
        "p50_without_ns",
        "p50_elevated_ns",
        "p50_request_entity_ns",
        "p50_request_entity_full_copy_ns",
    ] {
        assert!(points[0][key].as_u64().unwrap_or(0) > 0, "{key}: {grants}");
    }

    assert_eq!(report["mode"], "quick");
    assert_eq!(report["bundle"]["policies"], 200);
    let mix = &report["mix"];
    assert!(mix["allowed"].as_u64().unwrap_or(0) > 0, "{mix}");
    assert!(mix["denied"].as_u64().unwrap_or(0) > 0, "{mix}");
    assert!(mix["delegated"].as_u64().unwrap_or(0) > 0, "{mix}");

    assert_sane_stats("in-process json", &report["in_process"]["json"]);
    assert_sane_stats("in-process typed", &report["in_process"]["typed"]);
    let runs = report["runs"].as_array().expect("runs");
    // Two transports × two in-flight counts × floor and leash.
    assert_eq!(runs.len(), 8, "{runs:?}");
    for run in runs {
        assert_sane_stats(
            &format!(
                "{}/{}/{}",
                run["transport"], run["target"], run["concurrency"]
            ),
            run,
        );
    }
    assert_eq!(report["pairs"].as_array().map(Vec::len), Some(4));
    for form in report["forms"].as_array().expect("forms") {
        assert_sane_stats("form", form);
    }
    for batch in report["batch"].as_array().expect("batch") {
        assert_sane_stats("batch", batch);
        assert!(batch["decisions_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
    }

    // Quick mode: five policy changes timed to the first decision on each
    // new version, then decisions at rest and during schema reloads of the
    // same bundle.
    let reload = &report["reload"];
    assert_eq!(reload["changes"], 5, "{reload}");
    assert_eq!(reload["policies"], 200, "{reload}");
    assert_sane_stats("write to decision", &reload["write_to_decision"]);
    assert_eq!(reload["write_to_decision"]["calls"], 5, "{reload}");
    let under = &reload["under_reload"];
    assert_eq!(under["policies"], 200, "{under}");
    assert_sane_stats("at rest", &under["steady"]);
    assert_sane_stats("reloading", &under["reloading"]);
    assert!(under["p99_ratio"].as_f64().unwrap_or(0.0) > 0.0, "{under}");
    // Telemetry: every mode ran, and spans arrived exactly when a working
    // collector was configured. (A stuck collector drops spans only once
    // the queue fills, which a quick run may not reach.)
    let telemetry = report["telemetry"]["runs"]
        .as_array()
        .expect("telemetry runs");
    let modes: Vec<&str> = telemetry
        .iter()
        .filter_map(|r| r["mode"].as_str())
        .collect();
    assert_eq!(
        modes,
        [
            "off",
            "metrics",
            "traces-grpc",
            "traces-http",
            "traces-stuck",
            "audit-disk",
            "audit-queued"
        ]
    );
    for run in telemetry {
        let mode = run["mode"].as_str().unwrap_or("?");
        assert_sane_stats(mode, &run["stats"]);
        let received = run["spans_received"].as_u64().unwrap_or(0);
        let calls = run["stats"]["calls"].as_u64().unwrap_or(0);
        match mode {
            // Every measured call made a span (warm-up calls did too).
            "traces-grpc" | "traces-http" => assert!(received >= calls, "{run}"),
            _ => assert_eq!(received, 0, "{run}"),
        }
    }
    let rss = report["sidecar_memory_loaded"]["rss_kib"]
        .as_u64()
        .unwrap_or(0);
    assert!(rss > 1024, "sidecar RSS {rss} KiB");

    let scale: Vec<u64> = report["scale"]
        .as_array()
        .expect("scale")
        .iter()
        .map(|p| p["policies"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(scale, vec![10, 100, 1000]);
    for point in report["scale"].as_array().expect("scale") {
        assert_sane_stats("scale in-process", &point["in_process"]);
        assert_sane_stats("scale sidecar", &point["sidecar_uds_1"]);
        assert_sane_stats("scale in-process, no index", &point["in_process_full"]);
        assert_sane_stats("scale sidecar, no index", &point["sidecar_uds_1_full"]);
        assert!(point["load_ms"].as_f64().unwrap_or(0.0) > 0.0);
        assert!(point["parse_ms"].as_f64().unwrap_or(0.0) > 0.0);
        assert!(point["index_build_ms"].as_f64().unwrap_or(0.0) > 0.0);
        let policies = point["policies"].as_u64().unwrap_or(0);
        assert_eq!(point["index"]["policies"], policies, "{point}");
        assert!(
            point["sidecar_memory_full"]["rss_kib"]
                .as_u64()
                .unwrap_or(0)
                > 1024,
            "{point}"
        );
        // The generated deployment grows by agents, users and roles, so
        // each side's candidates stay a handful at any size.
        let evaluated = point["evaluated_per_side"].as_f64().unwrap_or(0.0);
        assert!(evaluated > 0.0 && evaluated < 20.0, "{point}");
    }

    // Latency at half load: the index on, then off, each offered half of
    // the maximum it reached.
    let capacity = &report["capacity"];
    assert_eq!(capacity["policies"], 200, "{capacity}");
    let runs = capacity["runs"].as_array().expect("capacity runs");
    let indexes: Vec<bool> = runs.iter().filter_map(|r| r["index"].as_bool()).collect();
    assert_eq!(indexes, [true, false]);
    for run in runs {
        assert_sane_stats("at half load", &run["at_half"]);
        let max = run["max_per_sec"].as_f64().unwrap_or(0.0);
        let offered = run["at_half"]["per_sec"].as_f64().unwrap_or(0.0);
        // The pacer schedules exactly rate × duration calls in the window.
        assert!(
            (offered - max / 2.0).abs() <= max * 0.05 + 3.0,
            "offered {offered}/s for a maximum of {max}/s"
        );
        // Hundreds of milliseconds of the sidecar's CPU: never zero ticks.
        assert_rounds("at half load", &run["at_half"], 2, true);
        let max_cpu = run["max_cpu_us_per_call"].as_f64().unwrap_or(0.0);
        assert!(max_cpu > 0.0 && max_cpu.is_finite(), "{run}");
    }
    // The floor, a round after each of the indexed sidecar's, at its rate.
    let floor = &capacity["floor_at_same_rate"];
    assert_sane_stats("floor at half load", floor);
    // The empty call's server may use less than one 10 ms clock tick.
    assert_rounds("floor at half load", floor, 2, false);
    assert_eq!(
        floor["per_sec"], runs[0]["at_half"]["per_sec"],
        "{capacity}"
    );
}

/// `at` reports `rounds` rounds and the median one's figures, with the
/// server's CPU per call and the machine's load in each round; for `leash`
/// (not the floor) CPU above zero and its own decision times.
fn assert_rounds(what: &str, at: &Value, rounds: usize, leash: bool) {
    let p99s: Vec<u64> = at["rounds_p99_ns"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no rounds in {at}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(p99s.len(), rounds, "{what}: {at}");
    let mut sorted = p99s.clone();
    sorted.sort_unstable();
    assert_eq!(
        at["p99_ns"].as_u64(),
        Some(sorted[rounds / 2]),
        "{what}: {at}"
    );
    let cpu = at["server_cpu_us_per_call"]
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: no CPU per call in {at}"));
    assert!(cpu.is_finite() && cpu >= 0.0, "{what}: {at}");
    assert!(!leash || cpu > 0.0, "{what}: {at}");
    // What the machine did in each round, in cores: the generator (this
    // bench) and the server both worked, and the parts agree.
    let loads = at["rounds_load"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no machine load in {at}"));
    assert_eq!(loads.len(), rounds, "{what}: {at}");
    for load in loads {
        let cores = |name: &str| {
            load[name]
                .as_f64()
                .unwrap_or_else(|| panic!("{what}: no {name} in {load}"))
        };
        let (machine, server, bench, others) = (
            cores("machine_cores"),
            cores("server_cores"),
            cores("bench_cores"),
            cores("others_cores"),
        );
        assert!(
            load["seconds"].as_f64().unwrap_or(0.0) > 0.0,
            "{what}: {load}"
        );
        assert!(bench > 0.0 && machine > 0.0, "{what}: {load}");
        assert!(!leash || server > 0.0, "{what}: {load}");
        // The remainder is good to about a tenth of a core either way; far
        // below zero, the machine's and the processes' times disagree.
        assert!(others > -0.5, "{what}: {load}");
        assert!(load["steal_cores"].is_number(), "{what}: {load}");
        assert!(
            load["server_wait_us_per_call"].is_number(),
            "{what}: {load}"
        );
    }
    // The sidecar's own decision times, from its metrics: every call the
    // bench made in a round is one decision counted (the floor has none).
    let decided = at["rounds_decisions"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no decision times in {at}"));
    assert_eq!(decided.len(), rounds, "{what}: {at}");
    for d in decided {
        if !leash {
            assert!(d.is_null(), "{what}: {d}");
            continue;
        }
        assert!(d["calls"].as_u64().unwrap_or(0) > 0, "{what}: {d}");
        assert_eq!(d["decisions"], d["calls"], "{what}: {d}");
        let (over_250us, over_1ms) = (
            d["over_250us"].as_f64().unwrap_or(-1.0),
            d["over_1ms"].as_f64().unwrap_or(-1.0),
        );
        assert!(
            (0.0..=1.0).contains(&over_250us) && (0.0..=over_250us).contains(&over_1ms),
            "{what}: {d}"
        );
    }
}

#[test]
fn a_bundle_on_disk_with_its_request_file_and_the_example() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    let out = leash(&[
        "bench",
        "generate",
        "--policy-count",
        "50",
        "--out",
        bundle.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("50 policies"), "{said}");
    let validate = leash(&[
        "validate",
        "--policies",
        bundle.join("policies").to_str().expect("utf-8"),
        "--schemas",
        bundle.join("schemas").to_str().expect("utf-8"),
    ]);
    assert!(validate.status.success(), "{}", stderr(&validate));

    let short = [
        "--quick",
        "--scale",
        "none",
        "--capacity-policies",
        "none",
        "--concurrency",
        "1",
        "--duration",
        "0.05",
        "--warmup",
        "0",
    ];
    let json = dir.path().join("disk.json");
    let (policies, schemas, requests) = (
        bundle.join("policies"),
        bundle.join("schemas"),
        bundle.join("requests.jsonl"),
    );
    let mut args = vec![
        "bench",
        "--policies",
        policies.to_str().expect("utf-8"),
        "--schemas",
        schemas.to_str().expect("utf-8"),
        "--requests",
        requests.to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
    ];
    args.extend(short);
    let out = leash(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = read_json(&json);
    assert_eq!(report["bundle"]["policies"], 50);
    assert_eq!(report["mix"]["requests"], 512);
    assert_eq!(report["scale"].as_array().map(Vec::len), Some(0));
    assert!(report["capacity"].is_null(), "{}", report["capacity"]);
    // The sidecar's own default, as it said at start.
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    assert_eq!(report["sidecar_worker_threads"], cpus);
    assert_eq!(report["sidecar_worker_threads_set"], false);

    // A sidecar sized otherwise (to a count no machine default gives
    // here) says so.
    let other = (cpus + 1).to_string();
    let json = dir.path().join("example.json");
    let mut args = vec![
        "bench",
        "--example",
        "--worker-threads",
        &other,
        "--json",
        json.to_str().expect("utf-8"),
    ];
    args.extend(short);
    let out = leash(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "sidecar: {other} worker threads (--worker-threads)"
        )),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report = read_json(&json);
    assert_eq!(report["sidecar_worker_threads"], cpus + 1);
    assert_eq!(report["sidecar_worker_threads_set"], true);
    assert_eq!(report["bundle"]["source"], "built-in example bundle");
    assert!(report["mix"]["allowed"].as_u64().unwrap_or(0) > 0);
    assert!(report["mix"]["denied"].as_u64().unwrap_or(0) > 0);
}

#[test]
fn bad_options_and_bad_mixes_are_named() {
    let out = leash(&[
        "bench",
        "--concurrency",
        "0",
        "--batch-size",
        "500",
        "--scale",
        "5",
        "--capacity-policies",
        "lots",
        "--grant-entities",
        "many",
        "--capacity-rounds",
        "0",
        "--worker-threads",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--concurrency: each value must be between 1 and 4096"),
        "{err}"
    );
    assert!(
        err.contains("--batch-size: must be between 1 and 100"),
        "{err}"
    );
    assert!(
        err.contains("--scale: `5` is not a policy count of at least 10"),
        "{err}"
    );
    assert!(
        err.contains("--capacity-policies: `lots` is not a policy count of at least 10"),
        "{err}"
    );
    assert!(
        err.contains("--grant-entities: `many` is not a number of users up to 1000000"),
        "{err}"
    );
    assert!(
        err.contains("--capacity-rounds: 0 rounds measure nothing"),
        "{err}"
    );
    assert!(
        err.contains("--worker-threads: must be between 1 and 1024"),
        "{err}"
    );

    let out = leash(&["bench", "--policies", "p"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a usage error: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--requests"), "{}", stderr(&out));

    let dir = tempfile::tempdir().expect("tempdir");
    let requests = dir.path().join("mix.jsonl");
    std::fs::write(
        &requests,
        "{\"agent\": \"Agent::\\\"support-bot\\\"\", \"action\": \"Action::\\\"tickets:read\\\"\", \"resource\": \"Ticket::\\\"T-1\\\"\"}\n{\"agent\": 7}\n",
    )
    .expect("write");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let policies = root.join("policies");
    let schemas = root.join("schemas");
    let bench = |requests: &Path| {
        leash(&[
            "bench",
            "--policies",
            policies.to_str().expect("utf-8"),
            "--schemas",
            schemas.to_str().expect("utf-8"),
            "--requests",
            requests.to_str().expect("utf-8"),
            "--quick",
            "--scale",
            "none",
        ])
    };
    let out = bench(&requests);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("mix.jsonl:2: `agent` must be a string such as `User::\"alice\"`"),
        "{}",
        stderr(&out)
    );

    // A well-formed request the bundle cannot decide is refused before
    // anything is measured, with the engine's field and problem.
    std::fs::write(
        &requests,
        "{\"agent\": \"Agent::\\\"support-bot\\\"\", \"action\": \"Action::\\\"tickets:fly\\\"\", \"resource\": \"Ticket::\\\"T-1\\\"\"}\n",
    )
    .expect("write");
    let out = bench(&requests);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "request 0 of the mix is invalid for this bundle: action: `Action::\"tickets:fly\"` is not an action of the schema"
        ),
        "{}",
        stderr(&out)
    );
}
