//! Per-call cost of the plugin runtime: a fresh sandbox per call (made per call, or a spare made ahead) versus one reused instance.
//!
//! ```sh
//! scripts/build-plugins && cargo bench -p callme --bench runtime
//! ```
//!
//! Prints median, p99 and mean per call of `calc.add` for each mode, the
//! CPU time the thread spent per call in each mode (everything runs on
//! one thread, spares and the dropping of used instances included), and
//! the ratios to the reused instance. Nothing is asserted: these machines
//! are noisy.

mod support;

use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{Plugin, PluginSettings, Runtime, RuntimeConfig};
use serde_json::json;
use support::{plugin_bytes, thread};

const WARMUP: usize = 2_000;
const CALLS: usize = 20_000;

/// CPU per call since `before`, a [`thread::cpu`] reading.
fn cpu_per_call(before: Option<Duration>, calls: usize) -> Option<Duration> {
    Some((thread::cpu()? - before?) / calls as u32)
}

fn summary(label: &str, mut samples: Vec<Duration>, cpu: Option<Duration>) -> Duration {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    let cpu = cpu.map_or_else(
        || "n/a".to_string(),
        |c| format!("{:.2} µs", c.as_secs_f64() * 1e6),
    );
    println!(
        "{label:<32} median {:>8.2} µs   p99 {:>8.2} µs   mean {:>8.2} µs   CPU/call {cpu:>9}   ({} calls)",
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        samples.len()
    );
    median
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let runtime = Runtime::with_config(RuntimeConfig {
            cache_dir: None,
            ..RuntimeConfig::default()
        })?;
        let bytes = plugin_bytes("calc")?;

        let started = Instant::now();
        let plugin = Plugin::load(&runtime, "calc", &bytes, PluginSettings::default())?;
        println!(
            "load (compile, no cache)     {:>8.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        println!("pooling allocator: {}", runtime.is_pooling());

        let args = Args::positional(vec![json!(1), json!(2)]);

        // Baseline: one instance, reused.
        let mut session = plugin.session().await?;
        for _ in 0..WARMUP {
            session.call("add", &args).await?;
        }
        let mut reuse = Vec::with_capacity(CALLS);
        let cpu = thread::cpu();
        for _ in 0..CALLS {
            let t = Instant::now();
            let v = session.call("add", &args).await?;
            reuse.push(t.elapsed());
            debug_assert_eq!(v, json!(3));
        }
        let reuse_cpu = cpu_per_call(cpu, CALLS);
        drop(session);

        // Default: a fresh store and instance per call.
        for _ in 0..WARMUP {
            plugin.call("add", &args).await?;
        }
        let mut fresh = Vec::with_capacity(CALLS);
        let cpu = thread::cpu();
        for _ in 0..CALLS {
            let t = Instant::now();
            let v = plugin.call("add", &args).await?;
            fresh.push(t.elapsed());
            debug_assert_eq!(v, json!(3));
        }
        let fresh_cpu = cpu_per_call(cpu, CALLS);

        // Default when served: a fresh spare instance per call, made ahead
        // of time. Each call waits until the spares are back (calls
        // arriving slower than instances are made); the spares are made on
        // this same thread meanwhile, so the CPU cost per call is as above.
        let prewarm = PluginSettings::default().prewarm;
        let spared = Plugin::load(&runtime, "calc", &bytes, PluginSettings::default())?;
        spared.start_prewarm(&tokio::runtime::Handle::current());
        let mut spares = Vec::with_capacity(CALLS);
        let mut cpu = None;
        for i in 0..WARMUP + CALLS {
            if i == WARMUP {
                cpu = thread::cpu();
            }
            while spared.spares() < prewarm {
                tokio::task::yield_now().await;
            }
            let t = Instant::now();
            let v = spared.call("add", &args).await?;
            if i >= WARMUP {
                spares.push(t.elapsed());
            }
            debug_assert_eq!(v, json!(3));
        }

        // Making the spares that replace the last calls' ones.
        while spared.spares() < prewarm {
            tokio::task::yield_now().await;
        }
        let spares_cpu = cpu_per_call(cpu, CALLS);

        println!();
        let r = summary("calc.add, reused instance", reuse, reuse_cpu);
        let f = summary("calc.add, fresh, made per call", fresh, fresh_cpu);
        let s = summary("calc.add, fresh, from spares", spares, spares_cpu);
        println!(
            "\nmade per call / reuse (median): {:.2}x\nfrom spares / reuse (median): {:.2}x\ntargets: fresh-sandbox call median <= 10 µs; CPU per fresh instance made per call <= 15 µs",
            f.as_secs_f64() / r.as_secs_f64(),
            s.as_secs_f64() / r.as_secs_f64()
        );
        anyhow::Ok(())
    })
}
