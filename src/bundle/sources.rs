//! Finding a bundle's files: on disk (blocking I/O, run off the request path)
//! or built into the binary (the example bundle).

use std::fmt::Write as _;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Diagnostic;

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Path as shown in diagnostics and status: `policies/agents/x.cedar`.
    pub path: String,
    pub text: String,
}

/// The schema formats leash reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaFormat {
    /// Cedar schema syntax, `*.cedarschema`.
    Cedar,
    /// Cedar JSON schema, `*.cedarschema.json` or `*.json`.
    Json,
}

/// Every file of a bundle, read into memory, in a stable (sorted) order.
#[derive(Debug, Clone, Default)]
pub struct BundleSources {
    /// Where the bundle came from, for logs and status (a directory pair or
    /// "built-in example").
    pub origin: String,
    pub policies: Vec<SourceFile>,
    pub schemas: Vec<(SchemaFormat, SourceFile)>,
    pub entities: Vec<SourceFile>,
    /// `*.approvers.json` under `policies/`: who may approve what.
    pub approvers: Vec<SourceFile>,
    /// Files in the bundle's directories that look meant for it but are not
    /// read (`policies/entities.json`, `Roles.CEDAR`, a policy file under
    /// `schemas/`), each with why: the load's warnings.
    pub skipped: Vec<String>,
}

const POLICY_SUFFIX: &str = ".cedar";
const ENTITIES_SUFFIX: &str = ".entities.json";
const APPROVERS_SUFFIX: &str = ".approvers.json";
const SCHEMA_SUFFIX: &str = ".cedarschema";
const JSON_SUFFIX: &str = ".json";

impl BundleSources {
    /// Reads `*.cedar` and `*.entities.json` under `policies` and the schema
    /// files under `schemas`, recursively, following symbolic links.
    ///
    /// Names starting with `.` are skipped: Kubernetes ConfigMap volumes hold
    /// every file twice, once through the hidden `..data` directory, and
    /// editors leave hidden swap files.
    pub fn read_dirs(policies: &Path, schemas: &Path) -> Result<Self, Vec<Diagnostic>> {
        let mut diagnostics = Vec::new();
        let mut sources = Self {
            origin: format!("{} + {}", policies.display(), schemas.display()),
            ..Self::default()
        };

        // Files read, by device and inode, and files passed over that look
        // meant for the bundle: when the two directories overlap, a file
        // one reader passes over the other may read.
        let mut read_files = std::collections::HashSet::new();
        let mut passed_over = Vec::new();
        let mut pass_over = |label: &str, shown: String, meta: &Metadata| {
            if let Some(why) = not_read_because(label, &shown) {
                passed_over.push(((meta.dev(), meta.ino()), shown, why));
            }
        };
        for (path, shown, meta) in walk("policies", policies, &mut diagnostics) {
            let kind = if shown.ends_with(ENTITIES_SUFFIX) {
                &mut sources.entities
            } else if shown.ends_with(APPROVERS_SUFFIX) {
                &mut sources.approvers
            } else if shown.ends_with(POLICY_SUFFIX) {
                &mut sources.policies
            } else {
                pass_over("policies", shown, &meta);
                continue;
            };
            read_files.insert((meta.dev(), meta.ino()));
            if let Some(file) = read(&path, shown, meta.len(), &mut diagnostics) {
                kind.push(file);
            }
        }
        for (path, shown, meta) in walk("schemas", schemas, &mut diagnostics) {
            let format = if shown.ends_with(SCHEMA_SUFFIX) {
                SchemaFormat::Cedar
            } else if is_bundle_file("schemas", &shown) {
                SchemaFormat::Json
            } else {
                pass_over("schemas", shown, &meta);
                continue;
            };
            read_files.insert((meta.dev(), meta.ino()));
            if let Some(file) = read(&path, shown, meta.len(), &mut diagnostics) {
                sources.schemas.push((format, file));
            }
        }
        // Once each, though both readers may pass over one file.
        let mut warned = std::collections::HashSet::new();
        sources.skipped = passed_over
            .into_iter()
            .filter(|(id, _, _)| !read_files.contains(id) && warned.insert(*id))
            .map(|(_, shown, why)| format!("`{shown}` is not read: {why}"))
            .collect();

        if diagnostics.is_empty() {
            Ok(sources)
        } else {
            Err(diagnostics)
        }
    }

