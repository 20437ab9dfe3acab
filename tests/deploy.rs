//! The deployment files under `deploy/`: every kustomize variant is rendered
//! with the machine's `kubectl kustomize` and the result is checked for what
//! a platform team relies on (hardening, probes, loopback-only decisions, the
//! shared socket, telemetry and audit settings, the bundle itself); the
//! Dockerfile is read for the same properties.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

const VARIANTS: [&str; 3] = ["base", "overlays/git-sync", "overlays/loopback-tcp"];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `kubectl` on the PATH, or `None` after saying loudly that the manifest
/// tests are skipped (CI machines have it; a laptop may not).
fn kubectl() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kubectl"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED: kubectl is not on the PATH, so the Kubernetes manifests were not rendered \
             or checked"
        );
    }
    found
}

/// The rendered documents of one variant.
fn render(kubectl: &Path, variant: &str) -> Vec<Value> {
    let out = Command::new(kubectl)
        .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
        .arg(repo(&format!("deploy/kubernetes/{variant}")))
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {variant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 YAML");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .collect()
}

use serde::Deserialize as _;

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn list(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// `--flag=value` from a container's args.
fn flag<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    list(&container["args"])
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    list(&container["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str())
}

/// A container setting, or the pod's where the container leaves it out.
fn secured<'a>(pod: &'a Value, container: &'a Value, key: &str) -> &'a Value {
    let own = &container["securityContext"][key];
    if own.is_null() {
        &pod["securityContext"][key]
    } else {
        own
    }
}

#[test]
fn every_variant_is_hardened_probed_and_serves_decisions_on_loopback_only() {
    let Some(kubectl) = kubectl() else { return };
    for variant in VARIANTS {
        let docs = render(&kubectl, variant);
        let deployments = of_kind(&docs, "Deployment");
        assert_eq!(deployments.len(), 1, "{variant}: one Deployment");
        let pod = &deployments[0]["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], Value::Bool(false));

        let inits = list(&pod["initContainers"]);
        let mains = list(&pod["containers"]);
        for c in inits.iter().chain(mains) {
            let name = str_of(&c["name"]);
            let what = format!("{variant}: container {name}");
            assert_eq!(
                secured(pod, c, "runAsNonRoot"),
                &Value::Bool(true),
                "{what}"
            );
            let uid = secured(pod, c, "runAsUser");
            assert!(uid.as_u64().is_some_and(|u| u > 0), "{what}: uid {uid:?}");
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true), "{what}");
            assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false), "{what}");
            assert!(
                list(&sc["capabilities"]["drop"])
                    .iter()
                    .any(|d| d.as_str() == Some("ALL")),
                "{what}: drops ALL capabilities"
            );
            assert!(list(&sc["capabilities"]["add"]).is_empty(), "{what}");
            assert_eq!(
                secured(pod, c, "seccompProfile")["type"].as_str(),
                Some("RuntimeDefault"),
                "{what}"
            );
            assert_eq!(sc["privileged"], Value::Null, "{what}");
            let resources = &c["resources"];
            for key in ["cpu", "memory"] {
                assert!(
                    !resources["requests"][key].is_null(),
                    "{what}: requests {key}"
                );
            }
            assert!(!resources["limits"]["memory"].is_null(), "{what}");
        }
        assert_eq!(pod["hostNetwork"], Value::Null, "{variant}");

        // leash: a native sidecar, ready before the agent starts.
        let leash = inits
            .iter()
            .find(|c| c["name"].as_str() == Some("leash"))
            .unwrap_or_else(|| panic!("{variant}: leash is an init container"));
        assert_eq!(leash["restartPolicy"].as_str(), Some("Always"), "{variant}");
        assert!(str_of(&leash["image"]).contains("leash"), "{variant}");
        assert_eq!(str_of(&list(&leash["args"])[0]), "serve", "{variant}");

        // Decisions and admin on loopback (or not at all); only the
        // health-only listener may take the pod IP, and it is what the
        // probes use.
        assert!(
            flag(leash, "--allow-non-loopback").is_none()
                && !list(&leash["args"])
                    .iter()
                    .any(|a| a.as_str() == Some("--allow-non-loopback")),
            "{variant}"
        );
        for (name, default) in [
            ("--listen", "127.0.0.1:50051"),
            ("--admin-listen", "127.0.0.1:9557"),
        ] {
            let value = flag(leash, name).unwrap_or(default);
            if value != "none" {
                let addr: SocketAddr = value.parse().expect("an address");
                assert!(addr.ip().is_loopback(), "{variant}: {name}={value}");
            }
        }
        for var in [
            "LEASH_LISTEN",
            "LEASH_ADMIN_LISTEN",
            "LEASH_ALLOW_NON_LOOPBACK",
        ] {
            assert_eq!(env(leash, var), None, "{variant}: {var} set in env");
        }
        let health: SocketAddr = flag(leash, "--health-listen")
            .expect("a health listener for the probes")
            .parse()
            .expect("an address");
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let grpc = &leash[probe]["grpc"];
            assert_eq!(
                grpc["port"].as_u64(),
                Some(u64::from(health.port())),
                "{variant}: {probe} on the grpc.health.v1 listener"
            );
        }
        for probe in ["startupProbe", "readinessProbe"] {
            assert_eq!(
                leash[probe]["grpc"]["service"].as_str(),
                Some("leash.v1.Authorizer"),
                "{variant}: {probe} waits for a loaded bundle"
            );
        }
        assert_eq!(
            leash["livenessProbe"]["grpc"]["service"].as_str(),
            Some(leash::server::LIVENESS_SERVICE),
            "{variant}: liveness does not restart a sidecar whose audit disk is full"
        );

        // The agent reaches leash where leash listens: the shared socket
        // (one emptyDir mounted by both, and by nothing else), or loopback.
        let agent = &mains[0];
        let target = env(agent, "LEASH_ENDPOINT").expect("the agent is told where leash is");
        let volumes = list(&pod["volumes"]);
        let mount_of = |c: &Value, dir: &str| -> Option<String> {
            list(&c["volumeMounts"])
                .iter()
                .find(|m| m["mountPath"].as_str() == Some(dir))
                .map(|m| str_of(&m["name"]).to_owned())
        };
        if let Some(socket) = target.strip_prefix("unix://") {
            assert_eq!(flag(leash, "--uds"), Some(socket), "{variant}");
            let dir = Path::new(socket)
                .parent()
                .and_then(Path::to_str)
                .expect("socket directory");
            let volume = mount_of(leash, dir).expect("leash mounts the socket directory");
            assert_eq!(mount_of(agent, dir).as_deref(), Some(volume.as_str()));
            let spec = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(&volume))
                .expect("socket volume");
            assert!(spec["emptyDir"].is_mapping(), "{variant}: {spec:?}");
            let users = inits
                .iter()
                .chain(mains)
                .filter(|c| {
                    list(&c["volumeMounts"])
                        .iter()
                        .any(|m| m["name"].as_str() == Some(&volume))
                })
                .count();
            assert_eq!(users, 2, "{variant}: only leash and the agent share it");
        } else {
            let addr = target.strip_prefix("http://").expect("unix:// or http://");
            assert_eq!(flag(leash, "--listen"), Some(addr), "{variant}");
            assert!(addr.starts_with("127.0.0.1:"), "{variant}");
        }

        // Telemetry to the collector Service; the audit trail somewhere
        // that outlives a read-only root.
        let otlp = env(leash, "OTEL_EXPORTER_OTLP_ENDPOINT").expect("OTLP endpoint");
        assert!(otlp.contains(".svc"), "{variant}: {otlp}");
        assert!(env(leash, "OTEL_SERVICE_NAME").is_some(), "{variant}");
        let audit = env(leash, "LEASH_AUDIT_LOG")
            .or(flag(leash, "--audit-log"))
            .expect("the audit trail is placed explicitly");
        if audit != "-" {
            let dir = Path::new(audit)
                .parent()
                .and_then(Path::to_str)
                .expect("dir");
            assert!(
                mount_of(leash, dir).is_some(),
                "{variant}: audit file on a volume"
            );
        }

        // No CPU limit, so the worker threads are sized explicitly (else one
        // per node CPU), to a count `leash serve` accepts.
        let workers = env(leash, "LEASH_WORKER_THREADS").expect("worker threads sized");
        assert!(
            workers
                .parse::<usize>()
                .is_ok_and(|n| (1..=1024).contains(&n)),
            "{variant}: {workers}"
        );

        // The bundle leash reads is mounted (read-only) in leash.
        for name in ["--policies", "--schemas"] {
            let dir = flag(leash, name).expect("bundle directory");
            let mounted = list(&leash["volumeMounts"]).iter().any(|m| {
                m["readOnly"].as_bool() == Some(true)
                    && Path::new(dir).starts_with(str_of(&m["mountPath"]))
            });
            assert!(mounted, "{variant}: {name}={dir} on a read-only mount");
        }
    }
}

