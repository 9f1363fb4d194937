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
//! seen, it fails validation and the next event retries).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::observe::{self, LoadFailure};
use crate::plugin::{Plugin, PluginSettings, Runtime, content_hash};
use crate::protocol::is_valid_server_id;
use crate::{Error, PluginError, Server};

/// Quiet time after an event before the directory is looked at: events of
/// one copy or rename arrive in a burst.
const SETTLE: Duration = Duration::from_millis(15);

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
    if stem.contains(".tmp") || stem.ends_with(".part") || stem.ends_with(".swp") {
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
    match std::fs::read_to_string(&path) {
        Ok(text) => PluginSettings::from_toml(&text)
            .map_err(|e| format!("{}: {}", path.display(), e.one_line(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PluginSettings::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// What is known about one plugin file.
#[derive(Default)]
struct Known {
    /// Hash and settings of the version serving.
    serving: Option<(String, PluginSettings)>,
    /// Hash and settings (or why the sidecar is invalid) that failed last,
    /// so a broken file or sidecar is reported once.
    refused: Option<(String, Result<PluginSettings, String>)>,
}

/// Keeps a server in step with a plugins directory.
pub(crate) struct Deployer {
    dir: PathBuf,
    runtime: Runtime,
    server: Server,
    known: HashMap<String, Known>,
    /// Files whose name is no server id, already reported.
    misnamed: HashSet<String>,
    events: mpsc::UnboundedReceiver<String>,
    _watcher: notify::RecommendedWatcher,
}

impl Deployer {
    /// Starts watching `dir` at once, so nothing that changes while the
    /// initial load runs is missed.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the directory cannot be watched.
    pub(crate) fn new(dir: PathBuf, runtime: Runtime, server: Server) -> Result<Self, Error> {
        let (tx, events) = mpsc::unbounded_channel::<String>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // A `cp` over a file shows as create/modify events and then a
                // close-after-write: act on the close, never on a file still
                // being written. Renames and moves are atomic.
                let relevant = matches!(
                    event.kind,
                    EventKind::Access(AccessKind::Close(AccessMode::Write))
                        | EventKind::Modify(ModifyKind::Name(_))
                        | EventKind::Remove(_)
                );
                if relevant {
                    for path in &event.paths {
                        if let Some(name) = plugin_name(path) {
                            let _ = tx.send(name);
                        }
                    }
                }
            })
            .map_err(|e| Error::Watch {
                dir: dir.clone(),
                source: Box::new(e),
            })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| Error::Watch {
                dir: dir.clone(),
                source: Box::new(e),
            })?;
        Ok(Deployer {
            dir,
            runtime,
            server,
            known: HashMap::new(),
            misnamed: HashSet::new(),
            events,
            _watcher: watcher,
        })
    }

    /// Loads and serves every plugin in the directory; how many serve.
    pub(crate) async fn load_all(&mut self) -> Result<usize, Error> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::Watch {
            dir: self.dir.clone(),
            source: Box::new(e),
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
            .filter_map(|e| plugin_name(&e.path()))
            .collect();
        names.sort();
        for name in &names {
            self.reconcile(name).await?;
        }
        Ok(names.iter().filter(|n| self.server.is_serving(n)).count())
    }

    /// Brings server id `name` in line with the directory.
    ///
    /// Nothing is applied unless all of it is valid: a file name that is
    /// no server id, an invalid sidecar, a plugin that does not load, or
    /// one the server refuses leaves what serves as it was, logged once.
    ///
    /// # Errors
    ///
    /// Only broker errors: a bad file is logged, not returned.
    pub(crate) async fn reconcile(&mut self, name: &str) -> Result<(), Error> {
        let path = self.dir.join(format!("{name}.wasm"));
        if !is_valid_server_id(name) {
            // Never served, so there is nothing to withdraw; logged again
            // only if the file goes away and comes back.
            if !path.exists() {
                self.misnamed.remove(name);
            } else if self.misnamed.insert(name.to_string()) {
                error!(
                    target: "callme::server",
                    file = %path.display(),
                    "skipped: the name is not a server id (1 to 200 letters, digits, `-`, `_` or `.`)"
                );
            }
            return Ok(());
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.known.remove(name);
                observe::plugin_removed(name);
                if self.server.stop_serving(name).await? {
                    info!(target: "callme::server", plugin = name, "removed");
                }
                return Ok(());
            }
            Err(e) => {
                error!(target: "callme::server", file = %path.display(), error = %e, "cannot read plugin");
                return Ok(());
            }
        };
        let hash = content_hash(&bytes);
        let settings = read_settings(&self.dir, name);
        let known = self.known.entry(name.to_string()).or_default();
        if let Ok(limits) = &settings
            && known
                .serving
                .as_ref()
                .is_some_and(|(h, l)| h == &hash && l == limits)
        {
            // Back to what serves (a bad sidecar undone, say): a later
            // failure is news again.
            known.refused = None;
            return Ok(());
        }
        let attempt = (hash, settings);
        if known.refused.as_ref() == Some(&attempt) {
            return Ok(());
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
                observe::plugin_refused(
                    name,
                    known.serving.is_some(),
                    LoadFailure::InvalidSettings,
                );
                known.refused = Some((hash, Err(reason)));
                return Ok(());
            }
        };
        let started = Instant::now();
        let runtime = self.runtime.clone();
        let owned_name = name.to_string();
        let lim = limits.clone();
        let loaded =
            tokio::task::spawn_blocking(move || Plugin::load(&runtime, &owned_name, &bytes, lim))
                .await
                // A load that panicked refuses that plugin only.
                .unwrap_or_else(|e| Err(PluginError::internal(format!("loading failed: {e}"))));
        let refusal = match loaded {
            Ok(plugin) => {
                let swapped = known.serving.is_some();
                match self.server.serve_plugin(plugin).await {
                    Ok(()) => {
                        known.serving = Some((hash.clone(), limits));
                        known.refused = None;
                        observe::plugin_served(name, &hash, swapped);
                        info!(
                            target: "callme::server",
                            plugin = name,
                            version = %&hash[..12],
                            elapsed = ?started.elapsed(),
                            "{}", if swapped { "swapped in" } else { "loaded" }
                        );
                        return Ok(());
                    }
                    // The server refused this plugin (its id, its
                    // concurrency, the broker's permissions for it): the
                    // others are not concerned.
                    Err(e @ (Error::Config(_) | Error::AccessRefused(_))) => e.to_string(),
                    Err(e) => return Err(e),
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
        Ok(())
    }

    /// Follows the directory until the watcher stops.
    pub(crate) async fn watch(mut self) -> Result<(), Error> {
        info!(target: "callme::server", dir = %self.dir.display(), "watching for plugins");
        while let Some(first) = self.events.recv().await {
            let mut names = HashSet::from([first]);
            tokio::time::sleep(SETTLE).await;
            while let Ok(n) = self.events.try_recv() {
                names.insert(n);
            }
            for name in names {
                if let Err(e) = self.reconcile(&name).await {
                    warn!(target: "callme::server", plugin = %name, error = %e, "could not apply change");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
