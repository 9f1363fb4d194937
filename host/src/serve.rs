//! `callme serve`: a host that serves a plugins directory until told to stop.
//!
//! [`Host::start`] connects, serves every plugin already in the directory
//! and only then returns (so "ready" means every plugin answers);
//! [`Host::run_until`] follows the directory until a stop signal, then
//! stops taking requests and finishes the calls it has. [`run`] is both,
//! stopped by SIGTERM or Ctrl-C. A broker that is not up yet at start-up
//! is waited for, with backoff. Readiness (`observe`) follows: starting
//! until every plugin is served, stopping from the stop signal on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::observe::{self, Phase};
use crate::plugin::{Runtime, RuntimeConfig};
use crate::watcher::Deployer;
use crate::{ConnectOptions, Error, Server, ServerOptions};

/// Everything `callme serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The broker.
    pub connect: ConnectOptions,
    /// The plugins directory.
    pub plugins_dir: PathBuf,
    /// Queue declaration and concurrency.
    pub server: ServerOptions,
    /// Engine settings.
    pub runtime: RuntimeConfig,
    /// Time to finish running calls after a stop signal.
    pub grace: Duration,
}

/// A running host: connected, serving its plugins directory.
pub struct Host {
    server: Server,
    runtime: Runtime,
    deployer: Deployer,
    grace: Duration,
}

impl Host {
    /// Connects and serves every plugin in the directory; returns when all
    /// of them are served.
    ///
    /// # Errors
    ///
    /// When the engine, the broker or the plugins directory cannot be used.
    pub async fn start(options: ServeOptions) -> Result<Host, Error> {
        match Host::start_until(options, std::future::pending()).await? {
            Some(host) => Ok(host),
            None => unreachable!("a start that cannot be stopped was stopped"),
        }
    }

    /// As [`Host::start`], unless `stop` resolves first: then the plugins
    /// already served finish their running calls (within the grace
    /// period), as after [`Host::run_until`]'s stop, and this returns
    /// `None`. Loading every plugin may take long (each first instance is
    /// tried, within its deadline), and the ones loaded first already
    /// take calls: a stop signal in that time is a graceful stop too.
    ///
    /// # Errors
    ///
    /// As [`Host::start`].
    pub async fn start_until(
        options: ServeOptions,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<Host>, Error> {
        let started = Instant::now();
        let mut stop = std::pin::pin!(stop);
        let runtime = Runtime::with_config(options.runtime.clone()).map_err(Error::Plugin)?;
        let server = tokio::select! {
            server = connect_patiently(&options) => server?,
            () = &mut stop => {
                info!(target: "callme::server", "stopped before the broker was reached");
                return Ok(None);
            }
        };
        let mut deployer =
            Deployer::new(options.plugins_dir.clone(), runtime.clone(), server.clone())?;
        let loaded = tokio::select! {
            count = deployer.load_all() => Some(count?),
            () = &mut stop => None,
        };
        let Some(count) = loaded else {
            observe::set_phase(Phase::Stopping);
            // As in [`Host::run_until`]: what is being loaded is given up
            // (or, being swapped in, finished) before the ids are stopped,
            // all within the one grace period.
            let by = crate::server::grace_ends(options.grace);
            let _ = tokio::time::timeout_at(by, deployer.stop()).await;
            info!(target: "callme::server", grace = ?options.grace, "stopping before every plugin was served: finishing running calls");
            server.shutdown_by(by).await;
            info!(target: "callme::server", "stopped");
            return Ok(None);
        };
        let (hits, misses) = runtime.cache_stats();
        info!(
            target: "callme::server",
            dir = %options.plugins_dir.display(),
            plugins = count,
            cache_hits = hits,
            cache_misses = misses,
            delivery_limit = options.server.delivery_limit,
            grace = ?options.grace,
            elapsed = ?started.elapsed(),
            "ready"
        );
        observe::set_phase(Phase::Serving);
        Ok(Some(Host {
            server,
            runtime,
            deployer,
            grace: options.grace,
        }))
    }

    /// The server, to serve more (native functions, say) beside the directory.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The plugin runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Follows the directory until `stop` resolves, then shuts down
    /// gracefully.
    ///
    /// # Errors
    ///
    /// When the broker connection is lost or the directory can no longer
    /// be watched.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<(), Error> {
        let Host {
            server,
            deployer,
            grace,
            ..
        } = self;
        let (stop_watching, stop_rx) = tokio::sync::watch::channel(false);
        let mut watch = tokio::spawn(deployer.watch(stop_rx));
        let outcome = tokio::select! {
            _ = stop => {
                // No plugin is loaded or swapped once stopping: it would
                // take requests that the process, on its way out, drops.
                // A change under way is finished first, not cut half-way,
                // within the grace period (a new version's first instance
                // may take its plugin's whole deadline).
                // Not ready from now on: a balancer or an orchestrator
                // sends no more work here.
                // The change and the calls share the one grace period: a
                // stop ends within it and the tidying up that follows
                // ([`Server::shutdown`]), as an orchestrator's own limit
                // set from `--grace` expects.
                observe::set_phase(Phase::Stopping);
                let by = crate::server::grace_ends(grace);
                let _ = stop_watching.send(true);
                if tokio::time::timeout_at(by, &mut watch).await.is_err() {
                    watch.abort();
                }
                info!(target: "callme::server", ?grace, "stopping: finishing running calls");
                server.shutdown_by(by).await;
                Ok(())
            }
            _ = server.closed() => Err(Error::BrokerLost),
            r = &mut watch => {
                // The directory can no longer be followed (or following it
                // failed): the host ends with an error, but the calls it
                // runs are finished first, as at a stop.
                let e = match r {
                    Ok(Err(e)) => e,
                    _ => Error::WatcherStopped,
                };
                observe::set_phase(Phase::Stopping);
                error!(target: "callme::server", error = %e.chain(), ?grace, "the plugins directory is no longer followed: finishing running calls, then stopping");
                server.shutdown(grace).await;
                Err(e)
            }
        };
        observe::set_phase(Phase::Stopping);
        info!(target: "callme::server", "stopped");
        outcome
    }
}

