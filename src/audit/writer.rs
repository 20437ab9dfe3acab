//! The writer thread: group commit of sealed records to a file (with
//! `fsync` per batch) or to stdout.
//!
//! Records arrive through a bounded queue (a full queue makes callers wait:
//! backpressure, not loss). The thread takes every record waiting, seals
//! them in order, writes them with one `write` and one `fsync`, then answers
//! every waiting caller. If the write or the sync fails, the file is cut
//! back to its last good length (so no partial record stays in the middle
//! of the chain), the chain head does not move, every caller of the batch
//! gets the error, and the trail is marked unavailable until a write
//! succeeds again. While unavailable, the thread tries on its own every
//! [`PROBE_INTERVAL`] to write a record of the outage itself (since when,
//! the error, how many records were refused), so it recovers without
//! traffic, and the trail says there was a gap.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::chain::{head_of, seal, seal_record, Head};
use super::{AuditStatus, AuditTarget};

/// Records sealed and written together at most.
const MAX_GROUP: usize = 4096;
/// How often an unavailable trail is tried again without traffic.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How often the chain's head is logged, so it lives outside the file.
const ANCHOR_INTERVAL: Duration = Duration::from_secs(60);
/// The queued mode's linger (see [`run`]).
pub const QUEUED_LINGER: Duration = Duration::from_millis(1);
/// How much of the end of a file is read to find the chain's head.
const TAIL_BYTES: u64 = 1 << 20;

/// Records to append, and who waits for them to be on disk.
pub struct Job {
    pub records: Vec<super::Record>,
    pub done: Option<oneshot::Sender<Result<(), String>>>,
    /// What became of a job its caller waits for, settled once by
    /// whichever comes first: the write, or the caller giving up after
    /// `WRITE_STALL` (a caller that merely went away, its client gone,
    /// leaves it to the write: its records are written as usual).
    pub settled: Arc<std::sync::OnceLock<Settled>>,
}

impl Job {
    /// A job without records nobody waits for: it wakes the writer, which
    /// then writes what it owes (an outage's record) or, owing nothing,
    /// marks the trail available again.
    pub fn wake_up() -> Self {
        Self {
            records: Vec::new(),
            done: None,
            settled: Arc::default(),
        }
    }
}

/// See [`Job::settled`].
#[derive(Debug)]
pub enum Settled {
    /// The records are in the chain: a caller whose wait ends just now
    /// answers as if in time.
    Written,
    /// The caller gave up and answered DENY, then and for this reason.
    GaveUp(super::Failure),
}

impl Job {
    /// When its caller gave up, if it did.
    fn gave_up(&self) -> Option<&super::Failure> {
        match self.settled.get() {
            Some(Settled::GaveUp(failure)) => Some(failure),
            _ => None,
        }
    }
}

/// The earliest time any of `jobs`' callers gave up.
fn first_gave_up<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Option<String> {
    jobs.into_iter()
        .filter_map(Job::gave_up)
        .fold(None, |at, failure| earliest(at, &failure.since))
}

/// Where sealed lines go.
pub enum Sink {
    Stdout,
    File(FileSink),
}

pub struct FileSink {
    path: PathBuf,
    file: Option<File>,
    /// Length of the file up to its last complete, synced record.
    good_len: u64,
    /// Rotate once the file reaches this size.
    max_bytes: u64,
    /// A failed batch's bytes still to cut off: (inode, good length).
    cut_to: Option<(u64, u64)>,
    /// The file was created and its directory entry is not yet known to be
    /// on disk: no record goes into it until it is (a power loss would
    /// take the file, and every record in it, away).
    entry_unsynced: bool,
    /// A handle of the active file holding its lock, kept through failed
    /// writes (when the data handle is closed) and given up only for the
    /// next active file: another leash cannot take the trail over while
    /// this one is in an outage. Inode and device of the locked file.
    lock: Option<(File, u64, u64)>,
    /// "cannot lock" said once, not on every retry.
    lock_warned: bool,
}

/// Opens the sink and finds the chain's head, continuing from the last good
/// record of an existing trail. A file whose last line was cut short by a
/// crash is set aside (renamed) and a new one started, so the partial line
/// stays the last thing in its file.
pub fn open(target: &AuditTarget, max_bytes: u64) -> Result<(Sink, Head), String> {
    match target {
        AuditTarget::Off => Err("no audit target".to_owned()),
        AuditTarget::Stdout => Ok((Sink::Stdout, Head::genesis())),
        AuditTarget::File(path) => {
            // Before anything is read or moved: a second leash on this
            // trail would set the first one's line in progress aside as
            // torn, and cut its records off after a failed write.
            let held = lock_existing(path)?;
            let head = recover_head(path)?;
            let mut sink = FileSink {
                path: path.clone(),
                file: None,
                good_len: 0,
                max_bytes,
                cut_to: None,
                entry_unsynced: false,
                lock: held,
                lock_warned: false,
            };
            sink.reopen()?;
            Ok((Sink::File(sink), head))
        }
    }
}

