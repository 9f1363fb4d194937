//! What every benchmark needs: the broker URL, the target directory and
//! the plugins `scripts/build-plugins` put there.

// Each benchmark uses only some of these.
#![allow(dead_code)]

pub mod add;
pub mod echo;
pub mod rounds;
pub mod thread;

use std::path::PathBuf;

/// The broker to measure against: `CALLME_AMQP_URL` (as set by
/// `eval "$(scripts/broker env)"`), or the project's node on its default port.
pub fn url() -> String {
    std::env::var("CALLME_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5682/%2f".into())
}

/// The nodes of a cluster to measure too: `CALLME_CLUSTER_URLS` (as set
/// by `eval "$(scripts/broker cluster env)"`), comma-separated.
pub fn cluster_urls() -> Option<Vec<String>> {
    let list = std::env::var("CALLME_CLUSTER_URLS").ok()?;
    Some(list.split(',').map(|u| u.trim().to_string()).collect())
}

/// The workspace's target directory.
pub fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A built plugin's file.
pub fn plugin_path(name: &str) -> PathBuf {
    target().join("plugins").join(format!("{name}.wasm"))
}

/// A built plugin's bytes, with a hint when it has not been built.
pub fn plugin_bytes(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = plugin_path(name);
    std::fs::read(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/build-plugins)", path.display()))
}
