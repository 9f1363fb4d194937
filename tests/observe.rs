//! The operator's endpoint of `callme serve --metrics-addr`: metrics that count what happened, health, readiness.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use callme::protocol::server_exchange;
use callme::{Args, Error, ErrorKind};
use callme_tests::{
    Forwarder, Host, amqp_url, deploy, eventually, plugin_bytes, plugin_path, proxy, tempdir,
    unique, url_via,
};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port free now, for a host to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `port`: the status and the body.
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot reach the metrics endpoint on {port}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (status, body.to_string())
}

/// Scrapes `/metrics`.
async fn scrape(port: u16) -> String {
    let (status, body) = get(port, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Every sample of a scrape: name, labels, value.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label=value");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().expect("a number"))
        })
        .collect()
}

/// The sum of the samples of `name` having `labels` (0 when there are none).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Starts a host serving the calc plugin as a fresh id, with its metrics
/// endpoint on a free port; waits until it is ready.
async fn host_with_calc(prefix: &str, extra: &[&str]) -> (Host, String, u16) {
    let dir = tempdir();
    let id = unique(prefix);
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--metrics-addr", addr.as_str()];
    args.extend_from_slice(extra);
    let mut host = Host::serve(&dir, &args);
    host.wait_ready(Duration::from_secs(60));
    let ready = eventually(Duration::from_secs(10), || async {
        (get(port, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "not ready: {}", host.log_text());
    (host, id, port)
}

#[tokio::test]
async fn metrics_count_every_call_and_unknown_names_add_no_series() {
    let (host, id, port) = host_with_calc("observed", &[]).await;
    let (status, body) = get(port, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let calls = |f: &'static str, outcome: &'static str| {
        [
            ("server_id", id.clone()),
            ("function", f.into()),
            ("outcome", outcome.into()),
        ]
    };
    let count = |text: &str, labels: &[(&'static str, String)]| {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        value(text, "callme_calls_total", &labels)
    };
    let before = scrape(port).await;
    let p = proxy(Duration::from_secs(10)).await;
    const N: i64 = 7;
    for i in 0..N {
        let sum: i64 = p.use_server(&id).invoke("add", (i, 1)).await.unwrap();
        assert_eq!(sum, i + 1);
    }
    let after = scrape(port).await;
    assert_eq!(
        count(&after, &calls("add", "ok")) - count(&before, &calls("add", "ok")),
        N as f64,
        "{after}"
    );
    let durations = |text: &str| {
        value(
            text,
            "callme_call_duration_seconds_count",
            &[("server_id", &id), ("function", "add")],
        )
    };
    assert_eq!(durations(&after) - durations(&before), N as f64);

    // Every name a caller makes up is one series, `_unknown`.
    for i in 0..20 {
        let e = p
            .use_server(&id)
            .call(&format!("made-up-{i}"), Args::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Remote(r) if r.kind == ErrorKind::NoSuchFunction),
            "{e}"
        );
    }
    let after = scrape(port).await;
    assert!(!after.contains("made-up"), "{after}");
    assert_eq!(count(&after, &calls("_unknown", "NoSuchFunction")), 20.0);
    let functions: BTreeSet<String> = samples(&after)
        .into_iter()
        .filter(|(_, l, _)| l.get("server_id") == Some(&id))
        .filter_map(|(_, mut l, _)| l.remove("function"))
        .collect();
    assert_eq!(
        functions,
        BTreeSet::from(["add".to_string(), "_unknown".to_string()])
    );

    // What the host serves, and how it stands.
    let version = callme::plugin::content_hash(&plugin_bytes("calc"));
    let id_is = [("server_id", id.as_str())];
    assert_eq!(
        value(
            &after,
            "callme_plugin_info",
            &[("server_id", &id), ("version", &version)]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "callme_plugin_loads_total",
            &[("server_id", &id), ("action", "load"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(value(&after, "callme_consumers", &id_is), 1.0);
    // A request is settled (acked) just after its reply is sent.
    let settled = eventually(Duration::from_secs(5), || async {
        (value(&scrape(port).await, "callme_calls_in_flight", &id_is) == 0.0).then_some(())
    })
    .await;
    assert!(settled.is_some(), "{}", scrape(port).await);
    assert_eq!(
        value(
            &after,
            "callme_broker_connected",
            &[("connection", "server")]
        ),
        1.0
    );

    // A body that is no request, with a reply exchange nobody has: answered
    // with BadRequest, and that reply is undeliverable. One with nowhere
    // to reply: dropped.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    for props in [
        BasicProperties::default()
            .with_reply_to(unique("nobody").as_str().into())
            .with_correlation_id("c".into()),
        BasicProperties::default(),
    ] {
        channel
            .basic_publish(
                server_exchange(&id).as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                b"not json",
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let settled = eventually(Duration::from_secs(10), || async {
        let text = scrape(port).await;
        let answered = value(
            &text,
            "callme_bad_requests_total",
            &[("server_id", &id), ("action", "answered")],
        );
        let dropped = value(
            &text,
            "callme_bad_requests_total",
            &[("server_id", &id), ("action", "dropped")],
        );
        let lost = value(
            &text,
            "callme_undeliverable_replies_total",
            &[("server_id", &id), ("reason", "caller_gone")],
        );
        (answered == 1.0 && dropped == 1.0 && lost == 1.0).then_some(())
    })
    .await;
    assert!(settled.is_some(), "{}", scrape(port).await);
    drop(host);
}

// Multi-threaded: the forwarder keeps running while the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_connection() {
    let broker_port = free_port();
    let forwarder = Forwarder::on(broker_port).await;
    let url = url_via(broker_port);
    let (host, id, port) = host_with_calc("readyz", &["--amqp-url", &url]).await;
    assert_eq!(get(port, "/readyz").await, (200, "ready\n".to_string()));

    forwarder.cut();
    // The consumer may be seen ending before the connection: wait for
    // the connection, which stays down while the forwarder does.
    let down = eventually(Duration::from_secs(10), || async {
        let connected = value(
            &scrape(port).await,
            "callme_broker_connected",
            &[("connection", "server")],
        );
        let (status, reason) = get(port, "/readyz").await;
        (status == 503 && connected == 0.0).then_some(reason)
    })
    .await;
    let reason =
        down.unwrap_or_else(|| panic!("still ready without a broker: {}", host.log_text()));
    assert!(reason.contains("broker"), "{reason}");
    assert_eq!(get(port, "/healthz").await.0, 200, "alive all the same");

    let forwarder = Forwarder::on(broker_port).await;
    let up = eventually(Duration::from_secs(30), || async {
        (get(port, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert!(up.is_some(), "not ready again: {}", host.log_text());
    let text = scrape(port).await;
    assert_eq!(
        value(
            &text,
            "callme_broker_connected",
            &[("connection", "server")]
        ),
        1.0
    );
    assert!(
        value(
            &text,
            "callme_broker_reconnects_total",
            &[("connection", "server")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "callme_consumers", &[("server_id", id.as_str())]),
        1.0
    );
    let p = proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (2, 2)).await.unwrap();
    assert_eq!(sum, 4);
    drop(host);
    forwarder.cut();
}

#[tokio::test]
async fn a_metrics_address_in_use_stops_the_host_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempdir();
    let mut host = Host::serve(&dir, &["--metrics-addr", &addr]);
    let code = host.wait(Duration::from_secs(20));
    assert!(
        code.is_some_and(|c| c != 0),
        "exit code {code:?}: {}",
        host.log_text()
    );
    let log = host.log_text();
    assert!(
        log.contains(&format!("--metrics-addr {addr}")) && log.contains("in use"),
        "{log}"
    );
    assert!(!host.ready_file.exists());
}
