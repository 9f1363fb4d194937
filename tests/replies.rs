//! The reply path under careless and hostile callers: no caller costs another its reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use callme::protocol::{
    Args, REPLY_QUEUE, client_exchange, client_queue, server_exchange, server_queue,
};
use callme::{
    ConnectOptions, Error, ErrorKind, NativeFunctions, Plugin, PluginError, PluginSettings, Proxy,
    Server, ServerOptions,
};
use callme_tests::{
    PlayedServer, RawClient, amqp_url, amqp_url_as, answer, answers_add, broker_ctl,
    connection_pid, declare_reply_exchange, dedicated_user, dedicated_vhost, load, native_add,
    plugin_bytes, pos, proxy, raw_channel, runtime, serve_calc, server, slow_calls, unique,
};
use futures_util::future::join_all;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
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
        let made_up = uuid::Uuid::new_v4().to_string();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(format!("lie-{i}").into());
        // Half of them name a reply queue too, paired with the exchange
        // as a proxy's are, neither of which exists: pipelined while the
        // host is busy, dropped by the broker, and confirmed.
        let props = if i % 2 == 1 {
            props
                .with_reply_to(client_exchange("liar", &made_up).into())
                .with_headers(reply_queue(&client_queue("liar", &made_up)))
        } else {
            props.with_reply_to(format!("no-such-exchange-{made_up}").into())
        };
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

