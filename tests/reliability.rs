//! The bad day: malformed messages, crashes, shutdowns, runaway neighbours, fuzzed input.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use callme::protocol::{Args, Request};
use callme::{Error, ErrorKind, PluginSettings, ServerOptions};
use callme_tests::{
    Host, RawClient, answers_add, deploy, load, plugin_path, pos, proxy, serve_calc, server,
    slow_calls, tempdir, unique,
};
use futures_util::future::join_all;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::{Value, json};

/// A request whose `reply_to` names, in 229 bytes, an exchange that does
/// not exist, with a two-byte character across byte 252 of the broker's
/// `NOT_FOUND - no exchange '...'`: RabbitMQ cuts a channel close's reply
/// text there (3.10 here, and 4.x), so a reply to it would have the host's
/// channel closed with a text that is not UTF-8, which lapin cannot read:
/// the host's whole connection would end, every call on it with it, and
/// again each time the request came back. Such a request is dropped
/// unanswered; the host keeps its connection and answers everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_the_broker_would_cut_in_two_costs_no_one_the_hosts_connection() {
    let (user, password) = callme_tests::dedicated_user("reply-to-cut");
    let url = callme_tests::amqp_url_as(&user, &password);
    let srv = callme::Server::connect(&callme::ConnectOptions::new(url), ServerOptions::default())
        .await
        .unwrap();
    let id = unique("reply-to-cut");
    srv.serve_native(&id, callme_tests::native_add())
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    let before =
        callme_tests::connection_pid(&user, "callme server").expect("the host's connection");

    let reply_to = format!("{}éb", "a".repeat(226));
    add_replying_to(&callme_tests::amqp_url(), &id, &reply_to).await;
    for i in 0..20i64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answers_add(&p, &id, i).await;
    }
    assert_eq!(
        callme_tests::connection_pid(&user, "callme server"),
        Some(before),
        "the host's connection was lost"
    );
    // Dropped (acked), not left to come back.
    let queues = callme_tests::broker_ctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages",
    ]);
    let queue = callme::protocol::server_queue(&id);
    let line = queues
        .lines()
        .find(|l| l.split('\t').next() == Some(queue.as_str()))
        .expect("the server's queue");
    assert_eq!(line.split('\t').nth(1), Some("0"), "{line}");
}

/// A request dropped for such a `reply_to` is acked and done with, not
/// noted as a request the host gave back (which its debug log says of
/// each it notes). Each used to be noted: a caller sending them with fresh
/// correlation ids could push out the notes that keep other callers'
/// requests, given back through connection losses, from counting against
/// the delivery limit (`host/src/server/given_back.rs`).
#[tokio::test]
async fn a_request_dropped_for_its_reply_to_is_not_noted_as_given_back() {
    let id = unique("reply-to-noted");
    let mut host = Host::serving("calc", &[&id], &[], "callme=debug");
    let p = proxy(Duration::from_secs(10)).await;
    answers_add(&p, &id, 1).await;
    let reply_to = format!("{}éb", "a".repeat(226));
    for _ in 0..3 {
        add_replying_to(&callme_tests::amqp_url(), &id, &reply_to).await;
    }
    let dropped = callme_tests::eventually(Duration::from_secs(20), || async {
        let log = host.log_text();
        // The first is logged, the next held back (throttled).
        log.contains("its reply_to is too long").then_some(())
    })
    .await;
    assert!(dropped.is_some(), "not dropped:\n{}", host.log_text());
    // Acked: nothing waits in the queue, and the calls after are answered.
    callme_tests::wait_queue_settled(
        &callme::protocol::server_queue(&id),
        Duration::from_secs(10),
    )
    .await;
    for i in 0..3 {
        answers_add(&p, &id, i).await;
    }
    let log = host.log_text();
    assert!(
        !log.contains("noted as given back"),
        "a dropped request was noted as given back:\n{log}"
    );
    host.terminate();
    host.wait(Duration::from_secs(30));
}

/// The same cut, in a virtual host whose name is not ASCII: an ASCII
/// `reply_to` of 212 bytes, an exchange that does not exist, puts the
/// `ö` of the vhost across byte 252 of `NOT_FOUND - no exchange '...' in
/// vhost 'abö-...'`. The host drops the request, and keeps its
/// connection; and a proxy there refuses, before sending anything, a
/// call to a 200-character server id that would put the `ö` of `abcdö-...`
/// there (`Config`), and keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_not_ascii_bounds_the_names_the_broker_would_echo() {
    for (prefix, attack) in [("abö", "reply_to"), ("abcdö", "server id")] {
        let (user, password) = callme_tests::dedicated_user("echo-vhost");
        let url = callme_tests::dedicated_vhost(prefix, &user, &password);
        let srv = callme::Server::connect(
            &callme::ConnectOptions::new(url.clone()),
            ServerOptions::default(),
        )
        .await
        .unwrap();
        let id = unique("echo-vhost");
        srv.serve_native(&id, callme_tests::native_add())
            .await
            .unwrap();
        let p = callme::Proxy::connect_with(
            &callme::ConnectOptions::new(url.clone()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
        assert_eq!(sum, 3);
        let host =
            callme_tests::connection_pid(&user, "callme server").expect("the host's connection");
        let proxy =
            callme_tests::connection_pid(&user, "callme proxy").expect("the proxy's connection");
        if attack == "reply_to" {
            add_replying_to(&url, &id, &"a".repeat(212)).await;
        } else {
            let refused = p
                .use_server(&"a".repeat(200))
                .invoke::<_, i64>("add", (1, 2))
                .await;
            assert!(matches!(refused, Err(Error::Config(_))), "{refused:?}");
        }
        for i in 0..10i64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            answers_add(&p, &id, i).await;
        }
        assert_eq!(
            callme_tests::connection_pid(&user, "callme server"),
            Some(host),
            "{attack}: the host's connection was lost"
        );
        assert_eq!(
            callme_tests::connection_pid(&user, "callme proxy"),
            Some(proxy),
            "{attack}: the proxy's connection was lost"
        );
    }
}

