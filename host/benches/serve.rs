//! The product as deployed: the `callme serve` binary, driven by a plain lapin client speaking docs/protocol.md, beside a raw lapin echo server driven by the same client; then the host's memory with many plugins and over many calls.
//!
//! ```sh
//! scripts/broker start && scripts/build-plugins
//! eval "$(scripts/broker env)"
//! cargo bench -p callme --bench serve
//! CALLME_BENCH_CALLS=1000000 cargo bench -p callme --bench serve -- memory
//! ```
//!
//! Speed: the client publishes `{"func": "add", "args": [i, 1]}` to
//! `server_ID_ex` and takes `{"result": i + 1}` from its own reply queue,
//! without confirms, naming that queue in `x-callme-reply-queue` (which
//! the raw servers ignore), the same way for every target. The targets:
//!
//! - **raw echo**: a lapin server that declares a server's exchange and
//!   queue as callme does, parses the request, and publishes the answer
//!   to the `reply_to` exchange, then acks (no confirms);
//! - **raw + confirms**: the same, with callme's guarantees (the reply
//!   confirmed before the ack);
//! - **callme serve**: the release `callme` binary serving the calc
//!   plugin (fresh sandbox per call, concurrency 64).
//!
//! `raw-server ID READY_FILE` runs only the raw + confirms server, under
//! server id `ID`, until killed, writing `READY_FILE` once it consumes:
//! the baseline `scripts/bench-host-cpu` measures beside `callme serve`.
//!
//! Memory (`memory`, or everything when no argument is given): resident
//! memory of `callme serve` with 1 and with 100 copies of calc served,
//! and before and after `CALLME_BENCH_CALLS` calls (default 200,000) with
//! 64 in flight.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use support::echo::{Answer, answer_each};
use support::rounds::{Call, IN_FLIGHT, Target, measure, print, ratios};
use support::{plugin_path, target, url};
use tokio::sync::oneshot;

/// How long one call may take before the bench gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// A plain client of the protocol: one connection, one channel without
/// confirms, one reply exchange and queue.
#[derive(Clone)]
struct Client {
    channel: Channel,
    reply_exchange: String,
    reply_queue: String,
    waiting: Waiting,
    _conn: Arc<Connection>,
}

impl Client {
    async fn connect() -> anyhow::Result<Client> {
        let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let uid = uuid::Uuid::new_v4().simple().to_string();
        let reply_exchange = format!("client_bench_ex_{uid}");
        let reply_queue = format!("client_bench_queue_{uid}");
        declare_bound(&channel, &reply_exchange, &reply_queue).await?;
        let mut replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let waiting: Waiting = Arc::default();
        let to = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = replies.next().await {
                let tx = d
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|c| to.lock().unwrap().remove(c.as_str()));
                if let Some(tx) = tx {
                    let _ = tx.send(d.data);
                }
            }
        });
        Ok(Client {
            channel,
            reply_exchange,
            reply_queue,
            waiting,
            _conn: Arc::new(conn),
        })
    }

    /// `add(i, 1)` on `server`, checked.
    async fn add(&self, server: &str, i: u64) -> anyhow::Result<()> {
        let corr = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(corr.clone(), tx);
        let body = serde_json::to_vec(&json!({"func": "add", "args": [i, 1]}))?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(corr.as_str().into())
            .with_reply_to(self.reply_exchange.as_str().into())
            .with_expiration(CALL_TIMEOUT.as_millis().to_string().into())
            .with_headers(reply_queue_header(&self.reply_queue));
        self.channel
            .basic_publish(
                format!("server_{server}_ex").as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        let reply = tokio::time::timeout(CALL_TIMEOUT, rx).await??;
        let reply: Value = serde_json::from_slice(&reply)?;
        anyhow::ensure!(reply == json!({"result": i + 1}), "wrong reply {reply}");
        Ok(())
    }

    fn target(&self, server: &str) -> Call {
        let (client, server) = (self.clone(), server.to_string());
        Arc::new(move |i| {
            let (client, server) = (client.clone(), server.clone());
            Box::pin(async move { client.add(&server, i).await })
        })
    }
}

/// The header naming the caller's reply queue, so a busy server can
/// pipeline its replies there (protocol.md, "Pipelined replies").
fn reply_queue_header(queue: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-callme-reply-queue".into(),
        lapin::types::AMQPValue::LongString(queue.into()),
    );
    headers
}