/// Callers that give up before their reply and leave, closing their
/// proxy, which takes their reply queue and exchange with it (the
/// everyday case of a caller with a short timeout).
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
        p.close().await;
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
    pipelined(&srv).await;
    let consumer_conn = connection_pid(&user, "callme server").expect("the host's connection");
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

    // Every lie and good call is acked: each lie's reply found
    // undeliverable or (the ones that name a reply queue, when the host
    // was busy) dropped by the broker and confirmed. (A leaver's request
    // may expire in the queue first.)
    let all_dropped = callme_tests::eventually(Duration::from_secs(20), || {
        let n = srv.undeliverable() + srv.answered();
        let direct = srv.undeliverable();
        async move { (n >= 800 + 4 * 75 && direct >= 400).then_some(n) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    // Most lies that name a reply queue went by the pipeline: of the 800
    // lies, 400 cannot be answered by it, and at most 40 leavers' replies
    // find their caller gone either way.
    let direct = srv.undeliverable();
    assert!(
        direct <= 760,
        "{direct} replies undeliverable: the lies naming a reply queue were not pipelined"
    );
    let (connections, channels) = watcher.await.unwrap();
    eprintln!(
        "flood: {} good calls answered, {left} callers left early, {} replies undeliverable, at most {channels} channels on {connections} connection(s)",
        answered.load(Ordering::Relaxed),
        srv.undeliverable()
    );
    assert_eq!(answered.load(Ordering::Relaxed), 4 * 75);
    assert!(
        all_dropped.is_some(),
        "the lies' requests were not all acked: {} undeliverable, {} answered",
        srv.undeliverable(),
        srv.answered()
    );
    // Its consumer connection and its reply pipeline's.
    assert!(connections <= 2, "{connections} connections");
    assert_eq!(
        connection_pid(&user, "callme server").as_deref(),
        Some(consumer_conn.as_str()),
        "the server lost its connection during the flood"
    );
    // One consumer channel per id, the reply lanes, the pipeline, and a
    // declare or two.
    assert!(channels <= 4 + 64 + 1 + 4, "{channels} channels open");
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

/// Callers that give up before their requests are written (a dropped
/// future, a short timeout, while large requests ahead of theirs are still
/// being sent) cost no other call on the same proxy its reply. A lane
/// given up was closed at once, and lapin sends a channel's `close` ahead
/// of publishes still queued for it: the broker then got a publish on a
/// closed channel and closed the proxy's connection (`CHANNEL_ERROR -
/// expected 'channel.open'`), so the calls in flight beside it lost their
/// replies and ran again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_while_their_requests_are_written_cost_no_other_call() {
    let srv = server(ServerOptions::default()).await;
    let id = unique("written");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut f = NativeFunctions::new();
    let counted = runs.clone();
    f.register("slow", "func() -> s64", move |_: Args| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1500));
        Ok(json!(5))
    });
    f.register("len", "func(s: string) -> u64", |args: Args| {
        Ok(json!(args.args[0].as_str().map_or(0, str::len)))
    });
    srv.serve_native(&id, f).await.unwrap();
    let p = proxy(Duration::from_secs(30)).await;
    let slow = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.invoke::<_, i64>("slow", ()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each round queues large requests, then small ones behind them whose
    // callers give up after a millisecond, most before they are written.
    let big = Arc::new("x".repeat(3 << 20));
    for _ in 0..3 {
        let ahead: Vec<_> = (0..12)
            .map(|_| {
                let (sp, big) = (p.use_server(&id), big.clone());
                tokio::spawn(async move { sp.invoke::<_, u64>("len", (big.as_str(),)).await })
            })
            .collect();
        let mut given_up = 0;
        for _ in 0..60 {
            let sp = p.use_server(&id);
            let call = sp.invoke::<_, u64>("len", ("abc",));
            given_up += usize::from(
                tokio::time::timeout(Duration::from_millis(1), call)
                    .await
                    .is_err(),
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(given_up >= 20, "only {given_up} of 60 calls given up");
        for a in ahead {
            assert_eq!(a.await.expect("task").expect("a large call"), 3 << 20);
        }
    }
    assert_eq!(slow.await.expect("task").expect("the slow call's reply"), 5);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the slow call was sent again: its first reply was lost"
    );
    let n = p
        .use_server(&id)
        .invoke::<_, u64>("len", ("abc",))
        .await
        .unwrap();
    assert_eq!(n, 3);
}

/// A classic queue's process, suspended inside the broker until dropped:
/// the queue takes nothing and confirms nothing meanwhile, as a quorum
/// queue that lost its majority does.
struct Suspended(String);

impl Suspended {
    fn queue(name: &str) -> Suspended {
        let suspended = Suspended(name.to_string());
        broker_ctl(&["eval", &suspended.on_pid("sys:suspend")]);
        suspended
    }

    fn on_pid(&self, f: &str) -> String {
        format!(
            r#"{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{}">>)), {f}(amqqueue:get_pid(Q))."#,
            self.0
        )
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        broker_ctl(&["eval", &self.on_pid("sys:resume")]);
    }
}

/// A server whose queue stops confirming requests holds at most a quarter
/// of a proxy's publish lanes: 80 calls to it wait for their confirms (a
/// request holds its lane until then), and a call to another server on
/// the same proxy is answered meanwhile. Without the bound the 80 took
/// all 64 lanes, and every other call waited with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_confirming_holds_a_quarter_of_a_proxys_lanes() {
    let srv = server(ServerOptions::default()).await;
    let (stuck, healthy) = (unique("unconfirming"), unique("confirming"));
    srv.serve_native(&stuck, native_add()).await.unwrap();
    srv.serve_native(&healthy, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(30)).await;
    answers_add(&p, &stuck, 1).await;
    let suspended = Suspended::queue(&server_queue(&stuck));
    let waiting: Vec<_> = (0..80i64)
        .map(|i| {
            let sp = p.use_server(&stuck);
            tokio::spawn(async move { (i, sp.invoke::<_, i64>("add", (i, 1)).await) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let beside = tokio::time::timeout(
        Duration::from_secs(5),
        p.use_server(&healthy).invoke::<_, i64>("add", (2, 3)),
    )
    .await;
    let done = waiting.iter().filter(|w| w.is_finished()).count();
    drop(suspended);
    assert_eq!(done, 0, "calls to the queue that confirms nothing ended");
    let beside = beside.expect("the call to the other server waited for a lane");
    assert_eq!(beside.expect("the other server's answer"), 5);
    for call in join_all(waiting).await {
        let (i, sum) = call.expect("task");
        assert_eq!(sum.expect("answered once the queue is back"), i + 1);
    }
}

/// A proxy of one publish lane (`channel_max=5` leaves one beside the
/// reply consumer and the channels still closing), with `timeout`.
async fn one_lane_proxy(timeout: Duration) -> Proxy {
    let url = format!("{}?channel_max=5", amqp_url());
    Proxy::connect_with(&ConnectOptions::new(url), timeout)
        .await
        .unwrap()
}

/// Call futures their program stopped polling (a slow consumer of a
/// `buffered` stream, a `select!` on `&mut call`) hold no publish lane:
/// 24 calls polled once and then left, more than a server's share of the
/// lanes, keep no other call to that server from its answer, and each is
/// answered once it is polled again. A request used to be published
/// inside its caller's future, which held its lane and its server's share
/// while nobody polled it: the next call to that server waited for them
/// to its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_left_unpolled_hold_no_lane_from_other_calls() {
    use futures_util::FutureExt;
    let srv = server(ServerOptions::default()).await;
    let id = unique("unpolled");
    srv.serve_native(&id, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(30)).await;
    answers_add(&p, &id, 1).await;
    let mut left: Vec<_> = (0..24i64)
        .map(|i| {
            let sp = p.use_server(&id);
            Box::pin(async move { sp.invoke::<_, i64>("add", (i, 1)).await })
        })
        .collect();
    for call in &mut left {
        assert!(call.now_or_never().is_none(), "answered at its first poll");
    }
    let beside = tokio::time::timeout(
        Duration::from_secs(10),
        p.use_server(&id).invoke::<_, i64>("add", (2, 3)),
    )
    .await;
    let beside = beside.expect("a call waited behind calls nobody polled");
    assert_eq!(beside.expect("its answer"), 5);
    for (i, call) in left.into_iter().enumerate() {
        assert_eq!(
            call.await.expect("answered when polled again"),
            i as i64 + 1
        );
    }
}

/// A call that gives up on a server whose queue confirms nothing lets its
/// publish lane go at once: with one lane, the next call, to another
/// server, is answered, and the proxy's connection is unharmed (the
/// lane's channel is closed after its request, which the queue still
/// gets). The lane used to be kept until the broker confirmed the request,
/// however long after its caller left: one such server per lane stalled
/// every call of the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_on_a_queue_that_confirms_nothing_frees_its_lane() {
    let srv = server(ServerOptions::default()).await;
    let (stuck, healthy) = (unique("given-up"), unique("after-given-up"));
    srv.serve_native(&stuck, native_add()).await.unwrap();
    srv.serve_native(&healthy, native_add()).await.unwrap();
    let p = one_lane_proxy(Duration::from_secs(30)).await;
    answers_add(&p, &stuck, 1).await;
    let suspended = Suspended::queue(&server_queue(&stuck));
    let given_up = p
        .use_server(&stuck)
        .with_timeout(Duration::from_secs(1))
        .invoke::<_, i64>("add", (1, 1))
        .await;
    assert!(
        matches!(given_up, Err(Error::Timeout { .. })),
        "{given_up:?}"
    );
    let beside = tokio::time::timeout(
        Duration::from_secs(10),
        p.use_server(&healthy).invoke::<_, i64>("add", (2, 3)),
    )
    .await;
    drop(suspended);
    let beside = beside.expect("the lane of a call given up was kept for its confirm");
    assert_eq!(beside.expect("the other server's answer"), 5);
    answers_add(&p, &stuck, 7).await;
}

/// A request that waited for a publish lane expires when its call stops
/// waiting, not its whole timeout after it was made: with the one lane
/// held at least 3 s by a request its queue does not confirm, a call with
/// 30 s to wait is published with at most 27 s to live. It used to get
/// the full 30 s, so a server could run it after its caller had left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_for_a_lane_expires_with_its_call() {
    let srv = server(ServerOptions::default()).await;
    let stuck = unique("lane-held");
    srv.serve_native(&stuck, native_add()).await.unwrap();
    let played = unique("lane-waiter");
    let mut waiter = PlayedServer::start(&played).await;
    let p = one_lane_proxy(Duration::from_secs(30)).await;
    answers_add(&p, &stuck, 1).await;
    let suspended = Suspended::queue(&server_queue(&stuck));
    let holder = {
        let sp = p.use_server(&stuck);
        tokio::spawn(async move { sp.invoke::<_, i64>("add", (1, 2)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = {
        let sp = p.use_server(&played).with_timeout(Duration::from_secs(30));
        tokio::spawn(async move { sp.invoke::<_, i64>("add", (3, 4)).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(suspended);
    let request = waiter.requests.next_reply(None).await;
    let expiration: u64 = request
        .properties
        .expiration()
        .as_ref()
        .expect("an expiration")
        .as_str()
        .parse()
        .expect("in milliseconds");
    answer(&waiter.channel, &request, json!(7)).await;
    assert_eq!(waiting.await.expect("task").expect("answered"), 7);
    assert_eq!(holder.await.expect("task").expect("answered"), 3);
    assert!(
        expiration <= 27_000,
        "published after waiting 3 s for a lane with {expiration} ms to live of its 30 s"
    );
}

/// A call waiting for a publish lane as its proxy's connection goes has
/// sent nothing: it waits for the next connection and is sent there,
/// within its timeout, though the proxy does not `retry`. A proxy of one
/// lane, held by a request to a suspended queue; a second call waits for
/// the lane; the broker closes the proxy's connection. The second call
/// used to fail `Connection` as it opened a lane on the connection that
/// had gone ("could not be sent").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_a_lane_as_the_connection_goes_is_sent_on_the_next() {
    let (user, password) = dedicated_user("lane-lost");
    let srv = server(ServerOptions::default()).await;
    let (stuck, id) = (unique("lane-lost-held"), unique("lane-lost"));
    srv.serve_native(&stuck, native_add()).await.unwrap();
    srv.serve_native(&id, native_add()).await.unwrap();
    let url = format!("{}?channel_max=5", amqp_url_as(&user, &password));
    let p = Proxy::connect_with(&ConnectOptions::new(url), Duration::from_secs(30))
        .await
        .unwrap();
    answers_add(&p, &stuck, 1).await;
    let suspended = Suspended::queue(&server_queue(&stuck));
    let holder = {
        let sp = p.use_server(&stuck);
        tokio::spawn(async move { sp.invoke::<_, i64>("add", (1, 2)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.invoke::<_, i64>("add", (3, 4)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished() && !holder.is_finished(),
        "the lane was not held"
    );
    let conn = connection_pid(&user, "callme proxy").expect("the proxy's connection");
    broker_ctl(&["close_connection", &conn, "closed by the test"]);
    let answered = tokio::time::timeout(Duration::from_secs(20), waiting).await;
    drop(suspended);
    assert_eq!(
        answered
            .expect("answered within 20 s")
            .expect("task")
            .expect("answered on the next connection"),
        7
    );
    // The held request was written: it goes with the connection.
    assert!(matches!(
        holder.await.expect("task"),
        Err(Error::Connection(_) | Error::Disconnected(_))
    ));
}

/// A forwarder to the test broker on a port of its own that passes on
/// what its clients write at about `bytes_per_second`, and what the
/// broker writes at once: a proxy behind it has a slow uplink. Its
/// receive buffer is small, so a client's large write waits for it.
async fn slow_uplink(bytes_per_second: usize) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = callme_tests::amqp_host_port();
    let url = amqp_url().replacen(&broker, &format!("127.0.0.1:{port}"), 1);
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let broker = broker.clone();
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(&broker).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_broker, mut to_broker) = upstream.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_broker, &mut to_client).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match from_client.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if to_broker.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let pause = n as f64 / bytes_per_second as f64;
                    tokio::time::sleep(Duration::from_secs_f64(pause)).await;
                }
                down.abort();
            });
        }
    });
    (url, task)
}

/// One caller's large request, written slowly (a slow uplink), holds up
/// no other call's reply: two calls of 1 s and 2 s, then a 12 MiB
/// request that takes many seconds to write (what the socket buffers do
/// not take at once, at 512 KiB/s); both replies come meanwhile and must
/// be handed over. The proxy used to await each acknowledgement of its
/// replies in the loop that hands them over, and lapin writes an ack only
/// after the rest of a publish it has begun: the ack due after the first
/// reply held the second until the large request was written, past the
/// second call's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_on_a_slow_link_holds_no_reply_back() {
    let srv = server(ServerOptions::default()).await;
    let id = serve_calc(&srv, &proxy(Duration::from_secs(10)).await, "slow-uplink").await;
    let (url, forwarder) = slow_uplink(512 << 10).await;
    let p = Proxy::connect_with(&ConnectOptions::new(url), Duration::from_secs(30))
        .await
        .unwrap();
    let _: String = p
        .use_server(&id)
        .invoke("slow-version", (1,))
        .await
        .unwrap();
    let call = |ms: u32, timeout: u64| {
        let sp = p.use_server(&id).with_timeout(Duration::from_secs(timeout));
        tokio::spawn(async move { sp.invoke::<_, String>("slow-version", (ms,)).await })
    };
    let first = call(1000, 10);
    let second = call(2000, 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let large = {
        let sp = p.use_server(&id);
        let arg = "x".repeat(12 << 20);
        tokio::spawn(async move { sp.invoke::<_, i64>("add", (arg, 1)).await })
    };
    first.await.expect("task").expect("the first call answered");
    second
        .await
        .expect("task")
        .expect("the second call answered while the large request is written");
    assert!(
        !large.is_finished(),
        "the large request was written and answered first: the link was not slow enough"
    );
    large.abort();
    forwarder.abort();
}

/// A reply the broker does not confirm (its caller's reply queue stopped
/// confirming, as one on a node cut off from its cluster) holds its
/// call's slot no longer than the server's `reply_confirm_limit`: the
/// request is given back once, run again, and dropped when its reply
/// goes unconfirmed again, and another caller's call, waiting for the
/// one slot, is answered meanwhile. The reply used to wait for its
/// confirm for as long as the queue took, the slot and the request with
/// it, until RabbitMQ's `consumer_timeout` closed the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_the_broker_does_not_confirm_holds_its_slot_only_so_long() {
    let srv = server(ServerOptions {
        concurrency: 1,
        reply_confirm_limit: Duration::from_secs(1),
        ..ServerOptions::default()
    })
    .await;
    let id = unique("unconfirmed-reply");
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let mut f = NativeFunctions::new();
    f.register("add", "func(a: s64, b: s64) -> s64", move |args: Args| {
        counted.fetch_add(1, Ordering::SeqCst);
        let n = |i: usize| args.args.get(i).and_then(serde_json::Value::as_i64);
        Ok(json!(n(0).unwrap_or(0) + n(1).unwrap_or(0)))
    });
    srv.serve_native(&id, f).await.unwrap();
    let stuck = proxy(Duration::from_secs(30)).await;
    answers_add(&stuck, &id, 1).await;
    let exchange = stuck.reply_exchange();
    let (user, uid) = exchange
        .strip_prefix("client_")
        .and_then(|rest| rest.rsplit_once("_ex_"))
        .expect("a reply exchange's name");
    let suspended = Suspended::queue(&client_queue(user, uid));
    let lost = {
        let sp = stuck.use_server(&id);
        tokio::spawn(async move { sp.invoke::<_, i64>("add", (1, 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = proxy(Duration::from_secs(30)).await;
    let beside = tokio::time::timeout(
        Duration::from_secs(15),
        other.use_server(&id).invoke::<_, i64>("add", (2, 3)),
    )
    .await;
    let ran = runs.load(Ordering::SeqCst);
    drop(suspended);
    let beside = beside.expect("a call waited behind a reply the broker did not confirm");
    assert_eq!(beside.expect("the other caller's answer"), 5);
    // The warm-up, the unconfirmed call twice (given back once), the other.
    assert_eq!(ran, 4, "runs");
    // Its replies were written: the queue takes them once resumed.
    assert_eq!(lost.await.expect("task").expect("answered at last"), 2);
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
    let with = |concurrency| PluginSettings {
        concurrency: Some(concurrency),
        ..PluginSettings::default()
    };
    srv.serve_plugin(load("calc", &id, with(3))).await.unwrap();
    let before = srv.plugin(&id).unwrap().hash().to_string();
    // Refused as it is loaded, before a server sees it.
    for bad in [0, 70_000] {
        let refused = Plugin::load(&runtime(), &id, &plugin_bytes("calc-v2"), with(bad));
        assert!(
            matches!(&refused, Err(PluginError::InvalidPlugin { message }) if message.contains("concurrency")),
            "{:?}",
            refused.err()
        );
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

/// The header naming a caller's reply queue, as a proxy sends it.
fn reply_queue(queue: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(REPLY_QUEUE.into(), AMQPValue::LongString(queue.into()));
    headers
}

/// Waits until `srv` pipelines replies.
async fn pipelined(srv: &Server) {
    let up = callme_tests::eventually(Duration::from_secs(30), || {
        let up = srv.replies_pipelined();
        async move { up.then_some(()) }
    })
    .await;
    assert!(up.is_some(), "the host never pipelined its replies");
}

/// Sends `n` requests at once, with `headers`, and takes their replies:
/// how many came pipelined, by the default exchange. Every reply is
/// checked.
async fn burst(client: &mut RawClient, id: &str, n: i64, headers: FieldTable) -> usize {
    send_burst(client, id, n, headers).await;
    let replies = take_replies(client, n as usize).await;
    let mut seen = std::collections::BTreeSet::new();
    for (i, _) in &replies {
        assert!(seen.insert(*i), "two replies to request {i}");
    }
    replies.iter().filter(|(_, piped)| *piped).count()
}

/// Sends `n` requests to `id` at once, `add(i, 1)` for each `i` below
/// `n`, with `headers`.
async fn send_burst(client: &RawClient, id: &str, n: i64, headers: FieldTable) {
    for i in 0..n {
        let body = serde_json::to_vec(&json!({"func": "add", "args": [i, 1]})).unwrap();
        let corr = format!("burst-{i}");
        client
            .send_with(
                id,
                &body,
                Some("application/json"),
                true,
                Some(&corr),
                headers.clone(),
            )
            .await;
    }
}

/// Takes `n` replies to [`send_burst`]: for each, the request it answers
/// (its sum checked) and whether it came pipelined.
async fn take_replies(client: &mut RawClient, n: usize) -> Vec<(i64, bool)> {
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        let reply = client.next_reply(None).await;
        replies.push(burst_reply(&reply));
    }
    replies
}

/// The request a reply to [`send_burst`] answers, its sum checked, and
/// whether it came by the default exchange.
fn burst_reply(reply: &lapin::message::Delivery) -> (i64, bool) {
    let corr = reply.properties.correlation_id().as_ref().unwrap();
    let i: i64 = corr
        .as_str()
        .strip_prefix("burst-")
        .unwrap()
        .parse()
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(body, json!({"result": i + 1}), "the reply to {corr}");
    (i, reply.exchange.as_str().is_empty())
}

/// A host's metrics endpoint, in this process: a function reading how many
/// replies of `id` were pipelined.
async fn pipelined_count() -> impl AsyncFn(&str) -> f64 {
    let port = callme_tests::metrics_endpoint().await;
    move |id: &str| {
        let id = id.to_string();
        async move {
            let text = callme_tests::scrape(port).await;
            callme_tests::value(
                &text,
                "callme_replies_pipelined_total",
                &[("server_id", &id)],
            )
        }
    }
}

/// A busy host pipelines the replies of callers that name their reply
/// queue, and only theirs; a lone call's reply goes by the caller's own
/// exchange, and so does one whose header names something that is not the
/// reply queue paired with its `reply_to` (a server's request queue, or
/// another caller's queue). A proxy names its
/// queue by itself.
#[tokio::test]
async fn replies_under_load_are_pipelined_to_callers_that_name_their_queue() {
    let srv = server(ServerOptions {
        concurrency: 16,
        ..ServerOptions::default()
    })
    .await;
    let id = unique("piped");
    srv.serve_native(&id, slow_add(20)).await.unwrap();
    pipelined(&srv).await;

    let mut client = RawClient::connect().await;
    let queue = client.queue().to_string();
    let by_pipeline = burst(&mut client, &id, 48, reply_queue(&queue)).await;
    // The last two or so are answered once the host is quiet again.
    assert!(by_pipeline >= 40, "{by_pipeline} of 48 replies pipelined");
    assert_eq!(burst(&mut client, &id, 48, FieldTable::default()).await, 0);
    let server_queue = callme::protocol::server_queue(&id);
    assert_eq!(
        burst(&mut client, &id, 48, reply_queue(&server_queue)).await,
        0,
        "a reply was pipelined to a server's request queue"
    );
    // Another caller's reply queue: the reply goes where `reply_to` says,
    // never into the queue the header names.
    let mut other_caller = RawClient::connect().await;
    assert_eq!(
        burst(&mut client, &id, 48, reply_queue(other_caller.queue())).await,
        0,
        "a reply was pipelined to another caller's queue"
    );
    assert!(
        other_caller.try_reply().is_none(),
        "another caller got a reply it did not ask for"
    );
    let lone = burst(&mut client, &id, 1, reply_queue(&queue)).await;
    assert_eq!(lone, 0, "a lone call's reply was pipelined");

    // A proxy's calls under load are pipelined too.
    let count = pipelined_count().await;
    let other = unique("piped");
    srv.serve_native(&other, slow_add(20)).await.unwrap();
    let p = proxy(Duration::from_secs(20)).await;
    let sums = join_all((0..64i64).map(|i| {
        let sp = p.use_server(&other);
        async move { sp.invoke::<_, i64>("add", (i, 1)).await.unwrap() }
    }))
    .await;
    assert_eq!(sums, (1..=64).collect::<Vec<i64>>());
    let piped = count(&other).await;
    assert!(piped >= 32.0, "{piped} of 64 proxy calls pipelined");
}

/// A reply over 1 MiB never goes by the pipeline, even to a caller that
/// names its reply queue on a busy host: it goes by the caller's own
/// exchange. Small replies in the same bursts are pipelined.
#[tokio::test]
async fn large_replies_go_by_the_callers_exchange_under_load() {
    let srv = server(ServerOptions {
        concurrency: 16,
        ..ServerOptions::default()
    })
    .await;
    let id = unique("piped-big");
    let mut natives = slow_add(20);
    natives.register("big", "func(n: u32) -> string", |args: Args| {
        std::thread::sleep(Duration::from_millis(20));
        let n = args
            .args
            .first()
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        Ok(json!("x".repeat(n as usize)))
    });
    srv.serve_native(&id, natives).await.unwrap();
    pipelined(&srv).await;
    let mut client = RawClient::connect().await;
    let queue = client.queue().to_string();
    // A burst of small replies: pipelined.
    let small = burst(&mut client, &id, 32, reply_queue(&queue)).await;
    assert!(small >= 24, "{small} of 32 small replies pipelined");
    // A burst of large ones, just over 1 MiB as JSON, and just under.
    for (n, may_pipeline) in [((1 << 20) + 16, false), ((1 << 20) - 64, true)] {
        for i in 0..24 {
            let body = serde_json::to_vec(&json!({"func": "big", "args": [n]})).unwrap();
            client
                .send_with(
                    &id,
                    &body,
                    Some("application/json"),
                    true,
                    Some(&format!("big-{n}-{i}")),
                    reply_queue(&queue),
                )
                .await;
        }
        let mut piped = 0;
        for _ in 0..24 {
            let reply = client.next_reply(None).await;
            let body: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
            assert_eq!(body["result"].as_str().map(str::len), Some(n));
            piped += usize::from(reply.exchange.as_str().is_empty());
        }
        if may_pipeline {
            assert!(piped > 0, "no reply under 1 MiB was pipelined");
        } else {
            assert_eq!(piped, 0, "{piped} replies over 1 MiB were pipelined");
        }
    }
}

/// An operator who takes the default exchange away from a busy host's
/// user (and closes its reply connection, since the broker applies
/// permissions to new channels), then gives it back, then closes the
/// reply connection again, costs no caller its reply, and the host keeps
/// its consumer connection: the replies in flight go by each caller's
/// exchange meanwhile.
#[tokio::test]
async fn taking_the_pipeline_away_under_load_loses_no_reply() {
    let (user, password) = dedicated_user("revoke");
    let url = dedicated_vhost("revoke", &user, &password);
    let vhost = url.rsplit_once('/').unwrap().1.to_string();
    let srv = Server::connect(
        &ConnectOptions::new(url.clone()),
        ServerOptions {
            concurrency: 16,
            ..ServerOptions::default()
        },
    )
    .await
    .unwrap();
    let id = unique("revoke");
    srv.serve_native(&id, slow_add(20)).await.unwrap();
    pipelined(&srv).await;
    let count = pipelined_count().await;
    let consumer_conn = connection_pid(&user, "callme server").expect("the host's connection");
    let close_replies = || {
        let replies = connection_pid(&user, "callme replies").expect("the reply connection");
        broker_ctl(&["close_connection", &replies, "closed by the test"]);
    };

    let p = Proxy::connect_with(&ConnectOptions::new(url.clone()), Duration::from_secs(30))
        .await
        .unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    // Calls for 20 s, a few at a time.
    const CALLS: i64 = 8000;
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let sp = p.use_server(&id);
            let answered = answered.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(i as u64 * 2500)).await;
                let sum: i64 = sp.invoke("add", (i, 1)).await.expect("a call");
                assert_eq!(sum, i + 1);
                answered.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    while answered.load(Ordering::Relaxed) < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = count(&id).await;
    assert!(first > 100.0, "{first} replies pipelined of 500");

    broker_ctl(&[
        "set_permissions",
        "-p",
        &vhost,
        &user,
        ".*",
        "^(?!amq\\.default$).*",
        ".*",
    ]);
    close_replies();
    let off = callme_tests::eventually(Duration::from_secs(10), || {
        let up = srv.replies_pipelined();
        async move { (!up).then_some(()) }
    })
    .await;
    assert!(off.is_some(), "the host still pipelines without permission");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!srv.replies_pipelined(), "the pipeline came back refused");
    // Refused, the host holds no second connection (but for the moment
    // of each retry).
    let closed = callme_tests::eventually(Duration::from_secs(10), || {
        let left = connection_pid(&user, "callme replies");
        async move { left.is_none().then_some(()) }
    })
    .await;
    assert!(closed.is_some(), "a refused host kept its reply connection");

    broker_ctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
    pipelined(&srv).await;
    let regranted = count(&id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        count(&id).await > regranted,
        "nothing pipelined once allowed again"
    );

    close_replies();
    pipelined(&srv).await;
    let left = CALLS as usize - answered.load(Ordering::Relaxed);
    assert!(
        left > 500,
        "calls ran out before the last step: {left} left"
    );

    for call in join_all(calls).await {
        call.expect("every call answered");
    }
    assert_eq!(answered.load(Ordering::Relaxed), CALLS as usize);
    assert_eq!(
        connection_pid(&user, "callme server").as_deref(),
        Some(consumer_conn.as_str()),
        "the host's consumer connection was replaced"
    );
    drop((p, srv));
    broker_ctl(&["delete_vhost", &vhost]);
}

/// A pipelined reply the broker refuses goes by the caller's own exchange
/// instead, and the pipeline stays up for the others. The queue the header
/// names takes 5 messages and refuses the rest: with `x-overflow` set to
/// `reject-publish`, RabbitMQ nacks a confirmed publish to a full queue
/// (its "Queue Length Limit" guide, 3.7 and later); it is not bound to the
/// caller's exchange, so what reaches the caller's other queue came the
/// other way.
#[tokio::test]
async fn a_refused_pipelined_reply_goes_by_the_callers_exchange() {
    let srv = server(ServerOptions {
        concurrency: 16,
        ..ServerOptions::default()
    })
    .await;
    let id = unique("nacked");
    srv.serve_native(&id, slow_add(20)).await.unwrap();
    pipelined(&srv).await;

    let uid = uuid::Uuid::new_v4().simple().to_string();
    let exchange = client_exchange("guest", &uid);
    let full = client_queue("guest", &uid);
    let (_conn, channel) = raw_channel().await;
    declare_reply_exchange(&channel, &exchange).await.unwrap();
    channel
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            callme_tests::reject_publish_over(5),
        )
        .await
        .unwrap();
    let mut client = RawClient::overhear(&exchange).await;

    send_burst(&client, &id, 48, reply_queue(&full)).await;
    let mut seen = std::collections::BTreeSet::new();
    for (i, piped) in take_replies(&mut client, 43).await {
        assert!(!piped, "the reply to {i} came by the default exchange");
        assert!(seen.insert(i), "two replies to request {i}");
    }
    for _ in 0..5 {
        let got = channel
            .basic_get(full.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("5 replies pipelined into the queue the header names");
        let (i, piped) = burst_reply(&got.delivery);
        assert!(
            piped,
            "the reply to {i} in the named queue came another way"
        );
        assert!(seen.insert(i), "two replies to request {i}");
    }
    assert_eq!(seen, (0..48).collect(), "a reply was lost");
    assert!(client.try_reply().is_none(), "a reply came twice");
    assert!(
        srv.replies_pipelined(),
        "a refused reply closed the pipeline"
    );
}

/// A host's reply pipeline holds a connection of its own while it is up,
/// and it closes with the host; a host told not to pipeline never opens
/// it, and answers every reply by its caller's exchange.
#[tokio::test]
async fn the_reply_connection_is_opened_only_when_asked_and_closes_with_the_host() {
    let (user, password) = dedicated_user("pipeconn");
    let connect = ConnectOptions::new(amqp_url_as(&user, &password));
    let options = ServerOptions {
        concurrency: 16,
        ..ServerOptions::default()
    };
    let srv = Server::connect(&connect, options.clone()).await.unwrap();
    pipelined(&srv).await;
    assert!(connection_pid(&user, "callme replies").is_some());
    srv.shutdown(Duration::from_secs(5)).await;
    let gone = callme_tests::eventually(Duration::from_secs(10), || {
        let left = user_channels(&user).0;
        async move { (left == 0).then_some(()) }
    })
    .await;
    assert!(gone.is_some(), "a connection outlived its host's shutdown");

    let off = Server::connect(
        &connect,
        ServerOptions {
            pipeline_replies: false,
            ..options
        },
    )
    .await
    .unwrap();
    let id = unique("unpiped");
    off.serve_native(&id, slow_add(20)).await.unwrap();
    let mut client = RawClient::connect().await;
    let queue = client.queue().to_string();
    assert_eq!(burst(&mut client, &id, 48, reply_queue(&queue)).await, 0);
    assert!(!off.replies_pipelined());
    assert_eq!(
        user_channels(&user).0,
        1,
        "a host told not to pipeline opened a second connection"
    );
    off.shutdown(Duration::from_secs(5)).await;
}

/// A reply the broker refuses for its size (over `max_message_size`,
/// 16 MiB on the test node as on RabbitMQ 4.x) reaches its caller as a
/// typed error, once, instead of no reply (the request run again, then
/// dropped); and a request too large is refused to its caller by name:
/// by the proxy before it is sent, over the proxy's limit, or by the
/// broker.
#[tokio::test]
async fn a_reply_too_large_for_the_broker_reaches_its_caller_as_an_error() {
    let srv = server(ServerOptions::default()).await;
    let id = unique("toolarge");
    let settings = PluginSettings {
        limits: callme::Limits {
            memory_bytes: 256 << 20,
            result_bytes: 64 << 20,
            ..callme::Limits::default()
        },
        ..PluginSettings::default()
    };
    srv.serve_plugin(load("hostile", &id, settings))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(20)).await;
    let e = p
        .use_server(&id)
        .call("huge", pos(json!([20])))
        .await
        .unwrap_err();
    match e {
        Error::Remote(r) => {
            assert_eq!(r.kind, ErrorKind::MemoryLimit, "{r:?}");
            assert!(r.message.contains("maximum message size"), "{r:?}");
        }
        other => panic!("expected a MemoryLimit reply, got {other:?}"),
    }
    // It ran once, and the host serves on.
    let small: String = p.use_server(&id).invoke("huge", (1,)).await.unwrap();
    assert_eq!(small.len(), 1 << 20);
    assert_eq!(srv.answered(), 2);

    // Over the proxy's own limit, 16 MiB by default: refused unsent.
    let big = "x".repeat(17 << 20);
    let e = p
        .use_server(&id)
        .call("print", pos(json!([big.clone()])))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::TooLarge { reason, .. } if reason.contains("over the proxy's limit")),
        "{e:?}"
    );
    assert_eq!(srv.answered(), 2);
    // Past it, the broker's refusal.
    p.set_max_request_bytes(64 << 20);
    let e = p
        .use_server(&id)
        .call("print", pos(json!([big])))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::TooLarge { reason, .. } if reason.contains("the broker refused it")),
        "{e:?}"
    );
    let small: String = p.use_server(&id).invoke("huge", (1,)).await.unwrap();
    assert_eq!(small.len(), 1 << 20);
}

