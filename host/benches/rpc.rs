//! `calc.add` through the broker and the host, beside a raw lapin echo in the same run.
//!
//! ```sh
//! scripts/broker start && scripts/build-plugins
//! cargo bench -p callme --bench rpc
//! ```
//!
//! Measures sequential latency (p50, p99, calls/s) and throughput with 64
//! calls in flight, for callme (proxy -> server -> fresh wasm sandbox ->
//! reply), for callme with a native `add` (no sandbox), and for a minimal
//! echo server/client written directly on lapin, once bare (no wasm, no
//! JSON, no confirms) and once with callme's delivery guarantees (publisher
//! confirms both ways, ack after the reply is confirmed); then prints the
//! ratios.
//!
//! The four are measured in interleaved rounds (each round runs every one
//! of them in turn), so a machine that slows down or speeds up during the
//! run moves all of them alike; ratios are the median of the per-round
//! ratios.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{
    ConnectOptions, NativeFunctions, Plugin, PluginSettings, Proxy, QueueType, Runtime,
    RuntimeConfig, Server, ServerOptions,
};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use support::{plugin_bytes, url};
use tokio::sync::{Mutex, oneshot};

const ROUNDS: usize = 5;
/// Sequential calls per round, after a warm-up.
const SEQUENTIAL: usize = 400;
const IN_FLIGHT: usize = 64;
/// Calls per round with `IN_FLIGHT` in flight.
const PARALLEL_CALLS: usize = 2_000;

type Call = Arc<dyn Fn(u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// Something to call, with whatever must stay alive while it is called.
struct Target {
    call: Call,
    _keep: Box<dyn std::any::Any + Send>,
}

/// One round of one target.
struct Round {
    samples: Vec<Duration>,
    p50: Duration,
    par_rate: f64,
}

/// All rounds of one target.
struct Figures {
    rounds: Vec<Round>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

impl Figures {
    fn samples(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self
            .rounds
            .iter()
            .flat_map(|r| r.samples.iter().copied())
            .collect();
        all.sort();
        all
    }

    fn par_rate(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.par_rate).collect())
    }
}

fn print(label: &str, f: &Figures) {
    let samples = f.samples();
    let total: Duration = samples.iter().sum();
    println!(
        "{label:<15} sequential p50 {:>7.1} µs  p99 {:>7.1} µs  {:>6.0} calls/s  |  {IN_FLIGHT} in flight {:>6.0} calls/s",
        samples[samples.len() / 2].as_secs_f64() * 1e6,
        samples[samples.len() * 99 / 100].as_secs_f64() * 1e6,
        samples.len() as f64 / total.as_secs_f64(),
        f.par_rate()
    );
}

/// The median over rounds of `of`'s figure divided by `to`'s in the same
/// round.
fn ratios(label: &str, of: &Figures, to: &Figures) {
    let pairs = || of.rounds.iter().zip(&to.rounds);
    let p50 = median(
        pairs()
            .map(|(a, b)| a.p50.as_secs_f64() / b.p50.as_secs_f64())
            .collect(),
    );
    let rate = median(pairs().map(|(a, b)| a.par_rate / b.par_rate).collect());
    println!("{label}: sequential p50 {p50:.2}x, throughput {rate:.2}x");
}

async fn round(call: &Call) -> anyhow::Result<Round> {
    let mut samples = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL as u64 {
        let t = Instant::now();
        call(i).await?;
        samples.push(t.elapsed());
    }
    let mut sorted = samples.clone();
    sorted.sort();

    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0u64;
    let mut done = 0;
    while done < PARALLEL_CALLS {
        while inflight.len() < IN_FLIGHT && (next as usize) < PARALLEL_CALLS {
            inflight.push(call(next));
            next += 1;
        }
        if let Some(r) = inflight.next().await {
            r?;
            done += 1;
        }
    }
    let par_rate = PARALLEL_CALLS as f64 / started.elapsed().as_secs_f64();
    Ok(Round {
        p50: sorted[sorted.len() / 2],
        samples,
        par_rate,
    })
}

async fn warm_up(call: &Call) -> anyhow::Result<()> {
    for i in 0..200 {
        call(i).await?;
    }
    Ok(())
}

