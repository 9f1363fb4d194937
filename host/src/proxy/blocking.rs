//! [`BlockingProxy`]: the proxy for code that is not async.

use std::time::Duration;

use serde_json::Value;

use super::Proxy;
use crate::protocol::Args;
use crate::{ConnectOptions, Error};

/// A proxy for code that is not async: it runs its own small runtime.
pub struct BlockingProxy {
    runtime: tokio::runtime::Runtime,
    proxy: Proxy,
}

impl BlockingProxy {
    /// Connects; see [`Proxy::connect_with`].
    ///
    /// # Errors
    ///
    /// As [`Proxy::connect`], or [`Error::Config`] when the runtime cannot start.
    pub fn connect(options: &ConnectOptions, timeout: Duration) -> Result<BlockingProxy, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("callme-proxy")
            .build()
            .map_err(|source| Error::Runtime {
                what: "the blocking proxy's runtime",
                source,
            })?;
        let proxy = runtime.block_on(Proxy::connect_with(options, timeout))?;
        Ok(BlockingProxy { runtime, proxy })
    }

    /// Calls `func` on `server`; see [`Proxy::call`].
    ///
    /// # Errors
    ///
    /// See [`Proxy::call`].
    pub fn call(&self, server: &str, func: &str, args: Args) -> Result<Value, Error> {
        let timeout = self.proxy.default_timeout();
        self.runtime
            .block_on(self.proxy.call(server, func, args, timeout))
    }

    /// Calls with a timeout for this call only.
    ///
    /// # Errors
    ///
    /// See [`Proxy::call`].
    pub fn call_timeout(
        &self,
        server: &str,
        func: &str,
        args: Args,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.runtime
            .block_on(self.proxy.call(server, func, args, timeout))
    }
}