fn recover_head(path: &Path) -> Result<Head, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    }
    unlink_if_also_rotated(path)?;
    let existed = path.exists();
    let (text, torn) = last_record_text(path)?;
    let head = head_of(&text).0;
    let head = match head {
        Some(head) => Some(head),
        // A complete line that is not a record: continuing would fork or
        // hide the chain.
        None if text.contains('\n') => {
            return Err(format!(
                "`{}` ends in lines that are not audit records; move it aside to start a new trail",
                path.display()
            ))
        }
        // An empty (or new) active file: the newest rotated file with a
        // complete record holds the head, if there is one (a file set aside
        // after a crash may hold none).
        None => {
            let mut found = None;
            for rotated in rotated_files(path).iter().rev() {
                let (text, _) = last_record_text(rotated)?;
                if let Some(head) = head_of(&text).0 {
                    found = Some((head, rotated.clone()));
                    break;
                }
            }
            // Said aloud: an active file that went missing is how a chain
            // would be restarted or continued by mistake.
            match &found {
                Some((head, rotated)) => warn!(
                    file = %rotated.display(),
                    next_seq = head.next_seq,
                    existed,
                    "the active audit file is empty or missing; the chain continues from the \
                     newest rotated file"
                ),
                None => info!(
                    file = %path.display(),
                    existed,
                    "no audit records yet: a new chain starts at seq 0"
                ),
            }
            found.map(|(head, _)| head)
        }
    };
    // A complete line after the last record that is not one (damage, or
    // an edit): writing after it would leave the chain broken for good.
    let damaged = head.is_some() && !ends_in_a_record(&text);
    if torn || damaged {
        let last = head.as_ref().map_or(0, |h| h.next_seq.saturating_sub(1));
        let aside = free_name(path, last);
        move_without_overwriting(path, &aside)?;
        warn!(
            file = %aside.display(),
            after_seq = last,
            "{}; the file was set aside and the chain continues in a new one",
            if torn {
                "the audit trail ended in a partial record (a crash mid-write)"
            } else {
                "the audit trail ended in lines that are not audit records"
            }
        );
    }
    Ok(head.unwrap_or_else(Head::genesis))
}

/// Whether the last complete line of `text` is an audit record (an empty
/// line is not: leash writes none).
fn ends_in_a_record(text: &str) -> bool {
    let Some(end) = text.rfind('\n') else {
        return true;
    };
    let last = text[..end].rsplit('\n').next().unwrap_or_default();
    head_of(&format!("{last}\n")).0.is_some()
}

/// `PATH.<seq>.torn`, or `.torn2`, `.torn3`... when a file was set aside
/// after the same record before (a second crash before a new record).
fn free_name(path: &Path, last: u64) -> PathBuf {
    let mut aside = rotated_name(path, last, "torn");
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = rotated_name(path, last, &format!("torn{n}"));
    }
    aside
}

/// A crash between the two steps of a move without `renameat2` leaves the
/// active file also under a rotated name; the rotated name is the one that
/// counts, so the active name is dropped.
fn unlink_if_also_rotated(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(active) = std::fs::metadata(path) else {
        return Ok(());
    };
    if active.nlink() < 2 {
        return Ok(());
    }
    let same = rotated_files(path).into_iter().find(|rotated| {
        std::fs::metadata(rotated).is_ok_and(|m| m.dev() == active.dev() && m.ino() == active.ino())
    });
    if let Some(rotated) = same {
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove `{}`: {e}", path.display()))?;
        sync_dir(path)?;
        warn!(
            file = %rotated.display(),
            "the active audit file was also a rotated one (a move cut short); kept as rotated"
        );
    }
    Ok(())
}

/// The end of the file at `path`, long enough to hold its last complete
/// record (the whole file if need be), and whether it ends in a partial
/// line.
fn last_record_text(path: &Path) -> Result<(String, bool), String> {
    let read = |window| {
        read_tail(path, window).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
    };
    let tail = read(TAIL_BYTES)?;
    let torn = !tail.is_empty() && !tail.ends_with('\n');
    if head_of(&tail).0.is_some() {
        return Ok((tail, torn));
    }
    // The last record is longer than the window, or there is none.
    Ok((read(u64::MAX)?, torn))
}

