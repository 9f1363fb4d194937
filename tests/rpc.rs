//! Calls through the real broker: the seed's integration tests and more.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{Error, ErrorKind, NativeFunctions, PluginSettings, Proxy, ServerOptions};
use callme_tests::{load, native_add, pos, proxy, serve_calc, server, unique};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// Native functions like the seed's examples: `add`, and a slow `sleep`.
fn natives(tag: &'static str) -> NativeFunctions {
    let mut f = native_add();
    f.register("sleep", "func(ms: u64) -> string", move |args: Args| {
        let ms = args.args.first().and_then(Value::as_u64).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(json!(tag))
    });
    f.register("whoami", "func() -> string", move |_| Ok(json!(tag)));
    f.register(
        "echo-after",
        "func(ms: u64, v: string) -> string",
        |args: Args| {
            let ms = args.args.first().and_then(Value::as_u64).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(ms));
            Ok(args.args.get(1).cloned().unwrap_or(Value::Null))
        },
    );
    f
}

/// Who answers `whoami` on `id`.
async fn whoami(p: &Proxy, id: &str) -> Value {
    p.use_server(id)
        .call("whoami", Args::default())
        .await
        .expect("whoami is answered")
}

/// Counts the calls running at once, and the most there ever were.
#[derive(Default)]
struct Overlap {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Overlap {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// A native `add(a, b)` that takes `ms` milliseconds, its calls counted
/// in `running`.
fn counted_add(running: Arc<Overlap>, ms: u64) -> NativeFunctions {
    let mut f = NativeFunctions::new();
    f.register("add", "func(a: s64, b: s64) -> s64", move |args: Args| {
        running.enter();
        std::thread::sleep(Duration::from_millis(ms));
        running.leave();
        Ok(json!(
            args.args.iter().filter_map(Value::as_i64).sum::<i64>()
        ))
    });
    f
}

#[tokio::test]
async fn single_call() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "fooserver").await;
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
        sp.call_timeout("sleep", pos(json!([10])), Duration::from_secs(5))
            .await
            .unwrap(),
        json!("t")
    );
    let e = sp
        .call_timeout("sleep", pos(json!([1500])), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(
        sp.call_timeout("add", pos(json!([2, 3])), Duration::from_secs(5))
            .await
            .unwrap(),
        json!(5)
    );
}

/// Five callers, each with a proxy of its own as in the seed's test, call
/// a 200 ms `add` at the same moment on a server with `concurrency`;
/// checks that the five were waiting at once, that each got its own
/// answer and that no more calls than `concurrency` ran at once. The most
/// calls the server ran at once.
async fn five_concurrent_callers(concurrency: usize) -> usize {
    let id = unique("five");
    let s = server(ServerOptions {
        concurrency,
        ..ServerOptions::default()
    })
    .await;
    let running = Arc::new(Overlap::default());
    s.serve_native(&id, counted_add(running.clone(), 200))
        .await
        .unwrap();
    let (waiting, start) = (Overlap::default(), tokio::sync::Barrier::new(5));
    let calls = (0..5).map(|i| {
        let (id, waiting, start) = (&id, &waiting, &start);
        async move {
            let p = proxy(Duration::from_secs(20)).await;
            start.wait().await;
            waiting.enter();
            let v: i64 = p.use_server(id).invoke("add", (i, 100)).await.unwrap();
            waiting.leave();
            assert_eq!(v, i + 100, "caller {i} gets its own answer");
        }
    });
    join_all(calls).await;
    assert_eq!(waiting.peak(), 5, "the callers did not all wait at once");
    let peak = running.peak();
    assert!(
        peak <= concurrency,
        "{peak} calls ran at once, more than the concurrency {concurrency}"
    );
    peak
}

#[tokio::test]
async fn serial_server_answers_five_concurrent_callers() {
    assert_eq!(five_concurrent_callers(1).await, 1);
}

#[tokio::test]
async fn concurrent_server_answers_five_concurrent_callers() {
    let peak = five_concurrent_callers(5).await;
    assert!(peak >= 2, "the server ran the calls one at a time");
}