/// A host whose address space is limited (`ulimit -v`) cannot reserve the
/// pooling allocator's slots, and makes instances on demand. Each used to
/// reserve wasmtime's default 4 GiB (and a guard) for its memory: with
/// 24 GiB to spare beyond what the host takes idle (its threads' stacks
/// are most of that), a few instances took it all, and the next call
/// failed `Trap` ("Cannot allocate memory"), or the plugin was refused
/// outright, its trial instance not made. Two copies of `hostile`, 8
/// calls in flight to each, and their spares: 20 instances, each now
/// reserving what its memory may grow to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_short_of_address_space_makes_its_instances_on_demand() {
    let dir = tempdir();
    let ids = [unique("short-of-space"), unique("short-of-space")];
    for id in &ids {
        deploy(&plugin_path("hostile"), &dir, &format!("{id}.wasm"));
    }
    let p = proxy(Duration::from_secs(20)).await;
    // Under 1 TiB the pool (4 TiB for 1000 slots) cannot be reserved.
    let short_of_space = |bytes: u64| {
        let mut command = std::process::Command::new("prlimit");
        command
            .arg(format!("--as={bytes}"))
            .arg("--")
            .arg(callme_tests::callme_bin());
        let mut host = Host::start(command, &dir, &[], "callme=info");
        host.wait_ready(Duration::from_secs(120));
        assert!(
            host.log_text().contains("pooling allocator unavailable"),
            "{}",
            host.log_text()
        );
        host
    };
    // What such a host takes idle, having served a call of each id.
    let idle = {
        let mut host = short_of_space(1 << 40);
        for id in &ids {
            let _: Value = p.use_server(id).invoke("sleep", (1,)).await.unwrap();
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", host.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmSize");
        host.terminate();
        assert!(
            host.wait(Duration::from_secs(60)).is_some(),
            "the host did not stop"
        );
        kib << 10
    };
    let _host = short_of_space(idle + (24 << 30));
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let sp = p.use_server(&ids[i % 2]);
            tokio::spawn(async move { sp.invoke::<_, Value>("sleep", (1000,)).await })
        })
        .collect();
    for call in join_all(calls).await {
        call.unwrap()
            .expect("a call on a host short of address space");
    }
}

/// Publishes to `id`, on the broker of `url` (its vhost), a request to
/// `add` whose `reply_to` is `reply_to`, as a caller of its own would.
async fn add_replying_to(url: &str, id: &str, reply_to: &str) {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;

    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_publish(
            callme::protocol::server_exchange(id).as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            br#"{"func":"add","args":[1,2]}"#,
            BasicProperties::default()
                .with_content_type(callme::protocol::CONTENT_TYPE.into())
                .with_correlation_id("cut".into())
                .with_reply_to(reply_to.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_messages_get_bad_request_and_the_server_keeps_serving() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "badmsg").await;
    let mut raw = RawClient::connect().await;

    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = format!(r#"{{"func":"add","args":["{}"]}}"#, "x".repeat(5 << 20));
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "garbage",
            vec![0, 159, 146, 150, 1, 2, 3],
            Some("application/json"),
        ),
        (
            "invalid utf-8",
            b"{\"func\": \"\xff\xfe\"}".to_vec(),
            Some("application/json"),
        ),
        ("too large", huge.into_bytes(), Some("application/json")),
        (
            "deeply nested",
            nested.into_bytes(),
            Some("application/json"),
        ),
        (
            "wrong content type",
            br#"{"func":"add","args":[1,2]}"#.to_vec(),
            Some("text/plain"),
        ),
        ("not a request", br#"{"fn":"add"}"#.to_vec(), None),
        (
            "a key given twice",
            br#"{"func":"add","kwargs":{"a":1,"b":2,"a":3}}"#.to_vec(),
            Some("application/json"),
        ),
    ];
    for (what, body, ct) in cases {
        let corr = unique("c");
        raw.send(&id, &body, ct, true, Some(&corr)).await;
        let reply = raw.reply_body(&corr).await;
        assert_eq!(reply["error"]["type"], "BadRequest", "{what}: {reply}");
        if what == "a key given twice" {
            let message = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("`a` is given twice"), "{message}");
        }
        let v: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
        assert_eq!(v, 3, "serving after {what}");
    }
    // Unanswerable requests are dropped, and nothing else is disturbed.
    raw.send(
        &id,
        br#"{"func":"add","args":[1,2]}"#,
        Some("application/json"),
        false,
        Some("x"),
    )
    .await;
    raw.send(
        &id,
        br#"{"func":"add","args":[1,2]}"#,
        Some("application/json"),
        true,
        None,
    )
    .await;
    let v: i64 = p.use_server(&id).invoke("add", (2, 2)).await.unwrap();
    assert_eq!(v, 4);
    // ... acknowledged (neither left unacknowledged nor put back to be
    // delivered again), and answered to nobody.
    callme_tests::wait_queue_settled(
        &callme::protocol::server_queue(&id),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        raw.try_reply().is_none(),
        "an unanswerable request was answered"
    );
}