/// Renames `from` to `to` in one step, failing rather than replacing an
/// existing file (`renameat2` with `RENAME_NOREPLACE`); where the file
/// system lacks it, a link then an unlink (a crash between the two is
/// repaired at the next start, see [`unlink_if_also_rotated`]).
fn move_without_overwriting(from: &Path, to: &Path) -> Result<(), String> {
    move_noreplace(from, to).map_err(|e| {
        format!(
            "cannot move `{}` to `{}`: {e}",
            from.display(),
            to.display()
        )
    })?;
    // The move is made; only its name may not survive a power loss, and
    // the records are in the file whatever its name. The new file that
    // follows is not written to until its own entry is synced.
    if let Err(e) = sync_dir(from) {
        warn!(error = %e, "a moved audit file's new name may not be on disk yet");
    }
    Ok(())
}

/// Moves `from` to `to` unless `to` exists (then `AlreadyExists`): with
/// `renameat2(RENAME_NOREPLACE)`, or a link and an unlink where the file
/// system has no such call.
pub(crate) fn move_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    match rename_noreplace(from, to) {
        Some(done) => done,
        None => std::fs::hard_link(from, to).and_then(|()| std::fs::remove_file(from)),
    }
}

/// `renameat2(RENAME_NOREPLACE)`; `None` where the system or file system
/// has no such call.
#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> Option<std::io::Result<()>> {
    use std::os::unix::ffi::OsStrExt as _;
    let (Ok(c_from), Ok(c_to)) = (
        std::ffi::CString::new(from.as_os_str().as_bytes()),
        std::ffi::CString::new(to.as_os_str().as_bytes()),
    ) else {
        return Some(Err(std::io::Error::other("a path with a NUL byte")));
    };
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let renamed = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if renamed == 0 {
        return Some(Ok(()));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS) => None,
        _ => Some(Err(error)),
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_noreplace(_from: &Path, _to: &Path) -> Option<std::io::Result<()>> {
    None
}

/// How locking the active audit file went.
enum Locked {
    /// Locked: the handle holding the lock, with the file's inode and device.
    Held(File, u64, u64),
    /// Not a regular file (a device such as `/dev/full`, a pipe): nothing
    /// to take over, so nothing is locked.
    NotAFile,
    /// The file system cannot lock: written unlocked.
    Unsupported(std::io::Error),
}

/// Locks the file `handle` is open on (the active audit file) for this
/// process alone (`flock`, which another process's lock refuses), on a
/// handle of its own, so the data handle may close and open again without
/// letting the lock go. Refused when another process holds it.
fn lock(handle: &File, path: &Path) -> Result<Locked, String> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let meta = handle
        .metadata()
        .map_err(|e| format!("cannot stat `{}`: {e}", path.display()))?;
    if !meta.is_file() {
        return Ok(Locked::NotAFile);
    }
    let held = handle
        .try_clone()
        .map_err(|e| format!("cannot lock `{}`: {e}", path.display()))?;
    // SAFETY: `flock` on a descriptor `held` owns for the whole call; the
    // lock goes when `held` (and every descriptor duplicated from it) is
    // closed.
    let rc = unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Locked::Held(held, meta.ino(), meta.dev()));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        return Err(format!(
            "`{}` is being written by another process (a second leash on the same trail?)",
            path.display()
        ));
    }
    Ok(Locked::Unsupported(e))
}

/// The existing audit file at `path`, locked (see [`lock`]), before
/// anything is read or moved; `None` when there is none yet (or it cannot
/// be locked: the reopen that follows says so).
fn lock_existing(path: &Path) -> Result<Option<(File, u64, u64)>, String> {
    match OpenOptions::new().append(true).open(path) {
        Ok(file) => match lock(&file, path)? {
            Locked::Held(held, ino, dev) => Ok(Some((held, ino, dev))),
            Locked::NotAFile | Locked::Unsupported(_) => Ok(None),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot open `{}`: {e}", path.display())),
    }
}

/// Makes a new or renamed entry in the file's directory durable.
fn sync_dir(path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| format!("cannot sync the directory `{}`: {e}", dir.display()))
}

fn read_tail(path: &Path, window: u64) -> std::io::Result<String> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        // A device or pipe (stdout through /dev/stdout, say) holds no chain
        // to continue, and may never end.
        return Ok(String::new());
    }
    let len = meta.len();
    let start = len.saturating_sub(window);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(len - start).read_to_end(&mut bytes)?;
    // Skip the (possibly partial) first line of a window into the file.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok(match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_owned(),
        _ => text,
    })
}

/// `PATH.<seq>` (20 digits, so names sort in chain order), with an optional
/// suffix for a file set aside after a crash.
fn rotated_name(path: &Path, last_seq: u64, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{last_seq:020}"));
    if !suffix.is_empty() {
        name.push(format!(".{suffix}"));
    }
    PathBuf::from(name)
}

