//! Hot reload: notice that the bundle's files changed, build a complete new
//! snapshot off the request path, and publish it with one atomic store, or
//! refuse it and keep serving the last good one.
//!
//! How a change travels:
//!
//! ```text
//! inotify event / poll stamp differs / SIGHUP
//!   → wake (coalesced: one pending wake-up however many events)
//!   → settle (wait until no event for `settle`, at most `MAX_COALESCE`)
//!   → re-arm watches (follows a swapped `..data` or git-sync symlink)
//!   → reload thread (low priority): stable read → Snapshot::build
//!       → same version: UNCHANGED   → invalid: REFUSED (last good serves on)
//!       → else: one ArcSwap store, LOADED; the old snapshot is freed on the
//!         reload thread once requests in flight let go of it
//! ```
//!
//! Watches are armed *before* the files are read, so a change made while a
//! bundle is being read or built always leads to another attempt.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{oneshot, Notify};
use tracing::{debug, error, info, warn};

use crate::bundle::{
    BuildCache, BuildTimings, BundleError, BundleLocation, BundleSources, Diagnostic, IndexStats,
    LiveBundle, ReadOutcome, Snapshot, TreeStamp,
};
use crate::server::Server;

/// Default quiet time before a burst of events is acted on.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(50);

/// A burst of events that never goes quiet is acted on after this long.
pub const MAX_COALESCE: Duration = Duration::from_secs(1);

/// Longest wait for bundle files open for writing to be closed.
pub const MAX_OPEN_WRITE: Duration = Duration::from_secs(10);

/// First pause before reading again files that changed while being read.
const MIN_RETRY: Duration = Duration::from_millis(10);

/// Reads of a bundle that keeps changing before startup gives up (about a
/// minute with the pauses between them).
const STARTUP_TRIES: u32 = 60;

/// Polling interval used when inotify cannot be used at all.
pub const FALLBACK_POLL: Duration = Duration::from_secs(2);

/// How long the reload thread waits for requests in flight to release a
/// replaced snapshot before leaving the last one to free it.
const RETIRE_WAIT: Duration = Duration::from_secs(30);

/// How changes to the bundle's files are noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// File system events (inotify), falling back to polling when the
    /// kernel refuses watches.
    Events,
    /// Compare a stamp of the trees every interval (NFS, EFS and other file
    /// systems without inotify).
    Poll(Duration),
    /// Only SIGHUP reloads.
    Off,
}

/// Reload settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadOptions {
    pub watch: WatchMode,
    /// Quiet time that ends a burst of events.
    pub settle: Duration,
    /// Build a scope index with each snapshot (`--policy-index`).
    pub policy_index: bool,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        Self {
            watch: WatchMode::Events,
            settle: DEFAULT_SETTLE,
            policy_index: true,
        }
    }
}

/// What started a reload attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    Watch,
    Poll,
    Signal,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Watch => "watch",
            Trigger::Poll => "poll",
            Trigger::Signal => "signal",
        }
    }
}

/// How a reload attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new version is served.
    Loaded,
    /// The files hold the version already served.
    Unchanged,
    /// The files are invalid; the previous version serves on.
    Refused(Vec<Diagnostic>),
}

/// One reload attempt, for the status RPC.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub trigger: Trigger,
    pub started_at: SystemTime,
    pub finished_at: SystemTime,
    /// Version of the files read, when they could be read in full.
    pub version: Option<String>,
    pub outcome: Outcome,
}

/// Attempts since startup, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub loaded: u64,
    pub unchanged: u64,
    pub refused: u64,
}

/// Reload state shared between the reloader (writer) and the status RPC
/// (reader). Never touched on the decision path.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
struct StatusInner {
    watch: String,
    last: Option<Attempt>,
    /// When the files were last read and accepted (loaded or unchanged).
    last_success: Option<SystemTime>,
    counters: Counters,
}

/// A copy of [`ReloadStatus`] at one instant.
#[derive(Debug, Clone)]
pub struct StatusView {
    /// How changes are noticed: "inotify", "poll every 2s", "off".
    pub watch: String,
    pub last_attempt: Option<Attempt>,
    /// When the files were last read and accepted: loaded, or found
    /// unchanged. `None` until the first load through the reloader.
    pub last_success: Option<SystemTime>,
    pub counters: Counters,
}

impl ReloadStatus {
    pub fn view(&self) -> StatusView {
        Self::view_of(self.lock().clone())
    }

    fn view_of(inner: StatusInner) -> StatusView {
        StatusView {
            watch: if inner.watch.is_empty() {
                "off".to_owned()
            } else {
                inner.watch
            },
            last_attempt: inner.last,
            last_success: inner.last_success,
            counters: inner.counters,
        }
    }

