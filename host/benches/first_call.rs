//! What the first call of a fresh instance pays, per language: instantiating, the first call, a second call in the same instance, dropping it; with the page faults of each, and the first call again with the CPU caches cold.
//!
//! ```sh
//! scripts/build-plugins && cargo bench -p callme --bench first_call
//! ```
//!
//! No broker: one thread makes a session (one instance), calls `add`
//! twice and drops it, `ROUNDS` times per plugin after warm-up rounds, and
//! prints the median of each step with the minor page faults the thread
//! took in it. A fresh sandbox per call (the default) pays
//! "instantiate + first call + drop" for every call, the caller waiting
//! for the first call only when a spare was made ahead. The last column
//! is the first call again after walking a buffer larger than the CPU's
//! caches, as happens to a call that arrives after the host did other
//! work, which is what a served call looks like. Nothing is asserted.

mod support;

use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{Plugin, PluginSettings, Runtime, RuntimeConfig};
use serde_json::json;
use support::{plugin_bytes, thread};

const WARMUP: usize = 5;
const ROUNDS: usize = 40;

/// Larger than the last-level cache of the machines this runs on.
const EVICT_BYTES: usize = 64 << 20;

/// One step's time and the page faults taken in it.
#[derive(Default)]
struct Step {
    times: Vec<Duration>,
    faults: Vec<u64>,
}

impl Step {
    async fn time<T>(&mut self, f: impl Future<Output = T>) -> T {
        let faults = thread::minor_faults();
        let started = Instant::now();
        let out = f.await;
        self.times.push(started.elapsed());
        if let (Some(before), Some(after)) = (faults, thread::minor_faults()) {
            self.faults.push(after - before);
        }
        out
    }

    /// The median of the rounds after the warm-up ones.
    fn median(&self) -> String {
        fn measured<T: Ord + Copy>(all: &[T]) -> Vec<T> {
            let mut kept = all[WARMUP.min(all.len())..].to_vec();
            kept.sort();
            kept
        }
        let times = measured(&self.times);
        let faults = measured(&self.faults);
        let t = times[times.len() / 2];
        let faults = faults
            .get(faults.len() / 2)
            .map_or_else(|| "?".into(), u64::to_string);
        format!("{:>8.1} µs {faults:>4} pf", t.as_secs_f64() * 1e6)
    }
}

/// Walks a buffer larger than the caches, so the next call finds them
/// holding none of the guest's memory or code.
fn evict_caches(buffer: &mut [u8]) {
    for (i, byte) in buffer.iter_mut().enumerate().step_by(64) {
        *byte = byte.wrapping_add(i as u8);
    }
    std::hint::black_box(buffer);
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let runtime = Runtime::with_config(RuntimeConfig::default())?;
        let args = Args::positional(vec![json!(1), json!(2)]);
        let mut buffer = vec![0u8; EVICT_BYTES];
        println!(
            "{:<8} {:>20} {:>20} {:>20} {:>20} {:>22}",
            "plugin", "instantiate", "first call", "second call", "drop", "first call, cold"
        );
        for name in ["calc", "calc-py", "calc-js"] {
            let bytes = match plugin_bytes(name) {
                Ok(bytes) => bytes,
                Err(e) => {
                    println!("{name:<8} skipped: {e}");
                    continue;
                }
            };
            let plugin = Plugin::load(&runtime, name, &bytes, PluginSettings::default())?;
            let (mut make, mut first, mut second, mut drop_it) = (
                Step::default(),
                Step::default(),
                Step::default(),
                Step::default(),
            );
            for _ in 0..WARMUP + ROUNDS {
                let mut session = make.time(plugin.session()).await?;
                let v = first.time(session.call("add", &args)).await?;
                assert_eq!(v, json!(3), "{name}: add(1, 2)");
                second.time(session.call("add", &args)).await?;
                drop_it.time(async move { drop(session) }).await;
            }
            // The first call again, finding the caches cold.
            let mut cold = Step::default();
            for _ in 0..WARMUP + ROUNDS {
                let mut session = plugin.session().await?;
                evict_caches(&mut buffer);
                cold.time(session.call("add", &args)).await?;
            }
            println!(
                "{name:<8} {} {} {} {} {}",
                make.median(),
                first.median(),
                second.median(),
                drop_it.median(),
                cold.median()
            );
        }
        println!("\nmedians of {ROUNDS} rounds; pf: minor page faults in the step");
        anyhow::Ok(())
    })
}
