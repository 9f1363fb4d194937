//! The plugins directory: initial load, and following it as files are copied, renamed and deleted.
//!
//! Every `NAME.wasm` is served as server id `NAME`, with settings from an
//! optional sidecar `NAME.toml`. Events are reduced to "something about
//! NAME changed"; the reconciler then compares the directory with what is
//! served. A new or changed plugin is compiled off the serving path and
//! swapped in only when it loads; a broken file, an invalid sidecar or a
//! name that is no server id changes nothing (the previous version keeps
//! serving with its settings, at start-up the plugin is skipped) and is
//! logged once per content. A `cp` over a served file is acted on when the
//! writer closes it, so a half-written file is never served (and if one is
//! seen, it fails validation and the next event retries); a plugin one of
//! whose files (its sidecar too) is open for writing is left until it is
//! closed. Changes to different plugins are applied at once, by a task
//! each, so one slow to load holds up no other.
//!
//! Events can be missed: the kernel's queue overflows under a flood of
//! changes, a symlink made in place raises no event worth acting on, the
//! directory itself is removed or replaced, a change cannot be applied
//! while the broker is away. So the whole directory is also looked at
//! every [`RESYNC`] (and at once after an overflow or a watcher error):
//! each file whose size, time or inode changed since it was last applied,
//! and each one whose change could not be applied, is reconciled again
//! (once it has not been written to for [`QUIET`]),
//! and a directory replaced is watched anew. Only regular files (a symlink
//! to one included) are read, up to [`MAX_PLUGIN_BYTES`]: a FIFO or a
//! device named `NAME.wasm` is refused, not opened.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::observe::{self, LoadFailure};
use crate::plugin::{Plugin, PluginSettings, Runtime, content_hash};
use crate::protocol::is_valid_server_id;
use crate::{Error, PluginError, Server};

/// Quiet time after an event before the directory is looked at: events of
/// one copy or rename arrive in a burst.
const SETTLE: Duration = Duration::from_millis(15);

/// How often start-up, kept from serving plugins by a lost broker
/// connection, says it still waits.
const LOAD_REPORT_EVERY: Duration = Duration::from_secs(30);

/// How often the whole directory is looked at, besides events.
pub(crate) const RESYNC: Duration = Duration::from_secs(5);

/// A resync leaves alone a file modified this recently: it may be being
/// written in place, and its writer's close will say when it is whole.
const QUIET: Duration = Duration::from_secs(3);

/// Largest plugin file read: components are megabytes; an interpreter's
/// with its runtime, tens.
pub(crate) const MAX_PLUGIN_BYTES: u64 = 256 << 20;

/// Largest sidecar read.
const MAX_SIDECAR_BYTES: u64 = 1 << 20;

/// What the watcher tells the reconciler.
enum Change {
    /// Something about the plugin `NAME` changed.
    One(String),
    /// Events may have been missed: look at everything.
    All,
}

/// What a file looked like when it was last applied: size, modification
/// time, status change time and inode (of the file a symlink points to).
/// A file whose stamp is unchanged is not read again by a resync; one
/// whose permissions or owner changed (a file the host could not read,
/// made readable) is, and so is one touched.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    changed: (i64, i64),
    inode: (u64, u64),
}

impl Stamp {
    /// Whether the file was modified less than [`QUIET`] ago.
    fn is_recent(stamp: &Option<Stamp>) -> bool {
        stamp
            .as_ref()
            .and_then(|s| s.modified)
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age < QUIET)
    }

    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            changed: (m.ctime(), m.ctime_nsec()),
            inode: (m.dev(), m.ino()),
        })
    }
}

/// The stamps of a plugin's `.wasm` and sidecar.
fn stamps(dir: &Path, name: &str) -> (Option<Stamp>, Option<Stamp>) {
    (
        Stamp::of(&dir.join(format!("{name}.wasm"))),
        Stamp::of(&dir.join(format!("{name}.toml"))),
    )
}

/// Reads `path` if it is a regular file (or a symlink to one) of at most
/// `max` bytes: never a FIFO, a device or a directory, which could block
/// or never end. It is looked at before it is opened, and again as
/// opened (without blocking), so a FIFO moved into place between the
/// look and the open cannot hold the watcher. A symbolic link to nothing is an error, not a
/// file that is gone: what serves keeps serving.
fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let not_there = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(path).is_ok() {
            std::io::Error::other("a symbolic link to a file that is not there")
        } else {
            e
        }
    };
    // Looked at before it is opened: opening some devices acts (a
    // terminal, a watchdog, a tape).
    if !std::fs::metadata(path).map_err(not_there)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(not_there)?;
    // And again as opened: it may have been swapped since.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > max {
        return Err(std::io::Error::other(format!(
            "{} bytes, over the limit of {max}",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "grew past the limit of {max} bytes"
        )));
    }
    Ok(bytes)
}