    /// The example bundle from the repository's `policies/` and `schemas/`,
    /// compiled into the binary so that `leash serve` works from anywhere.
    pub fn embedded() -> Self {
        let mut sources = Self {
            origin: "built-in example bundle".to_owned(),
            ..Self::default()
        };
        for (dir, rel, text) in EMBEDDED {
            let file = SourceFile {
                path: format!("{dir}/{rel}"),
                text: (*text).to_owned(),
            };
            match *dir {
                "policies" if rel.ends_with(ENTITIES_SUFFIX) => sources.entities.push(file),
                "policies" if rel.ends_with(APPROVERS_SUFFIX) => sources.approvers.push(file),
                "policies" if rel.ends_with(POLICY_SUFFIX) => sources.policies.push(file),
                "schemas" if rel.ends_with(SCHEMA_SUFFIX) => {
                    sources.schemas.push((SchemaFormat::Cedar, file))
                }
                "schemas" if is_bundle_file("schemas", rel) => {
                    sources.schemas.push((SchemaFormat::Json, file))
                }
                _ => {}
            }
        }
        sources
    }

    /// Reads the bundle as [`BundleSources::read_dirs`] does, but only
    /// returns a set of files that did not change while it was being read.
    ///
    /// Each directory is resolved once, to one tree (see
    /// [`effective_root`]): a git-sync link is followed to its worktree, a
    /// ConfigMap volume is read through `..data` from the generation it names
    /// rather than through the visible links, which the kubelet rewrites one
    /// by one after the swap. The trees are stamped before and after reading;
    /// a difference (a file being written, a swap mid-read, the two
    /// directories resolving into different checkouts) gives
    /// [`ReadOutcome::Changing`] instead of a mix of old and new files.
    pub fn read_stable(policies: &Path, schemas: &Path) -> ReadOutcome {
        let before = TreeStamp::of(policies, schemas);
        let read = Self::read_dirs(&effective_root(policies), &effective_root(schemas));
        if TreeStamp::of(policies, schemas) != before {
            return ReadOutcome::Changing;
        }
        let origin = format!("{} + {}", policies.display(), schemas.display());
        match read {
            Ok(mut sources) => {
                sources.origin = origin;
                ReadOutcome::Read(sources)
            }
            Err(diagnostics) => ReadOutcome::Unreadable {
                origin,
                diagnostics,
            },
        }
    }

    /// Every file, for hashing and status.
    pub fn files(&self) -> impl Iterator<Item = &SourceFile> {
        self.policies
            .iter()
            .chain(self.schemas.iter().map(|(_, f)| f))
            .chain(self.entities.iter())
            .chain(self.approvers.iter())
    }

    /// The version these files make: SHA-256 over every file's path and
    /// contents, in load order; the first 16 hex digits. The same files give
    /// the same version wherever and whenever they are loaded.
    pub fn version(&self) -> String {
        let mut hasher = Sha256::new();
        for file in self.files() {
            hasher.update((file.path.len() as u64).to_le_bytes());
            hasher.update(file.path.as_bytes());
            hasher.update((file.text.len() as u64).to_le_bytes());
            hasher.update(file.text.as_bytes());
        }
        let digest = hasher.finalize();
        let mut version = String::with_capacity(16);
        for byte in digest.iter().take(8) {
            let _ = write!(version, "{byte:02x}");
        }
        version
    }
}

/// What [`BundleSources::read_stable`] found.
#[derive(Debug)]
pub enum ReadOutcome {
    Read(BundleSources),
    /// A directory or file could not be read.
    Unreadable {
        origin: String,
        diagnostics: Vec<Diagnostic>,
    },
    /// The files changed while they were read; read again once they settle.
    Changing,
}

/// Whether `read_dirs` reads this file (`shown` is `label/relative/path`,
/// or any path ending in the file's name).
pub(crate) fn is_bundle_file(label: &str, shown: &str) -> bool {
    match label {
        "policies" => {
            shown.ends_with(ENTITIES_SUFFIX)
                || shown.ends_with(APPROVERS_SUFFIX)
                || shown.ends_with(POLICY_SUFFIX)
        }
        // Entity and approver files are never schemas, even where the two
        // directories are one.
        _ => {
            shown.ends_with(SCHEMA_SUFFIX)
                || (shown.ends_with(JSON_SUFFIX)
                    && !shown.ends_with(ENTITIES_SUFFIX)
                    && !shown.ends_with(APPROVERS_SUFFIX))
        }
    }
}

