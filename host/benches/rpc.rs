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

use callme::protocol::Args;
use callme::{ConnectOptions, Proxy, QueueType, Server, ServerOptions};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use support::add::serve_add;
use support::echo::{Answer, answer_each};
use support::rounds::{Call, IN_FLIGHT, Target, measure, print, ratios};
use support::url;
use tokio::sync::{Mutex, oneshot};

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
    answer_each(&server, &queue, IN_FLIGHT as u16, confirms, |d| Answer {
        exchange: String::new(),
        routing_key: d
            .properties
            .reply_to()
            .as_ref()
            .map_or_else(String::new, |to| to.to_string()),
        body: d.data.clone(),
        properties: BasicProperties::default()
            .with_correlation_id(d.properties.correlation_id().clone().unwrap_or_default()),
    })
    .await?;

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
        keep: Box::new((server, client)),
    })
}

/// `add` served by callme: from the calc plugin, or as a native function
/// (which leaves the sandbox out and shows what the messaging costs).
async fn through_callme(native: bool, queue_type: QueueType) -> anyhow::Result<Target> {
    let url = url();
    through_callme_on(native, queue_type, &url, &url).await
}

/// As [`through_callme`], the server connected to `server_url` and the
/// proxy to `proxy_url` (two nodes of a cluster, say).
async fn through_callme_on(
    native: bool,
    queue_type: QueueType,
    server_url: &str,
    proxy_url: &str,
) -> anyhow::Result<Target> {
    let id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let server = Server::connect(
        &ConnectOptions::new(server_url),
        ServerOptions {
            concurrency: IN_FLIGHT,
            queue_type,
            ..ServerOptions::default()
        },
    )
    .await?;
    serve_add(&server, &id, native).await?;
    let proxy = Proxy::connect(proxy_url).await?;
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
        keep: Box::new((server, proxy)),
    })
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("broker: {}", callme::redact_uri(&url()));
        let mut targets = vec![
            raw_echo(false).await?,
            raw_echo(true).await?,
            through_callme(true, QueueType::Classic).await?,
            through_callme(false, QueueType::Classic).await?,
            through_callme(true, QueueType::Quorum).await?,
        ];
        // A 3-node cluster (`scripts/broker cluster start`, then `eval
        // "$(scripts/broker cluster env)"`): the server on node 1, the
        // proxy on node 2, so every call crosses the cluster.
        let cluster = support::cluster_urls();
        if let Some([first, second, ..]) = cluster.as_deref() {
            println!("cluster: {}", callme::redact_uri(first));
            for queue_type in [QueueType::Classic, QueueType::Quorum] {
                targets.push(through_callme_on(true, queue_type, first, second).await?);
            }
        } else {
            println!("cluster: none (set CALLME_CLUSTER_URLS to measure one)");
        }
        let figures = measure(&targets).await?;
        let [raw, confirmed, native, callme, quorum, on_cluster @ ..] = &figures[..] else {
            unreachable!("five targets or more");
        };
        print("raw lapin echo", raw);
        print("raw + confirms", confirmed);
        print("callme native", native);
        print("callme calc.add", callme);
        print("native, quorum", quorum);
        if let [classic_3, quorum_3] = on_cluster {
            print("native, 3 nodes, classic", classic_3);
            print("native, 3 nodes, quorum", quorum_3);
        }
        println!();
        ratios(
            "callme / raw echo (targets: p50 <= 1.25x, throughput >= 0.75x)",
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
        if let [classic_3, quorum_3] = on_cluster {
            ratios("3 nodes, quorum / classic (native)", quorum_3, classic_3);
            ratios("3 nodes / 1 node, classic (native)", classic_3, native);
            ratios("3 nodes / 1 node, quorum (native)", quorum_3, quorum);
        }
        anyhow::Ok(())
    })
}
