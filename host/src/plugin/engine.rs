//! The plugin runtime: one wasmtime engine, its linker, and the epoch ticker.
//!
//! A [`Runtime`] is created once per host and shared by every plugin. It
//! owns the engine configuration (pooling allocator, fuel, epoch
//! interruption, on-disk compilation cache), the linker that offers WASI 0.2
//! and the callme host interface to guests, and a thread that advances the
//! engine's epoch so deadlines and cooperative yields work.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

use super::sandbox::{CallState, host_bindings};
use crate::PluginError;

/// How often the epoch advances. A running guest yields to the async
/// executor once per tick and deadlines are checked per tick, so this is
/// both the scheduling slice of CPU-heavy guests and the precision of
/// deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Engine-wide settings. Per-plugin settings are [`super::Limits`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled artifacts are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Use the pooling allocator (falls back to on-demand allocation, with
    /// a warning, when the pool cannot reserve its memory).
    pub pooling: bool,
    /// Concurrent instances the pool holds (calls in flight across all
    /// plugins, plus reused instances).
    pub pool_instances: u32,
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
            pool_instances: 256,
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
    /// cache directory is unusable, or the configuration is inconsistent).
    pub fn with_config(config: RuntimeConfig) -> Result<Runtime, PluginError> {
        let cache = match &config.cache_dir {
            Some(dir) => {
                let mut cc = CacheConfig::new();
                cc.with_directory(dir);
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
            let n = config.pool_instances;
            pool.total_component_instances(n)
                .total_core_instances(n * 8)
                .max_core_instances_per_component(64)
                .total_memories(n * 2)
                .max_memories_per_component(8)
                .total_tables(n * 8)
                .max_tables_per_component(32)
                .total_stacks(n)
                .max_memory_size(config.max_memory_bytes)
                .max_component_instance_size(1 << 20)
                .max_core_instance_size(1 << 20)
                .table_elements(1 << 16)
                .max_unused_warm_slots(n / 4)
                // A fresh instance per call is the default, so slot reuse
                // is the hot path: reset guests' memory with memset (or
                // only the pages they dirtied, where the kernel can tell)
                // instead of madvise and a page fault per page. 16 MiB
                // covers what an interpreter guest dirties in a call
                // (measured: Python `add` made per call 5.4 -> 3.7 ms, from
                // 1 MiB); the price is resident memory, at most 16 MiB per
                // warm slot (`max_unused_warm_slots`), reached only by
                // guests that dirty that much.
                .linear_memory_keep_resident(16 << 20)
                .table_keep_resident(1 << 20)
                .async_stack_keep_resident(128 << 10)
                .pagemap_scan(wasmtime::Enabled::Auto)
                .decommit_batch_size(16);
            pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            match Engine::new(&pooled) {
                Ok(engine) => (engine, true),
                Err(e) => {
                    tracing::warn!(
                        target: "callme::plugin",
                        error = %format!("{e:#}"),
                        "pooling allocator unavailable, allocating instances on demand"
                    );
                    (new_engine(&wasm)?, false)
                }
            }
        } else {
            (new_engine(&wasm)?, false)
        };

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::internal(format!("linking WASI: {e:#}")))?;
        host_bindings::callme::plugin::host::add_to_linker::<CallState, HasSelf<CallState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| PluginError::internal(format!("linking the host interface: {e:#}")))?;

        start_ticker(&engine);
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache,
                config,
                pooling,
            }),
        })
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