/// Why a file the bundle's `label` directory holds, and does not read,
/// looks meant for the bundle; `None` for any other file (`README.md`).
fn not_read_because(label: &str, shown: &str) -> Option<&'static str> {
    let name = shown.rsplit('/').next().unwrap_or(shown);
    let elsewhere = match label {
        "policies" if name.ends_with(SCHEMA_SUFFIX) || name.ends_with(".cedarschema.json") => {
            Some("schema files are read from the schemas directory")
        }
        "policies" if name.ends_with(JSON_SUFFIX) => Some(
            "of JSON files, the policies directory reads `*.entities.json` (entities) and \
             `*.approvers.json` (approvers) only",
        ),
        "schemas" if name.ends_with(POLICY_SUFFIX) => {
            Some("policy files are read from the policies directory")
        }
        "schemas" if name.ends_with(ENTITIES_SUFFIX) || name.ends_with(APPROVERS_SUFFIX) => {
            Some("entity and approver files are read from the policies directory")
        }
        _ => None,
    };
    let lower = name.to_ascii_lowercase();
    elsewhere.or_else(|| {
        [POLICY_SUFFIX, JSON_SUFFIX, SCHEMA_SUFFIX]
            .iter()
            .any(|suffix| lower.ends_with(suffix))
            .then_some("bundle file names end in lowercase `.cedar`, `.cedarschema` or `.json`")
    })
}

/// The directory a bundle directory is read from: the real path of
/// `dir/..data` when `dir` is a Kubernetes ConfigMap (or Secret, or
/// projected) volume, whose `..data` link names the current generation as a
/// whole; otherwise the real path of `dir` itself. Unresolvable paths are
/// returned as given, for the reader to report.
pub fn effective_root(dir: &Path) -> PathBuf {
    let data = dir.join("..data");
    if data.is_dir() {
        if let Ok(real) = std::fs::canonicalize(&data) {
            return real;
        }
    }
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// A cheap summary of a bundle's directory trees without reading contents:
/// each directory's [`effective_root`], and every bundle file's path, device, inode,
/// size, modification and change times (through symbolic links), plus any
/// error met on the way. Equal stamps mean, for all practical purposes, the
/// same files; polling compares stamps, and reads are checked with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeStamp([u8; 32]);

impl TreeStamp {
    /// Stamps the trees under `policies` and `schemas`: the bundle's files
    /// only, so a log or notes file changing beside the policies is not a
    /// change of the bundle (nor a read torn by one). Blocking.
    pub fn of(policies: &Path, schemas: &Path) -> Self {
        Self::stamp(policies, schemas, false)
    }

    /// [`TreeStamp::of`], plus the names of the files a load warns about
    /// not reading ([`BundleSources::skipped`]), for polling: such a file
    /// appearing or going changes the warnings, and so is a change to look
    /// at. Only their names count: one written to all the time
    /// (`policies/report.json`) must not keep the poller waiting for a
    /// quiet interval. Blocking.
    pub fn for_polling(policies: &Path, schemas: &Path) -> Self {
        Self::stamp(policies, schemas, true)
    }

    fn stamp(policies: &Path, schemas: &Path, passed_over_names: bool) -> Self {
        let mut hasher = Sha256::new();
        for (label, root) in [("policies", policies), ("schemas", schemas)] {
            let effective = effective_root(root);
            hasher.update(effective.as_os_str().as_encoded_bytes());
            hasher.update([0]);
            let mut problems = Vec::new();
            let files = walk(label, &effective, &mut problems);
            for (_, shown, meta) in &files {
                if is_bundle_file(label, shown) {
                    hasher.update(shown.as_bytes());
                    hasher.update([0]);
                    for n in [
                        meta.dev(),
                        meta.ino(),
                        meta.len(),
                        meta.mtime() as u64,
                        meta.mtime_nsec() as u64,
                        meta.ctime() as u64,
                        meta.ctime_nsec() as u64,
                    ] {
                        hasher.update(n.to_le_bytes());
                    }
                } else if passed_over_names && not_read_because(label, shown).is_some() {
                    hasher.update([1]);
                    hasher.update(shown.as_bytes());
                    hasher.update([0]);
                }
            }
            for problem in problems {
                hasher.update(problem.message.as_bytes());
            }
        }
        Self(hasher.finalize().into())
    }
}

/// `(directory, relative path, contents)` of each example file (build.rs).
const EMBEDDED: &[(&str, &str, &str)] = include!(concat!(env!("OUT_DIR"), "/embedded_bundle.rs"));

/// All regular files under `root` (except hidden ones), sorted, as
/// `(path, shown, metadata)` where `shown` is `label/relative/path` and the
/// metadata is that of the file a symbolic link leads to.
fn walk(
    label: &str,
    root: &Path,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<(PathBuf, String, Metadata)> {
    let mut out = Vec::new();
    match std::fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            diagnostics.push(Diagnostic::plain(
                None,
                format!("{label} directory `{}` is not a directory", root.display()),
            ));
            return out;
        }
        Err(err) => {
            diagnostics.push(Diagnostic::plain(
                None,
                format!("cannot open {label} directory `{}`: {err}", root.display()),
            ));
            return out;
        }
    }
    // (directory to list, its path relative to `root` as shown). A
    // subdirectory that is itself a ConfigMap volume is listed through its
    // `..data`, like the root (see `effective_root`).
    let mut stack = vec![(root.to_path_buf(), String::new())];
    // Bounded so that a symlink loop cannot walk forever.
    let mut budget = 100_000usize;
    while let Some((dir, rel_dir)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) => {
                diagnostics.push(Diagnostic::plain(
                    None,
                    format!("cannot list `{}`: {err}", dir.display()),
                ));
                continue;
            }
        };
        for entry in entries {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                diagnostics.push(Diagnostic::plain(
                    None,
                    format!(
                        "too many files under `{}` (symbolic link loop?)",
                        root.display()
                    ),
                ));
                return out;
            }
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    diagnostics.push(Diagnostic::plain(
                        None,
                        format!("cannot list `{}`: {err}", dir.display()),
                    ));
                    continue;
                }
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            // `lost+found` sits at the root of a mounted volume and only
            // root may read it.
            if name.starts_with('.') || name == "lost+found" {
                continue;
            }
            let path = entry.path();
            let rel = format!("{rel_dir}{name}");
            // `metadata` follows symbolic links, as ConfigMap and git-sync
            // layouts need.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => stack.push((effective_root(&path), format!("{rel}/"))),
                Ok(meta) if meta.is_file() => {
                    out.push((path, format!("{label}/{rel}"), meta));
                }
                Ok(_) => {}
                // Only a file the bundle would read matters: a dangling
                // link or a vanished temporary file named like no bundle
                // file (`NOTES.md`, `x.tmp`) is not part of it. A name
                // without an extension could be a directory of policies:
                // that still refuses, as does a dangling link whose target
                // could be one (`team.payments -> /mnt/payments`).
                Err(_) if passable(&name) && dangling_target_passable(&path) => {}
                Err(err) => diagnostics.push(Diagnostic::plain(
                    None,
                    format!("cannot read `{}`: {err}", path.display()),
                )),
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

