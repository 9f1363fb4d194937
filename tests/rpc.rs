//! Calls through the real broker: the seed's integration tests and more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{Error, ErrorKind, Limits, NativeFunctions, ServerOptions};
use callme_tests::{load, native_add, proxy, server, unique};
use futures_util::future::join_all;
use serde_json::{Value, json};

fn pos(args: Vec<Value>) -> Args {
    Args::positional(args)
}

/// Native functions like the seed's examples: `add`, and a slow `sleep`.
fn natives(tag: &'static str) -> NativeFunctions {
    let mut f = native_add();
    f.register("sleep", "func(ms: u64) -> string", move |args: Args| {
        let ms = args.args.first().and_then(Value::as_u64).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(json!(tag))
    });
    f.register("whoami", "func() -> string", move |_| Ok(json!(tag)));
    f
}

#[tokio::test]
async fn single_call() {
    let id = unique("fooserver");
    let s = server(ServerOptions::default()).await;
    s.serve_plugin(load("calc", &id, Limits::default()))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let v: i64 = p.use_server(&id).invoke("add", (1, 1)).await.unwrap();
    assert_eq!(v, 2);
}

#[tokio::test]
async fn native_function_served_and_called() {
    let id = unique("native");
    let s = server(ServerOptions::default()).await;
    s.serve_native(&id, natives("n")).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let v: i64 = p.use_server(&id).invoke("add", (40, 2)).await.unwrap();
    assert_eq!(v, 42);
    let d = p.use_server(&id).describe().await.unwrap();
    assert!(
        d["functions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "add")
    );
}

#[tokio::test]
async fn several_calls_with_different_timeouts() {
    let id = unique("timeouts");
    let s = server(ServerOptions::default()).await;
    s.serve_native(&id, natives("t")).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let sp = p.use_server(&id);
    assert_eq!(
        sp.call_timeout("sleep", pos(vec![json!(10)]), Duration::from_secs(5))
            .await
            .unwrap(),
        json!("t")
    );
    let e = sp
        .call_timeout("sleep", pos(vec![json!(1500)]), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(
        sp.call_timeout("add", pos(vec![json!(2), json!(3)]), Duration::from_secs(5))
            .await
            .unwrap(),
        json!(5)
    );
}

async fn five_concurrent_callers(concurrency: usize) -> Duration {
    let id = unique("serial");
    let s = server(ServerOptions {
        concurrency,
        ..ServerOptions::default()
    })
    .await;
    s.serve_plugin(load("calc", &id, Limits::default()))
        .await
        .unwrap();
    let started = Instant::now();
    let calls = (0..5).map(|i| {
        let id = id.clone();
        async move {
            // One proxy per caller, as the seed's test did.
            let p = proxy(Duration::from_secs(20)).await;
            let v: i64 = p.use_server(&id).invoke("add", (i, 100)).await.unwrap();
            assert_eq!(v, i + 100, "caller {i} gets its own answer");
        }
    });
    join_all(calls).await;
    started.elapsed()
}

#[tokio::test]
async fn serial_server_answers_five_concurrent_callers() {
    five_concurrent_callers(1).await;
}

#[tokio::test]
async fn concurrent_server_answers_five_concurrent_callers() {
    five_concurrent_callers(5).await;
}

#[tokio::test]
async fn concurrency_runs_slow_calls_in_parallel() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let id = unique("parallel");
    let s = server(ServerOptions {
        concurrency: 4,
        ..ServerOptions::default()
    })
    .await;
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut f = NativeFunctions::new();
    let (n, m) = (now.clone(), peak.clone());
    f.register("sleep", "func(ms: u64) -> string", move |_| {
        let running = n.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(running, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(700));
        n.fetch_sub(1, Ordering::SeqCst);
        Ok(json!("p"))
    });
    s.serve_native(&id, f).await.unwrap();
    let p = proxy(Duration::from_secs(20)).await;
    let sp = p.use_server(&id);
    let calls = (0..4).map(|_| sp.call("sleep", pos(vec![json!(700)])));
    for r in join_all(calls).await {
        assert_eq!(r.unwrap(), json!("p"));
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak >= 2, "calls ran one at a time (peak {peak})");
    assert!(
        peak <= 4,
        "more calls than the concurrency ran at once (peak {peak})"
    );
}

#[tokio::test]
async fn timeout_when_server_is_slow() {
    let id = unique("slow");
    let s = server(ServerOptions::default()).await;
    s.serve_native(&id, natives("s")).await.unwrap();
    let p = proxy(Duration::from_millis(400)).await;
    let e = p
        .use_server(&id)
        .call("sleep", pos(vec![json!(3000)]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
}

#[tokio::test]
async fn wrong_arity_is_a_remote_invalid_arguments() {
    let id = unique("arity");
    let s = server(ServerOptions::default()).await;
    s.serve_plugin(load("calc", &id, Limits::default()))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let e = p
        .use_server(&id)
        .call("add", pos(vec![json!(1)]))
        .await
        .unwrap_err();
    let r = e.remote().expect("remote error");
    assert_eq!(r.kind, ErrorKind::InvalidArguments);
    assert!(r.message.contains("`b`"), "{}", r.message);
    let e = p
        .use_server(&id)
        .call("divide", pos(vec![json!(1), json!(0)]))
        .await
        .unwrap_err();
    let r = e.remote().expect("remote error");
    assert_eq!(r.kind, ErrorKind::GuestError);
    assert_eq!(r.data, json!("division by zero"));
    let e = p
        .use_server(&id)
        .call("nope", Args::default())
        .await
        .unwrap_err();
    assert_eq!(e.remote().unwrap().kind, ErrorKind::NoSuchFunction);
}

#[tokio::test]
async fn two_servers_with_the_same_function_answer_for_themselves() {
    let (a, b) = (unique("alpha"), unique("beta"));
    let s = server(ServerOptions::default()).await;
    s.serve_native(&a, natives("alpha")).await.unwrap();
    s.serve_native(&b, natives("beta")).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    for _ in 0..3 {
        assert_eq!(
            p.use_server(&a)
                .call("whoami", Args::default())
                .await
                .unwrap(),
            json!("alpha")
        );
        assert_eq!(
            p.use_server(&b)
                .call("whoami", Args::default())
                .await
                .unwrap(),
            json!("beta")
        );
    }
}

#[tokio::test]
async fn unknown_server_fails_at_once() {
    let p = proxy(Duration::from_secs(30)).await;
    let started = Instant::now();
    let e = p
        .use_server(&unique("nobody"))
        .call("add", Args::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NoSuchServer(_)), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The proxy keeps working afterwards.
    let id = unique("after");
    let s = server(ServerOptions::default()).await;
    s.serve_native(&id, natives("a")).await.unwrap();
    assert_eq!(
        p.use_server(&id)
            .call("whoami", Args::default())
            .await
            .unwrap(),
        json!("a")
    );
}

#[tokio::test]
async fn late_reply_does_not_confuse_the_next_call() {
    let id = unique("late");
    let s = server(ServerOptions {
        concurrency: 2,
        ..ServerOptions::default()
    })
    .await;
    s.serve_native(&id, natives("late")).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let sp = p.use_server(&id);
    let e = sp
        .call_timeout("sleep", pos(vec![json!(600)]), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }));
    // The late reply lands while this call waits; it must get its own.
    let v = sp
        .call_timeout(
            "add",
            pos(vec![json!(20), json!(22)]),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(v, json!(42));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        sp.call("add", pos(vec![json!(1), json!(2)])).await.unwrap(),
        json!(3)
    );
}

#[tokio::test]
async fn thousand_concurrent_calls_through_one_proxy() {
    let id = unique("many");
    let s = server(ServerOptions {
        concurrency: 32,
        ..ServerOptions::default()
    })
    .await;
    s.serve_plugin(load("calc", &id, Limits::default()))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(60)).await;
    let calls = (0..1000i64).map(|i| {
        let sp = p.use_server(&id);
        async move { (i, sp.invoke::<_, i64>("add", (i, i)).await) }
    });
    let results = join_all(calls).await;
    let mut right = 0;
    for (i, r) in results {
        assert_eq!(r.unwrap(), 2 * i);
        right += 1;
    }
    assert_eq!(right, 1000);
}