#[tokio::test]
async fn concurrency_runs_slow_calls_in_parallel() {
    let id = unique("parallel");
    let s = server(ServerOptions {
        concurrency: 4,
        ..ServerOptions::default()
    })
    .await;
    let running = Arc::new(Overlap::default());
    s.serve_native(&id, counted_add(running.clone(), 300))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(20)).await;
    let sp = p.use_server(&id);
    // Twice as many calls as the concurrency, through one proxy.
    let calls = (0..8i64).map(|i| sp.invoke::<_, i64>("add", (i, 1)));
    for (i, r) in (0..).zip(join_all(calls).await) {
        assert_eq!(r.unwrap(), i + 1);
    }
    let peak = running.peak();
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
        .call("sleep", pos(json!([3000])))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
}

#[tokio::test]
async fn wrong_arity_is_a_remote_invalid_arguments() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "arity").await;
    let e = p
        .use_server(&id)
        .call("add", pos(json!([1])))
        .await
        .unwrap_err();
    let r = e.remote().expect("remote error");
    assert_eq!(r.kind, ErrorKind::InvalidArguments);
    assert!(r.message.contains("`b`"), "{}", r.message);
    let e = p
        .use_server(&id)
        .call("divide", pos(json!([1, 0])))
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
        assert_eq!(whoami(&p, &a).await, json!("alpha"));
        assert_eq!(whoami(&p, &b).await, json!("beta"));
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
    assert_eq!(whoami(&p, &id).await, json!("a"));
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
        .call_timeout("sleep", pos(json!([600])), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }));
    // The late reply (`"late"`, at about 600 ms) lands while this call
    // waits (answered at about 1 s); it must get its own.
    let started = Instant::now();
    let v = sp
        .call_timeout(
            "echo-after",
            pos(json!([800, "second"])),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(v, json!("second"));
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "the second call was not waiting when the late reply came: {:?}",
        started.elapsed()
    );
    assert_eq!(sp.call("add", pos(json!([1, 2]))).await.unwrap(), json!(3));
}

/// Keyword arguments go through the broker as they are given (the
/// request's `kwargs`), from the proxy and from `callme call --kwargs`.
#[tokio::test]
async fn keyword_arguments_reach_the_server() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "kwargs").await;
    let sum = p
        .use_server(&id)
        .call("add", callme_tests::kw(json!({"a": 40, "b": 2})))
        .await
        .unwrap();
    assert_eq!(sum, json!(42));
    // Given out of order: matched by name, not by position.
    let sum = p
        .use_server(&id)
        .call("add", callme_tests::kw(json!({"b": -2, "a": 5})))
        .await
        .unwrap();
    assert_eq!(sum, json!(3));
    // Off this runtime's thread, which serves the calls.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(callme_tests::callme_bin())
            .args(["call", &id, "add", "--kwargs", r#"{"a": 30, "b": 12}"#])
            .env("CALLME_AMQP_URL", callme_tests::amqp_url())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[tokio::test]
async fn thousand_concurrent_calls_through_one_proxy() {
    let s = server(ServerOptions {
        concurrency: 32,
        ..ServerOptions::default()
    })
    .await;
    let p = proxy(Duration::from_secs(60)).await;
    let id = serve_calc(&s, &p, "many").await;
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
        ..ServerOptions::default()
    })
    .await;
    s.serve_native(&id, natives("x")).await.unwrap();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = proxy(Duration::from_secs(10)).await;
    // The host goes away without stopping: its queue stays (until it
    // expires), with nobody consuming.
    drop(s);
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
    let s2 = server(ServerOptions::default()).await;
    s2.serve_native(&id, f).await.unwrap();
    assert_eq!(whoami(&p, &id).await, json!("x"));
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
    let plugin = load("calc", &id, PluginSettings::default());
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
        s.serve_plugin(load("calc", &id, PluginSettings::default()))
            .await
            .unwrap();
        s
    });
    let _keep = (&rt, &s);
    let bp =
        callme::BlockingProxy::connect(&callme_tests::connect_options(), Duration::from_secs(10))
            .unwrap();
    assert_eq!(bp.call(&id, "add", pos(json!([2, 2]))).unwrap(), json!(4));
}

