//! Queues as today's RabbitMQ accepts them: durable or exclusive, classic or quorum, expiring, deleted by the last host to leave.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use callme::protocol::{Args, server_queue};
use callme::{Error, ErrorKind, NativeFunctions, QueueType, ServerOptions};
use callme_tests::{
    Forwarder, Host, amqp_url, amqp_url_as, answers_add, broker_ctl, connection_pid,
    dedicated_user, deploy, eventually, free_port, native_add, plugin_path, pos, proxy, server,
    tempdir, unique,
};
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

fn quorum() -> ServerOptions {
    ServerOptions {
        queue_type: QueueType::Quorum,
        ..ServerOptions::default()
    }
}

/// `(name, durable, auto_delete, exclusive, arguments)` of every queue.
fn queues() -> Vec<(String, bool, bool, bool, String)> {
    let out = broker_ctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "durable",
        "auto_delete",
        "exclusive",
        "arguments",
    ]);
    out.lines()
        .filter_map(|line| {
            let mut cols = line.split('\t');
            let name = cols.next()?.to_string();
            let flag = |c: Option<&str>| c == Some("true");
            let durable = flag(cols.next());
            let auto_delete = flag(cols.next());
            let exclusive = flag(cols.next());
            let arguments = cols.collect::<Vec<_>>().join("\t");
            Some((name, durable, auto_delete, exclusive, arguments))
        })
        .collect()
}