#[tokio::test]
async fn expired_request_is_never_executed() {
    let id = unique("expiry");
    let s = server(ServerOptions {
        concurrency: 1,
        auto_delete: false,
        ..ServerOptions::default()
    })
    .await;
    s.serve_native(&id, natives("x")).await.unwrap();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = proxy(Duration::from_secs(10)).await;
    // Stop consuming; the queue stays (not auto-delete).
    s.stop_serving(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = p
        .use_server(&id)
        .call_timeout("whoami", Args::default(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Serve again with a function that counts executions.
    let c = counter.clone();
    let mut f = NativeFunctions::new();
    f.register("whoami", "func() -> string", move |_| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(json!("x"))
    });
    let s2 = server(ServerOptions {
        auto_delete: false,
        ..ServerOptions::default()
    })
    .await;
    s2.serve_native(&id, f).await.unwrap();
    let v = p
        .use_server(&id)
        .call("whoami", Args::default())
        .await
        .unwrap();
    assert_eq!(v, json!("x"));
    assert_eq!(
        counter.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the expired request never ran"
    );
    // Clean up the queue we kept.
    let ch = s2.stop_serving(&id).await;
    assert!(ch.unwrap());
    callme_tests::broker_ctl(&["delete_queue", &callme::protocol::server_queue(&id)]);
}

#[tokio::test]
async fn describe_lists_functions_and_version() {
    let id = unique("describe");
    let s = server(ServerOptions::default()).await;
    let plugin = load("calc", &id, Limits::default());
    let hash = plugin.hash().to_string();
    s.serve_plugin(plugin).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let d = p.use_server(&id).describe().await.unwrap();
    assert_eq!(d["version"], json!(hash));
    let fns = d["functions"].as_array().unwrap();
    assert!(fns.iter().any(
        |f| f["name"] == "stats.mean" && f["signature"] == "func(xs: list<f64>) -> option<f64>"
    ));
}

#[test]
fn blocking_proxy_calls_from_plain_code() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let id = unique("blocking");
    let s = rt.block_on(async {
        let s = server(ServerOptions::default()).await;
        s.serve_plugin(load("calc", &id, Limits::default()))
            .await
            .unwrap();
        s
    });
    let _keep = (&rt, &s);
    let bp =
        callme::BlockingProxy::connect(&callme_tests::connect_options(), Duration::from_secs(10))
            .unwrap();
    assert_eq!(
        bp.call(&id, "add", pos(vec![json!(2), json!(2)])).unwrap(),
        json!(4)
    );
}

#[tokio::test]
async fn serving_one_id_twice_at_once_starts_one_consumer() {
    let id = unique("twice");
    let s = server(ServerOptions::default()).await;
    let (a, b) = tokio::join!(
        s.serve_plugin(load("calc", &id, Limits::default())),
        s.serve_plugin(load("calc", &id, Limits::default())),
    );
    a.unwrap();
    b.unwrap();
    // Ask the broker how many consumers the server's queue has.
    let conn = lapin::Connection::connect(
        &callme_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            callme::protocol::server_queue(&id).as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(queue.consumer_count(), 1);
    let p = proxy(Duration::from_secs(10)).await;
    let v: i64 = p.use_server(&id).invoke("add", (2, 3)).await.unwrap();
    assert_eq!(v, 5);
}

/// The prefetch of each consumer of `id`'s queue, as the broker sees it.
fn prefetches(id: &str) -> Vec<u64> {
    let queue = callme::protocol::server_queue(id);
    callme_tests::broker_ctl(&["list_consumers", "-q", "queue_name", "prefetch_count"])
        .lines()
        .filter_map(|line| {
            let (name, prefetch) = line.split_once('\t')?;
            (name == queue).then(|| prefetch.trim().parse().ok())?
        })
        .collect()
}

#[tokio::test]
async fn a_new_concurrency_reaches_the_broker_as_the_prefetch() {
    let id = unique("prefetch");
    let s = server(ServerOptions::default()).await;
    let limits = |concurrency| Limits {
        concurrency: Some(concurrency),
        ..Limits::default()
    };
    s.serve_plugin(load("calc", &id, limits(2))).await.unwrap();
    assert_eq!(prefetches(&id), vec![2]);
    // The broker applies a prefetch to consumers made after it: the server
    // must consume again, with one consumer still.
    s.serve_plugin(load("calc", &id, limits(5))).await.unwrap();
    let changed = callme_tests::eventually(Duration::from_secs(20), || async {
        (prefetches(&id) == vec![5]).then_some(())
    })
    .await;
    assert!(changed.is_some(), "prefetches: {:?}", prefetches(&id));
    let p = proxy(Duration::from_secs(10)).await;
    let v: i64 = p.use_server(&id).invoke("add", (2, 3)).await.unwrap();
    assert_eq!(v, 5);
}

#[tokio::test]
async fn a_dropped_server_stops_serving() {
    let id = unique("dropped");
    let s = server(ServerOptions::default()).await;
    s.serve_plugin(load("calc", &id, Limits::default()))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let v: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(v, 3);
    // No shutdown: dropping the last handle closes its connection, so its
    // auto-delete queue goes and nobody answers the id any more.
    drop(s);
    let gone = callme_tests::eventually(Duration::from_secs(20), || async {
        match p
            .use_server(&id)
            .call("add", Args::positional(vec![json!(1), json!(1)]))
            .await
        {
            Err(Error::NoSuchServer(_)) => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(gone.is_some(), "the dropped server still answers");
}