/// The server id a file in the plugins directory belongs to, if any.
pub(crate) fn plugin_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    if file.starts_with('.') || file.ends_with('~') {
        return None;
    }
    let (stem, ext) = file.rsplit_once('.')?;
    if !matches!(ext, "wasm" | "toml") || stem.is_empty() {
        return None;
    }
    // Editors' and copy tools' temporaries: `calc.wasm.tmp`, `calc.part.wasm`.
    if stem.ends_with(".tmp") || stem.ends_with(".part") || stem.ends_with(".swp") {
        return None;
    }
    Some(stem.to_string())
}

/// Reads the sidecar `NAME.toml`, if present, and checks all of it.
///
/// # Errors
///
/// A message naming the file and what is wrong: unknown keys, values of
/// the wrong type, numbers out of their bounds.
pub(crate) fn read_settings(dir: &Path, name: &str) -> Result<PluginSettings, String> {
    let path = dir.join(format!("{name}.toml"));
    let text = read_regular(&path, MAX_SIDECAR_BYTES)
        .and_then(|bytes| String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8")));
    match text {
        Ok(text) => PluginSettings::from_toml(&text)
            .map_err(|e| format!("{}: {}", path.display(), e.one_line(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PluginSettings::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// What is known about one plugin file.
#[derive(Clone, Default)]
struct Known {
    /// Hash and settings of the version serving.
    serving: Option<(String, PluginSettings)>,
    /// Hash and settings (or why the sidecar is invalid) that failed last,
    /// so a broken file or sidecar is reported once.
    refused: Option<(String, Result<PluginSettings, String>)>,
    /// The files as they were when last reconciled to an end (served or
    /// refused); `None` while a change waits to be applied.
    applied: Option<(Option<Stamp>, Option<Stamp>)>,
}

/// What applying a change needs: shared by the tasks that apply them.
struct Apply {
    dir: PathBuf,
    runtime: Runtime,
    server: Server,
    /// Mebibytes of plugin files being loaded at once (read, compiled and
    /// their first instance tried): a load takes its file's size, and at
    /// least a quarter of them, so at most 4 plugins load at once, and
    /// fewer large ones. Each may be hundreds of megabytes as read,
    /// compiling one already uses every core, and a first instance runs
    /// on the threads that run calls.
    loads: Semaphore,
    writing: Writing,
}

/// What [`Apply::loads`] holds: [`MAX_PLUGIN_BYTES`] in mebibytes.
const LOAD_MIB: u32 = (MAX_PLUGIN_BYTES >> 20) as u32;

/// What one load takes of [`Apply::loads`], for a file of `len` bytes.
fn load_share(len: u64) -> u32 {
    u32::try_from(len.div_ceil(1 << 20))
        .unwrap_or(LOAD_MIB)
        .clamp(LOAD_MIB / 4, LOAD_MIB)
}

/// What a task applying a change to one plugin gives back.
type Applied = (String, Option<Known>, Result<(), Error>);

/// A file written to and not closed since is taken as done after this
/// long without a write: a hard link made in place raises a create and
/// nothing more, and an event can be lost without an overflow.
const WRITER_SILENT: Duration = Duration::from_secs(60);

/// The files of the directory open for writing: written to (or made
/// empty) and not closed since, with when that was last seen. What a
/// writer has not closed is not read: a sidecar written in place while
/// its `.wasm` is copied would be read half-way by the `.wasm`'s event,
/// and an empty or cut sidecar reads as looser limits and fewer grants
/// than the one being written.
#[derive(Clone, Default)]
struct Writing(Arc<Mutex<HashMap<OsString, Instant>>>);

impl Writing {
    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<OsString, Instant>> {
        // A panic elsewhere while holding it leaves a map still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows one event on `paths`.
    fn follow(&self, kind: &EventKind, paths: &[PathBuf]) {
        let now = Instant::now();
        match kind {
            EventKind::Modify(ModifyKind::Data(_)) => {
                let mut files = self.files();
                for name in paths.iter().filter_map(|p| p.file_name()) {
                    files.insert(name.to_os_string(), now);
                }
            }
            // Made and not written yet: a regular file that is empty. A
            // symbolic link, a FIFO or a hard link to a whole file is
            // never written here.
            EventKind::Create(_) => {
                let mut files = self.files();
                for path in paths {
                    let empty = path
                        .symlink_metadata()
                        .is_ok_and(|m| m.file_type().is_file() && m.len() == 0);
                    if let (true, Some(name)) = (empty, path.file_name()) {
                        files.insert(name.to_os_string(), now);
                    }
                }
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_)) => {
                let mut files = self.files();
                for name in paths.iter().filter_map(|p| p.file_name()) {
                    files.remove(name);
                }
            }
            _ => {}
        }
    }

    /// Events were lost: what is open is not known any more, and the
    /// quiet time of a resync stands in for it.
    fn forget(&self) {
        self.files().clear();
    }

    /// The file of plugin `name` open for writing, if any.
    fn of(&self, name: &str) -> Option<String> {
        let mut files = self.files();
        files.retain(|_, seen| seen.elapsed() < WRITER_SILENT);
        [format!("{name}.wasm"), format!("{name}.toml")]
            .into_iter()
            .find(|file| files.contains_key(OsStr::new(file)))
    }
}

/// Keeps a server in step with a plugins directory.
///
/// Changes to different plugins are applied at once, each by a task of
/// its own: a plugin slow to compile, or whose first instance takes its
/// whole deadline, holds up no other deploy or removal. Changes to one
/// plugin are applied one after the other.
pub(crate) struct Deployer {
    apply: Arc<Apply>,
    known: HashMap<String, Known>,
    /// Files whose name is no server id, already reported.
    misnamed: HashSet<String>,
    /// Plugins whose change is being applied (by a task working on a copy
    /// of their [`Known`]), and whether another change came meanwhile.
    applying: HashMap<String, bool>,
    tasks: JoinSet<Applied>,
    /// The plugin each task applies a change to.
    task_names: HashMap<tokio::task::Id, String>,
    writing: Writing,
    /// Set once the host stops: a change not yet served is given up.
    stop: watch::Receiver<bool>,
    /// Sets [`Self::stop`] until [`Self::watch`] is given the host's:
    /// [`Self::stop`] during [`Self::load_all`].
    stopping: watch::Sender<bool>,
    events: mpsc::UnboundedReceiver<Change>,
    /// Where the watcher sends, for a new watcher on a replaced directory.
    sender: mpsc::UnboundedSender<Change>,
    watcher: notify::RecommendedWatcher,
    /// The directory watched: device and inode.
    watched: Option<(u64, u64)>,
    /// The directory could not be read at the last look (moved away,
    /// replaced, unmounted): said once, until it can be again.
    unreadable: bool,
}

/// The device and inode of `dir`.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// A watcher of `dir` (not recursive) that sends to `tx`, and follows
/// which files are open for writing in `writing`.
fn watch_dir(
    dir: &Path,
    tx: mpsc::UnboundedSender<Change>,
    writing: Writing,
) -> Result<notify::RecommendedWatcher, Error> {
    // The directory's own events carry its path as given to the watch;
    // both forms are compared, whatever form that is.
    let own = [
        dir.to_path_buf(),
        std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
    ];
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // A watcher error or an overflowed queue: events were lost.
        let Ok(event) = event else {
            writing.forget();
            let _ = tx.send(Change::All);
            return;
        };
        if event.need_rescan() {
            writing.forget();
            let _ = tx.send(Change::All);
            return;
        }
        if event.paths.iter().any(|p| own.contains(p)) {
            // The directory itself removed or moved away: look it over
            // (and watch the new one). Anything else on it is no change,
            // least of all its being opened and read, which looking it
            // over does: taken as a change, that looked it over again
            // and again, every few milliseconds.
            if matches!(
                event.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
            ) {
                writing.forget();
                let _ = tx.send(Change::All);
            }
            return;
        }
        // Before the change is sent: the reconciler, told of a `.wasm`,
        // must already know its sidecar is being written.
        writing.follow(&event.kind, &event.paths);
        // A `cp` over a file shows as create/modify events and then a
        // close-after-write: act on the close, never on a file still
        // being written. Renames and moves are atomic, and so is a
        // symlink made in place (it raises only a create).
        let relevant = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_) => true,
            EventKind::Create(_) => event.paths.iter().any(|p| {
                p.symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
            }),
            _ => false,
        };
        if relevant {
            for path in &event.paths {
                if let Some(name) = plugin_name(path) {
                    let _ = tx.send(Change::One(name));
                }
            }
        }
    })
    .map_err(|e| Error::Watch {
        dir: dir.to_path_buf(),
        source: Box::new(e),
    })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| Error::Watch {
            dir: dir.to_path_buf(),
            source: Box::new(e),
        })?;
    Ok(watcher)
}

impl Deployer {
    /// Starts watching `dir` at once, so nothing that changes while the
    /// initial load runs is missed.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the directory cannot be watched.
    pub(crate) fn new(dir: PathBuf, runtime: Runtime, server: Server) -> Result<Self, Error> {
        let (sender, events) = mpsc::unbounded_channel();
        let watched = dir_identity(&dir);
        let writing = Writing::default();
        let watcher = watch_dir(&dir, sender.clone(), writing.clone())?;
        let (stopping, stop) = watch::channel(false);
        Ok(Deployer {
            apply: Arc::new(Apply {
                dir,
                runtime,
                server,
                loads: Semaphore::new(LOAD_MIB as usize),
                writing: writing.clone(),
            }),
            known: HashMap::new(),
            misnamed: HashSet::new(),
            applying: HashMap::new(),
            tasks: JoinSet::new(),
            task_names: HashMap::new(),
            writing,
            stop,
            stopping,
            events,
            sender,
            watcher,
            watched,
            unreadable: false,
        })
    }

    /// Loads and serves every plugin in the directory; how many serve.
    pub(crate) async fn load_all(&mut self) -> Result<usize, Error> {
        let dir = &self.apply.dir;
        let entries = std::fs::read_dir(dir).map_err(|e| Error::Watch {
            dir: dir.clone(),
            source: Box::new(e),
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
            .filter_map(|e| plugin_name(&e.path()))
            .collect();
        names.sort();
        for name in &names {
            self.change(name);
        }
        let mut attempt = 0;
        let mut reported: Option<std::time::Instant> = None;
        loop {
            let mut broker = Ok(());
            while let Some(done) = self.tasks.join_next_with_id().await {
                if let Err(e) = self.applied(done)
                    && broker.is_ok()
                {
                    broker = Err(e);
                }
            }
            let Err(e) = broker else { break };
            // The broker went away while the plugins were served: the ones
            // not served yet are once it is back, as after start-up (and
            // start-up ends only when every plugin is served). Ending here
            // instead would cut the calls the plugins served first run.
            // An error waiting cannot cure ends start-up, as it would
            // before any plugin is served.
            if !matches!(
                e,
                Error::Connection(_)
                    | Error::Disconnected(_)
                    | Error::ConnectTimeout { .. }
                    | Error::BrokerLost
            ) {
                return Err(e);
            }
            // Said at once, then every half minute while it lasts.
            if reported.is_none_or(|at| at.elapsed() >= LOAD_REPORT_EVERY) {
                warn!(target: "callme::server", error = %e.chain(), attempts = attempt + 1, "the broker connection failed while serving the plugins: trying again once it is back");
                reported = Some(std::time::Instant::now());
            }
            // The link may not have seen the loss yet: a moment first,
            // then until it is up again (none at all once it is closed
            // for good: nothing to wait for).
            tokio::select! {
                () = tokio::time::sleep(crate::amqp::link::backoff(attempt)) => {}
                () = self.apply.server.closed() => return Err(e),
            }
            if !self.apply.server.up().await {
                return Err(e);
            }
            attempt += 1;
            self.resync();
        }
        Ok(names
            .iter()
            .filter(|n| self.apply.server.is_serving(n))
            .count())
    }

    /// Starts bringing server id `name` in line with the directory, unless
    /// a change to it is being applied already (then it is brought in line
    /// again after that one) or one of its files is being written (its
    /// writer's close says when it is whole).
    fn change(&mut self, name: &str) {
        if let Some(again) = self.applying.get_mut(name) {
            *again = true;
            return;
        }
        if !is_valid_server_id(name) {
            // Never served, so there is nothing to withdraw; logged again
            // only if the file goes away and comes back.
            let path = self.apply.dir.join(format!("{name}.wasm"));
            if !path.exists() {
                self.misnamed.remove(name);
            } else if self.misnamed.insert(name.to_string()) {
                error!(
                    target: "callme::server",
                    file = %path.display(),
                    "skipped: the name is not a server id (1 to 200 letters, digits, `-`, `_` or `.`)"
                );
            }
            return;
        }
        // A removal is never held up by a sidecar being written.
        let there = self
            .apply
            .dir
            .join(format!("{name}.wasm"))
            .symlink_metadata()
            .is_ok();
        if there && let Some(file) = self.writing.of(name) {
            debug!(target: "callme::server", plugin = name, file = %file, "left until its writer closes it: it is being written");
            return;
        }
        // The task works on a copy: if it fails, what was known stays.
        let known = self.known.get(name).cloned().unwrap_or_default();
        self.applying.insert(name.to_string(), false);
        observe::plugin_change_pending(true);
        let task = self.tasks.spawn(reconcile(
            self.apply.clone(),
            name.to_string(),
            known,
            self.stop.clone(),
        ));
        self.task_names.insert(task.id(), name.to_string());
    }

    /// Takes back what a task applying a change learnt, and starts the
    /// change that came meanwhile; a broker error is returned.
    fn applied(
        &mut self,
        done: Result<(tokio::task::Id, Applied), tokio::task::JoinError>,
    ) -> Result<(), Error> {
        let (name, outcome) = match done {
            Ok((id, (name, known, outcome))) => {
                self.task_names.remove(&id);
                match known {
                    Some(known) => self.known.insert(name.clone(), known),
                    None => self.known.remove(&name),
                };
                (name, outcome)
            }
            Err(e) => {
                // What was known before it stays, its stamps older than
                // the files: the next look at the directory reads them
                // again.
                let name = self.task_names.remove(&e.id()).unwrap_or_default();
                error!(target: "callme::server", plugin = %name, error = %e, "applying a change failed");
                (name, Ok(()))
            }
        };
        // The change that came meanwhile is counted before this one is
        // not, so the count never reads 0 between them.
        if self.applying.remove(&name) == Some(true) && !*self.stop.borrow() {
            self.change(&name);
        }
        observe::plugin_change_pending(false);
        outcome
    }

    /// Looks at the whole directory: watches it anew if it was replaced,
    /// and reconciles every plugin whose files changed since they were
    /// applied, every one not applied yet, and every one known that is
    /// gone.
    fn resync(&mut self) {
        let dir = self.apply.dir.clone();
        debug!(target: "callme::server", dir = %dir.display(), "looking over the plugins directory");
        let now = dir_identity(&dir);
        if now.is_some() && now != self.watched {
            match watch_dir(&dir, self.sender.clone(), self.writing.clone()) {
                Ok(watcher) => {
                    info!(target: "callme::server", dir = %dir.display(), "the plugins directory was replaced: watching the new one");
                    self.watcher = watcher;
                    self.watched = now;
                }
                Err(e) => {
                    warn!(target: "callme::server", dir = %dir.display(), error = %e, "cannot watch the plugins directory again yet")
                }
            }
        }
        // A directory that cannot be read is not one whose plugins are
        // gone: a deploy that swaps directories (`mv plugins plugins.old;
        // mv plugins.new plugins`) leaves none there for a moment, and
        // every id would be withdrawn in it. What serves keeps serving
        // until the directory can be read again.
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                if !std::mem::replace(&mut self.unreadable, true) {
                    warn!(target: "callme::server", dir = %dir.display(), error = %e, "cannot read the plugins directory: every plugin serving keeps serving until it can be read again");
                }
                return;
            }
        };
        if std::mem::take(&mut self.unreadable) {
            info!(target: "callme::server", dir = %dir.display(), "the plugins directory can be read again");
        }
        let mut names: HashSet<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| plugin_name(&e.path()))
            .collect();
        names.extend(self.known.keys().cloned());
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        for name in names {
            // Being applied: its task read the files as they were, and
            // the next look compares them with that.
            if self.applying.contains_key(&name) {
                continue;
            }
            let now = stamps(&dir, &name);
            let present = now.0.is_some();
            if !is_valid_server_id(&name) && !present {
                self.misnamed.remove(&name);
                continue;
            }
            if !present && !self.known.contains_key(&name) {
                continue;
            }
            let unchanged = self
                .known
                .get(&name)
                .and_then(|k| k.applied.as_ref())
                .is_some_and(|applied| *applied == now);
            // A file written in place right now is left to its writer's
            // close (its event), never read half written.
            if unchanged || [&now.0, &now.1].into_iter().any(Stamp::is_recent) {
                continue;
            }
            self.change(&name);
        }
    }

    /// Follows the directory until the watcher stops.
    pub(crate) async fn watch(
        mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Error> {
        info!(target: "callme::server", dir = %self.apply.dir.display(), "watching for plugins");
        self.stop = stop.clone();
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            let first = tokio::select! {
                change = self.events.recv() => match change {
                    Some(change) => change,
                    None => break,
                },
                _ = resync.tick() => Change::All,
                Some(done) = self.tasks.join_next_with_id() => {
                    if let Err(e) = self.applied(done) {
                        warn!(target: "callme::server", error = %e.chain(), "could not apply change");
                    }
                    continue;
                }
                _ = stop.wait_for(|stop| *stop) => break,
            };
            tokio::select! {
                () = tokio::time::sleep(SETTLE) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            let mut all = false;
            let mut names = HashSet::new();
            for change in
                std::iter::once(first).chain(std::iter::from_fn(|| self.events.try_recv().ok()))
            {
                match change {
                    Change::One(name) => {
                        names.insert(name);
                    }
                    Change::All => all = true,
                }
            }
            for name in names {
                self.change(&name);
            }
            if all {
                self.resync();
            }
        }
        self.finish().await;
        Ok(())
    }

    /// The host stops while [`Self::load_all`] runs (its future dropped):
    /// no plugin not served yet is served from now on. A plugin served
    /// once the server has begun to stop would take requests that the
    /// process, on its way out, drops.
    pub(crate) async fn stop(mut self) {
        let _ = self.stopping.send(true);
        self.finish().await;
    }

    /// Asked to stop: changes under way give up what is not served yet,
    /// and the rest is let finish, never cut in the middle, which would
    /// leave an id half swapped.
    async fn finish(&mut self) {
        while let Some(done) = self.tasks.join_next_with_id().await {
            let _ = self.applied(done);
        }
    }
}

/// Waits for `work` unless the host stops first (`None`).
async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = work => Some(done),
        _ = stop.wait_for(|stop| *stop) => None,
    }
}