#[tokio::test]
async fn every_queue_callme_declares_is_durable_or_exclusive() {
    let classic = unique("classic");
    let replicated = unique("quorum");
    let a = server(ServerOptions::default()).await;
    let b = server(quorum()).await;
    a.serve_native(&classic, native_add()).await.unwrap();
    b.serve_native(&replicated, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    for id in [&classic, &replicated] {
        let sum: i64 = p.use_server(id).invoke("add", (1, 2)).await.unwrap();
        assert_eq!(sum, 3);
    }
    let all = queues();
    let mine: Vec<_> = all
        .iter()
        .filter(|(name, ..)| name.starts_with("server_") || name.starts_with("client_"))
        .collect();
    assert!(mine.len() >= 3, "{all:?}");
    for (name, durable, _, exclusive, _) in &mine {
        assert!(
            *durable || *exclusive,
            "{name} is neither durable nor exclusive: RabbitMQ 4.x refuses it"
        );
    }
    let find = |id: &str| {
        all.iter()
            .find(|(name, ..)| *name == server_queue(id))
            .unwrap_or_else(|| panic!("no queue for {id}: {all:?}"))
            .clone()
    };
    let (_, durable, auto_delete, exclusive, arguments) = find(&classic);
    assert!(durable && !auto_delete && !exclusive);
    assert!(arguments.contains("x-expires"), "{arguments}");
    assert!(!arguments.contains("quorum"), "{arguments}");
    let (_, durable, _, _, arguments) = find(&replicated);
    assert!(durable);
    assert!(arguments.contains("x-queue-type") && arguments.contains("quorum"));
    let reply = p.reply_exchange().replace("_ex_", "_queue_");
    let (_, durable, auto_delete, exclusive, arguments) = all
        .iter()
        .find(|(name, ..)| *name == reply)
        .expect("the proxy's reply queue")
        .clone();
    // It outlives its connection (`proxy::unreadable`), for 30 s unused,
    // and is classic whatever the vhost's default queue type.
    assert!(durable && !auto_delete && !exclusive);
    assert!(arguments.contains("x-expires"), "{arguments}");
    assert!(
        arguments.contains("x-queue-type") && arguments.contains("classic"),
        "{arguments}"
    );
}

/// Whether calls to `id` come to fail with `NoSuchServer` within `limit`.
async fn refused_within(p: &callme::Proxy, id: &str, limit: Duration) -> bool {
    eventually(limit, || async {
        let r = p
            .use_server(id)
            .call_timeout("add", pos(json!([1, 1])), Duration::from_millis(300))
            .await;
        matches!(r, Err(Error::NoSuchServer(_))).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn the_last_host_to_stop_takes_its_queue_along() {
    last_host_takes_the_queue(ServerOptions::default()).await;
}

#[tokio::test]
async fn the_last_host_to_stop_takes_its_quorum_queue_along() {
    last_host_takes_the_queue(quorum()).await;
}

async fn last_host_takes_the_queue(options: ServerOptions) {
    let id = unique("last");
    let first = server(options.clone()).await;
    let second = server(options).await;
    first.serve_native(&id, native_add()).await.unwrap();
    second.serve_native(&id, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(5)).await;
    // One of two leaves: the queue stays for the other.
    first.stop_serving(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..10i64 {
        let sum: i64 = p.use_server(&id).invoke("add", (i, 1)).await.unwrap();
        assert_eq!(sum, i + 1);
    }
    // The last one leaves: callers are told at once, as before any host.
    second.stop_serving(&id).await.unwrap();
    assert!(
        refused_within(&p, &id, Duration::from_secs(10)).await,
        "the queue of {id} outlived its last host"
    );
}

/// A connection to a broker that accepts it and never answers is given up
/// whole when its time runs out, or when its caller gives up first (a
/// timeout of its own around `Proxy::connect`): its socket is closed (and
/// lapin's thread for it ends with it). lapin 4.12 runs a connection on a thread of its
/// own from the start, and the host only dropped the future of one that
/// timed out: the thread and its socket stayed, waiting, one more at each
/// attempt, until the host ran out of descriptors.
#[tokio::test]
async fn a_connection_given_up_leaves_no_socket_open() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let open = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (o, a) = (open.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            // Never a byte back; counted closed at its end.
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while matches!(
                    tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await,
                    Ok(n) if n > 0
                ) {}
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let options = callme::ConnectOptions {
        auto_recover: false,
        ..callme::ConnectOptions::new(format!(
            "amqp://guest:guest@127.0.0.1:{port}/%2f?connection_timeout=300"
        ))
    };
    for _ in 0..5 {
        let e = callme::Proxy::connect_with(&options, Duration::from_secs(1))
            .await
            .err()
            .expect("no broker answers");
        assert!(matches!(e, callme::Error::ConnectTimeout { .. }), "{e}");
    }
    // And 5 given up by their caller, before the handshake's own limit.
    let patient = callme::ConnectOptions {
        auto_recover: false,
        ..callme::ConnectOptions::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
    };
    for _ in 0..5 {
        let connecting = callme::Proxy::connect_with(&patient, Duration::from_secs(1));
        let given_up = tokio::time::timeout(Duration::from_millis(300), connecting).await;
        assert!(given_up.is_err(), "no broker answers");
    }
    let closed = eventually(Duration::from_secs(5), || async {
        (open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    assert!(accepted.load(Ordering::SeqCst) >= 10);
    assert!(
        closed.is_some(),
        "{} of {} connections given up are still open",
        open.load(Ordering::SeqCst),
        accepted.load(Ordering::SeqCst)
    );
}

/// A host whose broker user is at its connection limit waits for a
/// connection to end instead of giving up: RabbitMQ refuses a connection
/// over a user's (or a virtual host's) limit with the same code as a
/// virtual host the user may not open (530, `NOT_ALLOWED`), and the host
/// took it for a refusal and exited. A host restarted while its
/// predecessor's connections still count (until their heartbeats time
/// out) would never come back.
#[tokio::test]
async fn a_host_at_its_users_connection_limit_waits_for_a_connection_to_end() {
    let (user, password) = dedicated_user("climit");
    broker_ctl(&["set_user_limits", &user, r#"{"max-connections": 4}"#]);
    let url = amqp_url_as(&user, &password);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            Connection::connect(&url, ConnectionProperties::default())
                .await
                .unwrap(),
        );
    }
    let refused = callme::Proxy::connect(&url)
        .await
        .err()
        .expect("over the limit");
    assert!(
        !matches!(refused, Error::AccessRefused(_)),
        "the limit was taken for a refusal: {refused:?}"
    );

    let dir = tempdir();
    deploy(
        &plugin_path("calc"),
        &dir,
        &format!("{}.wasm", unique("climit-calc")),
    );
    let mut host = Host::serve(&dir, &["--amqp-url", &url]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        host.child.try_wait().unwrap(),
        None,
        "the host exited: {}",
        host.log_text()
    );
    for conn in held {
        let _ = conn.close(200, "done".into()).await;
    }
    host.wait_ready(Duration::from_secs(30));
    host.terminate();
    host.wait(Duration::from_secs(30));
}

/// An expression for `rabbitmqctl eval` calling `f` (`sys:suspend`,
/// `sys:resume`) on the leader of `id`'s quorum queue (its Ra server).
fn on_leader(id: &str, f: &str) -> String {
    let queue = server_queue(id);
    format!(
        r#"{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), {f}(amqqueue:get_pid(Q))."#
    )
}

/// An id whose queue does not answer holds up no other id of its host:
/// two quorum ids whose leaders are suspended inside the broker, the
/// host's connection closed; while their consumers wait to be set up
/// again (15 s before each is given up), a new id is served and called
/// at once. One lock for the whole host held every change behind them:
/// other ids' consumers, deploys, removals, and stopping.
#[tokio::test]
async fn an_id_whose_queue_does_not_answer_holds_up_no_other_id() {
    let (user, password) = dedicated_user("qstuck");
    let host = callme::Server::connect(
        &callme::ConnectOptions::new(amqp_url_as(&user, &password)),
        quorum(),
    )
    .await
    .unwrap();
    let stuck = [unique("qstuck-a"), unique("qstuck-b")];
    for id in &stuck {
        host.serve_native(id, native_add()).await.unwrap();
    }
    for id in &stuck {
        broker_ctl(&["eval", &on_leader(id, "sys:suspend")]);
    }
    let conn = connection_pid(&user, "callme server").expect("the host's connection");
    broker_ctl(&["close_connection", &conn, "closed by the test"]);
    // Back on a new connection, each stuck id waits for its consumer.
    let reconnected = eventually(Duration::from_secs(10), || async {
        connection_pid(&user, "callme server").filter(|c| *c != conn)
    })
    .await;
    assert!(reconnected.is_some(), "the host did not reconnect");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    let fresh = unique("qfresh");
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        host.serve_native(&fresh, native_add()),
    )
    .await;
    let waited = started.elapsed();
    for id in &stuck {
        broker_ctl(&["eval", &on_leader(id, "sys:resume")]);
    }
    served
        .expect("serving a new id waited for the stuck ones")
        .unwrap();
    assert!(
        waited < Duration::from_secs(5),
        "serving a new id took {waited:?}"
    );
    let p = proxy(Duration::from_secs(30)).await;
    answers_add(&p, &fresh, 2).await;
    for id in &stuck {
        answers_add(&p, id, 3).await;
    }
    host.shutdown(Duration::from_secs(5)).await;
}

/// A host that stops serving an id never deletes its quorum queue while
/// the queue's leader does not answer: RabbitMQ reports such a queue's
/// consumers and messages as 0 and 0 (`rabbit_quorum_queue:stat/2`), and
/// forces a delete its members cannot agree on, taking the queue from
/// under the other hosts consuming from it, which are not told. Here the
/// leader is suspended inside the broker while the leaving host looks
/// (for 8 s), and the other host must still serve the id afterwards.
#[tokio::test]
async fn a_host_leaving_keeps_a_quorum_queue_whose_leader_does_not_answer() {
    let id = unique("qleader");
    let leaving = server(quorum()).await;
    let staying = server(quorum()).await;
    leaving.serve_native(&id, native_add()).await.unwrap();
    staying.serve_native(&id, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(30)).await;
    answers_add(&p, &id, 1).await;
    // The leaving host looks its queue over every 500 ms, and the
    // staying host's consumer keeps it.
    leaving.stop_serving(&id).await.unwrap();
    let queue = server_queue(&id);
    broker_ctl(&["eval", &on_leader(&id, "sys:suspend")]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    broker_ctl(&["eval", &on_leader(&id, "sys:resume")]);
    let listed = broker_ctl(&["list_queues", "name"]);
    assert!(
        listed.lines().any(|l| l.trim() == queue),
        "the quorum queue of {id} was deleted under its other host"
    );
    for i in 0..10 {
        answers_add(&p, &id, i).await;
    }
    staying.shutdown(Duration::from_secs(5)).await;
    leaving.shutdown(Duration::from_secs(5)).await;
}

/// Stopping a quorum id deletes its queue as it does a classic one's, and
/// costs the host's other ids nothing: RabbitMQ refuses `queue.delete`
/// with `if-unused` or `if-empty` on a quorum queue with a connection
/// error (540, `not_implemented`; `rabbit_quorum_queue:delete`, 3.8 to
/// 4.x), which would take every id of the host down with it.
#[tokio::test]
async fn stopping_a_quorum_id_deletes_its_queue_and_keeps_the_hosts_connection() {
    let (user, password) = dedicated_user("qstop");
    let host = callme::Server::connect(
        &callme::ConnectOptions::new(amqp_url_as(&user, &password)),
        quorum(),
    )
    .await
    .unwrap();
    let (gone, kept) = (unique("qgone"), unique("qkept"));
    host.serve_native(&gone, native_add()).await.unwrap();
    host.serve_native(&kept, native_add()).await.unwrap();
    let before = connection_pid(&user, "callme server").expect("the host's connection");
    let p = proxy(Duration::from_secs(5)).await;

    assert!(host.stop_serving(&gone).await.unwrap());
    // Given time: the host deletes the queue once the broker reports it
    // idle, looking every 500 ms, and under a loaded test run the queue
    // has been seen to outlive its host by over 10 s.
    assert!(
        refused_within(&p, &gone, Duration::from_secs(30)).await,
        "the quorum queue of {gone} outlived its last host"
    );
    for i in 0..20i64 {
        let sum: i64 = p.use_server(&kept).invoke("add", (i, 1)).await.unwrap();
        assert_eq!(sum, i + 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        connection_pid(&user, "callme server").as_deref(),
        Some(before.as_str()),
        "stopping one id cost the host its connection"
    );
}

/// A classic id stays classic on a vhost whose default queue type is
/// quorum (`rabbitmqctl add_vhost --default-queue-type quorum`, as 4.x
/// deployments are advised to set): without naming its type, its queue
/// would be made a quorum queue, and stopping the id would delete it with
/// `if-unused`, which the broker answers by closing the host's connection.
#[tokio::test]
async fn a_classic_id_stays_classic_on_a_vhost_that_defaults_to_quorum() {
    let (user, password) = dedicated_user("dqt");
    let vhost = unique("dqt");
    broker_ctl(&["add_vhost", &vhost, "--default-queue-type", "quorum"]);
    broker_ctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
    let url = amqp_url_as(&user, &password);
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    let options = callme::ConnectOptions::new(format!("{base}/{vhost}"));
    let host = callme::Server::connect(&options, ServerOptions::default())
        .await
        .unwrap();
    let (gone, kept) = (unique("dgone"), unique("dkept"));
    host.serve_native(&gone, native_add()).await.unwrap();
    host.serve_native(&kept, native_add()).await.unwrap();
    let types = broker_ctl(&[
        "list_queues",
        "-p",
        &vhost,
        "-q",
        "--no-table-headers",
        "name",
        "type",
    ]);
    for id in [&gone, &kept] {
        let queue = server_queue(id);
        assert!(
            types.lines().any(|l| l == format!("{queue}\tclassic")),
            "{queue} is not classic: {types}"
        );
    }
    let before = connection_pid(&user, "callme server").expect("the host's connection");
    let p = callme::Proxy::connect_with(&options, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(host.stop_serving(&gone).await.unwrap());
    assert!(
        refused_within(&p, &gone, Duration::from_secs(30)).await,
        "the queue of {gone} outlived its last host"
    );
    for i in 0..10 {
        answers_add(&p, &kept, i).await;
    }
    assert_eq!(
        connection_pid(&user, "callme server").as_deref(),
        Some(before.as_str()),
        "stopping one id cost the host its connection"
    );
    host.shutdown(Duration::from_secs(5)).await;
    p.close().await;
    broker_ctl(&["delete_vhost", &vhost]);
}

#[tokio::test]
async fn a_crashed_host_leaves_its_queue_until_it_expires() {
    let id = unique("crashed");
    let host = server(ServerOptions {
        queue_expires: Some(Duration::from_secs(2)),
        ..ServerOptions::default()
    })
    .await;
    host.serve_native(&id, native_add()).await.unwrap();
    // Gone without stopping: the broker sees the connection close.
    drop(host);
    let p = proxy(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = p
        .use_server(&id)
        .call_timeout("add", pos(json!([1, 1])), Duration::from_millis(500))
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(
        refused_within(&p, &id, Duration::from_secs(15)).await,
        "the queue of {id} never expired"
    );
}

#[tokio::test]
async fn a_request_delivered_too_often_is_not_run_again() {
    let id = unique("poison");
    let first = server(quorum()).await;
    first.serve_native(&id, native_add()).await.unwrap();
    // Crash: the quorum queue stays, with nobody consuming.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = proxy(Duration::from_secs(30)).await;
    let call = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.call("add", pos(json!([1, 1]))).await })
    };
    // Taken three times and given back unanswered, as by three hosts
    // that died running it.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut taken = 0;
    while taken < 3 {
        let got = channel
            .basic_get(
                server_queue(&id).as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap();
        match got {
            Some(message) => {
                // `basic.reject`, which every RabbitMQ counts as a failed
                // delivery (4.3 no longer counts a `basic.nack`).
                message
                    .delivery
                    .reject(BasicRejectOptions { requeue: true })
                    .await
                    .unwrap();
                taken += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // The next host refuses to run it a fourth time.
    let runs = Arc::new(AtomicUsize::new(0));
    let mut counting = NativeFunctions::new();
    let counted = runs.clone();
    counting.register("add", "func(a: s64, b: s64) -> s64", move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(json!(2))
    });
    let next = server(quorum()).await;
    next.serve_native(&id, counting).await.unwrap();
    let r = call.await.unwrap();
    match r {
        Err(Error::Remote(e)) => {
            assert_eq!(e.kind, ErrorKind::Internal);
            assert!(e.message.contains("delivered 3 times"), "{}", e.message);
        }
        other => panic!("expected the request refused, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Counted for the operators' poison alert.
    let text = callme::observe::render();
    assert_eq!(
        callme_tests::value(
            &text,
            "callme_requests_refused_total",
            &[("server_id", &id), ("reason", "delivery_limit")]
        ),
        1.0,
        "{text}"
    );
    // A fresh request runs as usual.
    let v = p
        .use_server(&id)
        .call("add", Args::default())
        .await
        .unwrap();
    assert_eq!(v, json!(2));
}

#[tokio::test]
async fn hosts_that_disagree_on_the_queue_are_told_how() {
    let id = unique("disagree");
    let classic = server(ServerOptions::default()).await;
    classic.serve_native(&id, native_add()).await.unwrap();
    let replicated = server(quorum()).await;
    let refused = replicated.serve_native(&id, native_add()).await;
    match refused {
        Err(Error::Config(message)) => {
            assert!(
                message.contains("already exists with other settings"),
                "{message}"
            );
            assert!(message.contains("--queue-type"), "{message}");
            assert!(message.contains("delete_queue"), "{message}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    // The first host is not disturbed.
    let p = proxy(Duration::from_secs(5)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (2, 2)).await.unwrap();
    assert_eq!(sum, 4);
}

#[tokio::test]
async fn a_list_of_brokers_is_tried_in_turn_and_failed_over() {
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let first = Forwarder::start().await;
    let second = Forwarder::start().await;
    let list = format!("{dead},{},{}", first.url(), second.url());
    let options = callme::ConnectOptions::new(list.clone());
    // The dead node is skipped at once; the host lands on the first
    // forwarder.
    let host = callme::Server::connect(&options, ServerOptions::default())
        .await
        .unwrap();
    let id = unique("failover");
    host.serve_native(&id, native_add()).await.unwrap();
    let p = callme::Proxy::connect_with(&options, Duration::from_secs(5))
        .await
        .unwrap();
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    // The host and the proxy are on the first node that answers (each
    // has its connection there; the proxy maybe a second, to publish).
    assert!(first.accepted() >= 2, "{} on the first", first.accepted());
    assert_eq!(second.accepted(), 0, "connections to the second node");
    // That node goes away: both fail over to the next one that answers.
    first.cut();
    let back = eventually(Duration::from_secs(20), || async {
        let r: Result<i64, _> = p.use_server(&id).invoke("add", (2, 2)).await;
        (r.ok() == Some(4)).then_some(())
    })
    .await;
    assert!(back.is_some(), "no failover to the second broker");
    assert!(
        second.accepted() >= 2,
        "{} on the second",
        second.accepted()
    );
    second.cut();
}

/// A host that loses its node fails over past a node of its list that
/// refuses the login, back to one that takes it. The list here is a
/// forwarder, then the broker itself with a wrong password. The refusal
/// ended each round of the reconnection, and each round began at the
/// node after the one lost: the refusing one, for good.
#[tokio::test]
async fn a_node_that_refuses_the_login_is_failed_over_past() {
    let first = Forwarder::start().await;
    let port = first.port();
    let refusing = callme_tests::amqp_url_as("guest", "not-the-password");
    let list = format!("{},{refusing}", first.url());
    let host =
        callme::Server::connect(&callme::ConnectOptions::new(list), ServerOptions::default())
            .await
            .unwrap();
    let id = unique("refused-node");
    host.serve_native(&id, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(5)).await;
    answers_add(&p, &id, 2).await;

    first.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = Forwarder::on(port).await;
    let back = eventually(Duration::from_secs(20), || async {
        let r: Result<i64, _> = p.use_server(&id).invoke("add", (2, 2)).await;
        (r.ok() == Some(4)).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the host never came back past the node that refuses it ({} connections to the first node)",
        first.accepted()
    );
    first.cut();
}

/// A node that closes every connection as soon as it is open (a node
/// being drained, a balancer in front of one) is not reconnected to at
/// the rate of handshakes: such losses back off as failed attempts do,
/// and the link is back at once when a connection lasts again. A proxy
/// reconnected to it every 150 ms or so, logging twice each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_as_soon_as_open_are_reopened_with_backoff() {
    let s = server(ServerOptions::default()).await;
    let id = unique("short-lived");
    s.serve_native(&id, native_add()).await.unwrap();
    let node = Forwarder::start().await;
    let p = proxy_through(std::slice::from_ref(&node)).await;
    answers_add(&p, &id, 2).await;

    node.cut_short(Duration::from_millis(100));
    let before = node.accepted();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let opened = node.accepted() - before;
    // Backing off from 100 ms: about 5 in 3 s; at once: 20 and more.
    assert!(opened <= 10, "{opened} connections in 3 s");

    node.carry_on();
    let back = eventually(Duration::from_secs(10), || async {
        let r: Result<i64, _> = p
            .use_server(&id)
            .with_timeout(Duration::from_secs(2))
            .invoke("add", (2, 2))
            .await;
        (r.ok() == Some(4)).then_some(())
    })
    .await;
    assert!(back.is_some(), "not back once connections last");
}

#[tokio::test]
async fn a_malformed_entry_in_a_list_is_named_without_its_password() {
    let list = format!("{},amqp//guest:s3cretpw@127.0.0.1:5682", amqp_url());
    let refused = callme::Proxy::connect(&list).await;
    let Err(e) = refused else {
        panic!("a malformed list connected");
    };
    let text = e.chain();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    assert!(text.contains("entry 2 of 2"), "{text}");
    assert!(!text.contains("s3cretpw"), "{text}");
    let options =
        callme::ConnectOptions::new("amqp://u:s3cretpw@a:5672/%2f, amqp://v:0therpw@b:5672/%2f");
    let shown = options.redacted();
    assert!(
        !shown.contains("s3cretpw") && !shown.contains("0therpw"),
        "{shown}"
    );
    assert!(
        shown.contains("@a:5672") && shown.contains("@b:5672"),
        "{shown}"
    );
}

/// `slow(ms)`: sleeps, then answers how many times it has run.
fn counted_sleep(runs: Arc<AtomicUsize>) -> NativeFunctions {
    let mut f = NativeFunctions::new();
    f.register("slow", "func(ms: u32) -> u32", move |args: Args| {
        let ms = args.args.first().and_then(|v| v.as_u64()).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(json!(runs.fetch_add(1, Ordering::SeqCst) + 1))
    });
    f
}

/// A proxy (20 s timeout) connecting to the test broker through `nodes`,
/// tried in turn.
async fn proxy_through(nodes: &[Forwarder]) -> callme::Proxy {
    callme::Proxy::connect_with(
        &callme::ConnectOptions::new(Forwarder::list(nodes)),
        Duration::from_secs(20),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_call_lost_with_its_connection_is_sent_again_when_asked() {
    let id = unique("retry");
    let runs = Arc::new(AtomicUsize::new(0));
    let host = server(ServerOptions::default()).await;
    host.serve_native(&id, counted_sleep(runs.clone()))
        .await
        .unwrap();
    let nodes = [
        Forwarder::start().await,
        Forwarder::start().await,
        Forwarder::start().await,
    ];
    let p = proxy_through(&nodes).await;
    // With retry: the connection goes mid-call, the call is sent again on
    // the next node and answered.
    let retried = {
        let sp = p.use_server(&id).with_retry(true);
        tokio::spawn(async move { sp.call("slow", pos(json!([1500]))).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes[0].cut();
    let answer = retried.await.unwrap();
    // It ran twice (the first run's reply went with its connection), and
    // the caller got the second run's answer, once.
    assert_eq!(answer.unwrap(), json!(2));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "runs of the retried call");
    // Without: the caller hears that the connection went.
    let once = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.call("slow", pos(json!([1500]))).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    nodes[1].cut();
    let lost = once.await.unwrap();
    assert!(matches!(lost, Err(Error::Disconnected(_))), "{lost:?}");
    nodes[2].cut();
}

/// A string header of a request.
fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        other => panic!("{name} is not a string: {other:?}"),
    }
}

/// A call sent again is the same call: the same correlation id, the same
/// trace, and an expiration of the time it has left, not a whole timeout
/// again. The test plays the server, so it sees both requests. The first
/// one's reply no longer finds the proxy (its reply exchange went with
/// the connection, and the new connection's has a new name): the reply
/// to the request sent again answers the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_sent_again_keeps_its_correlation_id_trace_and_deadline() {
    let id = unique("resent");
    let mut server = callme_tests::PlayedServer::start(&id).await;
    let nodes = [Forwarder::start().await, Forwarder::start().await];
    let p = proxy_through(&nodes).await;
    let call = {
        let sp = p.use_server(&id).with_retry(true);
        tokio::spawn(async move { sp.call("add", pos(json!([1, 2]))).await })
    };
    let first = server.requests.next_reply(None).await;
    // Some of its 20 s pass before the connection goes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[0].cut();
    let again = server.requests.next_reply(None).await;
    let corr = |d: &lapin::message::Delivery| {
        d.properties
            .correlation_id()
            .as_ref()
            .expect("a correlation id")
            .to_string()
    };
    let expiration = |d: &lapin::message::Delivery| -> u64 {
        d.properties
            .expiration()
            .as_ref()
            .expect("an expiration")
            .as_str()
            .parse()
            .expect("milliseconds")
    };
    assert_eq!(corr(&again), corr(&first), "sent again as another call");
    let trace = header(&first, "traceparent").expect("a traceparent");
    assert_eq!(header(&again, "traceparent"), Some(trace), "another trace");
    assert!(
        expiration(&again) <= expiration(&first) - 1000,
        "sent again with {} ms to live, first with {} ms",
        expiration(&again),
        expiration(&first)
    );
    // The first request's reply goes to a reply exchange that is gone.
    let gone = first
        .properties
        .reply_to()
        .as_ref()
        .expect("a reply address")
        .to_string();
    assert_ne!(
        again.properties.reply_to().as_ref().map(|r| r.to_string()),
        Some(gone),
        "sent again to the lost connection's reply exchange"
    );
    callme_tests::answer(&server.channel, &again, json!(3)).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call was answered")
        .unwrap();
    assert_eq!(answer.ok(), Some(json!(3)));
    nodes[1].cut();
}

/// Declares `exchange` (direct) and an exclusive `queue` bound to it that
/// holds one message and refuses the rest (`x-overflow` `reject-publish`:
/// RabbitMQ nacks a confirmed publish to a full queue, its "Queue Length
/// Limit" guide, 3.7 and later), and fills it.
async fn declare_full_queue(channel: &lapin::Channel, exchange: &str, queue: &str) {
    use lapin::options::QueueDeclareOptions;
    callme_tests::declare_reply_exchange(channel, exchange)
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            callme_tests::reject_publish_over(1),
        )
        .await
        .unwrap();
    callme_tests::bind_queue(channel, queue, exchange).await;
    let filler = lapin::BasicProperties::default();
    publish(channel, "", queue, b"filler", filler).await;
}

/// Publishes `body` to `exchange` with `key`, confirmed.
async fn publish(
    channel: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) {
    use lapin::options::BasicPublishOptions;
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A request whose reply could not be sent is given back once for
/// another try, even if the broker marks it delivered before because of a
/// return the host lived through: here its first run's connection is
/// closed under it, and every reply to its caller is refused (a full
/// reply queue, `reject-publish`). Run on the lost connection, run again
/// with its reply refused, given back, run a third time, refused again,
/// dropped: 3 runs. The host took the broker's `redelivered` as "given
/// back before" and dropped it after the second.
#[tokio::test]
async fn a_request_returned_by_a_lost_connection_still_gets_its_one_retry() {
    let (user, password) = dedicated_user("retry-once");
    let host = callme::Server::connect(
        &callme::ConnectOptions::new(amqp_url_as(&user, &password)),
        ServerOptions::default(),
    )
    .await
    .unwrap();
    let id = unique("retry-once");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut f = NativeFunctions::new();
    let counted = runs.clone();
    f.register("slow-once", "func() -> u32", move |_args: Args| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        Ok(json!(1))
    });
    host.serve_native(&id, f).await.unwrap();

    // A caller whose reply queue is full and refuses more.
    let (_conn, channel) = callme_tests::raw_channel().await;
    let uid = uuid::Uuid::new_v4().to_string();
    let exchange = callme::protocol::client_exchange("guest", &uid);
    let queue = callme::protocol::client_queue("guest", &uid);
    declare_full_queue(&channel, &exchange, &queue).await;
    let request = serde_json::to_vec(&json!({"func": "slow-once"})).unwrap();
    let props = lapin::BasicProperties::default()
        .with_content_type(callme::protocol::CONTENT_TYPE.into())
        .with_reply_to(exchange.as_str().into())
        .with_correlation_id("retry-once-1".into());
    let server = callme::protocol::server_exchange(&id);
    publish(&channel, &server, "", &request, props).await;

    // Its first run loses its connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let conn = connection_pid(&user, "callme server").expect("the host's connection");
    broker_ctl(&["close_connection", &conn, "closed by the test"]);
    let third = eventually(Duration::from_secs(20), || async {
        (runs.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        third.is_some(),
        "run {} times: no retry after the reply failed",
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3, "given back more than once");
    host.shutdown(Duration::from_secs(5)).await;
}

/// A request the broker refuses (a negative confirm) is sent again with
/// retry, until the broker takes it. The server's queue here holds one
/// message and refuses the rest (`x-overflow` `reject-publish`: RabbitMQ
/// nacks a confirmed publish to a full queue, its "Queue Length Limit"
/// guide, 3.7 and later); the test plays the server.
#[tokio::test]
async fn a_request_the_broker_refuses_is_sent_again_with_retry() {
    let id = unique("refused");
    let (_conn, channel) = callme_tests::raw_channel().await;
    let exchange = callme::protocol::server_exchange(&id);
    let queue = server_queue(&id);
    declare_full_queue(&channel, &exchange, &queue).await;
    let p = proxy(Duration::from_secs(20)).await;
    let refused = p.use_server(&id).call("add", pos(json!([1, 2]))).await;
    assert!(
        matches!(refused, Err(Error::Rejected { .. })),
        "{refused:?}"
    );
    // Sent again and refused until its time is up, it ends with the
    // refusal, not a timeout of its own.
    let retried = p
        .use_server(&id)
        .with_retry(true)
        .with_timeout(Duration::from_millis(1500))
        .call("add", pos(json!([1, 2])))
        .await;
    assert!(
        matches!(retried, Err(Error::Rejected { .. })),
        "{retried:?}"
    );

    let call = {
        let sp = p.use_server(&id).with_retry(true);
        tokio::spawn(async move { sp.call("add", pos(json!([1, 2]))).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let get = || async {
        channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    };
    let filler = get().await.expect("the filler");
    assert_eq!(filler.delivery.data, b"filler");
    let request = eventually(Duration::from_secs(10), || async { get().await })
        .await
        .expect("the request, sent again once the queue had room");
    callme_tests::answer(&channel, &request.delivery, json!(3)).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call was answered")
        .unwrap();
    assert_eq!(answer.ok(), Some(json!(3)));
}

/// Retry sends again what the connection lost, not what the broker
/// answered: a call to an id nobody serves is `NoSuchServer` at once.
#[tokio::test]
async fn retry_does_not_send_again_a_call_nobody_serves() {
    let p = proxy(Duration::from_secs(10)).await;
    let r = p
        .use_server(&unique("nobody-retry"))
        .with_retry(true)
        .call_timeout("add", pos(json!([1, 2])), Duration::from_secs(3))
        .await;
    assert!(matches!(r, Err(Error::NoSuchServer(_))), "{r:?}");
}

#[tokio::test]
async fn callers_of_a_reconnecting_host_wait_for_it_rather_than_hear_no_such_server() {
    let id = unique("reconnecting");
    let nodes = [Forwarder::start().await, Forwarder::start().await];
    let list = Forwarder::list(&nodes);
    let host =
        callme::Server::connect(&callme::ConnectOptions::new(list), ServerOptions::default())
            .await
            .unwrap();
    host.serve_native(&id, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (1, 1)).await.unwrap();
    assert_eq!(sum, 2);
    // The host loses its connection; its queue stays, so a call made
    // meanwhile waits and is answered once the host is back.
    nodes[0].cut();
    let started = std::time::Instant::now();
    let sum: Result<i64, _> = p.use_server(&id).invoke("add", (2, 2)).await;
    assert_eq!(sum.ok(), Some(4), "a call during the host's reconnection");
    eprintln!(
        "answered {:?} after the host lost its connection",
        started.elapsed()
    );
    nodes[1].cut();
}

#[tokio::test]
async fn a_sidecar_picks_the_queue_type_and_it_cannot_change_while_served() {
    let dir = callme_tests::tempdir();
    let id = unique("sidecar-quorum");
    std::fs::write(dir.join(format!("{id}.toml")), "queue_type = \"quorum\"\n").unwrap();
    callme_tests::deploy(
        &callme_tests::plugin_path("calc"),
        &dir,
        &format!("{id}.wasm"),
    );
    let mut host = callme_tests::Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    let (_, durable, _, _, arguments) = queues()
        .into_iter()
        .find(|(name, ..)| *name == server_queue(&id))
        .expect("the plugin's queue");
    assert!(durable && arguments.contains("quorum"), "{arguments}");
    // Asking for a classic queue now is refused; the plugin keeps serving.
    std::fs::write(dir.join(format!("{id}.toml")), "queue_type = \"classic\"\n").unwrap();
    let refused = eventually(Duration::from_secs(20), || async {
        host.log_text().contains("cannot switch").then_some(())
    })
    .await;
    assert!(refused.is_some(), "{}", host.log_text());
    let sum: i64 = p.use_server(&id).invoke("add", (2, 2)).await.unwrap();
    assert_eq!(sum, 4);
    // A value that is no queue type is refused by name.
    std::fs::write(
        dir.join(format!("{id}.toml")),
        "queue_type = \"mirrored\"\n",
    )
    .unwrap();
    let named = eventually(Duration::from_secs(20), || async {
        host.log_text().contains("mirrored").then_some(())
    })
    .await;
    assert!(named.is_some(), "{}", host.log_text());
}

/// An id stopped and served again at once is served: the stopped id's
/// queue deletion, which waits for its calls, never deletes the queue the
/// new serving has just declared.
#[tokio::test]
async fn an_id_stopped_and_served_again_at_once_is_served() {
    let host = server(ServerOptions::default()).await;
    let id = unique("again");
    let p = proxy(Duration::from_secs(5)).await;
    host.serve_native(&id, native_add()).await.unwrap();
    for i in 0..30i64 {
        assert!(host.stop_serving(&id).await.unwrap());
        host.serve_native(&id, native_add())
            .await
            .unwrap_or_else(|e| panic!("serving {id} again, round {i}: {e}"));
        answers_add(&p, &id, i).await;
    }
}

/// A host that starts serving an id while the id's last host stops (and
/// deletes its idle queue) serves it all the same.
#[tokio::test]
async fn a_host_starting_as_the_last_one_stops_serves_the_id() {
    let leaving = server(ServerOptions::default()).await;
    let coming = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(5)).await;
    for i in 0..20i64 {
        let id = unique("handover");
        leaving.serve_native(&id, native_add()).await.unwrap();
        let (stopped, served) = tokio::join!(
            leaving.stop_serving(&id),
            coming.serve_native(&id, native_add())
        );
        assert!(stopped.unwrap());
        served.unwrap_or_else(|e| panic!("serving {id}, round {i}: {e}"));
        // Past the leaving host's deletion (it follows its stop at once).
        tokio::time::sleep(Duration::from_millis(100)).await;
        answers_add(&p, &id, i).await;
        coming.stop_serving(&id).await.unwrap();
    }
}

/// A call made while its proxy is reconnecting waits for the connection,
/// within its own timeout, and is answered: it does not fail because the
/// broker happened to be away when it was made. The broker (a forwarder)
/// goes away, a call is made 300 ms later, and the broker comes back
/// 1.5 s after that.
#[tokio::test]
async fn a_call_made_while_its_proxy_reconnects_waits_and_is_answered() {
    let s = server(ServerOptions::default()).await;
    let id = callme_tests::unique("meanwhile");
    s.serve_native(&id, native_add()).await.unwrap();
    let node = Forwarder::start().await;
    let port = node.port();
    let p = callme::Proxy::connect_with(
        &callme::ConnectOptions::new(node.url()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);

    node.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let made = std::time::Instant::now();
    let call = {
        let p = p.clone();
        let id = id.clone();
        tokio::spawn(async move { p.use_server(&id).invoke::<_, i64>("add", (2, 3)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !call.is_finished(),
        "the call ended while the broker was away"
    );
    let _back = Forwarder::on(port).await;
    let answered = call.await.unwrap();
    assert_eq!(answered.unwrap(), 5, "answered once the broker was back");
    assert!(made.elapsed() < Duration::from_secs(10));
}

/// A plugin refused for something outside its file (here its queue,
/// declared classic by another host, where its sidecar asks for quorum)
/// is tried again on the next event about it: once the other host has
/// gone, a `touch` serves it.
#[tokio::test]
async fn a_plugin_refused_for_its_queue_is_served_after_a_touch_once_that_is_fixed() {
    let id = unique("touched");
    let other = server(ServerOptions::default()).await;
    other.serve_native(&id, native_add()).await.unwrap();

    let dir = callme_tests::tempdir();
    std::fs::write(dir.join(format!("{id}.toml")), "queue_type = \"quorum\"\n").unwrap();
    let file = dir.join(format!("{id}.wasm"));
    callme_tests::deploy(
        &callme_tests::plugin_path("calc"),
        &dir,
        &format!("{id}.wasm"),
    );
    let mut host = callme_tests::Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let refused = eventually(Duration::from_secs(20), || async {
        let log = host.log_text();
        log.lines()
            .any(|l| l.contains(&id) && l.contains("refused"))
            .then_some(())
    })
    .await;
    assert!(refused.is_some(), "{}", host.log_text());

    // The other host goes, and its idle queue with it.
    assert!(other.stop_serving(&id).await.unwrap());
    let gone = eventually(Duration::from_secs(20), || async {
        (!queues().iter().any(|(name, ..)| *name == server_queue(&id))).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the classic queue stayed");
    std::fs::File::options()
        .append(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    let p = proxy(Duration::from_secs(5)).await;
    let served = eventually(Duration::from_secs(20), || async {
        p.use_server(&id)
            .invoke::<_, serde_json::Value>("version", ())
            .await
            .ok()
    })
    .await;
    assert_eq!(served, Some(json!("1")), "{}", host.log_text());
    let (_, durable, _, _, arguments) = queues()
        .into_iter()
        .find(|(name, ..)| *name == server_queue(&id))
        .expect("the plugin's queue");
    assert!(durable && arguments.contains("quorum"), "{arguments}");
}

/// The queue-length policy of deploy.md ("A bound on each server's
/// queue") on a served id: with one call running and one waiting, a third
/// is refused by the broker at once (`Rejected`), and the first two are
/// answered. RabbitMQ counts only ready messages against `max-length`
/// ("Queue Length Limit" guide).
#[tokio::test]
async fn a_queue_length_policy_refuses_requests_past_it_at_once() {
    let id = unique("bounded");
    let policy = format!("callme-test-{id}");
    broker_ctl(&[
        "set_policy",
        &policy,
        &format!("^{}$", server_queue(&id).replace('.', "\\.")),
        r#"{"max-length": 1, "overflow": "reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
    let host = callme_tests::server(ServerOptions {
        concurrency: 1,
        ..ServerOptions::default()
    })
    .await;
    let mut f = NativeFunctions::new();
    f.register("slow", "func() -> u32", |_: Args| {
        std::thread::sleep(Duration::from_millis(1500));
        Ok(json!(1))
    });
    host.serve_native(&id, f).await.unwrap();
    let p = proxy(Duration::from_secs(20)).await;
    let call = || {
        let s = p.use_server(&id);
        tokio::spawn(async move { s.call("slow", Args::default()).await })
    };
    let running = call();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let waiting = call();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refused = p.use_server(&id).call("slow", Args::default()).await;
    broker_ctl(&["clear_policy", &policy]);
    assert!(
        matches!(refused, Err(Error::Rejected { .. })),
        "{refused:?}"
    );
    for c in [running, waiting] {
        assert_eq!(c.await.unwrap().unwrap(), json!(1));
    }
    host.shutdown(Duration::from_secs(5)).await;
}

/// A proxy whose connection drops again and again, a second or so apart,
/// answers calls again as soon as it is back each time: its reply
/// consumer waits for the next connection, not for a backoff of its own
/// that grew with each drop (3 s after the sixth, so a call with a 2 s
/// timeout made then failed though the broker was up).
#[tokio::test]
async fn a_proxy_that_loses_its_connection_often_is_back_as_soon_as_it_is() {
    let s = server(ServerOptions::default()).await;
    let id = unique("flapping");
    s.serve_native(&id, native_add()).await.unwrap();
    let mut node = Forwarder::start().await;
    let port = node.port();
    let p = callme::Proxy::connect_with(
        &callme::ConnectOptions::new(node.url()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    answers_add(&p, &id, 0).await;
    for round in 1..=7 {
        node.cut();
        tokio::time::sleep(Duration::from_millis(200)).await;
        node = Forwarder::on(port).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sum = p
            .use_server(&id)
            .with_timeout(Duration::from_secs(2))
            .invoke::<_, i64>("add", (round, 1))
            .await;
        assert_eq!(
            sum.as_ref().ok(),
            Some(&(round + 1)),
            "after drop {round}: {sum:?}"
        );
    }
}
