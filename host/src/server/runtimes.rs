//! The runtimes a server runs plugin work on: the plugin executor, and a background thread at the lowest CPU priority for spare instances.
//!
//! Calls run on the executor (or, on a quiet host, start on the tokio
//! worker that took the request). Making a spare instance and dropping a
//! used one (which copies its memory back from the image) is work no call
//! waits for, and for an interpreter plugin it is most of the CPU a call
//! costs (about 0.6 ms to make and 0.5 ms to drop a Python instance). On
//! the executor it competed with the calls and with the threads carrying
//! their replies, and on a host with few cores the replies waited. The
//! background thread runs at the lowest priority the system has
//! (`SCHED_IDLE` on Linux), so it takes only CPU nothing else wants. It
//! is used only while the host is quiet, and work it has not started
//! within a few milliseconds (the machine is busy with other work) is
//! done on the executor instead (see `plugin/maker.rs`).
//!
//! The cost of a thread at that priority: work it has started holds what
//! it holds (the plugin's pool lock for a moment, allocator locks) until
//! it runs again, so on a machine saturated by other processes a call
//! may wait behind it for as long as the kernel keeps it off the CPU.

use tokio::runtime::{Builder, Handle, Runtime};
use tracing::debug;

use crate::Error;

/// A runtime shut down without blocking when the server goes away
/// (dropping a runtime inside async code would panic).
pub(super) struct Executor(Option<Runtime>);

impl Executor {
    /// The plugin executor: `threads` workers (at least 1).
    pub(super) fn plugins(threads: usize) -> Result<Executor, Error> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("callme-plugin")
            .enable_time()
            .build()
            .map_err(|source| Error::Runtime {
                what: "the plugin executor",
                source,
            })?;
        Ok(Executor(Some(runtime)))
    }

    /// The background thread, `callme-spares`, at the lowest CPU priority.
    pub(super) fn background() -> Result<Executor, Error> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("callme-spares")
            .on_thread_start(lowest_priority)
            .enable_time()
            .build()
            .map_err(|source| Error::Runtime {
                what: "the spare instances' thread",
                source,
            })?;
        Ok(Executor(Some(runtime)))
    }

    pub(super) fn handle(&self) -> &Handle {
        // Only `Drop` takes the runtime out.
        self.0.as_ref().expect("runtime is running").handle()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Puts the calling thread at the lowest CPU priority: `SCHED_IDLE` on
/// Linux, the lowest `nice` elsewhere. Lowering one's own priority needs
/// no privilege; if it fails all the same, the thread runs as any other.
#[cfg(unix)]
fn lowest_priority() {
    use thread_priority::ThreadPriority;
    use thread_priority::unix::{
        NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id,
    };
    let policy = if cfg!(any(target_os = "linux", target_os = "android")) {
        NormalThreadSchedulePolicy::Idle
    } else {
        NormalThreadSchedulePolicy::Other
    };
    let set = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(policy),
    );
    if let Err(e) = set {
        debug!(target: "callme::server", error = ?e, "the spare instances' thread keeps its priority");
    }
}

#[cfg(not(unix))]
fn lowest_priority() {
    if let Err(e) =
        thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
    {
        debug!(target: "callme::server", error = ?e, "the spare instances' thread keeps its priority");
    }
}
