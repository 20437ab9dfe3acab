//! Hot reload against real files: a real server watches a bundle in a temp
//! dir while the tests change it the ways deploy tools do (in-place edits,
//! rename-over, ConfigMap `..data` swaps, git-sync link swaps), and checks
//! which version is served and what it decides.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{request, version_of, KillOnDrop, ReloadingServer, ALLOW, DENY, RELOAD_WAIT};
use leash::proto::v1 as pb;
use leash::reload::{ReloadOptions, WatchMode, DEFAULT_SETTLE};

const SCHEMA_DOC: &str = "entity Agent;\nentity Doc;\n\
    action \"read\", \"write\" appliesTo { principal: [Agent], resource: [Doc] };\n";
/// The same schema with `Doc` renamed: the old policies do not validate
/// against it, and the new ones do not validate against the old schema.
const SCHEMA_DOCUMENT: &str = "entity Agent;\nentity Document;\n\
    action \"read\", \"write\" appliesTo { principal: [Agent], resource: [Document] };\n";
const READ: &str =
    "@id(\"bot-reads\")\npermit (principal == Agent::\"bot\", action == Action::\"read\", resource is Doc);\n";
const WRITE: &str =
    "@id(\"bot-writes\")\npermit (principal == Agent::\"bot\", action == Action::\"write\", resource is Doc);\n";
const READ_DOCUMENT: &str = "@id(\"bot-reads\")\n\
    permit (principal == Agent::\"bot\", action == Action::\"read\", resource is Document);\n";

/// A bundle in a temp dir: `policies/` and `schemas/`.
struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    fn new(files: &[(&str, &str)]) -> Self {
        let bundle = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::create_dir_all(bundle.path("policies")).expect("mkdir");
        std::fs::create_dir_all(bundle.path("schemas")).expect("mkdir");
        for (rel, text) in files {
            bundle.write(rel, text);
        }
        bundle
    }

    /// `policies/read.cedar` allowing reads, and the `Doc` schema.
    fn reads() -> Self {
        Self::new(&[
            ("policies/access.cedar", READ),
            ("schemas/docs.cedarschema", SCHEMA_DOC),
        ])
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn policies(&self) -> PathBuf {
        self.path("policies")
    }

    fn schemas(&self) -> PathBuf {
        self.path("schemas")
    }

    /// Writes in place (truncate, then write), as `echo >` and many editors do.
    fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, text).expect("write");
    }

    /// Writes a hidden temporary file and renames it over `rel`, as editors
    /// and `git checkout` do.
    fn replace(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name().expect("name").to_string_lossy()
        ));
        std::fs::write(&tmp, text).expect("write tmp");
        std::fs::rename(&tmp, &path).expect("rename over");
    }

    fn version(&self) -> String {
        version_of(&self.policies(), &self.schemas())
    }

    async fn serve(&self, options: ReloadOptions) -> ReloadingServer {
        ReloadingServer::start(&self.policies(), &self.schemas(), options).await
    }
}

/// Watching with the default settle time. In-place writes are truncate then
/// write; the settle time is what keeps the empty file between the two from
/// being read, so it is not shortened here.
fn fast() -> ReloadOptions {
    ReloadOptions::default()
}

fn bot(action: &str, resource: &str) -> pb::IsAuthorizedRequest {
    request(
        "Agent::\"bot\"",
        None,
        &format!("Action::\"{action}\""),
        resource,
    )
}

/// (decision, version) of `action` on `resource` by the bot.
async fn decide(server: &ReloadingServer, action: &str, resource: &str) -> (i32, String) {
    let resp = server.decide(bot(action, resource)).await.expect("decided");
    (resp.decision, resp.policy_version)
}

fn last_result(status: &pb::StatusResponse) -> pb::ReloadResult {
    status
        .last_attempt
        .as_ref()
        .and_then(|a| pb::ReloadResult::try_from(a.result).ok())
        .unwrap_or(pb::ReloadResult::Unspecified)
}

fn refused_count(status: &pb::StatusResponse) -> u64 {
    status.counters.as_ref().map_or(0, |c| c.refused)
}

#[tokio::test]
async fn an_edit_in_place_is_served() {
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    let server = bundle.serve(fast()).await;
    assert_eq!(
        decide(&server, "read", "Doc::\"d1\"").await,
        (ALLOW, v1.clone())
    );

    bundle.write("policies/access.cedar", WRITE);
    let v2 = bundle.version();
    assert_ne!(v1, v2);
    let status = server.wait_version(&v2).await;
    assert_eq!(last_result(&status), pb::ReloadResult::Loaded);
    let attempt = status.last_attempt.expect("attempt");
    assert_eq!(attempt.trigger, pb::ReloadTrigger::Watch as i32);
    assert_eq!(attempt.version, v2);
    assert_eq!(
        decide(&server, "read", "Doc::\"d1\"").await,
        (DENY, v2.clone())
    );
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v2));
    server.shutdown().await;
}