    /// Publishes `snapshot` and records the attempt that loaded it as one
    /// step for [`ReloadStatus::view_with`]: a status never shows the new
    /// version with the previous attempt. Returns the replaced snapshot.
    pub fn install(
        &self,
        live: &LiveBundle,
        snapshot: Snapshot,
        attempt: Attempt,
    ) -> Option<Arc<Snapshot>> {
        let mut inner = self.lock();
        let old = live.replace(snapshot);
        inner.counters.loaded += 1;
        inner.last_success = Some(attempt.finished_at);
        inner.last = Some(attempt);
        old
    }

    /// The served snapshot and the status, read together (see `install`).
    pub fn view_with(&self, live: &LiveBundle) -> (Option<Arc<Snapshot>>, StatusView) {
        let inner = self.lock();
        let serving = live.current();
        (serving, Self::view_of(inner.clone()))
    }

    fn set_watch(&self, watch: String) {
        self.lock().watch = watch;
    }

    fn record(&self, attempt: Attempt) {
        let mut inner = self.lock();
        match attempt.outcome {
            Outcome::Loaded => inner.counters.loaded += 1,
            Outcome::Unchanged => inner.counters.unchanged += 1,
            Outcome::Refused(_) => inner.counters.refused += 1,
        }
        if matches!(attempt.outcome, Outcome::Loaded | Outcome::Unchanged) {
            inner.last_success = Some(attempt.finished_at);
        }
        inner.last = Some(attempt);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        // The state is plain data, valid whatever a panicking writer left.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps a server's bundle in step with its files.
pub struct Reloader {
    server: Arc<Server>,
    location: BundleLocation,
    options: ReloadOptions,
    wake: Arc<Notify>,
    forced: AtomicBool,
    /// Watches armed by [`Reloader::load_initial`] before it reads the
    /// files (so nothing written during or after that read goes unseen),
    /// handed to [`Reloader::run`].
    armed: Mutex<Option<Watch>>,
    /// What each build leaves for the next; used by the reload thread only.
    cache: Arc<Mutex<BuildCache>>,
    /// Bundle files written to and not yet closed, from inotify events: a
    /// truncated file mid-write must not be read as the new bundle.
    writing: Arc<Mutex<HashSet<PathBuf>>>,
    /// Set by the watcher when a directory is made under a bundle
    /// directory: writes in it went unseen until it was watched.
    dirs_made: Arc<AtomicBool>,
}

/// How the bundle is being watched right now.
struct Watch {
    mode: WatchMode,
    watcher: Option<Armed>,
    poller: Option<AbortOnDrop>,
    /// The directories read from that the watcher watches, as last armed.
    watched: HashSet<PathBuf>,
}

impl Watch {
    fn start_polling(
        &mut self,
        policies: &Path,
        schemas: &Path,
        interval: Duration,
        loaded: Option<TreeStamp>,
        wake: &Arc<Notify>,
    ) {
        self.poller = Some(AbortOnDrop(tokio::spawn(poll(
            policies.to_owned(),
            schemas.to_owned(),
            interval,
            loaded,
            wake.clone(),
        ))));
    }
}

/// A task that ends with its owner (a return, or shutdown dropping the
/// future), so the poller never outlives the reloader.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Reloader {
    pub fn new(server: Arc<Server>, location: BundleLocation, options: ReloadOptions) -> Arc<Self> {
        let cache = BuildCache::new(options.policy_index);
        Arc::new(Self {
            server,
            location,
            options,
            wake: Arc::new(Notify::new()),
            forced: AtomicBool::new(false),
            armed: Mutex::new(None),
            cache: Arc::new(Mutex::new(cache)),
            writing: Arc::new(Mutex::new(HashSet::new())),
            dirs_made: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Loads the bundle for the first time and publishes it (health turns
    /// SERVING). A refused bundle is returned as the error: leash does not
    /// start serving without a valid one.
    pub async fn load_initial(&self) -> Result<(), BundleError> {
        let watch = self.start_watching().await;
        // Described before anything is served, so a status never shows a
        // bundle without how it is watched.
        self.describe(&watch, matches!(self.location, BundleLocation::Dirs { .. }));
        *self.armed.lock().unwrap_or_else(PoisonError::into_inner) = Some(watch);
        let live = self.server.live();
        let mut tries = 0u32;
        let began = Instant::now();
        loop {
            let started_at = SystemTime::now();
            let location = self.location.clone();
            let live_for_job = live.clone();
            let (cache, writing) = (self.cache.clone(), self.writing.clone());
            let job =
                on_reload_thread(move || build(&location, &live_for_job, &cache, &writing, None))
                    .await;
            match job {
                Job::Changing if tries < STARTUP_TRIES => {
                    tries += 1;
                    if began.elapsed() >= MAX_OPEN_WRITE {
                        // A file held open that long is not a deploy in
                        // progress; read it as it is (as `settle` does).
                        self.writing
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clear();
                    }
                    let pause = MIN_RETRY
                        .saturating_mul(1 << tries.min(7))
                        .clamp(self.options.settle.min(MAX_COALESCE), MAX_COALESCE);
                    tokio::time::sleep(pause).await;
                }
                Job::Changing => {
                    return Err(BundleError {
                        origin: self.location.describe(),
                        diagnostics: vec![Diagnostic::plain(
                            None,
                            format!(
                                "the bundle's files kept changing while they were read \
                                 ({STARTUP_TRIES} tries); is something writing into the \
                                 bundle directories?"
                            ),
                        )],
                    })
                }
                Job::Startup(snapshot) => {
                    self.server.announce(&snapshot);
                    let attempt = Attempt {
                        trigger: Trigger::Startup,
                        started_at,
                        finished_at: SystemTime::now(),
                        version: Some(snapshot.version.clone()),
                        outcome: Outcome::Loaded,
                    };
                    let status = self.server.reload_status();
                    // Nothing was served before: nothing to free.
                    drop(status.install(&live, *snapshot, attempt));
                    self.server.mark_serving().await;
                    return Ok(());
                }
                Job::Refused { version, error } => {
                    self.record(
                        Trigger::Startup,
                        started_at,
                        version,
                        Outcome::Refused(error.diagnostics.clone()),
                    );
                    return Err(error);
                }
                Job::Loaded { .. } | Job::Unchanged { .. } => {
                    // `build` only installs when asked to; nothing to do.
                    return Ok(());
                }
            }
        }
    }

    /// Asks for a reload even if no change was seen (SIGHUP).
    pub fn force(&self) {
        self.forced.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Watches the bundle and reloads on change until `shutdown` completes.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            () = self.clone().watch_and_reload() => {}
        }
    }

    async fn watch_and_reload(self: Arc<Self>) {
        let dirs = match &self.location {
            BundleLocation::Dirs { policies, schemas } => Some((policies.clone(), schemas.clone())),
            BundleLocation::Embedded => None,
        };
        let armed = self
            .armed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut watch = match armed {
            Some(watch) => watch,
            None => self.start_watching().await,
        };
        self.describe(&watch, dirs.is_some());

        let mut unstable = 0u32;
        loop {
            self.wake.notified().await;
            let burst = Instant::now();
            self.settle_since(burst, burst, MAX_COALESCE).await;
            let trigger = if self.forced.swap(false, Ordering::SeqCst) {
                Trigger::Signal
            } else {
                match watch.mode {
                    WatchMode::Poll(_) => Trigger::Poll,
                    _ => Trigger::Watch,
                }
            };
            // Re-arm before reading: the directories may now resolve to
            // another tree (a swapped symlink, a re-created directory), and
            // anything that changes from here on must wake us again. A
            // directory watched only now had its writes unseen (a tree being
            // copied in): settle again, now that they are seen.
            if let (WatchMode::Events, Some((policies, schemas))) = (watch.mode, &dirs) {
                let mut rounds = 0;
                while self.arm(&mut watch, policies, schemas).await
                    && rounds < MAX_NEW_DIR_ROUNDS
                    && burst.elapsed() < MAX_OPEN_WRITE
                {
                    rounds += 1;
                    // A round of its own for events (a copy that ran past
                    // the first second still gets a quiet period), within
                    // the burst's bound for open files.
                    let at_least = MAX_COALESCE.max(self.options.settle);
                    self.settle_since(burst, Instant::now(), at_least).await;
                }
                self.describe(&watch, true);
            }
            if self.reload(trigger).await {
                unstable = 0;
            } else {
                // The files changed while being read: try again after a
                // pause that grows, so a tree that never settles cannot
                // keep the reload thread busy.
                unstable = unstable.saturating_add(1);
                let pause = MIN_RETRY
                    .saturating_mul(1 << unstable.min(7))
                    .min(MAX_COALESCE);
                tokio::time::sleep(pause).await;
                self.wake.notify_one();
            }
        }
    }

    /// Starts noticing changes as configured: inotify watches, or a poller
    /// comparing against the trees as they are now.
    async fn start_watching(&self) -> Watch {
        let mut watch = Watch {
            mode: match self.location {
                BundleLocation::Dirs { .. } => self.options.watch,
                BundleLocation::Embedded => WatchMode::Off,
            },
            watcher: None,
            poller: None,
            watched: HashSet::new(),
        };
        if let BundleLocation::Dirs { policies, schemas } = &self.location {
            if watch.mode == WatchMode::Events {
                self.arm(&mut watch, policies, schemas).await;
            }
            if let (WatchMode::Poll(interval), None) = (watch.mode, &watch.poller) {
                let (p, s) = (policies.clone(), schemas.clone());
                let now = tokio::task::spawn_blocking(move || TreeStamp::for_polling(&p, &s))
                    .await
                    .ok();
                watch.start_polling(policies, schemas, interval, now, &self.wake);
            }
        }
        watch
    }

    /// (Re-)arms the inotify watches; on failure (the kernel's watch limit)
    /// falls back to polling rather than keep watches on a stale tree.
    /// True when a directory the bundle is read from appeared since the last
    /// arm (watched now by a path not watched before, or made, as the
    /// watcher saw: a directory deleted and made again under its old name,
    /// maybe with its old inode number), so writes in it went unseen.
    async fn arm(&self, watch: &mut Watch, policies: &Path, schemas: &Path) -> bool {
        let (p, s, wake, writing, made) = (
            policies.to_owned(),
            schemas.to_owned(),
            self.wake.clone(),
            self.writing.clone(),
            self.dirs_made.clone(),
        );
        // Walking the trees is blocking work.
        let armed =
            tokio::task::spawn_blocking(move || arm_watches(&[&p, &s], wake, writing, made))
                .await
                .map_err(|e| e.to_string())
                .and_then(|armed| armed.map_err(|e| e.to_string()));
        match armed {
            Ok((watcher, watched)) => {
                watch.watcher = Some(watcher);
                let made = self.dirs_made.swap(false, Ordering::SeqCst);
                let grew = made || watched.iter().any(|p| !watch.watched.contains(p));
                watch.watched = watched;
                grew
            }
            Err(e) => {
                warn!(
                    error = %e,
                    poll_interval_secs = FALLBACK_POLL.as_secs_f64(),
                    "cannot watch the bundle with inotify; polling instead"
                );
                watch.watcher = None;
                watch.watched.clear();
                watch.mode = WatchMode::Poll(FALLBACK_POLL);
                watch.start_polling(policies, schemas, FALLBACK_POLL, None, &self.wake);
                // Whatever changed while the watches were failing.
                self.wake.notify_one();
                false
            }
        }
    }

    fn describe(&self, watch: &Watch, has_dirs: bool) {
        let described = match (watch.mode, has_dirs) {
            (_, false) => "off (built-in bundle)".to_owned(),
            (WatchMode::Events, _) => "inotify".to_owned(),
            (WatchMode::Poll(interval), _) => format!("poll every {}", human(interval)),
            (WatchMode::Off, _) => "off (SIGHUP reloads)".to_owned(),
        };
        let status = self.server.reload_status();
        if status.view().watch != described {
            info!(watch = %described, settle_ms = self.options.settle.as_millis() as u64, "watching the policy bundle");
            status.set_watch(described);
        }
    }

    /// Waits for a burst of events that began at `burst` to end: no event
    /// for `settle`, and no bundle file left open for writing (bounded by
    /// `MAX_OPEN_WRITE` from `burst`, however many times the burst is
    /// settled); events that never go quiet end it `coalesce` after
    /// `round`.
    async fn settle_since(&self, burst: Instant, round: Instant, coalesce: Duration) {
        loop {
            let open_before = !self
                .writing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty();
            // With a writer mid-file, never spin: wait at least MIN_RETRY.
            let wait = if open_before {
                self.options.settle.max(MIN_RETRY)
            } else {
                self.options.settle
            };
            let quiet = tokio::time::timeout(wait, self.wake.notified())
                .await
                .is_err();
            let open = {
                let writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
                (!writing.is_empty()).then(|| writing.len())
            };
            match open {
                None if quiet || round.elapsed() >= coalesce => return,
                None => {}
                Some(files) if burst.elapsed() >= MAX_OPEN_WRITE => {
                    warn!(
                        files,
                        waited_secs = MAX_OPEN_WRITE.as_secs(),
                        "bundle files are still open for writing; reading them anyway"
                    );
                    self.writing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                    return;
                }
                // A writer is mid-file (truncated, not yet closed): its
                // close event wakes us.
                Some(_) => {}
            }
        }
    }

    /// One reload attempt: read, build, compare, publish or refuse. False
    /// when the files changed while being read (nothing was decided).
    async fn reload(&self, trigger: Trigger) -> bool {
        let started_at = SystemTime::now();
        let clock = Instant::now();
        let live = self.server.live();
        let serving = live.current().map(|s| s.version.clone());
        let location = self.location.clone();
        let (cache, writing) = (self.cache.clone(), self.writing.clone());
        let status = self.server.reload_status();
        let job = on_reload_thread(move || {
            build(
                &location,
                &live,
                &cache,
                &writing,
                Some((&status, trigger, started_at)),
            )
        })
        .await;
        let took_ms = clock.elapsed().as_secs_f64() * 1e3;
        match job {
            Job::Changing => {
                debug!("bundle files changed while being read; reading again once they settle");
                return false;
            }
            Job::Loaded {
                version,
                policies,
                entities,
                files,
                warnings,
                timings,
                index,
                ..
            } => {
                info!(
                    policy_version = %version,
                    previous_version = serving.as_deref().unwrap_or("none"),
                    trigger = trigger.as_str(),
                    policies,
                    entities,
                    files,
                    took_ms,
                    parse_ms = ms(timings.parse),
                    validate_ms = ms(timings.validate),
                    index_ms = ms(timings.index),
                    index = if index.is_some() { "on" } else { "off" },
                    unindexed_policies = index.map_or(policies, |i| i.unkeyed),
                    "policy bundle reloaded"
                );
                for warning in warnings {
                    warn!(warning = %warning, "policy validation warning");
                }
            }
            Job::Unchanged { version } => {
                debug!(policy_version = %version, trigger = trigger.as_str(), took_ms, "policy bundle unchanged");
                self.record(trigger, started_at, Some(version), Outcome::Unchanged);
            }
            Job::Refused { version, error } => {
                error!(
                    origin = %error.origin,
                    problems = error.diagnostics.len(),
                    attempted_version = version.as_deref().unwrap_or("unreadable"),
                    serving_version = serving.as_deref().unwrap_or("none"),
                    trigger = trigger.as_str(),
                    "policy bundle refused; the previous version keeps serving"
                );
                for d in &error.diagnostics {
                    error!(
                        file = d.file.as_deref().unwrap_or(""),
                        line = d.line.unwrap_or(0),
                        column = d.column.unwrap_or(0),
                        report = %d.rendered.trim_end(),
                        "bundle problem: {}",
                        d.message
                    );
                }
                self.record(
                    trigger,
                    started_at,
                    version,
                    Outcome::Refused(error.diagnostics),
                );
            }
            Job::Startup(_) => {}
        }
        true
    }

    fn record(
        &self,
        trigger: Trigger,
        started_at: SystemTime,
        version: Option<String>,
        outcome: Outcome,
    ) {
        self.server.reload_status().record(Attempt {
            trigger,
            started_at,
            finished_at: SystemTime::now(),
            version,
            outcome,
        });
    }
}

/// What the reload thread did.
enum Job {
    /// Startup: the snapshot to publish (the caller sets health).
    Startup(Box<Snapshot>),
    Loaded {
        /// The snapshot this one replaced, for the reload thread to free.
        replaced: Option<Arc<Snapshot>>,
        version: String,
        policies: usize,
        entities: usize,
        files: usize,
        warnings: Vec<String>,
        timings: BuildTimings,
        index: Option<IndexStats>,
    },
    Unchanged {
        version: String,
    },
    Refused {
        version: Option<String>,
        error: BundleError,
    },
    Changing,
}

/// Milliseconds, for log fields.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Reads and builds the bundle. With `install` (a reload), publishes a new
/// version into `live`, recording the attempt in the same step, and frees
/// the snapshot it replaces. Blocking: runs on the reload thread.
fn build(
    location: &BundleLocation,
    live: &LiveBundle,
    cache: &Mutex<BuildCache>,
    writing: &Mutex<HashSet<PathBuf>>,
    install: Option<(&ReloadStatus, Trigger, SystemTime)>,
) -> Job {
    let sources = match location {
        BundleLocation::Embedded => BundleSources::embedded(),
        BundleLocation::Dirs { policies, schemas } => {
            match BundleSources::read_stable(policies, schemas) {
                // A file was opened for writing during the read (its stamp
                // may not show it yet): what was read may be cut short.
                ReadOutcome::Read(_)
                    if !writing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_empty() =>
                {
                    return Job::Changing
                }
                ReadOutcome::Read(sources) => sources,
                ReadOutcome::Changing => return Job::Changing,
                ReadOutcome::Unreadable {
                    origin,
                    diagnostics,
                } => {
                    return Job::Refused {
                        version: None,
                        error: BundleError {
                            origin,
                            diagnostics,
                        },
                    }
                }
            }
        }
    };
    let version = sources.version();
    // The same files build the same snapshot: skip the work (unless the
    // files passed over changed, which the warnings name).
    if install.is_some()
        && live
            .current()
            .is_some_and(|s| s.version == version && s.skipped == sources.skipped)
    {
        return Job::Unchanged { version };
    }
    let built = {
        let mut cache = match cache.lock() {
            Ok(cache) => cache,
            // A build panicked half-way: start from nothing rather than trust
            // what it left.
            Err(poisoned) => {
                let mut cache = poisoned.into_inner();
                *cache = BuildCache::new(cache.indexes());
                cache
            }
        };
        Snapshot::build_cached(&sources, &mut cache)
    };
    let snapshot = match built {
        Ok(snapshot) => snapshot,
        Err(error) => {
            return Job::Refused {
                version: Some(version),
                error,
            }
        }
    };
    let Some((status, trigger, started_at)) = install else {
        return Job::Startup(Box::new(snapshot));
    };
    let mut job = Job::Loaded {
        replaced: None,
        version: version.clone(),
        policies: snapshot.policy_count(),
        entities: snapshot.entity_count(),
        files: snapshot.files.len(),
        warnings: snapshot.warnings.clone(),
        timings: snapshot.timings,
        index: snapshot.index.as_ref().map(|i| i.stats()),
    };
    let attempt = Attempt {
        trigger,
        started_at,
        finished_at: SystemTime::now(),
        version: Some(version),
        outcome: Outcome::Loaded,
    };
    if let Job::Loaded { replaced, .. } = &mut job {
        // Freed by the reload thread once the result is sent.
        *replaced = status.install(live, snapshot, attempt);
    }
    job
}

/// Frees a replaced snapshot here, on the reload thread, rather than on
/// whichever request thread happens to drop the last reference: freeing a
/// large policy set takes long enough to show in decision latency. Requests
/// in flight hold it for microseconds to milliseconds.
fn retire(mut old: Arc<Snapshot>) {
    let deadline = Instant::now() + RETIRE_WAIT;
    loop {
        match Arc::try_unwrap(old) {
            Ok(snapshot) => {
                drop(snapshot);
                return;
            }
            Err(still_shared) if Instant::now() < deadline => {
                old = still_shared;
                std::thread::sleep(Duration::from_millis(1));
            }
            // A request is taking very long; it frees the snapshot itself.
            Err(_) => return,
        }
    }
}

/// Runs `work` on a dedicated thread at lowered CPU priority, so that a
/// large bundle being built competes as little as possible with decisions.
async fn on_reload_thread(work: impl FnOnce() -> Job + Send + 'static) -> Job {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("leash-reload".to_owned())
        .spawn(move || {
            lower_thread_priority();
            let mut job = work();
            let replaced = match &mut job {
                Job::Loaded { replaced, .. } => replaced.take(),
                _ => None,
            };
            let _ = tx.send(job);
            // The next reload need not wait for requests still holding the
            // replaced snapshot: it is freed after answering.
            if let Some(old) = replaced {
                retire(old);
            }
        });
    let refused = |message: String| Job::Refused {
        version: None,
        error: BundleError {
            origin: "reload".to_owned(),
            diagnostics: vec![Diagnostic::plain(None, message)],
        },
    };
    if let Err(e) = spawned {
        return refused(format!("cannot start the reload thread: {e}"));
    }
    match rx.await {
        Ok(job) => job,
        // The thread ended without an answer (a panic in a dependency):
        // nothing was published, so the last good bundle serves on.
        Err(_) => refused("the reload thread failed".to_owned()),
    }
}

/// Nice value of the reload thread: decisions come first, yet a reload
/// still gets a tenth of a contended core.
const RELOAD_NICE: libc::c_int = 10;

fn lower_thread_priority() {
    // SAFETY: setpriority only reads its integer arguments. On Linux, who = 0
    // with PRIO_PROCESS names the calling thread alone, not the process.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, RELOAD_NICE) };
    if rc != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the reload thread's priority"
        );
    }
}

/// A live inotify watcher over the bundle's directories.
type Armed = notify::RecommendedWatcher;

/// Most quiet periods waited for directories that appeared (each a new
/// level of a tree being copied in) before a read.
const MAX_NEW_DIR_ROUNDS: u32 = 20;

/// Most directories watched under one bundle directory (a bound on a
/// symbolic-link loop).
const MAX_WATCHED_DIRS: usize = 10_000;

/// Starts watching `roots`: every directory under each (through symbolic
/// links, each watched on its own so one vanishing mid-walk does not leave
/// its siblings unwatched), each root's parent (a deleted or re-created
/// directory), and the parent of every symbolic link on a root's path (a
/// swapped git-sync link). Fails only when the kernel refuses watches.
fn arm_watches(
    roots: &[&PathBuf],
    wake: Arc<Notify>,
    writing: Arc<Mutex<HashSet<PathBuf>>>,
    dirs_made: Arc<AtomicBool>,
) -> Result<(Armed, HashSet<PathBuf>), notify::Error> {
    // Events name absolute paths; parent directories also report changes to
    // their other entries, which must not cause reloads.
    let absolute: Vec<PathBuf> = roots
        .iter()
        .map(|r| std::path::absolute(r).unwrap_or_else(|_| (*r).clone()))
        .collect();
    // Every spelling of each root through its symbolic links, and the
    // directories holding those links: a link re-pointed anywhere on the
    // way (`policies -> current/policies`, `current -> releases/7`) is seen
    // in its directory, and its events concern the root.
    let mut link_dirs: Vec<PathBuf> = Vec::new();
    let mut ways: Vec<PathBuf> = absolute.clone();
    for root in &absolute {
        let (spellings, dirs) = link_chain(root);
        ways.extend(spellings);
        link_dirs.extend(dirs);
    }
    // The first root is the policies', the others the schemas'. Each also
    // by its real path: a directory reached by two spellings (a link to it
    // as the other root) has its events named by either.
    let labeled: Vec<(PathBuf, &'static str)> = absolute
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            let label = if i == 0 { "policies" } else { "schemas" };
            let real = std::fs::canonicalize(r).ok().filter(|c| c != r);
            std::iter::once((r.clone(), label)).chain(real.map(|c| (c, label)))
        })
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event) if !concerns(&event.paths, &ways) => {}
            Ok(event) => {
                track_writes(&event, &writing, &labeled);
                if matches!(
                    event.kind,
                    EventKind::Create(notify::event::CreateKind::Folder)
                ) && event.paths.iter().any(|p| read_dir_path(p, &absolute))
                {
                    dirs_made.store(true, Ordering::SeqCst);
                }
                // Not logged one by one: a log file inside a watched
                // directory would feed itself.
                if relevant(&event.kind) {
                    wake.notify_one();
                }
            }
            // An error may mean lost events (queue overflow): look again.
            Err(e) => {
                debug!(error = %e, "file watch error; reloading to be safe");
                wake.notify_one();
            }
        }
    })?;
    let mut points: Vec<PathBuf> = Vec::new();
    // Directories the bundle is read from (hidden ones are not, a
    // ConfigMap's `..<timestamp>` generation aside, which is complete when
    // it is swapped in).
    let mut read_from: HashSet<PathBuf> = HashSet::new();
    for root in roots {
        let mut stack = vec![(*root).clone()];
        let mut dirs = 0usize;
        while let Some(dir) = stack.pop() {
            if !dir.is_dir() || dirs >= MAX_WATCHED_DIRS {
                continue;
            }
            dirs += 1;
            if !hidden_below(&dir, root) {
                read_from.insert(dir.clone());
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if entry.file_type().is_ok_and(|t| t.is_symlink()) && path.is_file() {
                        // A linked file's target may live outside every
                        // watched directory: watch it through the link
                        // (inotify follows it), named by the link's path.
                        points.push(path);
                    }
                }
            }
            points.push(dir);
        }
        if let Some(parent) = existing_ancestor(root) {
            points.push(parent);
        }
    }
    points.extend(link_dirs);
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for path in &points {
        if !seen.insert(path.clone()) {
            continue;
        }
        if let Err(e) = watcher.watch(path, RecursiveMode::NonRecursive) {
            match e.kind {
                // The kernel's watch limit: polling is the only way left.
                notify::ErrorKind::MaxFilesWatch => return Err(e),
                // Gone between the walk and the watch: its parent's watch
                // has seen that, and the next attempt re-arms.
                notify::ErrorKind::PathNotFound => {}
                _ => warn!(path = %path.display(), error = %e, "cannot watch"),
            }
        }
    }
    Ok((watcher, read_from))
}