/// Every file under `dir`, by its path relative to `dir`.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("inside");
                out.insert(
                    rel.to_string_lossy().replace('\\', "/"),
                    std::fs::read_to_string(&path).expect("text"),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn the_generated_configmaps_hold_exactly_the_repository_bundle_and_it_validates() {
    let Some(kubectl) = kubectl() else { return };
    let docs = render(&kubectl, "base");
    let pod = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    let out = tempfile::tempdir().expect("temp dir");
    for (map_name, dir) in [("leash-policies", "policies"), ("leash-schemas", "schemas")] {
        let maps: Vec<&Value> = of_kind(&docs, "ConfigMap")
            .into_iter()
            .filter(|m| m["metadata"]["name"].as_str() == Some(map_name))
            .collect();
        assert_eq!(
            maps.len(),
            1,
            "{map_name}: one ConfigMap, name without hash"
        );
        let data = maps[0]["data"].as_mapping().expect("data");
        // The volume puts each key back at its path in the repository.
        let volume = list(&pod["volumes"])
            .iter()
            .find(|v| v["configMap"]["name"].as_str() == Some(map_name))
            .expect("mounted");
        let items = list(&volume["configMap"]["items"]);
        assert_eq!(items.len(), data.len(), "{map_name}: every key mounted");
        let mut mounted = BTreeMap::new();
        for item in items {
            let key = str_of(&item["key"]);
            let text = data
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{map_name}: no key {key}"));
            mounted.insert(str_of(&item["path"]).to_owned(), text.to_owned());
        }
        assert_eq!(
            mounted,
            tree(&repo(dir)),
            "{map_name} differs from {dir}/: update deploy/kubernetes/base"
        );
        for (path, text) in &mounted {
            let file = out.path().join(dir).join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, text).expect("write");
        }
    }
    let validated = Command::new(env!("CARGO_BIN_EXE_leash"))
        .arg("validate")
        .arg("--policies")
        .arg(out.path().join("policies"))
        .arg("--schemas")
        .arg(out.path().join("schemas"))
        .env_remove("LEASH_POLICIES")
        .env_remove("LEASH_SCHEMAS")
        .output()
        .expect("leash validate runs");
    assert!(
        validated.status.success(),
        "{}",
        String::from_utf8_lossy(&validated.stderr)
    );
    assert!(String::from_utf8_lossy(&validated.stdout).starts_with("bundle valid: "));
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((word.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn the_dockerfile_builds_a_small_non_root_image_with_no_secrets() {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).expect("Dockerfile");
    let all = instructions(&text);
    let last_from = all
        .iter()
        .rposition(|(word, _)| word == "FROM")
        .expect("a FROM");
    assert!(
        all.iter().filter(|(word, _)| word == "FROM").count() >= 2,
        "multi-stage"
    );
    let runtime = &all[last_from..];
    let base = &runtime[0].1;
    assert!(
        base.starts_with("gcr.io/distroless/") || base == "scratch",
        "small runtime image: {base}"
    );
    // The runtime stage runs nothing (no shell to run it with) and ends as
    // a numeric non-root user.
    assert!(runtime.iter().all(|(word, _)| word != "RUN"));
    let user = runtime
        .iter()
        .rev()
        .find(|(word, _)| word == "USER")
        .map(|(_, rest)| rest.as_str())
        .expect("a USER in the runtime stage");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("numeric UID, so runAsNonRoot can verify it");
    assert_ne!(uid, 0, "non-root");
    let envs: Vec<&str> = runtime
        .iter()
        .filter(|(word, _)| word == "ENV")
        .map(|(_, rest)| rest.as_str())
        .collect();
    assert!(
        envs.iter().any(|e| e.contains("LEASH_AUDIT_LOG=-")),
        "a read-only root needs the audit trail elsewhere than the working directory"
    );
    assert!(envs
        .iter()
        .any(|e| e.contains("LEASH_POLICIES=/etc/leash/policies")));
    // No secrets baked in: no credential-looking ARG or ENV, no key files,
    // nothing fetched from the network by ADD.
    let secretish = [
        "SECRET",
        "TOKEN",
        "PASSWORD",
        "PASSWD",
        "CREDENTIAL",
        "PRIVATE",
        "_KEY",
    ];
    for (word, rest) in &all {
        let upper = rest.to_ascii_uppercase();
        if word == "ARG" || word == "ENV" {
            for s in secretish {
                assert!(!upper.contains(s), "{word} {rest}");
            }
        }
        if word == "COPY" || word == "ADD" {
            for s in [
                ".ENV",
                ".PEM",
                ".KEY",
                "ID_RSA",
                ".P12",
                "KUBECONFIG",
                ".NPMRC",
                "CREDENTIALS",
            ] {
                assert!(!upper.contains(s), "{word} {rest}");
            }
        }
        assert!(
            !(word == "ADD" && (rest.contains("http://") || rest.contains("https://"))),
            "ADD from the network: {rest}"
        );
    }
    // The build context leaves out build output and history.
    let ignore = std::fs::read_to_string(repo("deploy/Dockerfile.dockerignore"))
        .expect("Dockerfile.dockerignore");
    for entry in ["target", ".git"] {
        assert!(ignore.lines().any(|l| l.trim() == entry), "{entry} ignored");
    }
}
