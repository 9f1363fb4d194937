//! The reply path under careless and hostile callers: no caller costs another its reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use callme::protocol::{Args, server_exchange};
use callme::{
    ConnectOptions, Error, ErrorKind, NativeFunctions, PluginSettings, Server, ServerOptions,
};
use callme_tests::{
    amqp_url, amqp_url_as, broker_ctl, load, pos, proxy, server, slow_calls, unique,
};
use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

/// `add(a, b)` that takes `ms` milliseconds, so replies overlap.
fn slow_add(ms: u64) -> NativeFunctions {
    let mut f = NativeFunctions::new();
    f.register("add", "func(a: s64, b: s64) -> s64", move |args: Args| {
        std::thread::sleep(Duration::from_millis(ms));
        match args.args.as_slice() {
            [a, b] => Ok(json!(a.as_i64().unwrap_or(0) + b.as_i64().unwrap_or(0))),
            _ => Err(callme::RemoteError::new(
                ErrorKind::InvalidArguments,
                "add takes 2 integers",
            )),
        }
    });
    f
}

/// A broker user of its own, so the broker's connection and channel
/// counts of that user are this test's alone.
fn dedicated_user(prefix: &str) -> (String, String) {
    let user = unique(prefix);
    let password = format!("{user}-pw");
    broker_ctl(&["add_user", &user, &password]);
    broker_ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    (user, password)
}

/// `(connections, channels)` the broker counts for `user`.
fn user_channels(user: &str) -> (usize, usize) {
    let out = broker_ctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "user",
        "channels",
    ]);
    out.lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next()? == user).then(|| cols.next()?.parse::<usize>().ok())?
        })
        .fold((0, 0), |(conns, chans), c| (conns + 1, chans + c))
}

/// Follows `user`'s connections and channels until `stop`: the most
/// channels seen, and the most connections (more than one means the
/// server lost its connection and made another).
fn watch_channels(user: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::task::spawn_blocking(move || {
        let (mut conns, mut chans) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let (c, n) = user_channels(&user);
            conns = conns.max(c);
            chans = chans.max(n);
        }
        (conns, chans)
    })
}