/// Most symbolic links followed on the way to one root (a loop's bound; the
/// kernel's own is 40).
const MAX_LINK_HOPS: usize = 40;

/// The other spellings of `root` through the symbolic links on its way,
/// each link replaced by its target (links inside targets too), and the
/// directories holding those links.
fn link_chain(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut spellings, mut dirs) = (Vec::new(), Vec::new());
    let mut pending = vec![root.to_path_buf()];
    let mut hops = 0;
    while let Some(path) = pending.pop() {
        let components: Vec<_> = path.components().collect();
        let mut prefix = PathBuf::new();
        for (i, component) in components.iter().enumerate() {
            prefix.push(component);
            if !std::fs::symlink_metadata(&prefix).is_ok_and(|m| m.is_symlink()) {
                continue;
            }
            let parent = prefix.parent().map(Path::to_path_buf).unwrap_or_default();
            dirs.push(parent.clone());
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return (spellings, dirs);
            }
            // The rest of this spelling is followed through the target.
            if let Ok(target) = std::fs::read_link(&prefix) {
                let mut next = parent.join(target);
                next.extend(&components[i + 1..]);
                spellings.push(next.clone());
                pending.push(next);
            }
            break;
        }
    }
    (spellings, dirs)
}

/// Whether `path` has a hidden component below `root` (a directory the
/// bundle is not read from).
fn hidden_below(path: &Path, root: &Path) -> bool {
    path.strip_prefix(root).is_ok_and(|rel| {
        rel.components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    })
}