/// Largest bundle file read. A bundle of 100,000 policies is a few tens of
/// MiB in all; a file past this is a mistake (a dump copied into the
/// directory), and reading it whole could take the sidecar's memory.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// Whether a file named `name` would be read as part of a bundle.
fn bundle_name(name: &str) -> bool {
    [POLICY_SUFFIX, JSON_SUFFIX, SCHEMA_SUFFIX]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// A name that can be left out when it cannot be opened: an extension, and
/// not a bundle file's.
fn passable(name: &str) -> bool {
    !bundle_name(name) && name.contains('.')
}

/// For a dangling symbolic link, whether its target's name is
/// [`passable`] too; true for anything else (a file that vanished).
fn dangling_target_passable(path: &Path) -> bool {
    match std::fs::read_link(path) {
        Ok(target) => target
            .file_name()
            .is_some_and(|name| passable(&name.to_string_lossy())),
        Err(_) => true,
    }
}

fn read(
    path: &Path,
    shown: String,
    len: u64,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<SourceFile> {
    if len > MAX_FILE_BYTES {
        diagnostics.push(Diagnostic::plain(
            Some(&shown),
            format!(
                "{len} bytes; bundle files over {} MiB are refused",
                MAX_FILE_BYTES >> 20
            ),
        ));
        return None;
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Some(SourceFile { path: shown, text }),
        Err(err) => {
            diagnostics.push(Diagnostic::plain(
                Some(&shown),
                format!("cannot read file: {err}"),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file the bundle passes over counts for polling by its name only:
    /// written to, it changes neither stamp; made or removed, it changes
    /// the polling stamp and never the one reads are checked with.
    #[test]
    fn files_passed_over_count_by_name_for_polling_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (policies, schemas) = (dir.path().join("policies"), dir.path().join("schemas"));
        std::fs::create_dir_all(&policies).expect("mkdir");
        std::fs::create_dir_all(&schemas).expect("mkdir");
        std::fs::write(policies.join("a.cedar"), "").expect("write");
        std::fs::write(schemas.join("s.cedarschema"), "").expect("write");
        let stamps = || {
            (
                TreeStamp::of(&policies, &schemas),
                TreeStamp::for_polling(&policies, &schemas),
            )
        };
        let (read, polled) = stamps();
        let report = policies.join("report.json");
        std::fs::write(&report, "1").expect("write");
        let (read_made, polled_made) = stamps();
        assert_eq!(read_made, read);
        assert_ne!(polled_made, polled);
        std::fs::write(&report, "a longer report").expect("write");
        assert_eq!(stamps(), (read_made.clone(), polled_made));
        std::fs::remove_file(&report).expect("rm");
        assert_eq!(stamps(), (read.clone(), polled));
        // A bundle file counts in both, contents and all.
        std::fs::write(policies.join("a.cedar"), "// edited").expect("write");
        let (read_edited, _) = stamps();
        assert_ne!(read_edited, read);
    }
}