#[tokio::test]
async fn a_rename_over_is_served() {
    let bundle = Bundle::reads();
    let server = bundle.serve(fast()).await;
    bundle.replace("policies/access.cedar", WRITE);
    let v2 = bundle.version();
    server.wait_version(&v2).await;
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v2));
    server.shutdown().await;
}

/// Kubernetes' ConfigMap volume layout: `..<timestamp>/` holds the files,
/// `..data` links to it, and each visible name links through `..data`. An
/// update writes a new timestamped directory, swaps `..data` atomically by
/// renaming a new link over it, fixes the visible links and deletes the old
/// directory.
struct ConfigMap {
    root: PathBuf,
    generation: u32,
}

impl ConfigMap {
    fn create(root: &Path, files: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(root).expect("mkdir");
        let mut map = Self {
            root: root.to_owned(),
            generation: 0,
        };
        map.update(files);
        map
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.update_pausing(files, Duration::ZERO);
    }

    /// An update that stops for `pause` between the `..data` swap and the
    /// visible links, as a slow kubelet would: a reader of the visible
    /// links in between finds old and dangling names.
    fn update_pausing(&mut self, files: &[(&str, &str)], pause: Duration) {
        let old = self.data_dir();
        self.generation += 1;
        let new = self.data_dir();
        std::fs::create_dir(self.root.join(&new)).expect("mkdir data");
        // A name may hold `/`: a volume item's `path` (keys cannot), which
        // the kubelet creates as a subdirectory of the generation.
        for (name, text) in files {
            let file = self.root.join(&new).join(name);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, text).expect("write");
        }
        let tmp = self.root.join("..data_tmp");
        symlink(&new, &tmp).expect("link");
        std::fs::rename(&tmp, self.root.join("..data")).expect("swap ..data");
        // The stimulus, not a wait for a result.
        std::thread::sleep(pause);
        // Visible links, one per top-level name (a subdirectory is one
        // link): add the new names, drop the names that are gone.
        let top = |name: &str| name.split('/').next().unwrap_or(name).to_owned();
        let visible: Vec<String> = files.iter().map(|(n, _)| top(n)).collect();
        for entry in std::fs::read_dir(&self.root).expect("list") {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !visible.contains(&name) {
                std::fs::remove_file(entry.path()).expect("unlink");
            }
        }
        for name in &visible {
            let link = self.root.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{name}"), &link).expect("visible link");
            }
        }
        if self.generation > 1 {
            std::fs::remove_dir_all(self.root.join(old)).expect("remove old data");
        }
    }

    fn data_dir(&self) -> String {
        format!("..2026_11_23_10_00_00.{:04}", self.generation)
    }
}

// Two worker threads: the reloader runs while the update stalls on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_data_swap_is_served_once_without_duplicates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = (dir.path().join("policies"), dir.path().join("schemas"));
    let mut policy_map = ConfigMap::create(&policies, &[("access.cedar", READ)]);
    ConfigMap::create(&schemas, &[("docs.cedarschema", SCHEMA_DOC)]);
    let v1 = version_of(&policies, &schemas);
    let server = ReloadingServer::start(&policies, &schemas, fast()).await;
    let status = server.status().await;
    let files = status.serving.expect("serving").files;
    assert_eq!(
        files,
        vec!["policies/access.cedar", "schemas/docs.cedarschema"],
        "each file once: nothing read through `..data` or the timestamped directory"
    );

    // A key is renamed and another added in one update, whose visible
    // links lag the swap by many quiet periods: `access.cedar` dangles and
    // the new names are missing meanwhile.
    tokio::task::block_in_place(|| {
        policy_map.update_pausing(
            &[("writes.cedar", WRITE), ("reads.cedar", READ)],
            DEFAULT_SETTLE * 8,
        );
    });
    let v2 = version_of(&policies, &schemas);
    assert_ne!(v1, v2);
    let status = server.wait_version(&v2).await;
    assert_eq!(
        status.serving.expect("serving").files,
        vec![
            "policies/reads.cedar",
            "policies/writes.cedar",
            "schemas/docs.cedarschema"
        ]
    );
    assert_eq!(
        decide(&server, "write", "Doc::\"d1\"").await,
        (ALLOW, v2.clone())
    );
    assert_eq!(decide(&server, "read", "Doc::\"d1\"").await, (ALLOW, v2));

    // A second swap, after the first generation's directory is gone.
    policy_map.update(&[("writes.cedar", WRITE)]);
    let v3 = version_of(&policies, &schemas);
    let status = server.wait_version(&v3).await;
    assert_eq!(decide(&server, "read", "Doc::\"d1\"").await, (DENY, v3));
    assert_eq!(
        refused_count(&status),
        0,
        "read through `..data`, never a half-updated set of visible links"
    );
    server.shutdown().await;
}

