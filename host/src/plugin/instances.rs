//! Where a call's store and instance come from, and how many may be alive.
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
//!
//! Every store holds a [`Slot`] of the runtime's [`Capacity`], which has as
//! many slots as the pooling allocator has instances: the pool is never
//! asked for more than it has. Calls come first. A call that finds every
//! slot taken evicts a spare or idle instance (of the plugin called least
//! recently), and only when all slots are in calls does it wait for one,
//! up to its deadline. Spares and idle instances never wait: they are made
//! only from free slots, hold at most a quarter of them, and are not made
//! at all while a call waits. When that quarter is full, a plugin being
//! called takes the place of one kept by a plugin idle for a while, so
//! spares follow the traffic.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, UpdateDeadline};

use super::engine::{EPOCH_TICK, Runtime};
use super::maker::{Maker, Watch};
use super::sandbox::CallState;
use super::settings::PluginSettings;
use super::trap::DeadlinePassed;
use crate::{PluginError, TimeoutCause, observe};

/// Idle instances kept per plugin with `reuse_instances`: enough for the
/// usual concurrency without holding many pool slots.
const MAX_IDLE: usize = 16;

/// Spares and idle instances hold at most 1/KEPT_SHARE of the slots, so
/// most of the pool is always free for calls without evicting anything.
const KEPT_SHARE: u32 = 4;

/// When kept instances are at their cap, a plugin that is being called
/// takes the place of one kept by a plugin not called for this long. Long
/// enough that two busy plugins do not take spares from each other on
/// every call (each would then make one per call, the cost spares exist to
/// avoid); short enough that spares move to where the calls are.
const IDLE_BEFORE_GIVING_UP: Duration = Duration::from_secs(1);

/// At most one warning this often that calls wait for a slot: under
/// overload every call would say it.
const WAIT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// What the runtime holds right now, across every plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeStats {
    /// Instances alive: in calls, spares (also those being made) and idle
    /// reused instances.
    pub instances: usize,
    /// Of those, spares and idle instances: alive, not in a call.
    pub kept: usize,
    /// Slots, the most instances alive at once
    /// ([`super::RuntimeConfig::max_instances`]).
    pub max_instances: usize,
    /// The most spares and idle instances at once.
    pub max_kept: usize,
    /// Plugins loaded and not yet dropped, every version counted: a
    /// replaced version stays until its last call ends.
    pub plugins: usize,
    /// Calls since start that found every slot in a call and waited.
    pub waited: u64,
}

/// The counters slots and kept instances give back to when dropped.
#[derive(Default)]
struct Counters {
    instances: AtomicUsize,
    kept: AtomicUsize,
    plugins: AtomicUsize,
    waited: AtomicU64,
    /// Calls waiting for a slot right now: while there are any, no
    /// instance is kept (it would hold a slot a call waits for).
    waiting: AtomicUsize,
    /// Used instances handed to the background thread to be dropped and
    /// not dropped yet.
    dropping: AtomicUsize,
}

/// A spare being made, counted in [`Pool::making`] until it is made, or
/// its work is dropped without running (its runtime shut down).
struct Making(Arc<Instances>);

impl Drop for Making {
    fn drop(&mut self) {
        self.0.pool().making -= 1;
    }
}

/// Used instances waiting for the background thread to drop them, at
/// most (and an eighth of the slots, at least one): past them, the thread
/// is starved (the host is saturated), and a call's instance is dropped
/// where the call ended, so slots come back.
const MAX_DROPPING: usize = 16;

/// One instance handed over to be dropped, counted until it is.
struct Dropping(Arc<Counters>);