/// Waits for `calls`; how many were answered with calc's version, and
/// every result.
async fn answered(
    calls: Vec<tokio::task::JoinHandle<Result<Value, Error>>>,
) -> (
    usize,
    Vec<Result<Result<Value, Error>, tokio::task::JoinError>>,
) {
    let results = join_all(calls).await;
    let answered = results
        .iter()
        .filter(|r| matches!(r, Ok(Ok(v)) if v == &json!("1")))
        .count();
    (answered, results)
}

/// Waits for `host`, told to stop, to exit 0 having answered every call
/// it ran; its log.
fn stopped_after_answering(host: &mut Host) -> String {
    let code = host.wait(Duration::from_secs(25));
    let log = host.log_text();
    assert_eq!(code, Some(0), "exit 0 once told to stop: {log}");
    assert!(log.contains("all calls answered"), "{log}");
    log
}

#[tokio::test]
async fn graceful_shutdown_answers_running_calls_and_leaves_the_rest() {
    let dir = tempdir();
    let id = unique("graceful");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    // Each call a host runs to its end is a line of its own.
    let host = |dir: &std::path::Path, extra: &[&str]| {
        let mut command = std::process::Command::new(callme_tests::callme_bin());
        command.env(
            "CALLME_CACHE_DIR",
            callme_tests::target_dir().join("test-cache"),
        );
        Host::start(command, dir, extra, "callme=info,callme::plugin=debug")
    };
    let ran = |log: &str| {
        log.lines()
            .filter(|l| l.contains("callme::plugin: call ") && l.contains("func=\"slow-version\""))
            .count()
    };
    let mut a = host(&dir, &["--concurrency", "2", "--grace", "20"]);
    a.wait_ready(Duration::from_secs(30));
    let dir_b = tempdir();
    deploy(&plugin_path("calc"), &dir_b, &format!("{id}.wasm"));
    let mut b = host(&dir_b, &["--concurrency", "2"]);
    b.wait_ready(Duration::from_secs(30));

    let p = proxy(Duration::from_secs(30)).await;
    let calls = slow_calls(&p, &id, 10, 800);
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.terminate();
    let (answered, results) = answered(calls).await;
    eprintln!(
        "graceful shutdown: calls 10, answered {answered}, lost {}",
        10 - answered
    );
    assert_eq!(answered, 10, "{results:?}");
    let log_a = stopped_after_answering(&mut a);
    // The calls the stopping host was running, it finished; none ran twice.
    let (by_a, by_b) = (ran(&log_a), ran(&b.log_text()));
    assert!(
        by_a >= 1,
        "the stopping host finished none of its calls: {log_a}"
    );
    assert_eq!(
        by_a + by_b,
        10,
        "calls run: {by_a} by the stopping host, {by_b} by the other"
    );
    drop(b);
}