/// Withdraws server id `name`, whose file is gone. What is known of it
/// is forgotten once it is withdrawn; kept, to be tried again, if the
/// broker would not let it be.
async fn remove(apply: &Apply, name: &str, mut known: Known) -> Applied {
    // The file is gone with its directory: nothing is withdrawn until
    // the directory is back (or a new one in its place) and says so.
    if !apply.dir.is_dir() {
        debug!(target: "callme::server", plugin = name, "the plugins directory is not there: kept serving");
        known.applied = None;
        return (name.to_string(), Some(known), Ok(()));
    }
    match apply.server.stop_serving_plugin(name).await {
        Ok(stopped) => {
            observe::plugin_removed(name);
            if stopped {
                info!(target: "callme::server", plugin = name, "removed");
            }
            (name.to_string(), None, Ok(()))
        }
        Err(e) => {
            known.applied = None;
            (name.to_string(), Some(known), Err(e))
        }
    }
}

/// The files of `name` changed while they were read: what was read may
/// be cut, and the change's own events bring the plugin back.
fn changed_while_read(name: &str, known: Known) -> Applied {
    debug!(target: "callme::server", plugin = name, "left for its next event: its files changed while they were read");
    (name.to_string(), Some(known), Ok(()))
}

/// The host stops: the version of `name` being loaded is not served.
fn given_up(name: &str, known: Known) -> Applied {
    info!(target: "callme::server", plugin = name, "stopping: the version being loaded is given up");
    (name.to_string(), Some(known), Ok(()))
}

