//! `add` end to end through the broker for each plugin language, fresh and reused instances.
//!
//! ```sh
//! scripts/broker start && scripts/build-plugins
//! cargo bench -p callme --bench languages
//! ```
//!
//! Serves `calc` (Rust), `calc-py` and `calc-js` in one host, each three
//! times: a new instance made per call (`prewarm = 0`), a fresh spare
//! instance per call (the default, `prewarm = 2`; each call waits until
//! the spares are back, as with calls arriving slower than instances are
//! made), and `reuse_instances`. Times sequential `add` calls through a
//! proxy and prints each median beside the Rust plugin's in the same mode,
//! with compile and cached-load times.

mod support;

use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{
    ConnectOptions, Plugin, PluginSettings, Proxy, Runtime, RuntimeConfig, Server, ServerOptions,
};
use serde_json::json;
use support::{plugin_bytes, target, url};

const CALLS: usize = 200;

/// (label, prewarm, reuse_instances)
const MODES: [(&str, usize, bool); 3] = [
    ("fresh", 0, false),
    ("spares", 2, false),
    ("reuse", 0, true),
];

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cache = target().join(format!(
            "bench-lang-cache-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let config = RuntimeConfig {
            cache_dir: Some(cache.clone()),
            ..RuntimeConfig::default()
        };
        let server = Server::connect(&ConnectOptions::new(url()), ServerOptions::default()).await?;
        let proxy = Proxy::connect(&url()).await?;
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let mut rows = Vec::new();
        for lang in ["calc", "calc-py", "calc-js"] {
            let bytes = plugin_bytes(lang)?;
            let t = Instant::now();
            let cold = Runtime::with_config(config.clone())?;
            Plugin::load(&cold, lang, &bytes, PluginSettings::default())?;
            let compile = t.elapsed();
            let warm = Runtime::with_config(config.clone())?;
            let t = Instant::now();
            Plugin::load(&warm, lang, &bytes, PluginSettings::default())?;
            let cached = t.elapsed();
            for (mode, prewarm, reuse) in MODES {
                let id = format!("{lang}-{mode}-{tag}");
                let limits = PluginSettings {
                    reuse_instances: reuse,
                    prewarm,
                    ..PluginSettings::default()
                };
                server
                    .serve_plugin(Plugin::load(&warm, &id, &bytes, limits)?)
                    .await?;
                let sp = proxy.use_server(&id);
                for i in 0..20 {
                    sp.call("add", Args::positional(vec![json!(i), json!(1)]))
                        .await?;
                }
                let plugin = server.plugin(&id).expect("served");
                let mut samples = Vec::with_capacity(CALLS);
                for i in 0..CALLS as i64 {
                    while plugin.spares() < prewarm {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let t = Instant::now();
                    let v = sp
                        .call("add", Args::positional(vec![json!(i), json!(1)]))
                        .await?;
                    samples.push(t.elapsed());
                    anyhow::ensure!(v == json!(i + 1), "{id}: wrong answer {v}");
                }
                samples.sort();
                rows.push((
                    lang,
                    mode,
                    samples[CALLS / 2],
                    samples[CALLS * 99 / 100],
                    compile,
                    cached,
                ));
            }
        }
        let rust = |mode: &str| {
            rows.iter()
                .find(|r| r.0 == "calc" && r.1 == mode)
                .unwrap()
                .2
        };
        println!(
            "{:<8} {:<6} {:>10} {:>10} {:>8} {:>10} {:>10}",
            "plugin", "mode", "p50", "p99", "vs Rust", "compile", "cached"
        );
        for (lang, mode, p50, p99, compile, cached) in &rows {
            println!(
                "{lang:<8} {mode:<6} {:>8.2}ms {:>8.2}ms {:>7.2}x {:>9.1}s {:>9.2}s",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                p50.as_secs_f64() / rust(mode).as_secs_f64(),
                compile.as_secs_f64(),
                cached.as_secs_f64(),
            );
        }
        println!(
            "target: Python and JavaScript add, default mode (spares), <= 1.5x the Rust plugin"
        );
        server.shutdown(Duration::from_secs(5)).await;
        std::fs::remove_dir_all(&cache).ok();
        anyhow::Ok(())
    })
}