/// Whether `path` is one of `roots` or under one and not hidden below it: a
/// directory made there is one the bundle is read from.
fn read_dir_path(path: &Path, roots: &[PathBuf]) -> bool {
    roots
        .iter()
        .any(|root| path.starts_with(root) && !hidden_below(path, root))
}

/// Keeps `writing` up to date: a bundle file created or modified is open for
/// writing until its close-after-write (or its removal or renaming away).
fn track_writes(
    event: &notify::Event,
    writing: &Mutex<HashSet<PathBuf>>,
    roots: &[(PathBuf, &'static str)],
) {
    use notify::event::{CreateKind, ModifyKind, RenameMode};
    let bundle_files = event.paths.iter().filter(|p| is_bundle_path(p, roots));
    let mut writing = writing.lock().unwrap_or_else(PoisonError::into_inner);
    match event.kind {
        EventKind::Modify(ModifyKind::Data(_)) => writing.extend(bundle_files.cloned()),
        // A new regular file is written next; a new symbolic link (a
        // ConfigMap's visible names) is complete as created.
        EventKind::Create(CreateKind::File) => writing.extend(
            bundle_files
                .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()))
                .cloned(),
        ),
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
            for path in bundle_files {
                writing.remove(path);
            }
        }
        _ => {}
    }
}

