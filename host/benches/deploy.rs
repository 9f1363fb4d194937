//! Hot deploy figures: rename-to-serving time, and restart-to-serving with a warm versus an empty cache.
//!
//! ```sh
//! scripts/broker start && scripts/build-plugins
//! cargo bench -p callme --bench deploy
//! ```
//!
//! Runs a host in-process on a temporary plugins directory against the
//! project's broker node (`CALLME_AMQP_URL`, default the dev node).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::serve::{Host, ServeOptions};
use callme::{ConnectOptions, Proxy, RuntimeConfig, ServerOptions};
use serde_json::json;
use support::{plugin_path, target, url};

const SWAPS: usize = 21;

fn fresh_dir(name: &str) -> PathBuf {
    let dir = target()
        .join("bench-dirs")
        .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

fn options(dir: &Path, cache: &Path) -> ServeOptions {
    ServeOptions {
        connect: ConnectOptions::new(url()),
        plugins_dir: dir.to_path_buf(),
        server: ServerOptions::default(),
        runtime: RuntimeConfig {
            cache_dir: Some(cache.to_path_buf()),
            ..RuntimeConfig::default()
        },
        grace: Duration::from_secs(5),
    }
}

fn deploy(from: &Path, dir: &Path, name: &str) -> Instant {
    let tmp = dir.join(format!(".{name}"));
    std::fs::copy(from, &tmp).expect("copy");
    let t = Instant::now();
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
    t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn rename_to_serving() -> anyhow::Result<Vec<Duration>> {
    let dir = fresh_dir("swap");
    let cache = target().join("bench-cache");
    let id = format!(
        "benchswap{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let host = Host::start(options(&dir, &cache)).await?;
    let server = host.server().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(host.run_until(async {
        let _ = stop_rx.await;
    }));
    let proxy = Proxy::connect(&url()).await?;
    let sp = proxy.use_server(&id);
    // Warm both versions into the cache so the figure is the swap, not
    // the first compilation.
    let mut times = Vec::new();
    for i in 0..SWAPS + 2 {
        let (file, want) = if i % 2 == 0 {
            ("calc-v2", "2")
        } else {
            ("calc", "1")
        };
        let t = deploy(&plugin_path(file), &dir, &format!("{id}.wasm"));
        loop {
            let v = sp.call("version", Args::default()).await?;
            if v == json!(want) {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "swap {i} never served"
            );
        }
        if i >= 2 {
            times.push(t.elapsed());
        }
    }
    let _ = stop_tx.send(());
    running.await??;
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
    Ok(times)
}

async fn restart(cache: &Path, dir: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let host = Host::start(options(dir, cache)).await?;
    let elapsed = t.elapsed();
    host.server().shutdown(Duration::from_secs(5)).await;
    Ok(elapsed)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let swaps = rename_to_serving().await?;
        let min = *swaps.iter().min().expect("swaps");
        let max = *swaps.iter().max().expect("swaps");
        println!(
            "rename -> first call answered by the new calc: median {:.1} ms (min {:.1}, max {:.1}, {} swaps; target <= 100 ms)",
            median(swaps).as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            SWAPS
        );

        // Ten plugins: every distinct build there is, then copies under
        // other names (a copy hits the cache of its original, as it would
        // in production).
        let dir = fresh_dir("restart");
        let mut distinct = 0;
        let sources: Vec<PathBuf> = ["calc", "calc-v2", "types", "hostile", "calc-py", "calc-js"]
            .iter()
            .map(|n| plugin_path(n))
            .filter(|p| p.exists())
            .collect();
        for i in 0..10 {
            let src = &sources[i % sources.len()];
            if i < sources.len() {
                distinct += 1;
            }
            deploy(src, &dir, &format!("restart{i}.wasm"));
        }
        let cache = fresh_dir("cache");
        let cold = restart(&cache, &dir).await?;
        let warm = restart(&cache, &dir).await?;
        println!(
            "restart to serving, 10 plugins ({distinct} distinct components): empty cache {:.0} ms, warm cache {:.0} ms ({:.1}x faster)",
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3,
            cold.as_secs_f64() / warm.as_secs_f64()
        );
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(&cache).ok();
        anyhow::Ok(())
    })
}