/// Approval grants the trail at `path` records as used and that have not
/// expired at `now` (seconds since the epoch), as (approver, grant id,
/// expiry): a restarted sidecar must not let them be used again. Files are
/// read newest first, line by line, and reading stops after a file whose
/// last record is older than `horizon` before `now`: no grant used in it
/// can still be valid. Unreadable files and lines are passed over (the
/// trail's own checks report them).
pub fn used_grants(path: &Path, now: u64, horizon: u64) -> Vec<(String, String, u64)> {
    use std::io::BufRead as _;
    const USED: &str = r#""outcome":"used""#;
    let oldest = now.saturating_sub(horizon);
    let mut files = rotated_files(path);
    files.push(path.to_owned());
    let mut found = Vec::new();
    let mut read: u64 = 0;
    // One buffer for every line: most lines are only searched, not parsed.
    // The line before is kept in the other: a file's last record gives its
    // newest time.
    let mut line = Vec::with_capacity(4096);
    let mut last_line = Vec::with_capacity(4096);
    for file in files.iter().rev() {
        // Only regular files: a device (`/dev/full`, say) reads forever.
        if !std::fs::metadata(file).is_ok_and(|m| m.is_file()) {
            continue;
        }
        if read >= MAX_GRANT_SCAN_BYTES {
            warn!(
                read,
                "the audit trail within the longest grant lifetime is larger than leash reads at \
                 start; grants used in older records are not remembered"
            );
            break;
        }
        let Ok(opened) = File::open(file) else {
            continue;
        };
        let mut reader = std::io::BufReader::with_capacity(1 << 20, opened);
        last_line.clear();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n as u64,
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            std::mem::swap(&mut line, &mut last_line);
            // A damaged line is passed over, not the rest of the file.
            let Ok(text) = std::str::from_utf8(&last_line) else {
                continue;
            };
            if !text.contains(USED) {
                continue;
            }
            let Ok(record) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            let grant = &record["grant"];
            if let (Some(approver), Some(id), Some(exp)) = (
                grant["approver"].as_str(),
                grant["grant_id"].as_str(),
                grant["expires_at"].as_u64(),
            ) {
                if exp > now {
                    found.push((approver.to_owned(), id.to_owned(), exp));
                }
            }
        }
        // The record's own `time`, parsed: a search of the text would find
        // a `"time"` in a context value recorded in clear first (keys are
        // in order, `context` before `time`), and a caller could then stop
        // the scan early with an old date, so that grants used in older
        // files could be used again. A last line that does not parse gives
        // no time, and the scan goes on.
        let newest = serde_json::from_slice::<Value>(&last_line)
            .ok()
            .and_then(|record| {
                let time = record.get("time")?.as_str()?.to_owned();
                let at = chrono::DateTime::parse_from_rfc3339(&time).ok()?;
                u64::try_from(at.timestamp()).ok()
            });
        if newest.is_some_and(|t| t < oldest) {
            break;
        }
    }
    found
}

/// Most bytes of trail read at start for used grants (newest first): at
/// roughly a gigabyte a second, about a second before the sidecar serves.
const MAX_GRANT_SCAN_BYTES: u64 = 1 << 30;

/// The rotated and set-aside files of the trail at `path`, in chain order.
fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(base) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{base}.");
    // `PATH.<20 digits>`, or `PATH.<20 digits>.torn` with an optional
    // number: nothing else (a compressed or backup copy) is part of the
    // chain.
    let ours = |name: &str| {
        name.strip_prefix(&prefix).is_some_and(|rest| {
            let seq = match rest.split_once(".torn") {
                Some((seq, n)) if n.bytes().all(|b| b.is_ascii_digit()) => seq,
                Some(_) => return false,
                None => rest,
            };
            seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit())
        })
    };
    let mut rotated: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| ours(&n.to_string_lossy())))
        .collect();
    rotated.sort();
    rotated
}