/// Whether `path` is a file the bundle reads from the root it is under
/// (hidden temporary files of atomic writers are not: they are closed
/// before being renamed). Only those hold a reload back while open for
/// writing: a `report.json` kept open beside the policies would otherwise
/// hold every reload for [`MAX_OPEN_WRITE`].
fn is_bundle_path(path: &Path, roots: &[(PathBuf, &'static str)]) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    !name.starts_with('.')
        && roots.iter().any(|(root, label)| {
            path.starts_with(root)
                && !hidden_below(path, root)
                && crate::bundle::is_bundle_file(label, &name)
        })
}

/// The nearest existing directory above `path`.
fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    let mut current = path.parent();
    while let Some(dir) = current {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if dir.is_dir() {
            return Some(dir.to_path_buf());
        }
        current = dir.parent();
    }
    None
}

/// Events that can mean a changed bundle. Opening and reading files (leash's
/// own reads among them) cannot.
fn relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Whether an event on `paths` can change the bundle under `roots`: a path
/// inside a root, or a root's own ancestor (a directory or symbolic link on
/// the way to it). An event without paths (lost events) always can.
fn concerns(paths: &[PathBuf], roots: &[PathBuf]) -> bool {
    paths.is_empty()
        || paths
            .iter()
            .any(|p| roots.iter().any(|r| p.starts_with(r) || r.starts_with(p)))
}

/// Stamps the trees every `interval` and wakes the reloader once a changed
/// stamp has held still for an interval.
async fn poll(
    policies: PathBuf,
    schemas: PathBuf,
    interval: Duration,
    loaded: Option<TreeStamp>,
    wake: Arc<Notify>,
) {
    let stamp = |p: PathBuf, s: PathBuf| async move {
        tokio::task::spawn_blocking(move || TreeStamp::for_polling(&p, &s))
            .await
            .ok()
    };
    // Compared against the stamp of the files loaded at startup, so a change
    // made in between is seen at the first tick.
    let mut last = loaded;
    // A change is acted on once the stamp has stayed the same for one more
    // interval: a file being written when the stamp is taken (polling sees
    // no close events) is not read half-written.
    let mut changed = false;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let now = stamp(policies.clone(), schemas.clone()).await;
        if now != last {
            last = now;
            changed = true;
        } else if changed {
            changed = false;
            wake.notify_one();
        }
    }
}