/// A large reply is read by the call it answers, not by the proxy's one
/// task that takes every reply: another call's reply, come just after
/// it, is handed over at once. The reply task read each body itself, so a
/// server answering with megabytes of JSON (a hostile one, or a plugin's
/// `rpc` callee) held up the replies of every other call on the proxy
/// while it was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_reply_holds_up_no_other_calls_reply() {
    let big_id = unique("big-reply");
    let small_id = unique("small-reply");
    let mut big = callme_tests::PlayedServer::start(&big_id).await;
    let mut small = callme_tests::PlayedServer::start(&small_id).await;
    let p = Arc::new(proxy(Duration::from_secs(60)).await);
    let finished = Arc::new(AtomicUsize::new(0));
    let call = |id: String| {
        let (p, finished) = (p.clone(), finished.clone());
        tokio::spawn(async move {
            let r = p.use_server(&id).call("f", pos(json!([]))).await;
            let order = finished.fetch_add(1, Ordering::SeqCst);
            (r, order, std::time::Instant::now())
        })
    };
    let big_call = call(big_id.clone());
    let small_call = call(small_id.clone());
    let big_request = big.requests.next_reply(None).await;
    let small_request = small.requests.next_reply(None).await;
    // 1.5 million numbers: 11 MB of JSON (under the test broker's 16 MiB
    // message size), long to read in a debug build.
    let numbers: Vec<u32> = (0..1_500_000).collect();
    callme_tests::answer(&big.channel, &big_request, json!(numbers)).await;
    callme_tests::answer(&small.channel, &small_request, json!("small")).await;
    let (small_reply, small_order, small_done) = small_call.await.unwrap();
    let (big_reply, big_order, big_done) = big_call.await.unwrap();
    assert_eq!(small_reply.unwrap(), json!("small"));
    assert_eq!(big_reply.unwrap().as_array().map(Vec::len), Some(1_500_000));
    // Read by its own call, the large reply takes hundreds of
    // milliseconds (360 on the machine this was written on) after the
    // small call is done; read by the reply task, the two calls ended
    // microseconds apart, in either order.
    let ahead = big_done.saturating_duration_since(small_done);
    assert!(
        small_order < big_order && ahead >= Duration::from_millis(50),
        "the small reply waited for the large one to be read (done {ahead:?} before it)"
    );
}