/// The layout of `deploy/kubernetes`: the ConfigMap's keys are flat, and
/// the volume's items put them back into subdirectories, so the visible
/// `agents` is a link to `..data/agents`. A change to a file in it is read
/// through `..data` and served.
#[tokio::test]
async fn a_configmap_with_items_in_subdirectories_reloads_a_nested_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (policies, schemas) = (dir.path().join("policies"), dir.path().join("schemas"));
    let mut policy_map = ConfigMap::create(
        &policies,
        &[("agents/bot.cedar", READ), ("baseline.cedar", "")],
    );
    ConfigMap::create(&schemas, &[("docs.cedarschema", SCHEMA_DOC)]);
    let v1 = version_of(&policies, &schemas);
    let server = ReloadingServer::start(&policies, &schemas, fast()).await;
    assert_eq!(
        server.status().await.serving.expect("serving").files,
        vec![
            "policies/agents/bot.cedar",
            "policies/baseline.cedar",
            "schemas/docs.cedarschema"
        ]
    );
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (DENY, v1));

    policy_map.update(&[("agents/bot.cedar", WRITE), ("baseline.cedar", "")]);
    let v2 = version_of(&policies, &schemas);
    let status = server.wait_version(&v2).await;
    assert_eq!(refused_count(&status), 0);
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v2));
    server.shutdown().await;
}

/// Releases kept side by side for rollback, a `current` link naming one,
/// and leash pointed through links of its own (`etc/policies ->
/// ../current/policies`): re-pointing `current` is a link swap inside a
/// link's target, not on the path leash was given, and is seen too.
#[tokio::test]
async fn a_link_swap_inside_a_link_target_is_served() {
    let root = tempfile::tempdir().expect("temp dir");
    let release = |n: u32, policy: &str| {
        let tree = root.path().join(format!("releases/{n}"));
        std::fs::create_dir_all(tree.join("policies")).expect("mkdir");
        std::fs::create_dir_all(tree.join("schemas")).expect("mkdir");
        std::fs::write(tree.join("schemas/docs.cedarschema"), SCHEMA_DOC).expect("write");
        std::fs::write(tree.join("policies/access.cedar"), policy).expect("write");
    };
    let point_current_at = |n: u32| {
        let tmp = root.path().join("current.tmp");
        symlink(format!("releases/{n}"), &tmp).expect("link");
        std::fs::rename(&tmp, root.path().join("current")).expect("swap link");
    };
    release(1, READ);
    release(2, WRITE);
    point_current_at(1);
    std::fs::create_dir(root.path().join("etc")).expect("mkdir");
    symlink("../current/policies", root.path().join("etc/policies")).expect("link");
    symlink("../current/schemas", root.path().join("etc/schemas")).expect("link");
    let policies = root.path().join("etc/policies");
    let schemas = root.path().join("etc/schemas");
    let v1 = version_of(&policies, &schemas);
    let server = ReloadingServer::start(&policies, &schemas, fast()).await;
    assert_eq!(
        decide(&server, "read", "Doc::\"d1\"").await,
        (ALLOW, v1.clone())
    );

    // Release 1 stays on disk: nothing inside the watched trees changes.
    point_current_at(2);
    let v2 = version_of(&policies, &schemas);
    assert_ne!(v1, v2);
    server.wait_version(&v2).await;
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v2));
    // And back: a rollback is a swap too.
    point_current_at(1);
    server.wait_version(&v1).await;
    server.shutdown().await;
}

/// git-sync's layout: `root/current` is a symbolic link to a worktree,
/// replaced atomically by a link to a new worktree on every sync. leash is
/// pointed at `root/current/policies` and `root/current/schemas`.
#[tokio::test]
async fn a_git_sync_link_swap_changing_schema_and_policies_together_is_served() {
    let root = tempfile::tempdir().expect("temp dir");
    let checkout = |sha: &str, schema: &str, policy: &str| {
        let tree = root.path().join(".worktrees").join(sha);
        std::fs::create_dir_all(tree.join("policies/agents")).expect("mkdir");
        std::fs::create_dir_all(tree.join("schemas")).expect("mkdir");
        std::fs::write(tree.join("schemas/docs.cedarschema"), schema).expect("write");
        std::fs::write(tree.join("policies/agents/bot.cedar"), policy).expect("write");
        let tmp = root.path().join("current.tmp");
        symlink(Path::new(".worktrees").join(sha), &tmp).expect("link");
        std::fs::rename(&tmp, root.path().join("current")).expect("swap link");
    };
    checkout("aaaa", SCHEMA_DOC, READ);
    let policies = root.path().join("current/policies");
    let schemas = root.path().join("current/schemas");
    let v1 = version_of(&policies, &schemas);
    let server = ReloadingServer::start(&policies, &schemas, fast()).await;
    assert_eq!(decide(&server, "read", "Doc::\"d1\"").await, (ALLOW, v1));

    // One commit renames `Doc` in the schema and in the policies: neither
    // half validates with the other half's old version.
    checkout("bbbb", SCHEMA_DOCUMENT, READ_DOCUMENT);
    std::fs::remove_dir_all(root.path().join(".worktrees/aaaa")).expect("remove old worktree");
    let v2 = version_of(&policies, &schemas);
    let status = server.wait_version(&v2).await;
    assert_eq!(last_result(&status), pb::ReloadResult::Loaded);
    assert_eq!(
        refused_count(&status),
        0,
        "no half-old, half-new refusal: {status:#?}"
    );
    assert_eq!(
        decide(&server, "read", "Document::\"d1\"").await,
        (ALLOW, v2.clone())
    );
    // `Doc` no longer exists: an unknown entity type is bad input.
    let err = server
        .decide(bot("read", "Doc::\"d1\""))
        .await
        .expect_err("Doc is gone from the schema");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // The watches follow the link: a file added inside the new worktree
    // (not by a swap) is seen too.
    std::fs::write(
        policies.join("agents/deny.cedar"),
        "@id(\"locked\")\nforbid (principal, action, resource == Document::\"locked\");\n",
    )
    .expect("write");
    let v2b = version_of(&policies, &schemas);
    server.wait_version(&v2b).await;
    assert_eq!(
        decide(&server, "read", "Document::\"locked\"").await,
        (DENY, v2b)
    );

    // And back again, to a third worktree.
    checkout("cccc", SCHEMA_DOC, WRITE);
    let v3 = version_of(&policies, &schemas);
    server.wait_version(&v3).await;
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v3));
    server.shutdown().await;
}