/// Ctrl-C (SIGINT) stops a host as SIGTERM does: the calls it runs are
/// finished and answered, and it exits 0.
#[tokio::test]
async fn ctrl_c_finishes_running_calls_as_sigterm_does() {
    let dir = tempdir();
    let id = unique("ctrl-c");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::serve(&dir, &["--grace", "20"]);
    host.wait_ready(Duration::from_secs(30));
    let p = proxy(Duration::from_secs(30)).await;
    let calls = slow_calls(&p, &id, 2, 1500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.signal("INT");
    let (answered, results) = answered(calls).await;
    assert_eq!(answered, 2, "{results:?}");
    stopped_after_answering(&mut host);
}

/// A plugin copied into the directory while the host stops (in its grace
/// period, finishing calls) is not loaded: served then, it would take
/// requests the process drops on its way out, to be run again elsewhere.
#[tokio::test]
async fn a_plugin_deployed_while_the_host_stops_is_not_served() {
    let dir = tempdir();
    let id = unique("stopping");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::serve(&dir, &["--grace", "20"]);
    host.wait_ready(Duration::from_secs(30));
    let p = proxy(Duration::from_secs(30)).await;
    let calls = slow_calls(&p, &id, 2, 3000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = unique("late-in-stop");
    deploy(&plugin_path("calc"), &dir, &format!("{late}.wasm"));
    let (answered, results) = answered(calls).await;
    assert_eq!(answered, 2, "{results:?}");
    let log = stopped_after_answering(&mut host);
    assert!(!log.contains(&late), "{log}");
}

#[tokio::test]
async fn stopping_acks_every_call_it_finishes() {
    // Two servers share an id; one stops while it runs calls. Each call it
    // finishes must be acked, not left to be delivered again and run a
    // second time by the other.
    let id = unique("acked");
    let opts = || ServerOptions {
        concurrency: 2,
        ..ServerOptions::default()
    };
    let (a, b) = (server(opts()).await, server(opts()).await);
    for s in [&a, &b] {
        s.serve_plugin(load("calc", &id, PluginSettings::default()))
            .await
            .unwrap();
    }
    let p = proxy(Duration::from_secs(30)).await;
    let n = 10;
    let calls = slow_calls(&p, &id, n, 800);
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.shutdown(Duration::from_secs(20)).await;
    let (answered, results) = answered(calls).await;
    assert_eq!(answered, n, "{results:?}");
    // A request whose ack was lost would be delivered again to `b` now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (by_a, by_b) = (a.answered(), b.answered());
    eprintln!("stop mid-call: calls {n}, run by the stopped server {by_a}, by the other {by_b}");
    // The stopped server had calls running when it stopped (2 of them, its
    // prefetch): their acks must have gone through. Had they been lost,
    // the other server would have run those calls again and answered
    // every one of the n itself.
    assert!(
        by_a > 0,
        "the stopped server acked none of the calls it ran"
    );
    assert_eq!(by_a + by_b, n as u64, "a call was answered twice, or never");
}

/// A stop ends within its grace period and the tidying up that follows
/// it (`SHUTDOWN_TIDY_LIMIT`, 5 s), even with the broker hanging: every cancel,
/// queue deletion and connection close waited out its own time limit in
/// turn, about 20 s past a 3 s grace period, where an orchestrator that
/// set its own limit from `--grace` would kill the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_the_broker_hanging_ends_within_its_grace_period() {
    let node = callme_tests::Forwarder::start().await;
    let dir = tempdir();
    let id = unique("hung-stop");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let url = node.url();
    let mut host = Host::serve(&dir, &["--amqp-url", &url, "--grace", "3"]);
    host.wait_ready(Duration::from_secs(30));
    let p = proxy(Duration::from_secs(30)).await;
    let _calls = slow_calls(&p, &id, 1, 20_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.stall();
    let stopping = Instant::now();
    host.terminate();
    let code = host.wait(Duration::from_secs(40));
    let took = stopping.elapsed();
    let log = host.log_text();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        took < Duration::from_secs(3 + 5 + 2),
        "the stop took {took:?} with a 3 s grace period: {log}"
    );
    assert!(log.contains("grace period over"), "{log}");
}

/// The last host of an id stops while its calls outlast the grace
/// period: it keeps the id's queue (which it otherwise deletes, so that
/// callers get `NoSuchServer` at once), since the requests it took and
/// did not answer go back to it as its connection closes. The broker
/// counts neither in `message_count` nor for `queue.delete`'s `if-empty`
/// a request taken and not acked (RabbitMQ 3.x and 4.x count ready
/// messages only): deleted, the queue took them along, and the next host
/// never saw them. So the call is answered by the next host.
#[tokio::test]
async fn the_last_host_stopping_past_its_grace_keeps_the_queue_its_calls_go_back_to() {
    let id = unique("past-grace");
    let first = server(ServerOptions::default()).await;
    first
        .serve_plugin(load("calc", &id, PluginSettings::default()))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(30)).await;
    // Longer than the stop takes, even on a loaded machine.
    let calls = slow_calls(&p, &id, 2, 8000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.shutdown(Duration::from_millis(300)).await;
    let queued = callme_tests::broker_ctl(&["list_queues", "name"]);
    assert!(
        queued
            .lines()
            .any(|l| l == callme::protocol::server_queue(&id)),
        "the queue was deleted with requests taken from it:\n{queued}"
    );
    let next = server(ServerOptions::default()).await;
    next.serve_plugin(load("calc", &id, PluginSettings::default()))
        .await
        .unwrap();
    let (answered, results) = answered(calls).await;
    assert_eq!(answered, 2, "{results:?}");
    // Counted once acked, after the reply's confirm: a moment after the
    // caller has its reply.
    let rerun = callme_tests::eventually(Duration::from_secs(10), || async {
        (next.answered() > 0).then_some(())
    })
    .await;
    assert!(rerun.is_some(), "the calls cut were not run again");
    next.shutdown(Duration::from_secs(5)).await;
}

/// An id stopped, served again and stopped again: the first stop's
/// retirement, once its own call is over, does not delete the queue the
/// second serving's call was taken from (its request would have nowhere
/// to go back to). It used to look only at its own serving's requests.
#[tokio::test]
async fn an_id_stopped_twice_keeps_its_queue_for_the_second_servings_calls() {
    let id = unique("stopped-twice");
    let s = server(ServerOptions::default()).await;
    let queue = callme::protocol::server_queue(&id);
    let queued = || {
        callme_tests::broker_ctl(&["list_queues", "name"])
            .lines()
            .any(|l| l == queue)
    };
    s.serve_plugin(load("calc", &id, PluginSettings::default()))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(30)).await;
    let first = slow_calls(&p, &id, 1, 2000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.stop_serving(&id).await.unwrap());
    s.serve_plugin(load("calc", &id, PluginSettings::default()))
        .await
        .unwrap();
    let second = slow_calls(&p, &id, 1, 8000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.stop_serving(&id).await.unwrap());
    let (answered_first, results) = answered(first).await;
    assert_eq!(answered_first, 1, "{results:?}");
    // The first retirement looks every half second once its call is over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        queued(),
        "the queue was deleted with a request of the second serving taken from it"
    );
    let (answered_second, results) = answered(second).await;
    assert_eq!(answered_second, 1, "{results:?}");
    // Its own retirement deletes it once that call is over.
    let gone = callme_tests::eventually(Duration::from_secs(10), || async {
        (!queued()).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the queue of an id no longer served stayed");
    s.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn host_killed_mid_call_loses_nothing() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    let id = unique("crash");
    deploy(&plugin_path("calc"), &dir_a, &format!("{id}.wasm"));
    deploy(&plugin_path("calc"), &dir_b, &format!("{id}.wasm"));
    let mut a = Host::serve(&dir_a, &["--concurrency", "4"]);
    let mut b = Host::serve(&dir_b, &["--concurrency", "4"]);
    a.wait_ready(Duration::from_secs(30));
    b.wait_ready(Duration::from_secs(30));

    let p = proxy(Duration::from_secs(30)).await;
    let n = 24;
    let calls = slow_calls(&p, &id, n, 500);
    tokio::time::sleep(Duration::from_millis(250)).await;
    a.child.kill().unwrap();
    let (answered, results) = answered(calls).await;
    eprintln!(
        "host crash: calls {n}, answered {answered}, lost {}",
        n - answered
    );
    assert_eq!(answered, n, "{results:?}");
    drop(b);
}

#[tokio::test]
async fn runaway_plugin_does_not_starve_its_neighbours() {
    let s = server(ServerOptions {
        concurrency: 4,
        ..ServerOptions::default()
    })
    .await;
    let p = proxy(Duration::from_secs(30)).await;
    let good = serve_calc(&s, &p, "good").await;
    let bad = unique("runaway");
    s.serve_plugin(load("hostile", &bad, PluginSettings::default()))
        .await
        .unwrap();

    let baseline = latencies(&p, &good, 50).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammers: Vec<_> = (0..8)
        .map(|i| {
            let (sp, stop) = (p.use_server(&bad), stop.clone());
            tokio::spawn(async move {
                // How long each `spin` took, queueing included.
                let mut spins = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let f = if i % 2 == 0 { "spin" } else { "bomb" };
                    let t = Instant::now();
                    let e = sp.call(f, Args::default()).await.unwrap_err();
                    let kind = e.remote().map(|r| r.kind);
                    assert!(
                        matches!(kind, Some(ErrorKind::Timeout | ErrorKind::MemoryLimit)),
                        "{e:?}"
                    );
                    if f == "spin" {
                        spins.push(t.elapsed());
                    }
                }
                spins
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let under_load = latencies(&p, &good, 50).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let spins: Vec<Duration> = join_all(hammers)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let shortest_spin = *spins.iter().min().expect("every spinner ends a call");
    eprintln!(
        "isolation: add p50 {:?} alone, {:?} beside {} runaway spins of {shortest_spin:?} \
         or more (p99 {:?} -> {:?})",
        baseline.0,
        under_load.0,
        spins.len(),
        baseline.1,
        under_load.1
    );
    // A neighbour kept waiting behind the runaway calls (for the CPU, a
    // thread or a slot) would take as long as one of them to answer. The
    // runaway calls' own length is the yardstick, so a slow machine slows
    // both sides alike.
    assert!(
        under_load.0 < shortest_spin,
        "beside runaway calls, half the neighbour's calls took {:?} or more: as long as a runaway \
         call ({shortest_spin:?})",
        under_load.0
    );
}

/// A call that finds the host idle is first run on the thread that took
/// it, which also serves the broker connection's other requests: a
/// runaway guest must leave it at its first yield, not hold it until its
/// limits stop it. The test's runtime has one thread, shared with the
/// server: a task ticking every millisecond on it sees how long the guest
/// held it.
#[tokio::test]
async fn a_lone_runaway_call_leaves_the_thread_that_took_it() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let bad = unique("lone-runaway");
    s.serve_plugin(load("hostile", &bad, PluginSettings::default()))
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut longest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                longest = longest.max(t.elapsed());
            }
            longest
        })
    };
    let t = Instant::now();
    let e = p
        .use_server(&bad)
        .call("spin", Args::default())
        .await
        .unwrap_err();
    let spun = t.elapsed();
    assert_eq!(
        e.remote().map(|r| r.kind),
        Some(ErrorKind::Timeout),
        "{e:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let held = ticker.await.unwrap();
    eprintln!("one runaway call of {spun:?}: the shared thread was held {held:?} at most");
    assert!(
        held < spun / 4,
        "a runaway call of {spun:?} held the thread that took it for {held:?}"
    );
}