/// A proxy names its reply exchange and queue anew on each connection.
/// Any server it calls learns them, and anyone who may write to them can
/// end its connection with one message lapin cannot read: named as
/// before, they were there to be written to again the moment the proxy
/// was back, and a server it no longer called could keep it down.
#[tokio::test]
async fn a_proxy_names_its_reply_queue_anew_on_each_connection() {
    let (user, password) = dedicated_user("renamed");
    let url = callme_tests::amqp_url_as(&user, &password);
    let srv = Server::connect(&ConnectOptions::new(url.clone()), ServerOptions::default())
        .await
        .unwrap();
    let id = unique("renamed");
    srv.serve_native(&id, native_add()).await.unwrap();
    let p = Proxy::connect_with(&ConnectOptions::new(url), Duration::from_secs(10))
        .await
        .unwrap();
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    let before = p.reply_exchange();

    let conn = connection_pid(&user, "callme proxy").expect("the proxy's connection");
    callme_tests::broker_ctl(&["close_connection", &conn, "closed by the test"]);
    let answered = callme_tests::eventually(Duration::from_secs(15), || async {
        p.use_server(&id).invoke::<_, i64>("add", (2, 3)).await.ok()
    })
    .await;
    assert_eq!(answered, Some(5));
    let after = p.reply_exchange();
    assert_ne!(
        after, before,
        "the same reply exchange on the new connection"
    );
    assert!(after.starts_with(&format!("client_{user}_ex_")), "{after}");
    let queues = callme_tests::broker_ctl(&["list_queues", "-q", "name"]);
    assert!(!queues.contains(&before.replace("_ex_", "_queue_")));
    assert!(queues.contains(&after.replace("_ex_", "_queue_")));
}

