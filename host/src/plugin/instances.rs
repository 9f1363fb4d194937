//! Where a call's store and instance come from.
//!
//! By default every call gets an instance nobody has used before. Making
//! one (a store, then instantiating the component, which runs the guest's
//! start-up code) is most of a small call's cost, and for interpreter
//! guests it takes milliseconds. [`Instances`] can make some ahead of
//! time: with `prewarm = N` it keeps up to N spare instances, fresh and
//! never called, and replaces each one a call takes in the background. A
//! call that finds no spare makes its own, so spares change latency, never
//! isolation.
//!
//! With `reuse_instances` the same type keeps instances that served a call
//! successfully for the next one instead.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, UpdateDeadline};

use super::engine::{EPOCH_TICK, Runtime};
use super::limits::Limits;
use super::sandbox::CallState;

/// Idle instances kept per plugin with `reuse_instances`: enough for the
/// usual concurrency without holding many pool slots.
const MAX_IDLE: usize = 16;

/// A store with its instance, ready for a call.
pub(super) struct Ready {
    pub(super) store: Store<CallState>,
    pub(super) instance: Instance,
}

/// Makes the stores and instances of one plugin's calls.
pub(super) struct Instances {
    pub(super) name: Arc<str>,
    pub(super) limits: Limits,
    runtime: Runtime,
    pre: InstancePre<CallState>,
    /// Spares (fresh) or idle instances (reuse), and spares being made.
    pool: Mutex<Pool>,
    /// Where spares are made; set by [`Instances::start_prewarm`].
    maker: OnceLock<tokio::runtime::Handle>,
}

#[derive(Default)]
struct Pool {
    ready: Vec<Ready>,
    making: usize,
}

impl Instances {
    pub(super) fn new(
        runtime: Runtime,
        name: Arc<str>,
        limits: Limits,
        pre: InstancePre<CallState>,
    ) -> Instances {
        Instances {
            name,
            limits,
            runtime,
            pre,
            pool: Mutex::new(Pool::default()),
            maker: OnceLock::new(),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts keeping `limits.prewarm` spares, made on `handle`. Until
    /// this is called (and with `prewarm = 0`) every fresh call makes its
    /// own instance, which suits one-shot use.
    pub(super) fn start_prewarm(self: &Arc<Self>, handle: &tokio::runtime::Handle) {
        if self.limits.prewarm == 0 || self.limits.reuse_instances {
            return;
        }
        if self.maker.set(handle.clone()).is_ok() {
            self.replenish();
        }
    }

    /// Spares ready now.
    pub(super) fn spares(&self) -> usize {
        if self.limits.reuse_instances {
            0
        } else {
            self.pool().ready.len()
        }
    }

    /// A ready instance for the next call, armed with fresh limits: a
    /// spare or an idle instance, if there is one.
    pub(super) fn take(self: &Arc<Self>) -> Option<Ready> {
        let taken = self.pool().ready.pop();
        // A no-op unless spares are kept (never with reuse).
        self.replenish();
        taken.map(|mut ready| {
            self.arm(&mut ready.store);
            ready
        })
    }

    /// Keeps an instance that has just served a call successfully, when
    /// the plugin reuses instances; discards it otherwise.
    pub(super) fn give_back(&self, ready: Ready) {
        if self.limits.reuse_instances {
            let mut pool = self.pool();
            if pool.ready.len() < MAX_IDLE {
                pool.ready.push(ready);
            }
        } else {
            self.discard(ready.store);
        }
    }

    /// Drops a used store. Giving its memory back to the pool takes as
    /// long as a small call, so where spares are made (off the caller's
    /// path) the drop happens there too.
    pub(super) fn discard(&self, store: Store<CallState>) {
        match self.maker.get() {
            Some(handle) => drop(handle.spawn(async move { drop(store) })),
            None => drop(store),
        }
    }

    /// Starts making spares until ready and being made reach the target.
    fn replenish(self: &Arc<Self>) {
        let Some(handle) = self.maker.get() else {
            return;
        };
        let mut pool = self.pool();
        while pool.ready.len() + pool.making < self.limits.prewarm {
            pool.making += 1;
            let this = Arc::clone(self);
            handle.spawn(async move {
                let made = this.make().await;
                let mut pool = this.pool();
                pool.making -= 1;
                match made {
                    Ok(ready) => pool.ready.push(ready),
                    // The call that finds no spare makes its own instance
                    // and reports the same failure to its caller.
                    Err(e) => {
                        tracing::debug!(target: "callme::plugin", plugin = &*this.name, error = %e, "spare instance failed")
                    }
                }
            });
        }
    }

    /// Instantiates into a new store, under the plugin's limits.
    async fn make(&self) -> wasmtime::Result<Ready> {
        let mut store = self.new_store();
        let store_ref = &mut store;
        let instance = self
            .with_deadline(self.pre.instantiate_async(store_ref))
            .await
            .map_err(|limit| wasmtime::format_err!("instantiation ran past {limit:?}"))??;
        Ok(Ready { store, instance })
    }

    /// The component, to instantiate in a store of this plugin.
    pub(super) fn pre(&self) -> &InstancePre<CallState> {
        &self.pre
    }

    /// A new store with nothing granted, armed with the plugin's limits.
    pub(super) fn new_store(&self) -> Store<CallState> {
        let mut store = Store::new(
            &self.runtime.inner.engine,
            CallState::new(
                self.name.clone(),
                self.limits.memory_bytes,
                self.limits.output_bytes,
                self.limits.log_level,
            ),
        );
        store.limiter(|s| &mut s.limiter);
        self.arm(&mut store);
        store
    }

    /// Refills fuel and sets the deadline for the next call in `store`.
    pub(super) fn arm(&self, store: &mut Store<CallState>) {
        // Fuel is enabled on the engine, so setting it cannot fail.
        let _ = store.set_fuel(self.limits.fuel);
        let deadline = Instant::now() + self.limits.deadline;
        store.data_mut().deadline_hit = false;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut cx| {
            if Instant::now() >= deadline {
                cx.data_mut().deadline_hit = true;
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Yield so a CPU-bound guest never holds an executor
                // thread for longer than one tick.
                Ok(UpdateDeadline::Yield(1))
            }
        });
    }

    /// Runs `fut` under the plugin's deadline. The epoch callback stops
    /// running guest code; this timeout also stops a guest blocked in a
    /// WASI call (a sleep, a poll), where no guest code runs.
    pub(super) async fn with_deadline<T>(
        &self,
        fut: impl Future<Output = wasmtime::Result<T>>,
    ) -> Result<wasmtime::Result<T>, Duration> {
        let limit = self.limits.deadline;
        tokio::time::timeout(limit + EPOCH_TICK * 2, fut)
            .await
            .map_err(|_| limit)
    }
}