/// p50 and p99 of `n` sequential `add` calls, all of which must succeed.
async fn latencies(p: &callme::Proxy, id: &str, n: usize) -> (Duration, Duration) {
    let mut samples = Vec::new();
    for i in 0..n as i64 {
        let t = Instant::now();
        let v: i64 = p.use_server(id).invoke("add", (i, 1)).await.unwrap();
        assert_eq!(v, i + 1);
        samples.push(t.elapsed());
    }
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

/// A JSON scalar: what most parameters take.
fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
        prop_oneof![
            Just("NaN"),
            Just("Infinity"),
            Just("read"),
            Just("green"),
            Just("empty"),
            Just("ok")
        ]
        .prop_map(Value::from),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    ".{0,6}".boxed(),
                    prop_oneof![
                        Just("x".to_string()),
                        Just("y".to_string()),
                        Just("label".to_string()),
                        Just("some".to_string()),
                        Just("err".to_string()),
                        Just("rect".to_string()),
                        Just("circle".to_string())
                    ]
                    .boxed()
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const TYPES_FUNCS: &[&str] = &[
    "echo-bool",
    "echo-s8",
    "echo-u16",
    "echo-s64",
    "echo-u64",
    "echo-f32",
    "echo-char",
    "echo-string",
    "echo-list",
    "echo-bytes",
    "echo-tuple",
    "echo-record",
    "echo-variant",
    "echo-enum",
    "echo-flags",
    "echo-option",
    "echo-result",
    "echo-nested",
    "describe-point",
];

proptest! {
    // PROPTEST_CASES sets the count: small in CI, 1,000,000 in the
    // dedicated run (see docs/reliability.md).
    #[test]
    fn request_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Request::decode(&bytes, 1 << 20);
    }

    #[test]
    fn request_decoder_accepts_exactly_requests(v in arb_json()) {
        let body = serde_json::to_vec(&v).unwrap();
        if let Ok(r) = Request::decode(&body, 1 << 20) {
            prop_assert!(v.get("func").is_some_and(Value::is_string));
            prop_assert_eq!(Request::decode(&r.encode(), 1 << 20).unwrap(), r);
        }
    }

    #[test]
    fn well_formed_requests_are_read_as_sent(
        func in "[a-z][a-z0-9.-]{0,16}",
        args in prop::collection::vec(arb_json(), 0..3),
        kwargs in prop::collection::btree_map("[a-z_]{1,6}", arb_json(), 0..3),
        extra in "[a-z]{1,6}",
    ) {
        let kwargs: serde_json::Map<String, Value> = kwargs.into_iter().collect();
        let sent = Request {
            func: func.clone(),
            args: Args { args: args.clone(), kwargs: kwargs.clone() },
        };
        // As this crate writes it, and as any client writes it: both
        // argument keys, even empty.
        prop_assert_eq!(&Request::decode(&sent.encode(), 1 << 20).unwrap(), &sent);
        let mut written = json!({"func": func, "args": args, "kwargs": kwargs});
        prop_assert_eq!(
            &Request::decode(&serde_json::to_vec(&written).unwrap(), 1 << 20).unwrap(),
            &sent
        );
        // A key that is not part of a request is refused, not ignored.
        if !["func", "args", "kwargs"].contains(&extra.as_str()) {
            written[&extra] = json!(1);
            let body = serde_json::to_vec(&written).unwrap();
            prop_assert!(Request::decode(&body, 1 << 20).is_err(), "{} accepted", extra);
        }
    }

    #[test]
    fn json_to_wit_conversion_never_panics(
        func in prop::sample::select(TYPES_FUNCS),
        args in prop::collection::vec(arb_json(), 0..3),
    ) {
        let plugin = types_plugin();
        match plugin.check_args(func, &Args::positional(args)) {
            Ok(()) | Err(callme::PluginError::InvalidArguments { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}

fn types_plugin() -> &'static callme::Plugin {
    static P: std::sync::OnceLock<callme::Plugin> = std::sync::OnceLock::new();
    P.get_or_init(|| load("types", "types", PluginSettings::default()))
}

#[tokio::test]
async fn fuzzed_arguments_through_the_sandbox_never_break_it() {
    // The full path (bind, call, lift, convert back) for a sample of
    // generated inputs; whatever passes the check must round-trip.
    let plugin = types_plugin();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(1000));
    let strategy = (
        prop::sample::select(TYPES_FUNCS),
        prop_oneof![arb_leaf(), arb_json()],
    );
    let mut called = HashSet::new();
    let mut echoed = 0;
    for _ in 0..1000 {
        let (func, arg) = strategy.new_tree(&mut runner).unwrap().current();
        let args = pos(json!([arg]));
        if plugin.check_args(func, &args).is_ok() {
            let result = plugin.call(func, &args).await;
            assert!(
                matches!(
                    result,
                    Ok(_)
                        | Err(callme::PluginError::GuestError { .. })
                        | Err(callme::PluginError::InvalidArguments { .. })
                ),
                "{func}({arg}): {result:?}"
            );
            called.insert(func);
            // What an echo gives back, given again, comes back unchanged.
            if let (true, Ok(once)) = (func.starts_with("echo-"), &result) {
                let twice = plugin.call(func, &pos(json!([once]))).await;
                assert_eq!(twice.as_ref().ok(), Some(once), "{func}({arg}) then {once}");
                // Types of one JSON form come back as they went; the
                // others in their canonical form (a variant case without a
                // payload given as its name comes back as `{"case": null}`,
                // an `f32` as the nearest `f32`).
                let one_form = [
                    "echo-bool",
                    "echo-s8",
                    "echo-u16",
                    "echo-s64",
                    "echo-u64",
                    "echo-char",
                    "echo-string",
                    "echo-list",
                    "echo-tuple",
                ];
                if one_form.contains(&func) {
                    assert_eq!(once, &arg, "{func}({arg})");
                }
                echoed += 1;
            }
        }
    }
    // Random JSON fits the functions of common shapes (numbers, strings,
    // lists, options): 8 to 13 of them, and 46 to 69 echoes, in 25 runs of
    // 1,000 samples. The rest are `every_wit_type_round_trips`'s.
    assert!(
        called.len() >= 6,
        "only {} of the functions were called: {called:?}",
        called.len()
    );
    assert!(echoed >= 25, "only {echoed} echoes round-tripped");
}

#[tokio::test]
async fn unknown_server_and_refusals_leave_a_proxy_usable() {
    let p = proxy(Duration::from_secs(5)).await;
    for _ in 0..3 {
        let e = p
            .use_server(&unique("ghost"))
            .call("f", Args::default())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoSuchServer(_)), "{e:?}");
    }
    let s = server(ServerOptions::default()).await;
    serve_calc(&s, &p, "still").await;
}