/// A proxy of a user of its own calling calc, served under an id of its
/// own, and answered once: what the unreadable-reply tests start from.
struct CalcCaller {
    user: String,
    /// Serves `id` while kept.
    _srv: Server,
    id: String,
    p: Proxy,
    /// The proxy's reply exchange.
    before: String,
    /// The pid of the proxy's connection.
    first: String,
}

/// [`CalcCaller`] for a user and an id named after `name`.
async fn calc_caller(name: &str) -> CalcCaller {
    let (user, password) = dedicated_user(name);
    let srv = server(ServerOptions::default()).await;
    let id = unique(name);
    srv.serve_plugin(load("calc", &id, PluginSettings::default()))
        .await
        .unwrap();
    let url = amqp_url_as(&user, &password);
    let p = Proxy::connect_with(&ConnectOptions::new(url), Duration::from_secs(30))
        .await
        .unwrap();
    answers_add(&p, &id, 1).await;
    let before = p.reply_exchange();
    let first = connection_pid(&user, "callme proxy").expect("the proxy's connection");
    CalcCaller {
        user,
        _srv: srv,
        id,
        p,
        before,
        first,
    }
}

/// A reply the AMQP client cannot read, sent to a proxy's reply exchange
/// (by a server it calls, or anyone else who may write there), ends the
/// proxy's connection. It used to fail every call waiting on it
/// `Disconnected`: their replies went with the connection's exclusive
/// queue. The reply queue now outlives the connection, and the calls
/// waiting get their replies from it, those that reached it before the
/// unreadable one and those that come after. The proxy goes on under new
/// names, and a second unreadable reply to the old ones costs its
/// connection nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_reply_costs_the_calls_waiting_nothing() {
    let CalcCaller {
        user,
        _srv,
        id,
        p,
        before,
        first,
    } = calc_caller("unreadable-reply").await;

    // Replies ahead of the unreadable one: held in the queue's process
    // until it is resumed, then delivered in their order.
    let suspended = Suspended::queue(&before.replace("_ex_", "_queue_"));
    let quick: Vec<_> = (0..4i64)
        .map(|i| {
            let sp = p.use_server(&id);
            tokio::spawn(async move { (i, sp.invoke::<_, i64>("add", (i, 100)).await) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Confirmed once the queue is resumed.
    let unreadable = {
        let exchange = before.clone();
        tokio::spawn(async move { callme_tests::publish_unreadable_to(&exchange).await })
    };
    // Replies behind it: the calls are running when it comes (their
    // requests confirmed: one still on its way to the broker when the
    // connection ends fails with it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let slow = slow_calls(&p, &id, 4, 5000);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(suspended);
    unreadable.await.unwrap();
    // Another to the same (old) names while the slow calls wait for
    // replies there: it ends the connection they are taken on, not the
    // proxy's. (Not in a task of its own: the broker commands below
    // block a thread of the test's, and it must come while the calls
    // wait.)
    callme_tests::publish_unreadable_to(&before).await;

    let second = callme_tests::eventually(Duration::from_secs(15), || async {
        connection_pid(&user, "callme proxy").filter(|pid| *pid != first)
    })
    .await
    .expect("the unreadable reply did not end the proxy's connection");
    for call in quick {
        let (i, sum) = call.await.unwrap();
        assert_eq!(
            sum.unwrap(),
            i + 100,
            "a call made before the unreadable reply"
        );
    }
    let slow = join_all(slow).await;
    for version in slow {
        let version = version.unwrap();
        assert!(version.is_ok(), "a call running when it came: {version:?}");
    }
    answers_add(&p, &id, 2).await;
    assert_ne!(p.reply_exchange(), before, "not named anew");
    assert_eq!(
        connection_pid(&user, "callme proxy"),
        Some(second),
        "the proxy's connection was lost again"
    );
}

/// Calls whose replies are taken from a queue left behind by an
/// unreadable reply are not failed when the proxy's next connection is
/// lost for an ordinary reason (here the broker closes it): their replies
/// come to that queue, read on a connection of its own. Such a loss used
/// to fail every call waiting, those being drained too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_connections_loss_costs_the_calls_being_drained_nothing() {
    let CalcCaller {
        user,
        _srv,
        id,
        p,
        before,
        first,
    } = calc_caller("drained-then-lost").await;
    let slow = slow_calls(&p, &id, 3, 5000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    callme_tests::publish_unreadable_to(&before).await;
    let second = callme_tests::eventually(Duration::from_secs(15), || async {
        connection_pid(&user, "callme proxy").filter(|pid| *pid != first)
    })
    .await
    .expect("the unreadable reply did not end the proxy's connection");
    broker_ctl(&["close_connection", &second, "closed by the test"]);
    callme_tests::eventually(Duration::from_secs(15), || async {
        connection_pid(&user, "callme proxy").filter(|pid| *pid != first && *pid != second)
    })
    .await
    .expect("the proxy did not connect again");
    for version in join_all(slow).await {
        let version = version.unwrap();
        assert!(version.is_ok(), "a call being drained: {version:?}");
    }
    answers_add(&p, &id, 2).await;
}

/// A proxy whose user may no longer declare its reply queue (the
/// permission taken away while it was connected, then its connection
/// lost) fails calls at once with `AccessRefused`, saying why, rather than
/// letting each wait out its timeout as `Disconnected`; given the
/// permission back, it is answered again.
#[tokio::test]
async fn a_proxy_refused_its_reply_queue_says_so_at_once() {
    let (user, password) = dedicated_user("unqueued");
    let s = callme_tests::server(ServerOptions::default()).await;
    let id = unique("unqueued");
    s.serve_native(&id, native_add()).await.unwrap();
    let p = Proxy::connect_with(
        &ConnectOptions::new(callme_tests::amqp_url_as(&user, &password)),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);

    // Configure nothing (no reply exchange or queue), write and read all.
    callme_tests::broker_ctl(&["set_permissions", "-p", "/", &user, "^$", ".*", ".*"]);
    let conn = connection_pid(&user, "callme proxy").expect("the proxy's connection");
    callme_tests::broker_ctl(&["close_connection", &conn, "closed by the test"]);
    let refused = callme_tests::eventually(Duration::from_secs(15), || async {
        match p.use_server(&id).invoke::<_, i64>("add", (2, 3)).await {
            Err(Error::AccessRefused(why)) => Some(why),
            _ => None,
        }
    })
    .await
    .expect("calls refused with AccessRefused");
    assert!(refused.contains("reply queue"), "{refused}");
    // However long it would wait.
    let again = p
        .use_server(&id)
        .with_timeout(Duration::from_secs(3600))
        .invoke::<_, i64>("add", (2, 3))
        .await;
    assert!(matches!(again, Err(Error::AccessRefused(_))), "{again:?}");

    callme_tests::broker_ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let answered = callme_tests::eventually(Duration::from_secs(15), || async {
        p.use_server(&id).invoke::<_, i64>("add", (2, 3)).await.ok()
    })
    .await;
    assert_eq!(answered, Some(5));
}

/// A reply over the proxy's limit, or one of tiny JSON objects that would
/// take the caller many times its size to parse (700,000 empty objects:
/// 2.1 MB of JSON, about 500 MB parsed), is not taken: its call fails
/// `Internal`, naming the limit, and the proxy's next call is answered. A
/// program's proxy used to parse whatever a server sent, up to the
/// broker's largest message (128 MiB in RabbitMQ 3.x: gigabytes parsed),
/// which could end the process and every caller in it.
#[tokio::test]
async fn a_reply_over_the_proxys_limit_is_refused_and_costs_no_other_call() {
    let id = unique("bomb-reply");
    let mut played = callme_tests::PlayedServer::start(&id).await;
    let p = Arc::new(proxy(Duration::from_secs(30)).await);
    assert_eq!(p.max_reply_bytes(), callme::DEFAULT_MAX_REPLY_BYTES);
    let call = || {
        let (p, id) = (p.clone(), id.clone());
        tokio::spawn(async move { p.use_server(&id).call("f", pos(json!([]))).await })
    };
    let refused = |r: Result<serde_json::Value, Error>, why: &str| match r {
        Err(Error::Remote(e)) => {
            assert_eq!(e.kind, ErrorKind::Internal, "{e:?}");
            assert!(
                e.message.contains(why) && e.message.contains("Proxy::set_max_reply_bytes"),
                "{e:?}"
            );
        }
        other => panic!("taken: {:?}", other.map(|v| v.to_string().len())),
    };

    let bombed = call();
    let request = played.requests.next_reply(None).await;
    let empties = (0..700_000).map(|_| json!({})).collect();
    callme_tests::answer(&played.channel, &request, serde_json::Value::Array(empties)).await;
    refused(bombed.await.unwrap(), "JSON objects");

    p.set_max_reply_bytes(1 << 20);
    let long = call();
    let request = played.requests.next_reply(None).await;
    callme_tests::answer(&played.channel, &request, json!("x".repeat(2 << 20))).await;
    refused(long.await.unwrap(), "the limit is 1048576");

    let fine = call();
    let request = played.requests.next_reply(None).await;
    callme_tests::answer(&played.channel, &request, json!("fine")).await;
    assert_eq!(fine.await.unwrap().unwrap(), json!("fine"));
}