#[tokio::test]
async fn new_and_deleted_subdirectories_are_followed() {
    let bundle = Bundle::reads();
    let server = bundle.serve(fast()).await;

    bundle.write("policies/teams/billing/writes.cedar", WRITE);
    let with_team = bundle.version();
    server.wait_version(&with_team).await;
    assert_eq!(
        decide(&server, "write", "Doc::\"d1\"").await,
        (ALLOW, with_team)
    );

    // A file added later to the new directory is seen too: it is watched.
    bundle.write(
        "policies/teams/billing/more.cedar",
        "@id(\"more\")\nforbid (principal, action == Action::\"write\", resource == Doc::\"locked\");\n",
    );
    let with_more = bundle.version();
    server.wait_version(&with_more).await;
    assert_eq!(
        decide(&server, "write", "Doc::\"locked\"").await,
        (DENY, with_more)
    );

    std::fs::remove_dir_all(bundle.path("policies/teams")).expect("rm -r");
    let without = bundle.version();
    server.wait_version(&without).await;
    assert_eq!(
        decide(&server, "write", "Doc::\"d1\"").await,
        (DENY, without)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_every_policy_file_is_refused_and_the_last_bundle_serves_on() {
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    let server = bundle.serve(fast()).await;
    let before = refused_count(&server.status().await);

    std::fs::remove_file(bundle.path("policies/access.cedar")).expect("rm");
    let status = server.wait_refused(before).await;
    let attempt = status.last_attempt.expect("attempt");
    assert_eq!(attempt.result, pb::ReloadResult::Refused as i32);
    assert!(
        attempt.diagnostics[0].message.contains("no policy files"),
        "{attempt:#?}"
    );
    assert_eq!(status.serving.expect("serving").version, v1);
    assert_eq!(decide(&server, "read", "Doc::\"d1\"").await, (ALLOW, v1));

    // Deny-all on purpose: a policy file with no policies.
    bundle.write("policies/none.cedar", "// Everything is denied for now.\n");
    let deny_all = bundle.version();
    server.wait_version(&deny_all).await;
    assert_eq!(
        decide(&server, "read", "Doc::\"d1\"").await,
        (DENY, deny_all)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_deleted_and_recreated_policies_directory_is_followed() {
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    let server = bundle.serve(fast()).await;
    let before = refused_count(&server.status().await);

    std::fs::remove_dir_all(bundle.policies()).expect("rm -r policies");
    // Waits for the refusal that names the missing directory (a read between
    // the file's removal and the directory's is refused too, for having no
    // policy files).
    server
        .wait_until("the missing directory to be reported", |s| {
            refused_count(s) > before
                && s.last_attempt.as_ref().is_some_and(|a| {
                    a.diagnostics
                        .iter()
                        .any(|d| d.message.contains("cannot open policies directory"))
                })
        })
        .await;
    assert_eq!(decide(&server, "read", "Doc::\"d1\"").await, (ALLOW, v1));

    bundle.write("policies/access.cedar", WRITE);
    let v2 = bundle.version();
    server.wait_version(&v2).await;
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v2));
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_changes_keep_the_last_good_bundle_and_are_reported() {
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    let server = bundle.serve(fast()).await;

    // Each bad change is refused with a located diagnostic while v1 serves.
    let cases: [(&str, &str, &str, &str); 4] = [
        (
            "half-written file",
            "policies/access.cedar",
            "@id(\"bot-reads\")\npermit (principal == Agent::\"bot\", act",
            "policies/access.cedar",
        ),
        (
            "schema violation",
            "policies/access.cedar",
            "@id(\"bot-reads\")\npermit (principal, action == Action::\"delete\", resource);\n",
            "policies/access.cedar",
        ),
        (
            "duplicate id",
            "policies/copy.cedar",
            READ,
            "policies/copy.cedar",
        ),
        (
            "invalid schema",
            "schemas/docs.cedarschema",
            "entity Agent;\nentity Doc;\naction \"read\" appliesTo { principal: [Agent], resource: [Nope] };\n",
            "",
        ),
    ];
    for (what, rel, text, blamed) in cases {
        let before = refused_count(&server.status().await);
        let original = std::fs::read_to_string(bundle.path(rel)).ok();
        bundle.write(rel, text);
        let status = server.wait_refused(before).await;
        let attempt = status.last_attempt.expect("attempt");
        assert!(!attempt.diagnostics.is_empty(), "{what}: {attempt:#?}");
        if !blamed.is_empty() {
            assert!(
                attempt.diagnostics.iter().any(|d| d.file == blamed),
                "{what}: no diagnostic names {blamed}: {attempt:#?}"
            );
        }
        assert_eq!(
            status.serving.expect("serving").version,
            v1,
            "{what}: the last good bundle serves on"
        );
        assert_eq!(
            decide(&server, "read", "Doc::\"d1\"").await,
            (ALLOW, v1.clone()),
            "{what}"
        );
        // Undo; the files are v1 again (nothing to load).
        match original {
            Some(text) => bundle.write(rel, &text),
            None => std::fs::remove_file(bundle.path(rel)).expect("rm"),
        }
        server
            .wait_until(&format!("{what} undone"), |s| {
                last_result(s) == pb::ReloadResult::Unchanged
            })
            .await;
    }

    // A change that breaks many policies at once: the status carries the
    // first 100 problems and how many more there are.
    let before = refused_count(&server.status().await);
    let many: String = (0..150)
        .map(|i| format!("permit (principal, action == Action::\"delete-{i}\", resource);\n"))
        .collect();
    bundle.write("policies/many.cedar", &many);
    let status = server.wait_refused(before).await;
    let attempt = status.last_attempt.expect("attempt");
    assert_eq!(attempt.diagnostics.len(), 100);
    assert!(
        attempt.diagnostics_omitted >= 50,
        "{}",
        attempt.diagnostics_omitted
    );
    assert!(status.serving.is_some_and(|s| s.version == v1));
    std::fs::remove_file(bundle.path("policies/many.cedar")).expect("rm");
    server
        .wait_until("many problems undone", |s| {
            last_result(s) == pb::ReloadResult::Unchanged
        })
        .await;

    // The half-written file is diagnosed with its line and column.
    let before = refused_count(&server.status().await);
    bundle.write(
        "policies/access.cedar",
        "@id(\"bot-reads\")\npermit (principal == Agent::\"bot\", act",
    );
    let status = server.wait_refused(before).await;
    let d = &status.last_attempt.expect("attempt").diagnostics[0];
    assert_eq!(
        (d.file.as_str(), d.line),
        ("policies/access.cedar", 2),
        "{d:#?}"
    );
    assert!(d.column > 0 && !d.rendered.is_empty(), "{d:#?}");

    // An unreadable file (a dangling link) is refused too.
    std::fs::remove_file(bundle.path("policies/access.cedar")).expect("rm");
    let before = refused_count(&server.status().await);
    symlink("missing.cedar", bundle.path("policies/access.cedar")).expect("link");
    let status = server.wait_refused(before).await;
    let attempt = status.last_attempt.expect("attempt");
    assert!(
        attempt.diagnostics[0].message.contains("cannot read"),
        "{attempt:#?}"
    );
    assert_eq!(decide(&server, "read", "Doc::\"d1\"").await.1, v1);

    // Fixing the file loads it.
    std::fs::remove_file(bundle.path("policies/access.cedar")).expect("rm");
    bundle.write("policies/access.cedar", WRITE);
    let v2 = bundle.version();
    let status = server.wait_version(&v2).await;
    assert_eq!(last_result(&status), pb::ReloadResult::Loaded);
    assert!(refused_count(&status) >= 6, "{status:#?}");
    server.shutdown().await;
}

/// Every version Status reports while a test changes files.
struct Served {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<std::collections::BTreeSet<String>>,
}

impl Served {
    fn record(server: &Arc<ReloadingServer>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (server, flag) = (server.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            while !flag.load(Ordering::SeqCst) {
                seen.insert(server.serving_version().await);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            seen
        });
        Self { stop, task }
    }

    async fn stop(self) -> std::collections::BTreeSet<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("recorder")
    }
}

/// Schema and policies rewritten in place one after the other, as a
/// non-atomic deploy would. The half-way state (new policies, old schema) is
/// itself a valid bundle, so serving it would go unnoticed by validation:
/// only the old and the new version may ever be served.
///
/// Two worker threads, so the reloader runs while the writer pauses between
/// the files; the quiet period is long enough that only a stall of the
/// machine of seconds could split them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_and_policies_changed_in_place_together_load_as_one() {
    const QUIET: Duration = Duration::from_secs(2);
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    let server = Arc::new(
        bundle
            .serve(ReloadOptions {
                settle: QUIET,
                ..fast()
            })
            .await,
    );

    let served = Served::record(&server);
    let half_way = tokio::task::block_in_place(|| {
        bundle.write("policies/access.cedar", WRITE);
        let half_way = bundle.version();
        // A deploy tool between its two writes: the stimulus, not a wait
        // for a result.
        std::thread::sleep(QUIET / 10);
        bundle.write(
            "schemas/docs.cedarschema",
            &format!("{SCHEMA_DOC}// v2: the same types, documented\n"),
        );
        half_way
    });
    let v2 = bundle.version();
    assert_ne!(half_way, v2);
    server.wait_version(&v2).await;
    let seen = served.stop().await;
    let expected: std::collections::BTreeSet<String> = [v1, v2.clone()].into();
    assert!(
        seen.is_subset(&expected),
        "served {seen:?}, expected only {expected:?} (half-way: {half_way})"
    );
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v2));
    match Arc::try_unwrap(server) {
        Ok(server) => server.shutdown().await,
        Err(_) => panic!("server still shared"),
    }
}