/// A second broker node of the project's own, so restarting it disturbs
/// no other test.
struct SpareBroker;

impl SpareBroker {
    const PORT: u16 = 5692;

    fn command(cmd: &str) -> std::process::Command {
        let mut command = std::process::Command::new(callme_tests::repo().join("scripts/broker"));
        command
            .arg(cmd)
            .env(
                "CALLME_BROKER_DIR",
                callme_tests::target_dir().join("broker-spare"),
            )
            .env("CALLME_BROKER_PORT", Self::PORT.to_string())
            .env("CALLME_BROKER_TLS_PORT", "5691")
            .env("CALLME_BROKER_DIST_PORT", "25692")
            .env("CALLME_BROKER_NODENAME", "callme-spare@localhost");
        command
    }

    fn run(cmd: &str) {
        Self::run_with(cmd, &[]);
    }

    fn run_with(cmd: &str, args: &[&str]) {
        callme_tests::run_ok(Self::command(cmd).args(args));
    }

    fn url() -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", Self::PORT)
    }
}

/// Stops the spare node when the test ends, passed or failed, so it holds
/// no ports afterwards.
struct StopsSpareBroker;

impl Drop for StopsSpareBroker {
    fn drop(&mut self) {
        let _ = SpareBroker::command("stop").output();
    }
}