/// Connects the server, waiting for a broker that is not up yet: a host
/// started before its broker (both started at boot, say) serves as soon
/// as the broker is there. Errors that waiting cannot cure (a refused
/// login, an invalid URI, a peer that is not AMQP) end it at once.
async fn connect_patiently(options: &ServeOptions) -> Result<Server, Error> {
    let since = Instant::now();
    let mut attempt = 0;
    let mut reported = None;
    loop {
        match Server::connect(&options.connect, options.server.clone()).await {
            Ok(server) => {
                if attempt > 0 {
                    info!(target: "callme::server", broker = %options.connect.redacted(), waited = ?since.elapsed(), attempts = attempt + 1, "the broker is up");
                }
                return Ok(server);
            }
            Err(
                e @ (Error::Connection(_) | Error::ConnectTimeout { .. } | Error::Disconnected(_)),
            ) if options.connect.auto_recover => {
                // Said at once, then every half minute while it lasts.
                if reported.is_none_or(|at: Instant| at.elapsed() >= WAIT_REPORT_EVERY) {
                    warn!(target: "callme::server", broker = %options.connect.redacted(), error = %e.chain(), waited = ?since.elapsed(), "the broker is unreachable: waiting for it before serving");
                    reported = Some(Instant::now());
                }
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(crate::amqp::link::backoff(attempt)).await;
        attempt += 1;
    }
}

/// How often a host still waiting for its broker at start-up says so.
const WAIT_REPORT_EVERY: Duration = Duration::from_secs(30);

/// Runs the host until SIGTERM/Ctrl-C or the loss of the broker.
///
/// # Errors
///
/// As [`Host::start`] and [`Host::run_until`].
pub async fn run(options: ServeOptions) -> Result<(), Error> {
    let mut stop = std::pin::pin!(shutdown_signal());
    match Host::start_until(options, &mut stop).await? {
        Some(host) => host.run_until(stop).await,
        None => Ok(()),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