/// Clients decide continuously while the bundle flips between two versions
/// 100 times: no RPC fails, and every decision is the one its reported
/// version gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_never_fail_or_tear_while_the_bundle_flips() {
    let bundle = Bundle::reads();
    let reads = bundle.version();
    bundle.write("policies/access.cedar", WRITE);
    let writes = bundle.version();
    bundle.write("policies/access.cedar", READ);
    let server = Arc::new(
        bundle
            .serve(ReloadOptions {
                watch: WatchMode::Events,
                settle: Duration::from_millis(2),
                ..Default::default()
            })
            .await,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (answered, errors, torn) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let seen_writes = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (server, stop, answered, errors, torn, seen_writes) = (
            server.clone(),
            stop.clone(),
            answered.clone(),
            errors.clone(),
            torn.clone(),
            seen_writes.clone(),
        );
        let (reads, writes) = (reads.clone(), writes.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match server.decide(bot("read", "Doc::\"d1\"")).await {
                    Ok(resp) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                        let expected = if resp.policy_version == reads {
                            ALLOW
                        } else if resp.policy_version == writes {
                            seen_writes.fetch_add(1, Ordering::Relaxed);
                            DENY
                        } else {
                            // A version that is neither: torn or unknown.
                            -1
                        };
                        if resp.decision != expected {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    for flip in 0..100 {
        let (text, version) = if flip % 2 == 0 {
            (WRITE, &writes)
        } else {
            (READ, &reads)
        };
        bundle.replace("policies/access.cedar", text);
        server.wait_version(version).await;
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client");
    }
    let status = server.status().await;
    let counters = status.counters.expect("counters");
    assert_eq!(errors.load(Ordering::SeqCst), 0, "RPC errors");
    assert_eq!(
        torn.load(Ordering::SeqCst),
        0,
        "decisions not matching their version"
    );
    assert!(answered.load(Ordering::SeqCst) > 0);
    assert!(
        seen_writes.load(Ordering::SeqCst) > 0,
        "clients saw only one version"
    );
    assert!(counters.loaded >= 101, "{counters:?}");
    assert_eq!(counters.refused, 0, "{counters:?}");
    match Arc::try_unwrap(server) {
        Ok(server) => server.shutdown().await,
        Err(_) => panic!("server still shared"),
    }
}

#[tokio::test]
async fn polling_notices_changes_without_inotify() {
    let bundle = Bundle::reads();
    let server = bundle
        .serve(ReloadOptions {
            watch: WatchMode::Poll(Duration::from_millis(20)),
            settle: Duration::from_millis(1),
            ..Default::default()
        })
        .await;
    assert_eq!(server.status().await.watch, "poll every 20ms");
    bundle.write("policies/access.cedar", WRITE);
    let v2 = bundle.version();
    let status = server.wait_version(&v2).await;
    assert_eq!(
        status.last_attempt.expect("attempt").trigger,
        pb::ReloadTrigger::Poll as i32
    );
    bundle.replace("policies/access.cedar", READ);
    let v3 = bundle.version();
    server.wait_version(&v3).await;
    assert_eq!(decide(&server, "read", "Doc::\"d1\"").await, (ALLOW, v3));
    server.shutdown().await;
}

/// A file that looks meant for the bundle but is not read, dropped in
/// while leash serves, is named in the warnings (the bundle's own files are
/// the same, so the version is too), and the warning goes when the file
/// does; with inotify and with polling.
#[tokio::test]
async fn a_file_passed_over_while_serving_is_warned_about() {
    for watch in [
        WatchMode::Events,
        WatchMode::Poll(Duration::from_millis(20)),
    ] {
        let bundle = Bundle::reads();
        let server = bundle
            .serve(ReloadOptions {
                watch,
                ..Default::default()
            })
            .await;
        let version = bundle.version();
        let warned = |s: &pb::StatusResponse| {
            s.serving.as_ref().is_some_and(|b| {
                b.warnings
                    .iter()
                    .any(|w| w.starts_with("`policies/entities.json` is not read: "))
            })
        };
        assert!(!warned(&server.status().await));
        bundle.write("policies/entities.json", "[]");
        let status = server.wait_until("the warning", warned).await;
        assert_eq!(status.serving.expect("serving").version, version);
        std::fs::remove_file(bundle.path("policies/entities.json")).expect("rm");
        server
            .wait_until("the warning gone", |s| s.serving.is_some() && !warned(s))
            .await;
        server.shutdown().await;
    }
}

/// A file passed over that something writes to all the time (a report
/// kept beside the policies) holds nothing up: the bundle still loads, and
/// a policy change is served, with inotify and with polling. (Its warning
/// is there all along.)
#[tokio::test]
async fn a_file_passed_over_and_written_all_the_time_holds_nothing_up() {
    for watch in [
        WatchMode::Events,
        WatchMode::Poll(Duration::from_millis(20)),
    ] {
        let bundle = Bundle::reads();
        let report = bundle.path("policies/report.json");
        std::fs::write(&report, "[]").expect("write");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, report) = (stop.clone(), report.clone());
            std::thread::spawn(move || {
                use std::io::Write as _;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut file = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&report)
                        .expect("open");
                    writeln!(file, "{n}").expect("append");
                    n += 1;
                    // The writer's pace: faster than the poll interval.
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let server = bundle
            .serve(ReloadOptions {
                watch,
                ..Default::default()
            })
            .await;
        assert!(server
            .status()
            .await
            .serving
            .expect("serving")
            .warnings
            .iter()
            .any(|w| w.starts_with("`policies/report.json` is not read: ")));
        bundle.write("policies/access.cedar", WRITE);
        let v2 = bundle.version();
        server.wait_version(&v2).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer");
        server.shutdown().await;
    }
}

/// The binary, with watching off: SIGHUP reloads, and `leash status` shows
/// the served version and a refused change (exit 2).
#[test]
fn sighup_reloads_and_leash_status_reports() {
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    let socket = bundle.dir.path().join("leash.sock");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_leash"))
            .args([
                "serve",
                "--listen",
                "none",
                "--admin-listen",
                "none",
                "--audit-log",
                "none",
                "--no-watch",
                "--uds",
            ])
            .arg(&socket)
            .arg("--policies")
            .arg(bundle.policies())
            .arg("--schemas")
            .arg(bundle.schemas())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let status = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leash"));
        cmd.args(["status", "--uds"]).arg(&socket);
        if json {
            cmd.arg("--json");
        }
        cmd.output().expect("leash status runs")
    };
    let wait = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = std::time::Instant::now() + RELOAD_WAIT;
        loop {
            let out = status(true);
            if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if done(&json) {
                    return json;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let hangup = |pid: u32| {
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill")
            .success());
    };

    let json = wait("the first load", &|j| {
        j["serving"]["version"] == v1.as_str()
    });
    assert_eq!(json["watch"], "off (SIGHUP reloads)");

    bundle.write("policies/access.cedar", WRITE);
    let v2 = bundle.version();
    hangup(child.0.id());
    let json = wait("the reload", &|j| j["serving"]["version"] == v2.as_str());
    assert_eq!(json["last_attempt"]["trigger"], "RELOAD_TRIGGER_SIGNAL");
    let out = status(false);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("serving   version {v2}")), "{text}");

    bundle.write("policies/access.cedar", "permit (principal, act");
    hangup(child.0.id());
    wait("the refusal", &|j| {
        j["last_attempt"]["result"] == "RELOAD_RESULT_REFUSED"
    });
    let out = status(false);
    assert_eq!(out.status.code(), Some(2), "a refused change exits 2");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policies/access.cedar:1:"), "{text}");
    assert!(text.contains(&format!("serving   version {v2}")), "{text}");

    // Many problems: the first 100 shown, and how many more.
    let many: String = (0..150)
        .map(|i| format!("permit (principal, action == Action::\"delete-{i}\", resource);\n"))
        .collect();
    bundle.write("policies/access.cedar", &many);
    hangup(child.0.id());
    let json = wait("the second refusal", &|j| {
        j["last_attempt"]["diagnostics_omitted"].as_u64() > Some(0)
    });
    let omitted = json["last_attempt"]["diagnostics_omitted"]
        .as_u64()
        .expect("a count");
    assert_eq!(
        json["last_attempt"]["diagnostics"].as_array().map(Vec::len),
        Some(100)
    );
    let out = status(false);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("... and {omitted} more problems")),
        "{text}"
    );

    assert_eq!(common::terminate(&mut child).code(), Some(0));
}

