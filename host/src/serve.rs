//! `callme serve`: a host that serves a plugins directory until told to stop.
//!
//! Connects, serves every plugin already in the directory (reporting ready
//! only then), follows the directory, and on SIGTERM or Ctrl-C stops
//! taking requests, finishes the calls it has, and returns.

use std::path::PathBuf;
use std::time::Duration;

use tracing::info;

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

/// Runs the host until SIGTERM/Ctrl-C or the loss of the broker.
///
/// # Errors
///
/// When the broker or the plugins directory cannot be used at start, or
/// the connection is lost.
pub async fn run(options: ServeOptions) -> Result<(), Error> {
    let runtime =
        Runtime::with_config(options.runtime.clone()).map_err(|e| Error::Config(e.to_string()))?;
    let server = Server::connect(&options.connect, options.server.clone()).await?;
    let mut deployer = Deployer::new(options.plugins_dir.clone(), runtime, server.clone());
    deployer.load_all().await?;
    info!(target: "callme::server", dir = %options.plugins_dir.display(), "ready");

    let watch = tokio::spawn(deployer.watch());
    let outcome = tokio::select! {
        _ = shutdown_signal() => {
            info!(target: "callme::server", grace = ?options.grace, "stopping: finishing running calls");
            server.shutdown(options.grace).await;
            Ok(())
        }
        _ = server.closed() => Err(Error::Config("the broker connection was lost".into())),
        r = watch => match r {
            Ok(Err(e)) => Err(e),
            _ => Err(Error::Config("the plugins directory watcher stopped".into())),
        },
    };
    info!(target: "callme::server", "stopped");
    outcome
}

async fn shutdown_signal() {
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
