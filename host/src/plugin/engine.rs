//! The plugin runtime: one wasmtime engine, its linker, and the epoch ticker.
//!
//! A [`Runtime`] is created once per host and shared by every plugin. It
//! owns the engine configuration (pooling allocator, fuel, epoch
//! interruption, on-disk compilation cache), the linker that offers WASI 0.2
//! and the callme host interface to guests, and a thread that advances the
//! engine's epoch so deadlines and cooperative yields work.
//!
//! The pooling allocator is sized once, from
//! [`RuntimeConfig::max_instances`], and the runtime never asks it for
//! more: every instance holds a slot of the runtime's `Capacity` (see
//! `instances`), which has exactly as many. So a call never fails because
//! the pool is full; it waits for a slot, and spares give theirs up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

use super::instances::{Capacity, RuntimeStats};
use super::sandbox::{CallState, host_bindings};
use crate::PluginError;

/// How often the epoch advances. A running guest yields to the async
/// executor once per tick and deadlines are checked per tick, so this is
/// both the scheduling slice of CPU-heavy guests and the precision of
/// deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Instances alive at once by default, across every plugin: wasmtime's own
/// default pool size. A slot reserves about 4 GiB of address space (the
/// linear memory's range, so that guests need no bounds checks) and no
/// memory until used: 1000 slots take 4 of the 128 TiB a 64-bit Linux
/// process can address. Served plugins need their concurrency plus their
/// spares each (calc with the defaults: 10), so 100 busy plugins fit
/// without waiting, and 500 share it (measured in `tests/scale.rs`).
pub const DEFAULT_MAX_INSTANCES: u32 = 1000;

/// Linear memories the pool reserves per slot. Every guest we build has
/// one (Rust; componentize-py and componentize-js link their core modules
/// against one shared memory); a component with more takes as many slots.
/// Memory reservations are nearly all of the pool's address space, so
/// this is kept at what guests use.
const MEMORIES_PER_SLOT: u32 = 1;

/// Tables the pool reserves per slot: every guest we build defines two.
/// Each is 512 KiB of address space (`table_elements`).
const TABLES_PER_SLOT: u32 = 4;

/// Most core instances one component may have (componentize-py's guests
/// have 14). The pool only counts core instances, it reserves nothing for
/// them, so their total is set to this many per slot and is never the
/// limit.
pub(super) const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 64;

/// Most memories one component may define.
pub(super) const MAX_MEMORIES_PER_COMPONENT: u32 = 8;

/// Most tables one component may define.
pub(super) const MAX_TABLES_PER_COMPONENT: u32 = 32;

/// Most elements one table may have (a function table's entry is a
/// pointer: 512 KiB a table). componentize-js's guests fill 7,688.
pub(super) const MAX_TABLE_ELEMENTS: usize = 1 << 16;

/// Freed slots the pool keeps warm before it reuses them for other
/// plugins instead of touching unused ones. A freed slot keeps up to
/// `linear_memory_keep_resident` (16 MiB) resident, so the set of slots
/// ever touched sets the pool's resident memory, and wasmtime grows that
/// set to the most instances alive at once plus this many. A plugin making
/// spares and serving calls still gets its own warm slots back (the pool
/// prefers slots last used by the same module); a new plugin or a new
/// version reuses the slots of others rather than touching new ones. A
/// share of the pool here (a quarter of 1000 slots: 250) would let
/// interpreter guests keep 4 GB resident with few instances alive.
const MAX_UNUSED_WARM_SLOTS: u32 = 16;

/// Engine-wide settings. Per-plugin settings are [`super::PluginSettings`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled artifacts are cached; `None` disables the cache.
    /// They are kept in a directory of their own inside it, `wasmtime`,
    /// made with mode 0700; a path another user could change (a directory
    /// on the way owned by another user, or writable by others and not
    /// sticky) refuses the runtime, since the cache holds native code the
    /// host runs.
    pub cache_dir: Option<PathBuf>,
    /// Use the pooling allocator (falls back to on-demand allocation, with
    /// a warning, when the pool cannot reserve its memory).
    pub pooling: bool,
    /// Instances alive at once across every plugin: calls in flight,
    /// spares and idle reused instances. The pooling allocator is sized
    /// for exactly this many and never asked for more. A call that finds
    /// every slot taken takes one from a spare or idle instance, or else
    /// waits for a call to end (up to its deadline); spares and idle
    /// instances hold at most a quarter of the slots. This caps the
    /// host's memory: at most this many guests' memories are alive, and
    /// each freed slot keeps at most 16 MiB of it resident. Guests with
    /// several memories or many tables take several slots each.
    pub max_instances: u32,
    /// Largest linear memory any plugin may be configured for.
    pub max_memory_bytes: usize,
    /// WebAssembly stack per call. Unbounded recursion stops here.
    pub max_wasm_stack: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: default_cache_dir(),
            pooling: true,
            max_instances: DEFAULT_MAX_INSTANCES,
            max_memory_bytes: 1 << 30,
            max_wasm_stack: 512 << 10,
        }
    }
}