#[tokio::test]
async fn broker_restart_is_survived_by_hosts_and_proxies() {
    tokio::task::spawn_blocking(|| SpareBroker::run("start"))
        .await
        .unwrap();
    let _stop = StopsSpareBroker;
    let dir = tempdir();
    let id = unique("restart");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::serve(&dir, &["--amqp-url", &SpareBroker::url()]);
    host.wait_ready(Duration::from_secs(30));
    let p = callme::Proxy::connect_with(
        &callme::ConnectOptions::new(SpareBroker::url()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let sp = p.use_server(&id);
    let v: i64 = sp.invoke("add", (1, 1)).await.unwrap();
    assert_eq!(v, 2);

    // Calls keep going while the broker restarts, and again while it
    // closes every connection: each call ends within its timeout, by an
    // answer or an error, never hanging; then calls succeed again without
    // restarting anything.
    let restart = tokio::task::spawn_blocking(|| SpareBroker::run("restart"));
    let outage = calls_through(&sp, restart).await;
    let recovery = recovered(&sp, &host).await;
    eprintln!("broker restart: {outage}; back after {recovery:?}");

    // A longer outage: the broker stays away past the longest backoff.
    let away = tokio::task::spawn_blocking(|| {
        SpareBroker::run("stop");
        std::thread::sleep(Duration::from_secs(8));
        SpareBroker::run("start");
    });
    let outage = calls_through(&sp, away).await;
    let recovery = recovered(&sp, &host).await;
    eprintln!("broker stopped for 8 s: {outage}; back after {recovery:?}");

    // A proxy without `auto_recover` (as one-shot commands use) does not
    // reconnect: once its connection is closed, calls fail at once.
    let one_shot = callme::Proxy::connect_with(
        &callme::ConnectOptions {
            auto_recover: false,
            ..callme::ConnectOptions::new(SpareBroker::url())
        },
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let v: i64 = one_shot
        .use_server(&id)
        .invoke("add", (1, 1))
        .await
        .unwrap();
    assert_eq!(v, 2);

    let close = tokio::task::spawn_blocking(|| {
        SpareBroker::run_with("ctl", &["close_all_connections", "closed by a test"])
    });
    let outage = calls_through(&sp, close).await;
    let recovery = recovered(&sp, &host).await;
    eprintln!("connections closed by the broker: {outage}; back after {recovery:?}");

    for _ in 0..3 {
        let t = Instant::now();
        let e = one_shot
            .use_server(&id)
            .call("add", pos(json!([1, 1])))
            .await
            .unwrap_err();
        // Closed for good, said so: not `Disconnected`, a state that passes.
        assert!(matches!(e, Error::BrokerLost), "{e:?}");
        // At once, not after waiting out its 60 s timeout for a
        // reconnection that never comes.
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    assert!(
        host.log_text().contains("reconnected"),
        "host log: {}",
        host.log_text()
    );
}

/// What happened to calls made one after another until `event` finished.
struct Outage {
    made: usize,
    answered: usize,
    /// Calls that ended with an error within their timeout, by kind.
    failed: std::collections::BTreeMap<&'static str, usize>,
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "calls during the outage {} (answered {}, ended by an error in time {:?}, hung 0)",
            self.made, self.answered, self.failed
        )
    }
}

/// Makes calls until `event` finishes; asserts each ends within its
/// timeout (5 s) with the right answer or an error.
async fn calls_through(sp: &callme::ServerProxy, event: tokio::task::JoinHandle<()>) -> Outage {
    let mut outage = Outage {
        made: 0,
        answered: 0,
        failed: Default::default(),
    };
    let started = Instant::now();
    while !event.is_finished() {
        outage.made += 1;
        let t = Instant::now();
        match sp.call("add", pos(json!([1, 2]))).await {
            Ok(v) => {
                assert_eq!(v, json!(3));
                outage.answered += 1;
            }
            Err(e) => {
                let kind = match e {
                    Error::Disconnected(_) => "Disconnected",
                    Error::Connection(_) => "Connection",
                    Error::NoSuchServer(_) => "NoSuchServer",
                    Error::Timeout { .. } => "Timeout",
                    other => panic!("a call during the outage failed with {other:?}"),
                };
                *outage.failed.entry(kind).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(7),
            "a call hung for {:?}",
            t.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the broker took too long"
        );
    }
    event.await.unwrap();
    outage
}

/// Waits for calls to be answered again, then checks 20 in a row are;
/// returns how long the first answer took.
async fn recovered(sp: &callme::ServerProxy, host: &Host) -> Duration {
    let started = Instant::now();
    let back = callme_tests::eventually(Duration::from_secs(60), || async {
        sp.call("add", pos(json!([2, 2]))).await.ok()
    })
    .await;
    assert_eq!(back, Some(json!(4)), "host log: {}", host.log_text());
    let took = started.elapsed();
    for i in 0..20i64 {
        let v: i64 = sp.invoke("add", (i, i)).await.unwrap();
        assert_eq!(v, 2 * i);
    }
    took
}

// Multi-threaded: the forwarder keeps running while the test blocks on
// the host's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_started_before_its_broker_waits_for_it() {
    // A port nothing listens on yet: the broker "comes up" there later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let dir = tempdir();
    let id = unique("early");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    // As a host killed before this one would have left it.
    std::fs::write(dir.with_extension("ready"), "1\n").unwrap();
    let mut host = Host::serve(&dir, &["--amqp-url", &url]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        host.child.try_wait().unwrap(),
        None,
        "the host gave up on a broker that was not up yet: {}",
        host.log_text()
    );
    assert!(
        host.log_text().contains("waiting for it"),
        "{}",
        host.log_text()
    );
    assert!(
        !host.ready_file.exists(),
        "a ready file before the broker was there"
    );
    let _broker = callme_tests::Forwarder::on(port).await;
    host.wait_ready(Duration::from_secs(30));
    let p = proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (1, 1)).await.unwrap();
    assert_eq!(sum, 2);
    assert!(
        !host.log_text().contains("guest:guest"),
        "{}",
        host.log_text()
    );
}

/// A server makes its spare instances, and drops used ones, on a thread
/// at the lowest CPU priority the system has (Linux `SCHED_IDLE`, policy
/// 5 in `/proc/.../sched`): work no call waits for never takes a core
/// from a call or the threads carrying its reply. (Measured in
/// docs/benchmarks.md: a Python plugin's `add` from 1.07 to 0.65 ms end
/// to end.)
#[cfg(target_os = "linux")]
#[tokio::test]
async fn spare_instances_are_made_at_the_lowest_cpu_priority() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let id = serve_calc(&s, &p, "idle-spares").await;
    callme_tests::answers_add(&p, &id, 1).await;
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "callme-spares" {
            continue;
        }
        let sched = std::fs::read_to_string(task.path().join("sched")).unwrap_or_default();
        let policy = sched
            .lines()
            .find(|l| l.starts_with("policy"))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string());
        found.push(policy);
    }
    assert!(!found.is_empty(), "no callme-spares thread");
    assert!(
        found.iter().all(|p| p.as_deref() == Some("5")),
        "policies: {found:?}"
    );
}
