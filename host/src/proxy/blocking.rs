//! [`BlockingProxy`]: the proxy for code that is not async.

use std::time::Duration;

use serde_json::Value;

use super::Proxy;
use crate::protocol::Args;
use crate::{ConnectOptions, Error};

/// A proxy for code that is not async: it runs its own small runtime.
///
/// Its methods block, so async code uses [`Proxy`] instead (tokio panics
/// at a blocking call on one of its async threads). It may be dropped
/// anywhere, async code included: its connection is closed, then its
/// runtime ends without blocking there.
pub struct BlockingProxy {
    /// Both `Some` until dropped: the proxy goes first, in its runtime.
    runtime: Option<tokio::runtime::Runtime>,
    proxy: Option<Proxy>,
}

/// How long a dropped [`BlockingProxy`] waits for the broker to take the
/// close of its connection.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Drop for BlockingProxy {
    fn drop(&mut self) {
        let proxy = self.proxy.take();
        if let Some(runtime) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Async code may not block: the connection is dropped, and
                // the runtime ends without waiting.
                {
                    let _inside = runtime.enter();
                    drop(proxy);
                }
                runtime.shutdown_background();
            } else {
                if let Some(proxy) = proxy {
                    // Closed with the broker's word, not cut, and dropped
                    // in its runtime.
                    runtime.block_on(async move {
                        let _ = tokio::time::timeout(CLOSE_WAIT, proxy.close()).await;
                        drop(proxy);
                    });
                }
                runtime.shutdown_timeout(CLOSE_WAIT);
            }
        }
    }
}

impl BlockingProxy {
    /// Connects; see [`Proxy::connect_with`].
    ///
    /// # Errors
    ///
    /// As [`Proxy::connect`], or [`Error::Runtime`] when its runtime cannot
    /// start.
    ///
    /// # Panics
    ///
    /// Called on a thread that runs async code (a tokio worker): tokio
    /// refuses to block there. Use [`Proxy`] in async code, or call this
    /// inside `spawn_blocking`.
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
        Ok(BlockingProxy {
            runtime: Some(runtime),
            proxy: Some(proxy),
        })
    }

    /// Calls `func` on `server`; see [`Proxy::call`].
    ///
    /// # Errors
    ///
    /// See [`Proxy::call`].
    pub fn call(&self, server: &str, func: &str, args: Args) -> Result<Value, Error> {
        let timeout = self.proxy().default_timeout();
        self.call_timeout(server, func, args, timeout)
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
        self.runtime()
            .block_on(self.proxy().call(server, func, args, timeout))
    }

    /// Sets the largest reply body taken; see [`Proxy::set_max_reply_bytes`].
    pub fn set_max_reply_bytes(&self, max: usize) {
        self.proxy().set_max_reply_bytes(max);
    }

    /// Sets the largest request body sent; see
    /// [`Proxy::set_max_request_bytes`].
    pub fn set_max_request_bytes(&self, max: usize) {
        self.proxy().set_max_request_bytes(max);
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("present until dropped")
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("present until dropped")
    }
}