/// `$CALLME_CACHE_DIR`, else `$XDG_CACHE_HOME/callme`, else `~/.cache/callme`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CALLME_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(Path::new(&dir).join("callme"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache").join("callme"))
}

/// The shared plugin runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

pub(crate) struct RuntimeInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<CallState>,
    pub(crate) cache: Option<Cache>,
    pub(crate) config: RuntimeConfig,
    pub(crate) pooling: bool,
    /// The slots every instance holds one of (or several).
    pub(crate) capacity: Capacity,
}

impl Runtime {
    /// Creates a runtime with default settings.
    ///
    /// # Errors
    ///
    /// [`PluginError::Internal`] when the engine cannot be created.
    pub fn new() -> Result<Runtime, PluginError> {
        Runtime::with_config(RuntimeConfig::default())
    }

    /// Creates a runtime.
    ///
    /// # Errors
    ///
    /// [`PluginError::Internal`] when the engine cannot be created (the
    /// cache directory is unusable, or the configuration is inconsistent:
    /// `max_instances` of 0).
    pub fn with_config(config: RuntimeConfig) -> Result<Runtime, PluginError> {
        if config.max_instances == 0 {
            return Err(PluginError::internal(
                "max_instances must be at least 1".to_string(),
            ));
        }
        let cache = match &config.cache_dir {
            Some(dir) => {
                let artifacts = super::cache::artifacts_dir(dir).map_err(|e| {
                    PluginError::internal(format!("compilation cache in {}: {e}", dir.display()))
                })?;
                let mut cc = CacheConfig::new();
                cc.with_directory(&artifacts);
                Some(Cache::new(cc).map_err(|e| {
                    PluginError::internal(format!("compilation cache in {}: {e:#}", dir.display()))
                })?)
            }
            None => None,
        };
        let mut wasm = Config::new();
        wasm.consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .async_stack_size(config.max_wasm_stack + (1 << 20))
            .parallel_compilation(true)
            .memory_init_cow(true)
            .cache(cache.clone());

        let (engine, pooling) = if config.pooling {
            let mut pooled = wasm.clone();
            let mut pool = PoolingAllocationConfig::new();
            let n = config.max_instances;
            pool.total_component_instances(n)
                .total_stacks(n)
                .total_core_instances(n.saturating_mul(MAX_CORE_INSTANCES_PER_COMPONENT))
                .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
                .total_memories(n.saturating_mul(MEMORIES_PER_SLOT))
                .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
                .total_tables(n.saturating_mul(TABLES_PER_SLOT))
                .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
                .max_memory_size(config.max_memory_bytes)
                .max_component_instance_size(1 << 20)
                .max_core_instance_size(1 << 20)
                .table_elements(MAX_TABLE_ELEMENTS)
                .max_unused_warm_slots(MAX_UNUSED_WARM_SLOTS.min(n))
                // A fresh instance per call is the default, so slot reuse
                // is the hot path: reset guests' memory with memset
                // instead of madvise and a page fault per page. 16 MiB
                // covers what an interpreter guest dirties in a call
                // (measured: Python `add` made per call 5.4 -> 3.7 ms, from
                // 1 MiB); the price is resident memory, at most 16 MiB per
                // slot ever used (see `MAX_UNUSED_WARM_SLOTS`), reached
                // only by guests that dirty that much.
                .linear_memory_keep_resident(16 << 20)
                .table_keep_resident(1 << 20)
                .async_stack_keep_resident(128 << 10)
                // Never reset a slot by scanning for the pages its last
                // instance wrote (Linux `PAGEMAP_SCAN`). wasmtime 48's scan
                // looks only at pages present in memory: a written page the
                // kernel has swapped out (or is migrating at that instant)
                // is neither reset nor dropped, and the next instance in
                // the slot reads the last one's data
                // (`runtime::a_fresh_instance_never_sees_its_slots_last_memory_swapped_out`
                // fails with the scan on). Resetting the first
                // `linear_memory_keep_resident` bytes in full and dropping
                // the rest is correct whatever the kernel did with the
                // pages; it costs a small instance about 7 µs more CPU
                // (docs/benchmarks.md).
                .pagemap_scan(wasmtime::Enabled::No)
                // Give each slot back to the pool as its instance is
                // dropped, never batched. A slot keeps the memory image of
                // the last module it ran, and that image holds the
                // module's whole compiled code; when a module is dropped
                // the pool clears the images of the slots it has back, but
                // a slot still waiting in a batch is missed and keeps the
                // code alive until another plugin happens to reuse it
                // (measured: 50 swaps between the Python and JavaScript
                // calc kept 637 MiB of code mapped, 1.25 GB resident).
                // Only slots whose reset needs madvise are batched at all
                // (the rest are memset), so this costs one syscall per
                // such slot.
                .decommit_batch_size(1);
            pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            match Engine::new(&pooled) {
                Ok(engine) => (engine, true),
                Err(e) => {
                    tracing::warn!(
                        target: "callme::plugin",
                        error = %format!("{e:#}"),
                        "pooling allocator unavailable, allocating instances on demand"
                    );
                    (new_engine(on_demand(&mut wasm))?, false)
                }
            }
        } else {
            (new_engine(on_demand(&mut wasm))?, false)
        };

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::internal(format!("linking WASI: {e:#}")))?;
        host_bindings::callme::plugin::host::add_to_linker::<CallState, HasSelf<CallState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| PluginError::internal(format!("linking the host interface: {e:#}")))?;
        super::caps::add_to_linker(&mut linker)?;

        start_ticker(&engine);
        let capacity = Capacity::new(config.max_instances);
        tracing::info!(
            target: "callme::plugin",
            max_instances = config.max_instances,
            max_spares = capacity.max_kept(),
            allocator = if pooling { "pooling" } else { "on demand" },
            "instance pool: the most instances alive at once over all plugins (calls in flight, \
             spares, idle instances); a call finding none free takes a spare's place or waits \
             for a call to end, up to its deadline"
        );
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache,
                config,
                pooling,
                capacity,
            }),
        })
    }

    /// The slots one instance of `component` takes: one, or more for a
    /// component with more memories or tables than a slot reserves.
    ///
    /// # Errors
    ///
    /// [`PluginError::InvalidPlugin`] when it needs more slots than the
    /// runtime has: it could never be instantiated.
    pub(crate) fn slots_for(&self, component: &Component) -> Result<u32, PluginError> {
        // Without static figures (a component instantiating an imported
        // core module, which our import rules refuse anyway), assume the
        // most a component may have.
        let (memories, tables) = component.resources_required().map_or(
            (MAX_MEMORIES_PER_COMPONENT, MAX_TABLES_PER_COMPONENT),
            |r| (r.num_memories, r.num_tables),
        );
        let slots = 1
            .max(memories.div_ceil(MEMORIES_PER_SLOT))
            .max(tables.div_ceil(TABLES_PER_SLOT));
        if slots > self.inner.config.max_instances {
            return Err(PluginError::invalid_plugin(format!(
                "an instance needs {slots} instance slots ({memories} memories, {tables} tables) \
                 and the runtime has {}",
                self.inner.config.max_instances
            )));
        }
        Ok(slots)
    }

    /// Instances, spares and plugin versions alive right now.
    pub fn stats(&self) -> RuntimeStats {
        self.inner.capacity.stats()
    }

    /// Whether instances come from the pooling allocator.
    pub fn is_pooling(&self) -> bool {
        self.inner.pooling
    }

    /// Compilation cache hits and misses since the runtime started.
    pub fn cache_stats(&self) -> (usize, usize) {
        match &self.inner.cache {
            Some(c) => (c.cache_hits(), c.cache_misses()),
            None => (0, 0),
        }
    }

    /// The engine settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }
}

/// `config` for instances made on demand, each reserving no more address
/// space than its memory takes, with room to grow by 16 MiB before it is
/// moved. wasmtime 48's defaults reserve 4 GiB and a 32 MiB guard for
/// every memory (and 2 GiB more for one that moves), so that bounds
/// checks can be left out: a host runs without the pool when its address
/// space is limited (`ulimit -v`), where a handful of instances would take
/// all of it, and the next one fail (or the plugin be refused, its trial
/// instance not made). Each access is bounds-checked instead.
fn on_demand(config: &mut Config) -> &Config {
    config
        .memory_reservation(0)
        .memory_guard_size(64 << 10)
        .memory_reservation_for_growth(16 << 20)
}

fn new_engine(config: &Config) -> Result<Engine, PluginError> {
    Engine::new(config).map_err(|e| PluginError::internal(format!("creating the engine: {e:#}")))
}

/// Advances the epoch every [`EPOCH_TICK`] until the engine is dropped.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("callme-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(target: "callme::plugin", error = %e, "cannot start the epoch thread: deadlines will not fire");
    }
}