impl FileSink {
    fn reopen(&mut self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        let existed = self.path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("cannot open `{}`: {e}", self.path.display()))?;
        self.keep_locked(&file)?;
        self.entry_unsynced |= !existed;
        if self.entry_unsynced {
            sync_dir(&self.path)?;
            self.entry_unsynced = false;
        }
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat `{}`: {e}", self.path.display()))?;
        // A failed batch whose bytes could not be cut off before: cut them
        // now, or stay unavailable (records after them would follow a
        // partial line in the middle of the chain).
        if let Some((ino, len)) = self.cut_to {
            if meta.ino() == ino && meta.len() > len {
                file.set_len(len).map_err(|e| {
                    format!(
                        "cannot cut a failed write off `{}`: {e}",
                        self.path.display()
                    )
                })?;
            }
            self.cut_to = None;
        }
        self.good_len = file
            .metadata()
            .map_err(|e| format!("cannot stat `{}`: {e}", self.path.display()))?
            .len();
        self.file = Some(file);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8], last_seq: u64) -> Result<(), String> {
        if self.file.is_some() && !self.still_in_place() {
            // Records written to a removed or replaced file would be lost
            // with it; continue the chain in a file at the path.
            warn!(
                file = %self.path.display(),
                "the audit file was removed or replaced; the chain continues in a new file"
            );
            self.file = None;
        }
        if self.file.is_none() {
            self.reopen()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err("the audit file is not open".to_owned());
        };
        // Where this batch begins: the file may have been cut by someone
        // else (copytruncate) since leash last wrote, so not `good_len`.
        let before = file.metadata().map_or(self.good_len, |m| m.len());
        let written = file.write_all(bytes).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // Cut any partial batch off, so the chain on disk stays whole;
            // reopen next time (the file may have been removed or replaced).
            // Never lengthened: padding a file would add damage.
            let cut =
                file.metadata().is_ok_and(|m| m.len() <= before) || file.set_len(before).is_ok();
            if !cut {
                use std::os::unix::fs::MetadataExt as _;
                self.cut_to = file.metadata().ok().map(|m| (m.ino(), before));
            }
            self.file = None;
            return Err(format!("cannot write `{}`: {e}", self.path.display()));
        }
        self.good_len += bytes.len() as u64;
        if self.good_len >= self.max_bytes {
            // The records are on disk whatever happens to the rotation; a
            // failed rotation is tried again after the next write.
            if let Err(e) = self.rotate(last_seq) {
                warn!(error = %e, "audit trail rotation failed; writing on to the current file");
            }
        }
        Ok(())
    }

    /// Whether the open file is still the one at the path.
    /// Holds the lock of the file `file` is open on: kept if it is the
    /// file already locked, else taken (and the old file's let go).
    fn keep_locked(&mut self, file: &File) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat `{}`: {e}", self.path.display()))?;
        if self
            .lock
            .as_ref()
            .is_some_and(|(_, ino, dev)| *ino == meta.ino() && *dev == meta.dev())
        {
            return Ok(());
        }
        self.lock = None;
        match lock(file, &self.path)? {
            Locked::Held(held, ino, dev) => self.lock = Some((held, ino, dev)),
            Locked::NotAFile => {}
            Locked::Unsupported(e) => {
                if !std::mem::replace(&mut self.lock_warned, true) {
                    warn!(file = %self.path.display(), error = %e, "cannot lock the audit file; writing it unlocked");
                }
            }
        }
        Ok(())
    }

    fn still_in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let (Some(file), Ok(at_path)) = (self.file.as_ref(), std::fs::metadata(&self.path)) else {
            return false;
        };
        file.metadata()
            .is_ok_and(|open| open.ino() == at_path.ino() && open.dev() == at_path.dev())
    }

    fn rotate(&mut self, last_seq: u64) -> Result<(), String> {
        let rotated = rotated_name(&self.path, last_seq, "");
        self.file = None;
        move_without_overwriting(&self.path, &rotated)?;
        info!(file = %rotated.display(), last_seq, "audit trail rotated");
        self.reopen()
    }
}

impl Sink {
    fn write(&mut self, bytes: &[u8], last_seq: u64) -> Result<(), String> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)
                    .and_then(|()| out.flush())
                    .map_err(|e| format!("cannot write to stdout: {e}"))
            }
            Sink::File(file) => file.write(bytes, last_seq),
        }
    }

    /// Opens the file again (it may have been removed or replaced).
    fn reopen(&mut self) -> Result<(), String> {
        match self {
            Sink::Stdout => Ok(()),
            Sink::File(file) => file.reopen(),
        }
    }
}

/// What the writer could not write by the time it closed: records already
/// answered (queued mode) and the record of an outage (decisions refused,
/// or answered late, while writes failed).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unwritten {
    pub records: usize,
    /// Decisions refused during an outage whose record was not written;
    /// `None` when no outage record is owed.
    pub outage_refused: Option<u64>,
}

impl Unwritten {
    pub fn is_empty(&self) -> bool {
        self.records == 0 && self.outage_refused.is_none()
    }
}