/// Publishes `n` requests to `server_id` whose `reply_to` names an
/// exchange that does not exist.
async fn lying_requests(server_id: &str, n: usize) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(format!("lie-{i}").into())
            .with_reply_to(format!("no-such-exchange-{}", uuid::Uuid::new_v4()).into());
        channel
            .basic_publish(
                server_exchange(server_id).as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                br#"{"func":"add","args":[1,1]}"#,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Callers that give up before their reply and leave, taking their reply
/// exchange with them (the everyday case of a caller with a short
/// timeout).
async fn leaving_callers(server_id: &str, n: usize) -> usize {
    let mut gone = 0;
    for _ in 0..n {
        let p = proxy(Duration::from_secs(5)).await;
        let r = p
            .use_server(server_id)
            .call_timeout("add", pos(json!([1, 1])), Duration::from_millis(5))
            .await;
        if matches!(r, Err(Error::Timeout { .. })) {
            gone += 1;
        }
        drop(p);
    }
    gone
}

#[tokio::test]
async fn replies_to_missing_exchanges_cost_no_other_caller_its_reply() {
    let (user, password) = dedicated_user("flood");
    let srv = Server::connect(
        &ConnectOptions::new(amqp_url_as(&user, &password)),
        ServerOptions {
            concurrency: 16,
            ..ServerOptions::default()
        },
    )
    .await
    .unwrap();
    let ids: Vec<String> = (0..4).map(|_| unique("flood")).collect();
    for id in &ids {
        srv.serve_native(id, slow_add(10)).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_channels(user.clone(), stop.clone());

    // Good calls, lies and leavers on every id at once.
    let good = proxy(Duration::from_secs(30)).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in &ids {
        for i in 0..75i64 {
            let sp = good.use_server(id);
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i as u64 * 25)).await;
                let sum: i64 = sp.invoke("add", (i, 1)).await.expect("a good call");
                assert_eq!(sum, i + 1);
                answered.fetch_add(1, Ordering::Relaxed);
            }));
        }
    }
    let lies = ids.iter().map(|id| {
        let id = id.clone();
        tokio::spawn(async move { lying_requests(&id, 200).await })
    });
    let leavers = ids.iter().map(|id| {
        let id = id.clone();
        tokio::spawn(async move { leaving_callers(&id, 10).await })
    });
    let (lies, leavers, good_calls) =
        tokio::join!(join_all(lies), join_all(leavers), join_all(tasks));
    for r in lies.into_iter().chain(good_calls) {
        r.expect("task");
    }
    let left: usize = leavers.into_iter().map(|r| r.expect("task")).sum();

    // Every lie's reply is found undeliverable and its request acked.
    let all_dropped = callme_tests::eventually(Duration::from_secs(20), || {
        let n = srv.undeliverable();
        async move { (n >= 800).then_some(n) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (connections, channels) = watcher.await.unwrap();
    eprintln!(
        "flood: {} good calls answered, {left} callers left early, {} replies undeliverable, at most {channels} channels on {connections} connection(s)",
        answered.load(Ordering::Relaxed),
        srv.undeliverable()
    );
    assert_eq!(answered.load(Ordering::Relaxed), 4 * 75);
    assert!(
        all_dropped.is_some(),
        "the lies' requests were not all acked: {} undeliverable",
        srv.undeliverable()
    );
    assert_eq!(
        connections, 1,
        "the server lost its connection during the flood"
    );
    // One consumer channel per id, the reply lanes, and a declare or two.
    assert!(channels <= 4 + 64 + 4, "{channels} channels open");
    // And it still answers.
    let sum: i64 = good
        .use_server(&ids[0])
        .invoke("add", (2, 3))
        .await
        .unwrap();
    assert_eq!(sum, 5);
}

#[tokio::test]
async fn a_call_to_a_missing_server_costs_no_concurrent_call() {
    let srv = server(ServerOptions::default()).await;
    let id = unique("beside");
    srv.serve_native(&id, slow_add(0)).await.unwrap();
    let p = proxy(Duration::from_secs(20)).await;
    let calls = (0..400i64).map(|i| {
        let sp = if i % 2 == 0 {
            p.use_server(&id)
        } else {
            p.use_server(&unique("nobody"))
        };
        tokio::spawn(async move { (i, sp.invoke::<_, i64>("add", (i, 1)).await) })
    });
    let mut good = 0;
    let mut missing = 0;
    for r in join_all(calls).await {
        let (i, r) = r.expect("task");
        if i % 2 == 0 {
            assert_eq!(r.expect("a call to a served id"), i + 1);
            good += 1;
        } else {
            assert!(
                matches!(r, Err(Error::NoSuchServer(_))),
                "call {i} to a missing server: {r:?}"
            );
            missing += 1;
        }
    }
    assert_eq!((good, missing), (200, 200));
}

#[tokio::test]
async fn changing_concurrency_under_a_backlog_loses_nothing() {
    let srv = server(ServerOptions::default()).await;
    let id = unique("resize");
    let with = |concurrency| PluginSettings {
        concurrency: Some(concurrency),
        ..PluginSettings::default()
    };
    srv.serve_plugin(load("calc", &id, with(2))).await.unwrap();
    let p = proxy(Duration::from_secs(60)).await;
    let calls = slow_calls(&p, &id, 200, 20);
    // Up, down, and up again while requests wait in the queue.
    for concurrency in [6, 1, 4] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        srv.serve_plugin(load("calc", &id, with(concurrency)))
            .await
            .unwrap();
        let described = p.use_server(&id).describe().await.unwrap();
        assert_eq!(described["concurrency"], json!(concurrency));
    }
    let results = join_all(calls).await;
    let lost: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r, Ok(Ok(v)) if v == &json!("1")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of 200 lost: {:?}",
        lost.len(),
        lost.first()
    );
}

#[tokio::test]
async fn an_invalid_concurrency_changes_nothing() {
    let srv = server(ServerOptions::default()).await;
    let id = unique("keep");
    let with = |concurrency, version: &str| {
        let limits = PluginSettings {
            concurrency: Some(concurrency),
            ..PluginSettings::default()
        };
        load(version, &id, limits)
    };
    srv.serve_plugin(with(3, "calc")).await.unwrap();
    let before = srv.plugin(&id).unwrap().hash().to_string();
    for bad in [0, 70_000] {
        let refused = srv.serve_plugin(with(bad, "calc-v2")).await;
        assert!(matches!(refused, Err(Error::Config(_))), "{refused:?}");
    }
    // The version and the settings serving before are serving still.
    assert_eq!(srv.plugin(&id).unwrap().hash(), before);
    let p = proxy(Duration::from_secs(10)).await;
    let described = p.use_server(&id).describe().await.unwrap();
    assert_eq!(described["concurrency"], json!(3));
    assert_eq!(described["version"], json!(before));
    let v = p
        .use_server(&id)
        .call("version", Args::default())
        .await
        .unwrap();
    assert_eq!(v, json!("1"));
}