/// `2s`, `500ms`, `1.5s` for logs and status.
fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_is_not_a_change() {
        assert!(!relevant(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!relevant(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(relevant(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(relevant(&EventKind::Any));
    }

    #[test]
    fn only_files_the_bundle_reads_hold_a_reload_back_while_written() {
        let roots = [
            (PathBuf::from("/b/policies"), "policies"),
            (PathBuf::from("/b/schemas"), "schemas"),
        ];
        let held = |p: &str| is_bundle_path(Path::new(p), &roots);
        assert!(held("/b/policies/team/access.cedar"));
        assert!(held("/b/policies/users.entities.json"));
        assert!(held("/b/schemas/app.cedarschema"));
        assert!(held("/b/schemas/app.json"));
        // Beside the policies but not read: a report kept open and written
        // now and then must not hold every reload for ten seconds.
        assert!(!held("/b/policies/report.json"));
        assert!(!held("/b/schemas/stray.cedar"));
        assert!(!held("/b/policies/.access.cedar.swp"));
        // In a hidden directory the bundle does not read (a cache, a
        // ConfigMap generation being written before its swap).
        assert!(!held("/b/policies/.cache/access.cedar"));
        assert!(!held("/elsewhere/access.cedar"));
    }

    #[test]
    fn only_events_on_the_way_to_or_inside_a_root_count() {
        let roots = vec![PathBuf::from("/git/current/policies")];
        let concerns_one = |p: &str| concerns(&[PathBuf::from(p)], &roots);
        assert!(concerns_one("/git/current/policies/a.cedar"));
        assert!(concerns_one("/git/current/policies/./sub/b.cedar"));
        assert!(concerns_one("/git/current"), "the swapped link itself");
        assert!(!concerns_one("/git/current.tmp"), "not yet the link");
        assert!(!concerns_one("/git/current/README.md"));
        assert!(!concerns_one("/git/current/policies-old/a.cedar"));
        assert!(concerns(&[], &roots));
    }

    #[test]
    fn durations_print_briefly() {
        assert_eq!(human(Duration::from_secs(2)), "2s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
    }
}
