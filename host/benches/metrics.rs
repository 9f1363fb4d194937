//! What recording metrics costs: throughput through the broker with metrics on and off, in one run.
//!
//! ```sh
//! scripts/broker start && scripts/build-plugins
//! cargo bench -p callme --bench metrics
//! ```
//!
//! Two servers in this process, one with a native `add` (no sandbox: the
//! cheapest call, where recording weighs most) and one serving the calc
//! plugin, are called with 64 calls in flight. "On" is everything a
//! deployment records: the host's per-call metrics
//! ([`callme::observe::record_calls`]), a proxy counting its own calls in
//! a registry ([`callme::Proxy::register_metrics`]), and the host's
//! metrics rendered once a second, as a scrape would. "Off" is the same
//! servers with recording off and a proxy without a registry.
//!
//! On and off alternate round by round, so a machine that slows down or
//! speeds up during the run moves both alike; the ratio is the median of
//! the per-round ratios. The target: metrics cost at most 3% of
//! throughput (a ratio of at least 0.97).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{ConnectOptions, Proxy, Server, ServerOptions};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use support::add::serve_add;
use support::url;

/// Rounds of each of on and off, per target.
const ROUNDS: usize = 15;
const IN_FLIGHT: usize = 64;
/// Calls per round.
const CALLS: usize = 3_000;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Calls/s of `CALLS` calls of `add` on `id`, `IN_FLIGHT` at a time.
async fn throughput(proxy: &Proxy, id: &str) -> anyhow::Result<f64> {
    let server = proxy.use_server(id);
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let (mut next, mut done) = (0u64, 0);
    while done < CALLS {
        while inflight.len() < IN_FLIGHT && (next as usize) < CALLS {
            let server = server.clone();
            let i = next;
            inflight.push(async move {
                let v = server
                    .call("add", Args::positional(vec![json!(i), json!(1)]))
                    .await?;
                anyhow::ensure!(v == json!(i + 1), "wrong answer {v}");
                anyhow::Ok(())
            });
            next += 1;
        }
        if let Some(r) = inflight.next().await {
            r?;
            done += 1;
        }
    }
    Ok(CALLS as f64 / started.elapsed().as_secs_f64())
}

async fn serve(native: bool) -> anyhow::Result<(Server, String)> {
    let id = format!(
        "bench-metrics-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let server = Server::connect(
        &ConnectOptions::new(url()),
        ServerOptions {
            concurrency: IN_FLIGHT,
            ..ServerOptions::default()
        },
    )
    .await?;
    serve_add(&server, &id, native).await?;
    Ok((server, id))
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("broker: {}", callme::redact_uri(&url()));
        let (native_server, native) = serve(true).await?;
        let (plugin_server, plugin) = serve(false).await?;
        let plain = Proxy::connect(&url()).await?;
        let counted = Proxy::connect(&url()).await?;
        let mut registry = callme::observe::Registry::default();
        counted.register_metrics(&mut registry);

        // A scrape a second while metrics are on.
        let scraping = Arc::new(AtomicBool::new(false));
        let scraper = {
            let scraping = scraping.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if scraping.load(Ordering::Relaxed) {
                        std::hint::black_box(callme::observe::render());
                    }
                }
            })
        };

        for id in [&native, &plugin] {
            throughput(&counted, id).await?;
            throughput(&plain, id).await?;
        }
        let mut on = [Vec::new(), Vec::new()];
        let mut off = [Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            for (t, id) in [&native, &plugin].into_iter().enumerate() {
                // Which goes first alternates, so neither always follows the other.
                for metrics in [round % 2 == 0, round % 2 == 1] {
                    callme::observe::record_calls(metrics);
                    scraping.store(metrics, Ordering::Relaxed);
                    if metrics {
                        on[t].push(throughput(&counted, id).await?);
                    } else {
                        off[t].push(throughput(&plain, id).await?);
                    }
                }
            }
        }
        callme::observe::record_calls(true);
        scraper.abort();
        println!(
            "{ROUNDS} interleaved rounds of {CALLS} calls, {IN_FLIGHT} in flight, metrics on and off"
        );
        for (t, label) in ["native add", "calc.add"].into_iter().enumerate() {
            let ratios: Vec<f64> = on[t].iter().zip(&off[t]).map(|(a, b)| a / b).collect();
            let (low, high) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
            println!(
                "{label:<11} on {:>6.0} calls/s  off {:>6.0} calls/s  on/off {:.3}x (rounds {low:.2}..{high:.2}; target >= 0.97x)",
                median(on[t].clone()),
                median(off[t].clone()),
                median(ratios),
            );
        }
        drop((native_server, plugin_server, plain, counted));
        anyhow::Ok(())
    })
}