/// A writer that truncates a policy file and pauses (far longer than the
/// settle time) before writing the rest: the empty file in between is a
/// valid deny-all bundle, and must not be served. leash waits for the
/// file's close.
#[tokio::test]
async fn a_slow_writer_mid_file_is_not_read_half_written() {
    use std::io::Write as _;
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    let server = Arc::new(bundle.serve(fast()).await);
    let served = Served::record(&server);

    let path = bundle.path("policies/access.cedar");
    let writer = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::create(&path).expect("truncate");
        // The stall of a slow copy: the stimulus, not a wait for a result.
        std::thread::sleep(Duration::from_millis(600));
        file.write_all(WRITE.as_bytes()).expect("write");
        file.sync_all().expect("sync");
    });
    writer.await.expect("writer");
    let v2 = bundle.version();
    server.wait_version(&v2).await;
    let seen = served.stop().await;
    let expected: std::collections::BTreeSet<String> = [v1, v2].into();
    assert!(
        seen.is_subset(&expected),
        "served {seen:?}: the truncated file was read"
    );
    match Arc::try_unwrap(server) {
        Ok(server) => server.shutdown().await,
        Err(_) => panic!("server still shared"),
    }
}

/// A tree copied in while a file in it is still being written: the file's
/// first lines landed before leash watched its new directory, so nothing
/// said it was open. Once leash watches a directory that appeared, it waits
/// for another quiet period, sees the writes go on, and serves only the
/// finished file (each line is a complete policy, so every prefix is a
/// valid bundle that must never be served).
#[tokio::test]
async fn a_file_still_written_in_a_new_directory_is_served_only_when_finished() {
    use std::io::Write as _;
    let bundle = Bundle::reads();
    let v1 = bundle.version();
    // A quiet period well past the writer's pace, so only a stall of the
    // machine that long could pass for the end of the copy.
    let server = Arc::new(
        bundle
            .serve(ReloadOptions {
                settle: Duration::from_secs(1),
                ..fast()
            })
            .await,
    );
    let served = Served::record(&server);

    // Makes `policies/team` afresh (removing any before) and writes
    // `more.cedar` in it one policy at a time.
    let copy_in = |tag: &'static str| {
        let dir = bundle.path("policies/team");
        tokio::task::spawn_blocking(move || {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).expect("rm -r");
            }
            std::fs::create_dir(&dir).expect("mkdir");
            let mut file = std::fs::File::create(dir.join("more.cedar")).expect("create");
            for i in 0..30 {
                writeln!(
                    file,
                    "@id(\"{tag}-{i}\") permit (principal == Agent::\"bot\", action == Action::\"write\", resource == Doc::\"d{i}\");"
                )
                .expect("write");
                file.flush().expect("flush");
                // A slow copy's pace, well inside the quiet period but
                // longer than a read of this bundle (a write landing in a
                // read would make it read again anyway): the stimulus, not
                // a wait for a result.
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    copy_in("more").await.expect("writer");
    let v2 = bundle.version();
    server.wait_version(&v2).await;
    // The same directory deleted and made again: new by its inode, though
    // its path was watched before.
    copy_in("again").await.expect("writer");
    let v3 = bundle.version();
    server.wait_version(&v3).await;
    let seen = served.stop().await;
    // Between the removal and the new directory, the bundle without it
    // (v1's files) may be served; no part of either file may.
    let expected: std::collections::BTreeSet<String> = [v1, v2, v3].into();
    assert!(
        seen.is_subset(&expected),
        "served {seen:?}: a part of the file was read"
    );
    match Arc::try_unwrap(server) {
        Ok(server) => server.shutdown().await,
        Err(_) => panic!("server still shared"),
    }
}

/// A ConfigMap mounted as a subdirectory of the policies directory (one
/// team's policies) is read through its own `..data` too.
#[tokio::test]
async fn a_configmap_mounted_in_a_subdirectory_is_read_through_its_data_link() {
    let bundle = Bundle::reads();
    let mut team = ConfigMap::create(&bundle.path("policies/team"), &[("writes.cedar", WRITE)]);
    let v1 = bundle.version();
    let server = bundle.serve(fast()).await;
    let files = server.status().await.serving.expect("serving").files;
    assert_eq!(
        files,
        vec![
            "policies/access.cedar",
            "policies/team/writes.cedar",
            "schemas/docs.cedarschema"
        ]
    );
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (ALLOW, v1));

    team.update(&[
        ("writes.cedar", WRITE),
        (
            "locked.cedar",
            "@id(\"locked\")\nforbid (principal, action, resource == Doc::\"locked\");\n",
        ),
    ]);
    let v2 = bundle.version();
    let status = server.wait_version(&v2).await;
    assert_eq!(
        decide(&server, "write", "Doc::\"locked\"").await,
        (DENY, v2)
    );
    assert_eq!(refused_count(&status), 0, "{status:#?}");
    server.shutdown().await;
}

/// A policy file that is a symbolic link to a file outside the bundle
/// directories: editing the target in place is seen through the link.
#[tokio::test]
async fn an_edit_to_a_linked_file_outside_the_bundle_is_served() {
    let bundle = Bundle::reads();
    bundle.write("shared/common.cedar", WRITE);
    symlink(
        bundle.path("shared/common.cedar"),
        bundle.path("policies/common.cedar"),
    )
    .expect("link");
    let server = bundle.serve(fast()).await;
    assert_eq!(
        decide(&server, "write", "Doc::\"d1\"").await,
        (ALLOW, bundle.version())
    );

    bundle.write(
        "shared/common.cedar",
        "@id(\"locked\")\nforbid (principal, action, resource == Doc::\"locked\");\n",
    );
    let v2 = bundle.version();
    server.wait_version(&v2).await;
    assert_eq!(decide(&server, "write", "Doc::\"d1\"").await, (DENY, v2));
    server.shutdown().await;
}