/// Brings server id `name` in line with the directory, given what is
/// known of it; gives back what is known after (`None` once its file is
/// gone).
///
/// Nothing is applied unless all of it is valid: an invalid sidecar, a
/// plugin that does not load, or one the server refuses leaves what
/// serves as it was, logged once. Once the host stops, a version not
/// served yet is given up.
///
/// The error is a broker error only: a bad file is logged, not returned.
async fn reconcile(
    apply: Arc<Apply>,
    name: String,
    mut known: Known,
    mut stop: watch::Receiver<bool>,
) -> Applied {
    let name = name.as_str();
    let path = apply.dir.join(format!("{name}.wasm"));
    // A removal is not held up by loads under way: there is nothing to
    // read. Anything that is there is read only under its share of
    // the loads.
    if path
        .symlink_metadata()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        return remove(&apply, name, known).await;
    }
    let mut share = load_share(std::fs::metadata(&path).map_or(0, |m| m.len()));
    let (permit, stamped) = loop {
        let Some(Ok(permit)) = unless_stopped(&mut stop, apply.loads.acquire_many(share)).await
        else {
            return given_up(name, known);
        };
        // Looked at again now that it may be read: the sidecar may have
        // been opened for writing while this waited; its close says when.
        if let Some(file) = apply.writing.of(name) {
            debug!(target: "callme::server", plugin = name, file = %file, "left until its writer closes it: it is being written");
            return (name.to_string(), Some(known), Ok(()));
        }
        // And the file may have been replaced by a larger one: its share
        // is taken anew, so what is read at once stays within the loads'.
        let stamped = stamps(&apply.dir, name);
        let needed = load_share(stamped.0.as_ref().map_or(0, |s| s.len));
        if needed <= share {
            break (permit, stamped);
        }
        share = needed;
    };
    debug!(target: "callme::server", plugin = name, bytes = stamped.0.as_ref().map_or(0, |s| s.len), "reading");
    // Reading and hashing up to 256 MiB is no work for the runtime
    // that talks to the broker.
    let reading = path.clone();
    // No more than the share taken: a file replaced by a larger one since
    // it was stamped is not read past it (and is left for its events).
    let most = (u64::from(share) << 20).min(MAX_PLUGIN_BYTES);
    let read = tokio::task::spawn_blocking(move || {
        read_regular(&reading, most).map(|bytes| {
            let hash = content_hash(&bytes);
            (bytes, hash)
        })
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(format!("reading failed: {e}"))));
    let (bytes, hash) = match read {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return remove(&apply, name, known).await;
        }
        Err(_) if stamps(&apply.dir, name) != stamped => return changed_while_read(name, known),
        Err(e) => {
            // Reported once until the file changes.
            if known.applied.as_ref() != Some(&stamped) {
                error!(target: "callme::server", file = %path.display(), error = %e, "cannot read plugin");
                known.applied = Some(stamped);
            }
            return (name.to_string(), Some(known), Ok(()));
        }
    };
    let settings = read_settings(&apply.dir, name);
    // Either file written to since it was stamped may have been read cut:
    // a sidecar rewritten in place while a large `.wasm` was read reads
    // empty, as the default limits and no grants. The write's events
    // bring the plugin back here (once its writer closes the file).
    if stamps(&apply.dir, name) != stamped {
        return changed_while_read(name, known);
    }
    // A version refused is tried again only once its files changed,
    // touched included: a refusal for a passing reason (a first instance
    // that ran out of time on a busy machine) is not for good.
    let same_files = known.applied.as_ref() == Some(&stamped);
    // Until this ends in a version served or refused; a change that
    // could not be applied (the broker away) is tried again.
    known.applied = None;
    // What serves is asked of the server, not of what this knew: a
    // change the broker failed half-way (a version swapped in, then its
    // new prefetch not confirmed; an id taken out, then its consumer not
    // cancelled) leaves the server apart from it.
    if let Ok(limits) = &settings
        && apply
            .server
            .plugin(name)
            .is_some_and(|p| p.hash() == hash && p.settings() == limits)
    {
        // A version the server took in a change that then failed (swapped
        // in, its new prefetch not confirmed) is told as served now.
        if known
            .serving
            .as_ref()
            .is_none_or(|(served, _)| *served != hash)
        {
            let swapped = known.serving.is_some();
            observe::plugin_served(name, &hash, swapped);
            info!(target: "callme::server", plugin = name, version = %&hash[..12], "{}", if swapped { "swapped in" } else { "loaded" });
        }
        // Back to what serves (a bad sidecar undone, say): a later
        // failure is news again.
        known.serving = Some((hash, limits.clone()));
        known.refused = None;
        known.applied = Some(stamped);
        return (name.to_string(), Some(known), Ok(()));
    }
    let attempt = (hash, settings);
    if same_files && known.refused.as_ref() == Some(&attempt) {
        known.applied = Some(stamped);
        return (name.to_string(), Some(known), Ok(()));
    }
    let outcome = if known.serving.is_some() {
        "the previous version keeps serving with its settings"
    } else {
        "not served"
    };
    let (hash, limits) = match attempt {
        (hash, Ok(limits)) => (hash, limits),
        (hash, Err(reason)) => {
            error!(target: "callme::server", plugin = name, version = %&hash[..12], reason = %reason, "invalid settings: {outcome}");
            observe::plugin_refused(name, known.serving.is_some(), LoadFailure::InvalidSettings);
            known.refused = Some((hash, Err(reason)));
            known.applied = Some(stamped);
            return (name.to_string(), Some(known), Ok(()));
        }
    };
    let started = Instant::now();
    let runtime = apply.runtime.clone();
    let owned_name = name.to_string();
    let lim = limits.clone();
    let loading =
        tokio::task::spawn_blocking(move || Plugin::load(&runtime, &owned_name, &bytes, lim));
    let Some(loaded) = unless_stopped(&mut stop, loading).await else {
        return given_up(name, known);
    };
    // A load that panicked refuses that plugin only.
    let loaded =
        loaded.unwrap_or_else(|e| Err(PluginError::internal(format!("loading failed: {e}"))));
    // An instance is made once before the version is served: one that
    // can never be made (an initial memory over its `memory_bytes`, a
    // start function that traps or spins) would fail every call, and
    // is refused instead, the version before it serving on.
    // On the plugin executor, not this runtime, which talks to the
    // broker; within the plugin's deadline.
    let loaded = match loaded {
        Ok(plugin) => {
            let trying = apply.server.plugin_executor().spawn(async move {
                let made = plugin.try_instance().await;
                (plugin, made)
            });
            let trial = trying.abort_handle();
            let Some(tried) = unless_stopped(&mut stop, trying).await else {
                // Not left running beside the calls the host finishes.
                trial.abort();
                return given_up(name, known);
            };
            match tried {
                Ok((plugin, Ok(()))) => Ok(plugin),
                Ok((_, Err(e))) => Err(PluginError::invalid_plugin(format!(
                    "an instance of it cannot be made: {e}"
                ))),
                Err(e) => Err(PluginError::internal(format!("trying it failed: {e}"))),
            }
        }
        Err(e) => Err(e),
    };
    drop(permit);
    let refusal = match loaded {
        // No version is served once the host stops: it would take
        // requests that the process, on its way out, drops.
        Ok(_) if *stop.borrow() => return given_up(name, known),
        Ok(plugin) => {
            let swapped = known.serving.is_some();
            match apply.server.serve_plugin(plugin).await {
                Ok(()) => {
                    known.serving = Some((hash.clone(), limits));
                    known.refused = None;
                    known.applied = Some(stamped);
                    observe::plugin_served(name, &hash, swapped);
                    info!(
                        target: "callme::server",
                        plugin = name,
                        version = %&hash[..12],
                        elapsed = ?started.elapsed(),
                        "{}", if swapped { "swapped in" } else { "loaded" }
                    );
                    return (name.to_string(), Some(known), Ok(()));
                }
                // The server refused this plugin (its id, its
                // concurrency, its queue, the broker's permissions for
                // it): the others are not concerned. Not remembered
                // as refused: what made it fail is outside the file,
                // so the next event about it (a `touch`) tries again.
                // Swapped in, then its new concurrency refused: the
                // version serves (with the prefetch it had), and is told.
                Err(e @ (Error::Config(_) | Error::AccessRefused(_)))
                    if apply
                        .server
                        .plugin(name)
                        .is_some_and(|p| p.hash() == hash && p.settings() == &limits) =>
                {
                    warn!(target: "callme::server", plugin = name, version = %&hash[..12], reason = %e, "swapped in; its concurrency change was refused");
                    known.serving = Some((hash.clone(), limits));
                    known.refused = None;
                    known.applied = Some(stamped);
                    observe::plugin_served(name, &hash, swapped);
                    return (name.to_string(), Some(known), Ok(()));
                }
                Err(e @ (Error::Config(_) | Error::AccessRefused(_))) => {
                    error!(target: "callme::server", plugin = name, file = %path.display(), version = %&hash[..12], reason = %e, "refused: {outcome}");
                    observe::plugin_refused(name, known.serving.is_some(), LoadFailure::Failed);
                    known.applied = Some(stamped);
                    return (name.to_string(), Some(known), Ok(()));
                }
                Err(e) => return (name.to_string(), Some(known), Err(e)),
            }
        }
        Err(e) => e.to_string(),
    };
    error!(
        target: "callme::server",
        plugin = name,
        file = %path.display(),
        version = %&hash[..12],
        reason = %refusal,
        "refused: {outcome}"
    );
    observe::plugin_refused(name, known.serving.is_some(), LoadFailure::Failed);
    known.refused = Some((hash, Ok(limits)));
    known.applied = Some(stamped);
    (name.to_string(), Some(known), Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file's stamp changes with its permissions (a file the host could
    /// not read, made readable, is read again) and with a `touch`.
    #[test]
    fn a_stamp_changes_with_permissions_and_touch() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("callme-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.wasm");
        std::fs::write(&file, b"\0asm").unwrap();
        let before = Stamp::of(&file).unwrap();
        // Status change times have the clock's granularity.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let chmodded = Stamp::of(&file).unwrap();
        assert_ne!(before, chmodded);
        assert_eq!(Stamp::of(&file).unwrap(), chmodded);
        std::thread::sleep(Duration::from_millis(20));
        let later = std::time::SystemTime::now();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_ne!(Stamp::of(&file).unwrap(), chmodded);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_and_ignored_files() {
        assert_eq!(
            plugin_name(Path::new("/p/calc.wasm")).as_deref(),
            Some("calc")
        );
        assert_eq!(
            plugin_name(Path::new("/p/calc.toml")).as_deref(),
            Some("calc")
        );
        assert_eq!(
            plugin_name(Path::new("/p/report.tmpl.wasm")).as_deref(),
            Some("report.tmpl")
        );
        for ignored in [
            "/p/.calc.wasm",
            "/p/calc.wasm~",
            "/p/calc.wasm.tmp",
            "/p/calc.tmp.wasm",
            "/p/calc.part.wasm",
            "/p/calc.txt",
            "/p/.wasm",
        ] {
            assert_eq!(plugin_name(Path::new(ignored)), None, "{ignored}");
        }
    }

    #[test]
    fn sidecar_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("callme-sidecar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.toml"), "fuel = 5\n").unwrap();
        assert_eq!(read_settings(&dir, "a").unwrap().limits.fuel, 5);
        std::fs::write(dir.join("b.toml"), "fuel = 5\nfeul = 6\n").unwrap();
        let unknown = read_settings(&dir, "b").unwrap_err();
        assert!(
            unknown.contains("feul") && unknown.contains("line 2"),
            "{unknown}"
        );
        assert!(!unknown.contains('\n'), "one line for the log: {unknown}");
        std::fs::write(dir.join("c.toml"), "fuel = 5\nconcurrency = 0\n").unwrap();
        let zero = read_settings(&dir, "c").unwrap_err();
        assert!(
            zero.contains("c.toml") && zero.contains("concurrency = 0"),
            "{zero}"
        );
        assert_eq!(
            read_settings(&dir, "none").unwrap(),
            PluginSettings::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