/// The raw baseline: a lapin server that echoes bodies to `reply_to`.
/// With `confirms`, both publishes wait for the broker's confirm and the
/// server acks a request after its reply is confirmed: the guarantees
/// callme gives, without anything else callme does.
async fn raw_echo(confirms: bool) -> anyhow::Result<Target> {
    let queue = format!("bench_echo_{}", uuid::Uuid::new_v4().simple());
    let server = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let sch = server.create_channel().await?;
    sch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    sch.basic_qos(IN_FLIGHT as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = sch
        .basic_consume(
            queue.as_str().into(),
            "echo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let reply_ch = server.create_channel().await?;
    if confirms {
        reply_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let reply_ch = reply_ch.clone();
            tokio::spawn(async move {
                let to = d.properties.reply_to().clone().unwrap_or_default();
                let props = BasicProperties::default()
                    .with_correlation_id(d.properties.correlation_id().clone().unwrap_or_default());
                let published = reply_ch
                    .basic_publish(
                        "".into(),
                        to,
                        BasicPublishOptions::default(),
                        &d.data,
                        props,
                    )
                    .await;
                if let Ok(confirm) = published
                    && confirms
                {
                    let _ = confirm.await;
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            });
        }
    });

    let client = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let cch = client.create_channel().await?;
    let reply_q = cch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let reply_name = reply_q.name().clone();
    let mut replies = cch
        .basic_consume(
            reply_name.clone(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let pending: Arc<Mutex<std::collections::HashMap<String, oneshot::Sender<()>>>> =
        Arc::default();
    let p2 = pending.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = replies.next().await {
            if let Some(c) = d.properties.correlation_id()
                && let Some(tx) = p2.lock().await.remove(c.as_str())
            {
                let _ = tx.send(());
            }
        }
    });
    let pch = client.create_channel().await?;
    if confirms {
        pch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let call: Call = Arc::new(move |i| {
        let (pch, pending, queue, reply_name) = (
            pch.clone(),
            pending.clone(),
            queue.clone(),
            reply_name.clone(),
        );
        Box::pin(async move {
            let corr = uuid::Uuid::new_v4().to_string();
            let (tx, rx) = oneshot::channel();
            pending.lock().await.insert(corr.clone(), tx);
            let body = i.to_le_bytes();
            let props = BasicProperties::default()
                .with_correlation_id(corr.as_str().into())
                .with_reply_to(reply_name);
            let confirm = pch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?;
            if confirms {
                let (confirmed, replied) = tokio::join!(confirm, rx);
                confirmed?;
                replied?;
            } else {
                rx.await?;
            }
            Ok(())
        })
    });
    Ok(Target {
        call,
        _keep: Box::new((server, client)),
    })
}

/// `add` served by callme: from the calc plugin, or as a native function
/// (which leaves the sandbox out and shows what the messaging costs).
async fn through_callme(native: bool, queue_type: QueueType) -> anyhow::Result<Target> {
    let id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let server = Server::connect(
        &ConnectOptions::new(url()),
        ServerOptions {
            concurrency: IN_FLIGHT,
            queue_type,
            ..ServerOptions::default()
        },
    )
    .await?;
    if native {
        let mut functions = NativeFunctions::new();
        functions.register("add", "func(a: s64, b: s64) -> s64", |args| {
            let n = |i: usize| args.args.get(i).and_then(|v| v.as_i64()).unwrap_or(0);
            Ok(json!(n(0) + n(1)))
        });
        server.serve_native(&id, functions).await?;
    } else {
        let runtime = Runtime::with_config(RuntimeConfig::default())?;
        let bytes = plugin_bytes("calc")?;
        let plugin = Plugin::load(&runtime, &id, &bytes, PluginSettings::default())?;
        server.serve_plugin(plugin).await?;
    }
    let proxy = Proxy::connect(&url()).await?;
    let sp = proxy.use_server(&id);
    let call: Call = Arc::new(move |i| {
        let sp = sp.clone();
        Box::pin(async move {
            let v = sp
                .call("add", Args::positional(vec![json!(i), json!(1)]))
                .await?;
            anyhow::ensure!(v == json!(i + 1), "wrong answer {v}");
            Ok(())
        })
    });
    Ok(Target {
        call,
        _keep: Box::new((server, proxy)),
    })
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("broker: {}", callme::redact_uri(&url()));
        let targets = [
            raw_echo(false).await?,
            raw_echo(true).await?,
            through_callme(true, QueueType::Classic).await?,
            through_callme(false, QueueType::Classic).await?,
            through_callme(true, QueueType::Quorum).await?,
        ];
        for t in &targets {
            warm_up(&t.call).await?;
        }
        let mut figures: Vec<Figures> = (0..targets.len())
            .map(|_| Figures { rounds: Vec::new() })
            .collect();
        for _ in 0..ROUNDS {
            for (t, f) in targets.iter().zip(&mut figures) {
                f.rounds.push(round(&t.call).await?);
            }
        }
        let [raw, confirmed, native, callme, quorum] = &figures[..] else {
            unreachable!("five targets");
        };
        println!("{ROUNDS} interleaved rounds of {SEQUENTIAL} sequential and {PARALLEL_CALLS} parallel calls each");
        print("raw lapin echo", raw);
        print("raw + confirms", confirmed);
        print("callme native", native);
        print("callme calc.add", callme);
        print("native, quorum", quorum);
        println!();
        ratios(
            "callme / raw echo (targets: p50 <= 1.15x, throughput >= 0.85x)",
            callme,
            raw,
        );
        ratios("raw + confirms / raw echo", confirmed, raw);
        ratios(
            "callme / raw + confirms (the same guarantees)",
            callme,
            confirmed,
        );
        ratios("callme native / raw echo (no sandbox)", native, raw);
        ratios("quorum / classic server queue (native)", quorum, native);
        anyhow::Ok(())
    })
}