/// Declares a direct exchange (auto-delete) and an exclusive queue bound
/// to it with `""`, as callme's server and reply topology look on the wire.
async fn declare_bound(channel: &Channel, exchange: &str, queue: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A raw lapin server of `add` under `server`'s exchange and queue.
async fn raw_echo(server: &str, confirms: bool) -> anyhow::Result<Connection> {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let exchange = format!("server_{server}_ex");
    let queue = format!("server_{server}_queue");
    declare_bound(&ch, &exchange, &queue).await?;
    answer_each(&conn, &queue, IN_FLIGHT as u16, confirms, |d| {
        let request: Value = serde_json::from_slice(&d.data).unwrap_or_default();
        let n = |i: usize| request["args"][i].as_i64().unwrap_or(0);
        Answer {
            exchange: d
                .properties
                .reply_to()
                .as_ref()
                .map_or_else(String::new, |to| to.to_string()),
            routing_key: String::new(),
            body: serde_json::to_vec(&json!({"result": n(0) + n(1)})).unwrap_or_default(),
            properties: BasicProperties::default()
                .with_content_type("application/json".into())
                .with_correlation_id(d.properties.correlation_id().clone().unwrap_or_default()),
        }
    })
    .await?;
    Ok(conn)
}

/// A `callme serve` child process, killed when dropped.
struct Host {
    child: Child,
    dir: PathBuf,
}

impl Host {
    /// Serves every `.wasm` in `dir`; waits until all are served.
    fn serve(dir: &Path) -> anyhow::Result<Host> {
        let ready = dir.with_extension("ready");
        let _ = std::fs::remove_file(&ready);
        let child = Command::new(env!("CARGO_BIN_EXE_callme"))
            .arg("serve")
            .arg("--plugins")
            .arg(dir)
            .args(["--concurrency", &IN_FLIGHT.to_string()])
            .arg("--ready-file")
            .arg(&ready)
            .env("CALLME_AMQP_URL", url())
            .env("CALLME_CACHE_DIR", target().join("bench-cache"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let host = Host {
            child,
            dir: dir.to_path_buf(),
        };
        let started = Instant::now();
        while !ready.exists() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "callme serve not ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(host)
    }

    /// Resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("ready"));
    }
}

/// A fresh plugins directory holding `copies` copies of calc, as
/// `PREFIX-N.wasm`; their ids.
fn plugins(prefix: &str, copies: usize) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let dir = target().join(format!("bench-serve-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let ids: Vec<String> = (0..copies).map(|n| format!("{prefix}-{n}")).collect();
    for id in &ids {
        std::fs::copy(plugin_path("calc"), dir.join(format!("{id}.wasm")))?;
    }
    Ok((dir, ids))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn speed() -> anyhow::Result<()> {
    let uid = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let client = Client::connect().await?;
    let (echo, echo_confirmed) = (format!("echo-{uid}"), format!("echo-confirms-{uid}"));
    let raw = raw_echo(&echo, false).await?;
    let confirmed = raw_echo(&echo_confirmed, true).await?;
    let (dir, ids) = plugins(&format!("serve-{uid}"), 1)?;
    let host = Host::serve(&dir)?;
    let targets = [
        Target {
            call: client.target(&echo),
            keep: Box::new(raw),
        },
        Target {
            call: client.target(&echo_confirmed),
            keep: Box::new(confirmed),
        },
        Target {
            call: client.target(&ids[0]),
            keep: Box::new(()),
        },
    ];
    let figures = measure(&targets).await?;
    let [raw, confirmed, callme] = &figures[..] else {
        unreachable!("three targets");
    };
    print("raw echo", raw);
    print("raw + confirms", confirmed);
    print("callme serve", callme);
    println!();
    ratios(
        "callme serve / raw echo (targets: p50 <= 1.15x, throughput >= 0.85x)",
        callme,
        raw,
    );
    ratios(
        "callme serve / raw + confirms (the same guarantees)",
        callme,
        confirmed,
    );
    ratios("raw + confirms / raw echo", confirmed, raw);
    drop(host);
    Ok(())
}

async fn memory() -> anyhow::Result<()> {
    let uid = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (dir, _) = plugins(&format!("one-{uid}"), 1)?;
    let one = Host::serve(&dir)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_one = one.rss();
    drop(one);
    let (dir, _) = plugins(&format!("many-{uid}"), 100)?;
    let many = Host::serve(&dir)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_many = many.rss();
    drop(many);
    println!(
        "resident memory: 1 calc {:.1} MiB, 100 calc {:.1} MiB: {:.0} KiB per served plugin",
        mib(rss_one),
        mib(rss_many),
        (rss_many.saturating_sub(rss_one)) as f64 / 99.0 / 1024.0
    );

    let calls: u64 = std::env::var("CALLME_BENCH_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let (dir, ids) = plugins(&format!("long-{uid}"), 1)?;
    let host = Host::serve(&dir)?;
    let client = Client::connect().await?;
    let call = client.target(&ids[0]);
    let step = (calls / 10).max(1);
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let (mut next, mut done) = (0u64, 0u64);
    let mut first = None;
    while done < calls {
        while inflight.len() < IN_FLIGHT && next < calls {
            inflight.push(call(next));
            next += 1;
        }
        if let Some(r) = inflight.next().await {
            r?;
            done += 1;
            if done == 10_000.min(calls) {
                first = Some(host.rss());
                println!(
                    "after {done:>9} calls: resident {:.1} MiB (the baseline: pools warm)",
                    mib(host.rss())
                );
            } else if done % step == 0 {
                println!(
                    "after {done:>9} calls: resident {:.1} MiB ({:.0} calls/s)",
                    mib(host.rss()),
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let last = host.rss();
    if let Some(first) = first {
        println!(
            "growth over {calls} calls: {:+.1} MiB ({:.3}x)",
            mib(last) - mib(first),
            last as f64 / first as f64
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let [mode, id, ready] = &which[..]
        && mode == "raw-server"
    {
        return rt.block_on(async {
            let _conn = raw_echo(id, true).await?;
            std::fs::write(ready, "")?;
            std::future::pending::<anyhow::Result<()>>().await
        });
    }
    rt.block_on(async {
        println!("broker: {}", callme::redact_uri(&url()));
        if wants("speed") {
            speed().await?;
        }
        if wants("memory") {
            memory().await?;
        }
        anyhow::Ok(())
    })
}