impl Drop for Dropping {
    fn drop(&mut self) {
        self.0.dropping.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The instance slots of a runtime, and the plugins that keep instances
/// in them.
pub(crate) struct Capacity {
    slots: Arc<Semaphore>,
    max_instances: u32,
    max_kept: usize,
    /// Used instances handed over to be dropped, at most.
    max_dropping: usize,
    counters: Arc<Counters>,
    /// Every plugin loaded, to find kept instances to evict. Weak, so a
    /// replaced version goes away with its last call.
    plugins: Mutex<Vec<Weak<Instances>>>,
    /// The origin of `Instances::last_call`.
    started: Instant,
    /// When calls were last said to wait, in ms since `started`.
    warned: AtomicU64,
    /// Told when a call finds no slot and no spare to take one from:
    /// spares being made give theirs up.
    short: Notify,
}

/// One instance's share of the capacity, released when dropped.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    counters: Arc<Counters>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.instances.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A kept instance's place under the cap on kept instances.
struct Quota(Arc<Counters>);

impl Drop for Quota {
    fn drop(&mut self) {
        self.0.kept.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Capacity {
    pub(crate) fn new(max_instances: u32) -> Capacity {
        Capacity {
            slots: Arc::new(Semaphore::new(max_instances as usize)),
            max_instances,
            max_kept: max_instances.div_ceil(KEPT_SHARE) as usize,
            max_dropping: (max_instances as usize / 8).clamp(1, MAX_DROPPING),
            counters: Arc::default(),
            plugins: Mutex::new(Vec::new()),
            started: Instant::now(),
            warned: AtomicU64::new(0),
            short: Notify::new(),
        }
    }

    pub(crate) fn max_kept(&self) -> usize {
        self.max_kept
    }

    pub(crate) fn stats(&self) -> RuntimeStats {
        let c = &self.counters;
        RuntimeStats {
            instances: c.instances.load(Ordering::Relaxed),
            kept: c.kept.load(Ordering::Relaxed),
            max_instances: self.max_instances as usize,
            max_kept: self.max_kept,
            plugins: c.plugins.load(Ordering::Relaxed),
            waited: c.waited.load(Ordering::Relaxed),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn plugins(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Instances>>> {
        self.plugins.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.counters.instances.fetch_add(1, Ordering::Relaxed);
        Slot {
            _permit: permit,
            counters: self.counters.clone(),
        }
    }

    /// A free slot, if there is one; never waits, never evicts.
    fn try_slot(&self, weight: u32) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_many_owned(weight).ok()?;
        Some(self.slot(permit))
    }

    /// A slot for a call: a free one, else one a kept instance gives up,
    /// else the next one a call gives back, waiting up to `patience`.
    async fn slot_for_call(
        &self,
        weight: u32,
        patience: Duration,
        plugin: &str,
    ) -> Result<Slot, PluginError> {
        if let Some(slot) = self.try_slot(weight) {
            return Ok(slot);
        }
        // Counted before the last look at kept instances: one made from
        // now on sees this and is not kept, so none can hold a slot while
        // the call waits (see `Instances::keep`).
        let waiting = Waiting::new(&self.counters);
        loop {
            if let Some(slot) = self.try_slot(weight) {
                return Ok(slot);
            }
            if !self.evict(|_| true) {
                break;
            }
        }
        // Spares still being made hold slots too, for as long as their
        // start-up code runs (up to their plugin's deadline): they give
        // way as made ones do. None starts while a call waits.
        self.short.notify_waiters();
        self.counters.waited.fetch_add(1, Ordering::Relaxed);
        observe::instance_waited(plugin);
        self.warn_waiting(plugin);
        let acquired =
            tokio::time::timeout(patience, self.slots.clone().acquire_many_owned(weight)).await;
        drop(waiting);
        match acquired {
            Ok(Ok(permit)) => Ok(self.slot(permit)),
            // The semaphore lives as long as the runtime and is never closed.
            Ok(Err(closed)) => Err(PluginError::internal(format!(
                "no sandbox available: {closed}"
            ))),
            Err(_) => Err(PluginError::Timeout {
                cause: TimeoutCause::Deadline,
                message: format!(
                    "no sandbox free within the deadline of {patience:?}: all {} instance \
                     slots of the host are in calls",
                    self.max_instances
                ),
            }),
        }
    }

    fn warn_waiting(&self, plugin: &str) {
        let now = self.now_ms();
        let last = self.warned.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WAIT_WARNING_EVERY.as_millis() as u64;
        if due
            && self
                .warned
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                target: "callme::plugin",
                plugin,
                max_instances = self.max_instances,
                "all instance slots are in calls: calls wait for one to end \
                 (raise the instance limit, or lower concurrency)"
            );
        }
    }

    /// A place for one more kept instance of `plugin`: free under the
    /// cap, or given up by a plugin idle for a while.
    fn reserve_kept(&self, plugin: &Instances) -> Option<Quota> {
        for attempt in 0..2 {
            let reserved =
                self.counters
                    .kept
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| {
                        (k < self.max_kept).then_some(k + 1)
                    });
            if reserved.is_ok() {
                return Some(Quota(self.counters.clone()));
            }
            let idle_since = self
                .now_ms()
                .saturating_sub(IDLE_BEFORE_GIVING_UP.as_millis() as u64);
            let ours = plugin.last_call.load(Ordering::Relaxed);
            if attempt > 0 || !self.evict(|last| last <= idle_since && last < ours) {
                break;
            }
        }
        None
    }

    /// Drops one kept instance of the plugin called least recently among
    /// those whose last call passes `eligible`; whether there was one.
    fn evict(&self, eligible: impl Fn(u64) -> bool) -> bool {
        let evicted = {
            let mut plugins = self.plugins();
            plugins.retain(|p| p.strong_count() > 0);
            let mut victim: Option<(u64, Arc<Instances>)> = None;
            for p in plugins.iter().filter_map(Weak::upgrade) {
                let last = p.last_call.load(Ordering::Relaxed);
                let older = victim.as_ref().is_none_or(|(v, _)| last < *v);
                if older && eligible(last) && !p.pool().ready.is_empty() {
                    victim = Some((last, p));
                }
            }
            victim.and_then(|(_, p)| p.pool().ready.pop())
        };
        // Dropped outside the locks: freeing an instance takes a while.
        evicted.is_some()
    }

    fn register(&self, plugin: &Arc<Instances>) {
        self.counters.plugins.fetch_add(1, Ordering::Relaxed);
        let mut plugins = self.plugins();
        plugins.retain(|p| p.strong_count() > 0);
        plugins.push(Arc::downgrade(plugin));
    }
}

/// A call waiting for a slot, counted while it waits.
struct Waiting<'a>(&'a Counters);

impl<'a> Waiting<'a> {
    fn new(counters: &'a Counters) -> Self {
        counters.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(counters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A store for one call with the slot it holds, and its instance if one
/// was made ahead.
pub(super) struct Sandbox {
    pub(super) store: Store<CallState>,
    pub(super) instance: Option<Instance>,
    /// When the call its store is armed for must end (see
    /// [`Instances::arm`]).
    pub(super) deadline: Instant,
    // After the store, so dropped after it: wasmtime has the pool slot
    // back before another instance may take this one's place.
    _slot: Slot,
}

/// A spare or idle instance with its place under the cap.
struct Kept {
    sandbox: Sandbox,
    _quota: Quota,
    _counted: observe::KeptInstance,
}

/// Makes the stores and instances of one plugin's calls.
pub(super) struct Instances {
    pub(super) name: Arc<str>,
    pub(super) settings: PluginSettings,
    runtime: Runtime,
    pre: InstancePre<CallState>,
    /// Slots one instance takes (see `Runtime::slots_for`).
    weight: u32,
    /// Spares (fresh) or idle instances (reuse), and spares being made.
    pool: Mutex<Pool>,
    /// Where spares are made; set by [`Instances::start_prewarm`].
    maker: OnceLock<tokio::runtime::Handle>,
    /// The work handed to that thread and not started yet.
    watch: Arc<Watch>,
    /// When a call last started, in ms since the capacity's start, or 0
    /// for never: the plugin called least recently gives its kept
    /// instances up first, and one never called takes no one's place.
    last_call: AtomicU64,
}

#[derive(Default)]
struct Pool {
    ready: Vec<Kept>,
    making: usize,
}

impl Drop for Instances {
    fn drop(&mut self) {
        self.runtime
            .inner
            .capacity
            .counters
            .plugins
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instances {
    pub(super) fn new(
        runtime: Runtime,
        name: Arc<str>,
        settings: PluginSettings,
        pre: InstancePre<CallState>,
        weight: u32,
    ) -> Arc<Instances> {
        let instances = Arc::new(Instances {
            name,
            settings,
            runtime,
            pre,
            weight,
            pool: Mutex::new(Pool::default()),
            maker: OnceLock::new(),
            watch: Arc::default(),
            last_call: AtomicU64::new(0),
        });
        instances.capacity().register(&instances);
        instances
    }

    fn capacity(&self) -> &Capacity {
        &self.runtime.inner.capacity
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where spares are made and used instances dropped, if spares are
    /// kept: the thread given to `start_prewarm`, unless the host is
    /// `busy` (see `CallContext::busy`): then the runtime of the call at
    /// hand, where that work competes with calls as an equal (under load
    /// a lowest-priority thread gets too little CPU to keep up).
    fn maker(&self, busy: bool) -> Option<Maker> {
        let quiet = self.maker.get()?;
        let current = tokio::runtime::Handle::try_current().ok();
        Some(match current {
            Some(current) if busy => Maker {
                handle: current,
                rescuer: None,
            },
            current => Maker {
                handle: quiet.clone(),
                rescuer: current.map(|rescuer| (rescuer, Arc::clone(&self.watch))),
            },
        })
    }

    /// Starts keeping `settings.prewarm` spares, made on `handle`. Until
    /// this is called (and with `prewarm = 0`) every fresh call makes its
    /// own instance, which suits one-shot use.
    pub(super) fn start_prewarm(self: &Arc<Self>, handle: &tokio::runtime::Handle) {
        if self.settings.prewarm == 0 || self.settings.reuse_instances {
            return;
        }
        if self.maker.set(handle.clone()).is_ok() {
            self.replenish(false);
        }
    }

    /// Whether a call now would find an instance ready: a spare, or an
    /// idle instance with `reuse_instances`.
    pub(super) fn has_ready(&self) -> bool {
        !self.pool().ready.is_empty()
    }

    /// Spares ready now.
    pub(super) fn spares(&self) -> usize {
        if self.settings.reuse_instances {
            0
        } else {
            self.pool().ready.len()
        }
    }

    /// A sandbox for the next call, armed with fresh limits: a spare or an
    /// idle instance if there is one, else a new store (the caller
    /// instantiates) in a slot of its own. The call's deadline runs from
    /// now, so time spent waiting for a slot is part of it; it is
    /// `ends_by` if that comes first (the end of the call that made this
    /// one).
    ///
    /// # Errors
    ///
    /// [`PluginError::Timeout`] when every slot stays in a call for
    /// longer than the plugin's deadline.
    pub(super) async fn sandbox(
        self: &Arc<Self>,
        busy: bool,
        ends_by: Option<Instant>,
    ) -> Result<Sandbox, PluginError> {
        let now = Instant::now();
        let deadline = ends_by.map_or(now + self.settings.limits.deadline, |end| {
            end.min(now + self.settings.limits.deadline)
        });
        let capacity = self.capacity();
        self.last_call
            .store(capacity.now_ms() + 1, Ordering::Relaxed);
        let kept = self.pool().ready.pop();
        let sandbox = match kept {
            Some(Kept {
                mut sandbox,
                _quota: quota,
                ..
            }) => {
                // No longer kept: its place is free for the replacement.
                drop(quota);
                self.arm(&mut sandbox, deadline);
                sandbox
            }
            None => {
                let slot = capacity
                    .slot_for_call(
                        self.weight,
                        deadline.saturating_duration_since(now),
                        &self.name,
                    )
                    .await?;
                self.new_sandbox(slot, deadline)
            }
        };
        // After the call has its slot: a spare made first could take it.
        // A no-op unless spares are kept (never with reuse).
        self.replenish(busy);
        Ok(sandbox)
    }

    /// A new store in a slot of its own, for a session: never a spare.
    ///
    /// # Errors
    ///
    /// As [`Instances::sandbox`].
    pub(super) async fn fresh_sandbox(&self) -> Result<Sandbox, PluginError> {
        let deadline = Instant::now() + self.settings.limits.deadline;
        let slot = self
            .capacity()
            .slot_for_call(self.weight, self.settings.limits.deadline, &self.name)
            .await?;
        Ok(self.new_sandbox(slot, deadline))
    }

    /// Takes back a sandbox after its call. With `reuse_instances`, one
    /// whose call returned (it still has its instance) is kept for the
    /// next call; anything else is discarded.
    pub(super) fn give_back(&self, sandbox: Sandbox, busy: bool) {
        let reusable = self.settings.reuse_instances
            && sandbox.instance.is_some()
            && !sandbox.store.data().caps.is_spent()
            && self.pool().ready.len() < MAX_IDLE;
        let quota = if reusable {
            self.capacity().reserve_kept(self)
        } else {
            None
        };
        match quota {
            Some(quota) => {
                let kept = Kept {
                    sandbox,
                    _quota: quota,
                    _counted: observe::instance_kept(&self.name),
                };
                if let Err(kept) = self.keep(kept) {
                    self.discard(kept.sandbox, busy);
                }
            }
            None => self.discard(sandbox, busy),
        }
    }

    /// Puts `kept` with the spares or idle instances, unless a call waits
    /// for a slot: then it is handed back, to be dropped and free its slot.
    fn keep(&self, kept: Kept) -> Result<(), Kept> {
        let mut pool = self.pool();
        // Checked under the pool lock, which a waiting call's last look
        // for kept instances takes after counting itself: either this sees
        // the call, or the call sees this instance and evicts it.
        if self.capacity().counters.waiting.load(Ordering::SeqCst) > 0 {
            return Err(kept);
        }
        pool.ready.push(kept);
        Ok(())
    }

    /// Drops a used sandbox. Giving its memory back to the pool takes as
    /// long as a small call (longer for an interpreter), so where spares
    /// are made (off the caller's path, at the lowest priority) the drop
    /// happens there too, unless enough already wait there
    /// ([`MAX_DROPPING`]).
    pub(super) fn discard(&self, sandbox: Sandbox, busy: bool) {
        let Some(maker) = self.maker(busy) else {
            return drop(sandbox);
        };
        if busy {
            // On the call's runtime, as one of its tasks.
            return maker.run(async move { drop(sandbox) });
        }
        let capacity = self.capacity();
        let counters = &capacity.counters;
        let dropping = Dropping(Arc::clone(counters));
        if counters.dropping.fetch_add(1, Ordering::SeqCst) >= capacity.max_dropping {
            drop(dropping);
            return drop(sandbox);
        }
        maker.run(async move {
            drop(sandbox);
            drop(dropping);
        });
    }

    /// Starts making spares until ready and being made reach the target,
    /// from free slots only and while no call waits for one.
    fn replenish(self: &Arc<Self>, busy: bool) {
        let Some(maker) = self.maker(busy) else {
            return;
        };
        let capacity = self.capacity();
        loop {
            {
                let mut pool = self.pool();
                if pool.ready.len() + pool.making >= self.settings.prewarm {
                    return;
                }
                pool.making += 1;
            }
            // Not under the pool lock: finding room may evict another
            // plugin's spare, which takes that plugin's pool lock.
            let room = if capacity.counters.waiting.load(Ordering::SeqCst) > 0 {
                None
            } else {
                capacity
                    .reserve_kept(self)
                    .and_then(|quota| Some((quota, capacity.try_slot(self.weight)?)))
            };
            let Some((quota, slot)) = room else {
                self.pool().making -= 1;
                return;
            };
            let making = Making(Arc::clone(self));
            maker.run(async move {
                let this = Arc::clone(&making.0);
                let capacity = this.capacity();
                // Listening before the look at calls waiting: a call that
                // came since is seen, or tells this.
                let give_way = capacity.short.notified();
                let made = if capacity.counters.waiting.load(Ordering::SeqCst) > 0 {
                    None
                } else {
                    tokio::select! {
                        made = this.make(slot) => Some(made),
                        () = give_way => None,
                    }
                };
                drop(making);
                match made {
                    None => {
                        tracing::debug!(target: "callme::plugin", plugin = &*this.name, "spare given up as it was made: a call waits for its slot")
                    }
                    Some(Ok(sandbox)) => {
                        let kept = Kept {
                            sandbox,
                            _quota: quota,
                            _counted: observe::instance_kept(&this.name),
                        };
                        if let Err(kept) = this.keep(kept) {
                            drop(kept);
                        }
                    }
                    // The call that finds no spare makes its own instance
                    // and reports the same failure to its caller.
                    Some(Err(e)) => {
                        tracing::debug!(target: "callme::plugin", plugin = &*this.name, error = %e, "spare instance failed")
                    }
                }
            });
        }
    }

    /// Instantiates into a new store in `slot`, under the plugin's limits.
    async fn make(&self, slot: Slot) -> wasmtime::Result<Sandbox> {
        observe::instance_made(&self.name, observe::Made::Spare);
        let mut sandbox = self.new_sandbox(slot, Instant::now() + self.settings.limits.deadline);
        let deadline = sandbox.deadline;
        let instance = self
            .with_deadline(deadline, self.pre.instantiate_async(&mut sandbox.store))
            .await?;
        sandbox.instance = Some(instance);
        // Until its call begins (`arm`): the guest's clock says nothing of
        // how long it waited.
        sandbox.store.data().clock.pause();
        Ok(sandbox)
    }

    /// The component, to instantiate in a store of this plugin.
    pub(super) fn pre(&self) -> &InstancePre<CallState> {
        &self.pre
    }

    /// A new store with nothing granted in `slot`, armed with the plugin's
    /// limits for a call that must end by `deadline`.
    fn new_sandbox(&self, slot: Slot, deadline: Instant) -> Sandbox {
        let mut store = Store::new(
            &self.runtime.inner.engine,
            CallState::new(
                self.name.clone(),
                self.settings.limits.memory_bytes,
                self.settings.limits.output_bytes,
                self.settings.log_level,
            ),
        );
        store.limiter(|s| &mut s.limiter);
        super::hostcall::bound(
            &mut store,
            super::value::lift_bytes(self.settings.limits.result_bytes),
        );
        let mut sandbox = Sandbox {
            store,
            instance: None,
            deadline,
            _slot: slot,
        };
        self.arm(&mut sandbox, deadline);
        sandbox
    }

    /// Refills fuel, sets the deadline (`deadline`), forgets any memory
    /// refused before, resets the transfer allowances
    /// ([`super::hostcall::rearm`]) and lets the guest's clock run again
    /// (a spare's stands still while it waits), for the next call in
    /// `sandbox`.
    pub(super) fn arm(&self, sandbox: &mut Sandbox, deadline: Instant) {
        sandbox.deadline = deadline;
        let store = &mut sandbox.store;
        store.data().clock.resume();
        store.data_mut().limiter.refused = None;
        super::hostcall::rearm(store);
        // Fuel is enabled on the engine, so setting it cannot fail.
        let _ = store.set_fuel(self.settings.limits.fuel);
        // Never fails on an async engine.
        let _ = store.fuel_async_yield_interval(Some(super::YIELD_EVERY_FUEL));
        let limit = self.settings.limits.deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                // Unwinds the guest with an error that says which limit
                // stopped it, where an interrupt would not.
                Err(wasmtime::Error::new(DeadlinePassed {
                    limit,
                    blocked_in_host: false,
                }))
            } else {
                // Yield so a CPU-bound guest never holds an executor
                // thread for longer than one tick.
                Ok(UpdateDeadline::Yield(1))
            }
        });
    }

    /// Runs `fut` until `deadline`, the one its store was armed with. The
    /// epoch callback stops running guest code; this timeout also stops a
    /// guest blocked in a WASI call (a sleep, a poll), where no guest code
    /// runs. Either way the error is a [`DeadlinePassed`].
    pub(super) async fn with_deadline<T>(
        &self,
        deadline: Instant,
        fut: impl Future<Output = wasmtime::Result<T>>,
    ) -> wasmtime::Result<T> {
        let limit = self.settings.limits.deadline;
        let until = tokio::time::Instant::from_std(deadline) + EPOCH_TICK * 2;
        match tokio::time::timeout_at(until, fut).await {
            Ok(outcome) => outcome,
            Err(_) => Err(wasmtime::Error::new(DeadlinePassed {
                limit,
                blocked_in_host: true,
            })),
        }
    }
}