/// The writer thread's loop; ends when every sender is gone, after one last
/// attempt at whatever is owed, and says what it could not write.
///
/// `linger`: how long to wait for more records after the first of a batch.
/// Zero when callers wait for the sync (they are the batch); in the queued
/// mode nobody waits, so a short linger turns a sync per record into a sync
/// per batch.
pub fn run(
    mut sink: Sink,
    mut head: Head,
    mut jobs: mpsc::Receiver<Job>,
    status: Arc<AuditStatus>,
    linger: Duration,
    fail_open: bool,
) -> Unwritten {
    // If this thread ends for any reason but a shutdown, the trail is
    // unavailable: decisions are refused and health says so.
    let _stopped = StoppedGuard(status.clone());
    let mut outage = Outage {
        fail_open,
        ..Outage::default()
    };
    // Records already answered (queued mode) whose write failed: written
    // first, in their order, once writing works again.
    let mut retry: Vec<super::Record> = Vec::new();
    let mut last_anchor = Instant::now();
    let mut anchored_seq = head.next_seq;
    // Set when the last sender is gone (shutdown): one more pass writes
    // what is owed (an outage's record, answered records to retry, refusals
    // counted on the request path), then the loop ends.
    let mut closing = false;
    loop {
        if closing {
            break;
        }
        let first = if status.available() {
            match jobs.blocking_recv() {
                Some(job) => Some(job),
                None => {
                    closing = true;
                    None
                }
            }
        } else {
            match jobs.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closing = true;
                    let _ = sink.reopen();
                    None
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Nothing waiting: try on our own (the outage record,
                    // and any records to retry), so the trail recovers
                    // without traffic.
                    std::thread::sleep(PROBE_INTERVAL);
                    let _ = sink.reopen();
                    None
                }
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        if !batch.is_empty() && !linger.is_zero() {
            std::thread::sleep(linger);
        }
        let mut records: usize = batch.iter().map(|j| j.records.len()).sum();
        while !batch.is_empty() && records < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => {
                    records += job.records.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // A caller that stopped waiting (the write took longer than
        // `WRITE_STALL`) was answered DENY: records saying otherwise are not
        // written. The stall is an outage: its record, written first here,
        // counts them as refused. (A write that completes just as the
        // caller gives up is still written.)
        let mut gave_up = 0u64;
        let mut gave_up_at = None;
        batch.retain(|job| match job.gave_up() {
            Some(failure) => {
                gave_up += job.records.len() as u64;
                gave_up_at = earliest(gave_up_at.take(), &failure.since);
                false
            }
            None => true,
        });
        let pending = status.take_pending();
        let refused = pending.refused;
        if gave_up > 0 {
            outage.failed(
                &format!(
                    "an audit write did not complete in {}s (a stalled disk?)",
                    super::WRITE_STALL.as_secs()
                ),
                gave_up,
            );
            outage.began(gave_up_at);
        }
        // In chain order: the end of an outage, records to retry, new ones.
        let mut next = head.clone();
        let mut bytes = String::with_capacity((records + retry.len() + 1) * 640);
        if refused > 0 && !outage.active() {
            // Refused on the request path while this thread's own writes
            // succeeded (a write that stalled, then finished): an outage
            // all the same, and the trail says why.
            let error = pending
                .first
                .as_ref()
                .map(|f| f.error.clone())
                .or_else(|| status.last_error())
                .unwrap_or_else(|| "the audit trail was unavailable".to_owned());
            outage.failed(&error, 0);
        }
        // It began at the first refusal, which may be earlier than this
        // thread learned of it (it was stuck in a write).
        if let Some(first) = pending.first.filter(|_| outage.active()) {
            outage.began(Some(first.since));
        }
        outage.refused_records += refused;
        let outage_ended = outage.active();
        if outage_ended {
            bytes.push_str(&seal(outage.record(), &mut next));
        }
        for record in &mut retry {
            bytes.push_str(&seal_record(record, &mut next));
        }
        for job in &mut batch {
            for record in &mut job.records {
                bytes.push_str(&seal_record(record, &mut next));
            }
        }
        if bytes.is_empty() {
            // Nothing to write and nothing owed: no outage, no record to
            // retry, so the last write succeeded. A trail still marked
            // unavailable was marked so by a caller that gave up just as
            // that write completed; without this, health would stay
            // NOT_SERVING until the next decision's record is written.
            if !status.available() {
                status.recovered();
            }
            // A job without records (a wake-up, or an empty batch) waits
            // for nothing: answer it.
            for job in batch {
                if let Some(done) = job.done {
                    let _ = done.send(Ok(()));
                }
            }
            continue;
        }
        let written = next.next_seq - head.next_seq;
        status.writing(true);
        let result = sink.write(bytes.as_bytes(), next.next_seq.saturating_sub(1));
        status.writing(false);
        match &result {
            Ok(()) => {
                head = next;
                status.written(written, head.next_seq);
                outage = Outage {
                    fail_open,
                    ..Outage::default()
                };
                retry.clear();
                // Callers that gave up while this very write stalled were
                // answered DENY, yet their records are now in the chain:
                // the next outage record says how many of the records
                // before it were written late. The others' callers, if
                // their wait ends now, answer as if in time.
                let mut late = 0u64;
                for job in batch.iter().filter(|job| job.done.is_some()) {
                    if job.settled.set(Settled::Written).is_err() {
                        late += job.records.len() as u64;
                    }
                }
                let late_at = first_gave_up(&batch);
                if late > 0 {
                    outage.failed(
                        &format!(
                            "an audit write completed after {}s, when its callers had been \
                             answered DENY",
                            super::WRITE_STALL.as_secs()
                        ),
                        0,
                    );
                    outage.late_records = late;
                    // Since the first of those callers gave up.
                    outage.began(late_at);
                }
            }
            Err(e) => {
                if status.available() {
                    error!(error = %e, records, "audit trail write failed; decisions are refused until it works again");
                }
                // Callers waiting (disk mode) are told, and their decisions
                // refused; records nobody waits for (queued mode) were
                // answered already, so they are kept for the retry.
                let mut refused_now = 0u64;
                for job in &mut batch {
                    if job.done.is_some() {
                        refused_now += job.records.len() as u64;
                    } else {
                        retry.append(&mut job.records);
                    }
                }
                outage.failed(e, refused_now);
                // Since the first caller of this batch gave up, if one did
                // while the write hung before failing.
                outage.began(first_gave_up(&batch));
                status.failed(e.clone());
            }
        }
        for job in batch {
            if let Some(done) = job.done {
                let _ = done.send(result.clone());
            }
        }
        if last_anchor.elapsed() >= ANCHOR_INTERVAL && head.next_seq != anchored_seq {
            anchor(&head);
            last_anchor = Instant::now();
            anchored_seq = head.next_seq;
        }
    }
    let unwritten = Unwritten {
        records: retry.len(),
        outage_refused: outage.active().then_some(outage.refused_records),
    };
    if !retry.is_empty() {
        error!(
            records = retry.len(),
            "audit trail closed while writes were failing: these answered decisions' records \
             are lost"
        );
    }
    if outage.active() {
        error!(
            since = outage.since.as_deref().unwrap_or_default(),
            refused_records = outage.refused_records,
            late_records = outage.late_records,
            fail_open = outage.fail_open,
            error = outage.error.as_str(),
            "audit trail closed before it could record its outage"
        );
    }
    if head.next_seq != anchored_seq {
        anchor(&head);
    }
    _stopped.disarm();
    unwritten
}

/// Marks the trail unavailable if the writer thread ends unexpectedly
/// (a panic): nothing would write the records of new decisions.
struct StoppedGuard(Arc<AuditStatus>);

impl StoppedGuard {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0
            .failed("the audit writer stopped unexpectedly".to_owned());
    }
}

/// A period during which records could not be written; recorded in the
/// chain when it ends, so the trail itself says that (and since when)
/// decisions were refused.
#[derive(Default)]
struct Outage {
    since: Option<String>,
    error: String,
    refused_records: u64,
    /// With `--audit-fail-open` the decisions were answered all the same:
    /// the count is of decisions answered without a record.
    fail_open: bool,
    /// Records written (just before this outage record's batch) after
    /// their callers had been answered DENY: they record what was decided,
    /// not what was answered.
    late_records: u64,
}

impl Outage {
    fn active(&self) -> bool {
        self.since.is_some()
    }

    fn failed(&mut self, error: &str, records: u64) {
        if self.since.is_none() {
            self.since = Some(now());
        }
        self.error = error.to_owned();
        self.refused_records += records;
    }

    /// Dates an active outage from `since` if that is earlier: the failure
    /// was met on the request path before this thread learned of it.
    fn began(&mut self, since: Option<String>) {
        if let (Some(since), Some(current)) = (since, &self.since) {
            if since < *current {
                self.since = Some(since);
            }
        }
    }

    fn record(&self) -> Map<String, Value> {
        let mut r = Map::new();
        r.insert("v".into(), Value::from(1));
        r.insert("time".into(), Value::from(now()));
        r.insert("event".into(), Value::from("audit_unavailable"));
        r.insert(
            "since".into(),
            Value::from(self.since.clone().unwrap_or_default()),
        );
        r.insert("error".into(), Value::from(self.error.clone()));
        // Decisions answered DENY (or refused) because they could not be
        // recorded during the outage; with fail-open, answered unrecorded.
        let key = if self.fail_open {
            "unrecorded_answered"
        } else {
            "refused_records"
        };
        r.insert(key.into(), Value::from(self.refused_records));
        if self.late_records > 0 {
            r.insert("late_records".into(), Value::from(self.late_records));
        }
        r
    }
}

/// The earlier of two times in [`now`]'s form (which sorts as text).
fn earliest(a: Option<String>, b: &str) -> Option<String> {
    match a {
        Some(a) if a.as_str() <= b => Some(a),
        _ => Some(b.to_owned()),
    }
}

pub(super) fn now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// Logs the chain's head: a copy outside the file, which truncation of the
/// newest records cannot remove.
fn anchor(head: &Head) {
    info!(
        seq = head.next_seq.saturating_sub(1),
        hash = %head.prev_hash,
        "audit trail head"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_held_through_an_outage_and_given_up_with_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = AuditTarget::File(dir.path().join("audit.log"));
        let (Sink::File(mut first), _) = open(&target, 1 << 20).expect("opens") else {
            panic!("a file sink");
        };
        // A failed write closes the data handle; the trail stays this
        // leash's, so a second one is refused before it reads anything.
        first.file = None;
        let refused = open(&target, 1 << 20).err().unwrap_or_default();
        assert!(
            refused.contains("is being written by another process"),
            "{refused}"
        );
        // Reopened (the outage over), then rotated: the new file is locked
        // and the old one let go.
        first.reopen().expect("reopens");
        first.rotate(7).expect("rotates");
        let rotated = rotated_name(&first.path, 7, "");
        let old = OpenOptions::new()
            .append(true)
            .open(&rotated)
            .expect("rotated");
        assert!(matches!(lock(&old, &rotated), Ok(Locked::Held(..))));
        assert!(open(&target, 1 << 20).is_err());
        drop(first);
        assert!(open(&target, 1 << 20).is_ok(), "free once the sink is gone");
    }

    #[test]
    fn devices_are_not_locked() {
        let full = OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("opens");
        assert!(matches!(
            lock(&full, Path::new("/dev/full")),
            Ok(Locked::NotAFile)
        ));
    }

    fn chain_of(n: u64) -> (String, Head) {
        let mut head = Head::genesis();
        let mut text = String::new();
        for i in 0..n {
            let mut record = Map::new();
            record.insert("n".into(), Value::from(i));
            text.push_str(&seal(record, &mut head));
        }
        (text, head)
    }

    /// A file's newest time is its last record's own `time`, not the first
    /// `"time"` in the line: a context value recorded in clear comes first
    /// (keys are in order), and an old date there used to stop the scan
    /// before older files, forgetting the grants used in them.
    #[test]
    fn a_time_inside_a_recorded_context_does_not_stop_the_scan_for_used_grants() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.log");
        let now = 2_000_000_000u64;
        let rfc3339 = |t: u64| {
            chrono::DateTime::from_timestamp(t as i64, 0)
                .expect("time")
                .to_rfc3339()
        };
        let used = serde_json::json!({
            "context": {},
            "grant": {"approver": "ops", "grant_id": "g-1", "expires_at": now + 600, "outcome": "used"},
            "time": rfc3339(now - 100),
        });
        std::fs::write(rotated_name(&path, 0, ""), format!("{used}\n")).expect("write");
        let later = serde_json::json!({
            "context": {"ticket": {"time": "2000-01-01T00:00:00Z"}},
            "time": rfc3339(now - 10),
        });
        std::fs::write(&path, format!("{later}\n\n")).expect("write");
        assert_eq!(
            used_grants(&path, now, 900),
            vec![("ops".to_owned(), "g-1".to_owned(), now + 600)]
        );
        // A newest file whose last record is past the horizon does stop it.
        let old = serde_json::json!({"context": {}, "time": rfc3339(now - 1000)});
        std::fs::write(&path, format!("{old}\n")).expect("write");
        assert_eq!(used_grants(&path, now, 900), Vec::new());
    }

    #[test]
    fn the_head_is_found_past_a_set_aside_file_with_no_whole_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.log");
        let (text, head) = chain_of(6);
        std::fs::write(rotated_name(&path, 5, ""), text).expect("write");
        // Rotated, then a crash in the first write of the new file.
        std::fs::write(rotated_name(&path, 5, "torn"), "{\"seq\":6,\"pre").expect("write");
        std::fs::write(&path, "").expect("write");
        assert_eq!(recover_head(&path).expect("recovers"), head);
    }

    #[test]
    fn a_torn_active_file_is_set_aside_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.log");
        let (text, head) = chain_of(3);
        std::fs::write(&path, text + "{\"seq\":3,\"pr").expect("write");
        assert_eq!(recover_head(&path).expect("recovers"), head);
        assert!(!path.exists(), "the torn file was renamed");
        assert!(rotated_name(&path, 2, "torn").exists());
    }
}