#[tokio::test]
async fn serving_one_id_twice_at_once_starts_one_consumer() {
    let id = unique("twice");
    let s = server(ServerOptions::default()).await;
    let (a, b) = tokio::join!(
        s.serve_plugin(load("calc", &id, PluginSettings::default())),
        s.serve_plugin(load("calc", &id, PluginSettings::default())),
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
    let limits = |concurrency| PluginSettings {
        concurrency: Some(concurrency),
        ..PluginSettings::default()
    };
    s.serve_plugin(load("calc", &id, limits(2))).await.unwrap();
    // Read until seen, as below: under load the broker's listing has
    // been seen to miss a consumer right after its consume-ok.
    let first = callme_tests::eventually(Duration::from_secs(20), || async {
        (prefetches(&id) == vec![2]).then_some(())
    })
    .await;
    assert!(first.is_some(), "prefetches: {:?}", prefetches(&id));
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
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "dropped").await;
    // No shutdown: dropping the last handle closes its connection, so its
    // consumer goes and nobody answers the id any more (its queue stays
    // until it expires, as after a crash).
    drop(s);
    let queue = callme::protocol::server_queue(&id);
    let gone = callme_tests::eventually(Duration::from_secs(20), || {
        let queue = queue.clone();
        async move {
            let listed = callme_tests::broker_ctl(&[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "consumers",
            ]);
            listed
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [queue.as_str(), "0"])
                .then_some(())
        }
    })
    .await;
    assert!(gone.is_some(), "the dropped server still consumes");
    let r = p
        .use_server(&id)
        .call_timeout("add", pos(json!([1, 1])), Duration::from_millis(500))
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
}

/// Timeouts of any length work: `Duration::MAX` does not overflow a
/// clock, and one past RabbitMQ's longest `expiration` (2^32 - 1 ms) is
/// not refused by the broker, with or without retry; an id no server could
/// have (over 200 characters) is refused by name.
#[tokio::test]
async fn any_timeout_works_and_an_impossible_id_is_refused() {
    let srv = server(ServerOptions::default()).await;
    let id = unique("longwait");
    srv.serve_native(&id, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let sum = p
        .call(&id, "add", pos(json!([1, 2])), Duration::MAX)
        .await
        .unwrap();
    assert_eq!(sum, json!(3));
    let sixty_days = Duration::from_secs(60 * 24 * 3600);
    let retried = p.use_server(&id).with_retry(true);
    let sum = tokio::time::timeout(
        Duration::from_secs(10),
        retried.call_timeout("add", pos(json!([2, 2])), sixty_days),
    )
    .await
    .expect("a call with a 60-day timeout answered at once")
    .unwrap();
    assert_eq!(sum, json!(4));
    let e = p
        .call(
            &"a".repeat(250),
            "add",
            pos(json!([1, 2])),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    // An id as long as a guest's memory is not copied, nor escaped (six
    // bytes for each of these), into the message.
    let e = p
        .call(
            &"\u{7f}".repeat(1 << 20),
            "add",
            pos(json!([1, 2])),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    assert!(e.to_string().len() < 2000, "{} bytes", e.to_string().len());
}

/// A `BlockingProxy` made and used in plain code may be dropped in async
/// code (dropping a tokio runtime there panics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_proxy_may_be_dropped_in_async_code() {
    let s = server(ServerOptions::default()).await;
    let id = unique("blockdrop");
    s.serve_native(&id, native_add()).await.unwrap();
    let made = {
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            let bp = callme::BlockingProxy::connect(
                &callme_tests::connect_options(),
                Duration::from_secs(10),
            )
            .unwrap();
            assert_eq!(bp.call(&id, "add", pos(json!([2, 3]))).unwrap(), json!(5));
            bp
        })
        .await
        .unwrap()
    };
    drop(made);
    // And the server is still answered by others.
    let p = proxy(Duration::from_secs(5)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (1, 1)).await.unwrap();
    assert_eq!(sum, 2);
}

/// A call whose time is up before its request is sent sends nothing: a
/// zero timeout fails with `Timeout` at once, and no server runs a request
/// nobody waits for. (A call sent again after a lost connection likewise
/// expires with what is left of its timeout, not a whole one.)
#[tokio::test]
async fn a_call_with_no_time_left_sends_nothing() {
    let srv = server(ServerOptions::default()).await;
    let id = unique("no-time");
    srv.serve_native(&id, native_add()).await.unwrap();
    let mut overheard =
        callme_tests::RawClient::overhear(&callme::protocol::server_exchange(&id)).await;
    let p = proxy(Duration::from_secs(10)).await;
    let e = p
        .use_server(&id)
        .call_timeout("add", pos(json!([1, 2])), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    let published = tokio::time::timeout(Duration::from_millis(500), overheard.next_reply(None));
    assert!(published.await.is_err(), "a request was published");
    // The next call, with time, goes out and is answered.
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    assert!(
        overheard
            .next_reply(None)
            .await
            .properties
            .expiration()
            .is_some()
    );
}

/// A float crosses the broker as the very number sent, both ways: JSON
/// read with the default parser could come out one unit in the last
/// place off (`-3.043388641313571e238` read as `...5713e238`).
#[tokio::test]
async fn a_float_crosses_the_broker_exactly() {
    let id = unique("floats");
    let s = server(ServerOptions::default()).await;
    s.serve_native(&id, natives("floats")).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    for x in [
        -3.043388641313571e238,
        0.1 + 0.2,
        f64::MIN_POSITIVE,
        5e-324,
        f64::MAX,
        -0.0,
    ] {
        let back = p
            .use_server(&id)
            .call("echo-after", pos(json!([0, x])))
            .await
            .unwrap();
        let back = back.as_f64().unwrap();
        assert_eq!(back.to_bits(), x.to_bits(), "{x:e} came back as {back:e}");
    }
}

/// A deadline over the 30 minutes a broker lets a consumer hold a request
/// (RabbitMQ's `consumer_timeout`) is a program's to give its own calls,
/// not a served plugin's: the plugin loads and runs, and the server
/// refuses to serve it, naming why.
#[tokio::test]
async fn a_deadline_longer_than_a_broker_allows_is_for_local_calls_only() {
    let id = unique("long-deadline");
    let settings = PluginSettings {
        limits: callme::Limits {
            deadline: Duration::from_secs(2 * 3600),
            ..callme::Limits::default()
        },
        ..PluginSettings::default()
    };
    let plugin = load("calc", &id, settings);
    assert_eq!(
        plugin.call("add", &pos(json!([1, 2]))).await.unwrap(),
        json!(3)
    );
    let s = server(ServerOptions::default()).await;
    match s.serve_plugin(plugin).await {
        Err(Error::Config(message)) => {
            assert!(message.contains("consumer_timeout"), "{message}")
        }
        other => panic!("served with a 2 h deadline: {other:?}"),
    }
    // 25 minutes, five short of the broker's own default, is served;
    // 30 is not.
    let over = PluginSettings {
        limits: callme::Limits {
            deadline: Duration::from_secs(30 * 60),
            ..callme::Limits::default()
        },
        ..PluginSettings::default()
    };
    let refused = s
        .serve_plugin(load("calc", &unique("over-deadline"), over))
        .await;
    assert!(matches!(refused, Err(Error::Config(_))), "{refused:?}");
    let at_limit = PluginSettings {
        limits: callme::Limits {
            deadline: Duration::from_secs(25 * 60),
            ..callme::Limits::default()
        },
        ..PluginSettings::default()
    };
    let id = unique("limit-deadline");
    s.serve_plugin(load("calc", &id, at_limit)).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let v: i64 = p.use_server(&id).invoke("add", (2, 2)).await.unwrap();
    assert_eq!(v, 4);
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(callme_tests::callme_bin())
            .args([
                "invoke",
                callme_tests::plugin_path("calc").to_str().unwrap(),
            ])
            .args(["add", "2", "3", "--deadline-ms", "7200000"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5", "{out:?}");
}

/// A proxy whose connection may have few channels (`channel_max=8` in its
/// URI; a broker may set it lower too) publishes on as many lanes as fit:
/// 40 calls at once are all answered, where the calls past the channels
/// failed with "channels limit reached".
#[tokio::test]
async fn a_proxy_with_few_channels_answers_many_calls_at_once() {
    let s = server(ServerOptions::default()).await;
    let id = unique("few-channels");
    s.serve_native(&id, native_add()).await.unwrap();
    let url = format!("{}?channel_max=8", callme_tests::amqp_url());
    let p = Proxy::connect_with(&callme::ConnectOptions::new(url), Duration::from_secs(20))
        .await
        .unwrap();
    let calls = (0..40i64).map(|i| {
        let s = p.use_server(&id);
        async move { s.invoke::<_, i64>("add", (i, 1)).await }
    });
    for (i, sum) in join_all(calls).await.into_iter().enumerate() {
        assert_eq!(sum.ok(), Some(i as i64 + 1), "call {i}");
    }
}
