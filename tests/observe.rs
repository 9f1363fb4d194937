//! The operator's endpoint of `callme serve --metrics-addr`: metrics that count what happened, health, readiness.
//!
//! The metrics are read twice over: straight from `/metrics`, and through
//! a real Prometheus (`scripts/prometheus`, Debian's package), started once
//! for the test run on its own port and stopped when the test process
//! exits (its watchdog follows this process).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callme::protocol::{CONTENT_TYPE, Request, TIMESTAMP_IN_MS, server_exchange};
use callme::{Args, Error, ErrorKind};
use callme_tests::{
    Forwarder, Host, RawClient, amqp_url, deploy, eventually, free_port, http_get, plugin_bytes,
    plugin_path, proxy, repo, samples, scrape, tempdir, unique, url_via, value,
};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts a host serving the calc plugin as a fresh id, with its metrics
/// endpoint on a free port; waits until it is ready.
async fn host_with_calc(prefix: &str, extra: &[&str]) -> (Host, String, u16) {
    host_with("calc", None, prefix, extra).await
}

/// Starts a host serving `plugin` as a fresh id, with `sidecar` as its
/// settings when given, and its metrics endpoint on a free port; waits
/// until it is ready.
async fn host_with(
    plugin: &str,
    sidecar: Option<&str>,
    prefix: &str,
    extra: &[&str],
) -> (Host, String, u16) {
    let dir = tempdir();
    let id = unique(prefix);
    if let Some(settings) = sidecar {
        std::fs::write(dir.join(format!("{id}.toml")), settings).unwrap();
    }
    deploy(&plugin_path(plugin), &dir, &format!("{id}.wasm"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--metrics-addr", addr.as_str()];
    args.extend_from_slice(extra);
    let mut host = Host::serve(&dir, &args);
    host.wait_ready(Duration::from_secs(60));
    let ready = eventually(Duration::from_secs(10), || async {
        (http_get(port, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "not ready: {}", host.log_text());
    (host, id, port)
}

#[tokio::test]
async fn metrics_count_every_call_and_unknown_names_add_no_series() {
    let (host, id, port) = host_with_calc("observed", &[]).await;
    let (status, body) = http_get(port, "/healthz").await;
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

/// A new version swapped in by a change the broker then failed half-way
/// (its new concurrency's prefetch never confirmed, the connection lost)
/// serves, and the metrics say so once the host is back: the version
/// served, and a reload that went well. They went on naming the version
/// before it until the next deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_swapped_in_by_a_change_that_failed_half_way_is_the_one_reported() {
    let node = Forwarder::start().await;
    let broker_port = node.port();
    let dir = tempdir();
    let id = unique("halfway");
    std::fs::write(dir.join(format!("{id}.toml")), "concurrency = 2\n").unwrap();
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut host = Host::serve(&dir, &["--amqp-url", &node.url(), "--metrics-addr", &addr]);
    host.wait_ready(Duration::from_secs(60));
    let old = callme::plugin::content_hash(&plugin_bytes("calc"));
    let new = callme::plugin::content_hash(&plugin_bytes("calc-v2"));
    let info = |text: &str, version: &str| {
        value(
            text,
            "callme_plugin_info",
            &[("server_id", &id), ("version", version)],
        )
    };
    assert_eq!(info(&scrape(port).await, &old), 1.0);

    node.stall();
    // Both files of the new version at once: one change, which swaps the
    // version in and then waits on the broker for the new prefetch.
    let incoming = dir.join(format!(".{id}.toml.incoming"));
    std::fs::write(&incoming, "concurrency = 4\n").unwrap();
    std::fs::rename(&incoming, dir.join(format!("{id}.toml"))).unwrap();
    deploy(&plugin_path("calc-v2"), &dir, &format!("{id}.wasm"));
    // The new prefetch waits 5 s for the broker before it fails.
    tokio::time::sleep(Duration::from_secs(7)).await;
    node.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _node = Forwarder::on(broker_port).await;

    let p = proxy(Duration::from_secs(10)).await;
    let serving = eventually(Duration::from_secs(30), || async {
        let v = p
            .use_server(&id)
            .call("version", Args::default())
            .await
            .ok()?;
        (v == json!("2")).then_some(())
    })
    .await;
    assert!(
        serving.is_some(),
        "the new version is not served: {}",
        host.log_text()
    );
    let told = eventually(Duration::from_secs(20), || async {
        let text = scrape(port).await;
        (info(&text, &new) == 1.0).then_some(text)
    })
    .await;
    let text =
        told.unwrap_or_else(|| panic!("the metrics name another version: {}", host.log_text()));
    assert_eq!(info(&text, &old), 0.0, "{text}");
    assert_eq!(
        value(
            &text,
            "callme_plugin_loads_total",
            &[("server_id", &id), ("action", "reload"), ("outcome", "ok")]
        ),
        1.0,
        "{text}"
    );
}

// Multi-threaded: the forwarder keeps running while the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_connection() {
    let broker_port = free_port();
    let forwarder = Forwarder::on(broker_port).await;
    let url = url_via(broker_port);
    let (host, id, port) = host_with_calc("readyz", &["--amqp-url", &url]).await;
    assert_eq!(
        http_get(port, "/readyz").await,
        (200, "ready\n".to_string())
    );

    forwarder.cut();
    // The consumer may be seen ending before the connection: wait for
    // the connection, which stays down while the forwarder does.
    let down = eventually(Duration::from_secs(10), || async {
        let connected = value(
            &scrape(port).await,
            "callme_broker_connected",
            &[("connection", "server")],
        );
        let (status, reason) = http_get(port, "/readyz").await;
        (status == 503 && connected == 0.0).then_some(reason)
    })
    .await;
    let reason =
        down.unwrap_or_else(|| panic!("still ready without a broker: {}", host.log_text()));
    assert!(reason.contains("broker"), "{reason}");
    assert_eq!(
        http_get(port, "/healthz").await.0,
        200,
        "alive all the same"
    );

    let forwarder = Forwarder::on(broker_port).await;
    let up = eventually(Duration::from_secs(30), || async {
        (http_get(port, "/readyz").await.0 == 200).then_some(())
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
    // Left by a host that was killed: it must not outlive this one either.
    std::fs::write(dir.with_extension("ready"), "1\n").unwrap();
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

/// The private Prometheus of `scripts/prometheus`.
struct Prometheus {
    /// Its HTTP API's address, `127.0.0.1:PORT`.
    addr: String,
    /// The directory of target files it follows.
    targets: PathBuf,
}

/// A target of the test's Prometheus; no longer scraped once dropped.
struct Scraped(PathBuf);

impl Drop for Scraped {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test run's Prometheus: started by the first test that needs it,
/// for this process, so it stops within a second or so of the test
/// binary's exit; a test run in the same tree that finds one running
/// shares it.
fn prometheus() -> &'static Prometheus {
    static PROMETHEUS: OnceLock<Prometheus> = OnceLock::new();
    PROMETHEUS.get_or_init(|| {
        let script = repo().join("scripts/prometheus");
        let pid = std::process::id().to_string();
        let started = std::process::Command::new(&script)
            .args(["start", "--for", &pid])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "scripts/prometheus start failed (installed? scripts/prometheus install): {}",
            String::from_utf8_lossy(&started.stderr)
        );
        let env = std::process::Command::new(&script)
            .arg("env")
            .output()
            .unwrap();
        let env = String::from_utf8(env.stdout).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .map(|v| v.trim_matches('\'').to_string())
                .unwrap_or_else(|| panic!("no {name} in {env}"))
        };
        Prometheus {
            addr: var("CALLME_PROMETHEUS_URL")
                .trim_start_matches("http://")
                .to_string(),
            targets: PathBuf::from(var("CALLME_PROMETHEUS_TARGETS")),
        }
    })
}

/// `text` as a URL's query value.
fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Prometheus {
    /// Scrapes `instance` (`HOST:PORT`) from now on, as target `name`.
    fn scrape(&self, name: &str, instance: &str) -> Scraped {
        let file = self.targets.join(format!("{name}.json"));
        // Written whole under another name, then renamed: Prometheus never
        // reads half a file.
        let partial = self.targets.join(format!("{name}.partial"));
        let targets = json!([{ "targets": [instance], "labels": { "test": name } }]);
        std::fs::write(&partial, targets.to_string()).unwrap();
        std::fs::rename(&partial, &file).unwrap();
        Scraped(file)
    }

    /// `GET path` on the HTTP API: its `data`.
    async fn api(&self, path: &str) -> Value {
        let mut stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Prometheus on {}: {e}", self.addr));
        // HTTP/1.0: the body is never chunked, and ends with the connection.
        let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
        let reply: Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {head}\n{body}"));
        assert_eq!(reply["status"], "success", "{path}: {reply}");
        reply["data"].clone()
    }

    /// The samples of an instant query.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let data = self
            .api(&format!("/api/v1/query?query={}", url_encoded(promql)))
            .await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of `promql`, a query of one sample; `None` when it has none.
    async fn value(&self, promql: &str) -> Option<f64> {
        let samples = self.query(promql).await;
        assert!(samples.len() <= 1, "{promql}: {samples:?}");
        samples.first().map(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{promql}: {s}"))
        })
    }

    /// Waits for a successful scrape of `instance` that started after
    /// `since`: from then on, queries see everything that happened before.
    async fn scraped_after(&self, instance: &str, since: SystemTime) {
        let since = since.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let last_scrape = format!(r#"timestamp(up{{instance="{instance}"}})"#);
        let up = format!(r#"up{{instance="{instance}"}}"#);
        let (this, last_scrape, up) = (self, last_scrape.as_str(), up.as_str());
        // New targets are taken up within 5 s, then scraped every second.
        let scraped = eventually(Duration::from_secs(60), move || async move {
            let at = this.value(last_scrape).await?;
            (at > since && this.value(up).await == Some(1.0)).then_some(())
        })
        .await;
        if scraped.is_none() {
            panic!(
                "Prometheus did not scrape {instance} successfully within 60 s: {}",
                self.api("/api/v1/targets").await
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counts_exactly_the_calls_made() {
    let prom = prometheus();
    let (host, id, port) = host_with_calc("scraped", &[]).await;
    let instance = format!("127.0.0.1:{port}");
    let _scraped = prom.scrape(&id, &instance);
    let p = proxy(Duration::from_secs(10)).await;
    let mut registry = callme::observe::Registry::default();
    p.register_metrics(&mut registry);
    let calc = p.use_server(&id);

    // One call first, so the series exists before the calls counted.
    let two: i64 = calc.invoke("add", (1, 1)).await.unwrap();
    assert_eq!(two, 2);
    let calls = format!(r#"callme_calls_total{{server_id="{id}",function="add",outcome="ok"}}"#);
    prom.scraped_after(&instance, SystemTime::now()).await;
    let before = prom.value(&calls).await;
    assert_eq!(before, Some(1.0));

    const N: i64 = 37;
    for i in 0..N {
        let sum: i64 = calc.invoke("add", (i, 1)).await.unwrap();
        assert_eq!(sum, i + 1);
    }
    prom.scraped_after(&instance, SystemTime::now()).await;
    let after = prom.value(&calls).await;
    assert_eq!(after.zip(before).map(|(a, b)| a - b), Some(N as f64));
    // Every request of the proxy says when it was sent.
    let waits = format!(r#"callme_queue_wait_seconds_count{{server_id="{id}"}}"#);
    assert_eq!(prom.value(&waits).await, Some((N + 1) as f64));
    let fuel = format!(r#"callme_call_fuel_count{{server_id="{id}",function="add"}}"#);
    assert_eq!(prom.value(&fuel).await, Some((N + 1) as f64));

    // Names the id does not export add no label value.
    for i in 0..20 {
        let e = calc
            .call(&format!("made-up-{i}"), Args::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Remote(r) if r.kind == ErrorKind::NoSuchFunction),
            "{e}"
        );
    }
    prom.scraped_after(&instance, SystemTime::now()).await;
    let series = format!(r#"count(callme_calls_total{{server_id="{id}"}})"#);
    assert_eq!(prom.value(&series).await, Some(2.0));
    let functions = prom
        .api(&format!(
            "/api/v1/label/function/values?match[]={}",
            url_encoded(&format!(r#"{{server_id="{id}"}}"#))
        ))
        .await;
    assert_eq!(functions, json!(["_unknown", "add"]));
    let unknown = format!(
        r#"callme_calls_total{{server_id="{id}",function="_unknown",outcome="NoSuchFunction"}}"#
    );
    assert_eq!(prom.value(&unknown).await, Some(20.0));

    // The proxy counted the same calls on its side.
    let e = p
        .use_server(&unique("nobody"))
        .call("add", Args::default())
        .await;
    assert!(matches!(e, Err(Error::NoSuchServer(_))), "{e:?}");
    let mut text = String::new();
    callme::observe::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let client = |function: &str, outcome: &str| {
        value(
            &text,
            "callme_client_calls_total",
            &[
                ("server_id", &id),
                ("function", function),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(client("add", "ok"), (N + 1) as f64, "{text}");
    assert_eq!(client("made-up-3", "NoSuchFunction"), 1.0, "{text}");
    assert_eq!(
        value(
            &text,
            "callme_client_calls_total",
            &[("outcome", "NoSuchServer")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "callme_client_call_duration_seconds_count",
            &[("server_id", &id), ("function", "add")]
        ),
        (N + 1) as f64,
        "{text}"
    );
    drop(host);
}

/// A call its caller gives up on (a timeout of the caller's own, a
/// request handler whose client left) is counted and timed by the proxy
/// as `cancelled`: the calls that went uncounted were the slow ones.
#[tokio::test]
async fn a_call_its_caller_drops_is_counted_as_cancelled() {
    let (host, id, _port) = host_with_calc("dropped", &[]).await;
    let p = proxy(Duration::from_secs(10)).await;
    let mut registry = callme::observe::Registry::default();
    p.register_metrics(&mut registry);
    let calc = p.use_server(&id);
    let given_up = tokio::time::timeout(
        Duration::from_millis(300),
        calc.call("slow-version", callme_tests::pos(json!([3000]))),
    )
    .await;
    assert!(given_up.is_err(), "{given_up:?}");
    let mut text = String::new();
    callme::observe::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let labels = [("server_id", id.as_str()), ("function", "slow-version")];
    let outcome = [labels[0], labels[1], ("outcome", "cancelled")];
    assert_eq!(
        value(&text, "callme_client_calls_total", &outcome),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "callme_client_call_duration_seconds_count", &labels),
        1.0,
        "{text}"
    );
    drop(host);
}

#[tokio::test]
async fn limits_fuel_and_instances_are_counted() {
    let sidecar = "fuel = 10000000\ndeadline_ms = 300\nmemory_bytes = 8388608\nprewarm = 0\n";
    let (host, id, port) = host_with("hostile", Some(sidecar), "limited", &[]).await;
    let p = proxy(Duration::from_secs(10)).await;
    let hostile = p.use_server(&id);
    for (function, args, kind) in [
        ("spin", json!([]), ErrorKind::Timeout),
        ("sleep", json!([2000]), ErrorKind::Timeout),
        ("bomb", json!([]), ErrorKind::MemoryLimit),
    ] {
        let e = hostile
            .call(function, callme_tests::pos(args))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Remote(r) if r.kind == kind),
            "{function}: {e}"
        );
    }
    let text = scrape(port).await;
    for limit in ["fuel", "deadline", "memory"] {
        assert_eq!(
            value(
                &text,
                "callme_call_limits_total",
                &[("server_id", &id), ("limit", limit)]
            ),
            1.0,
            "{limit}: {text}"
        );
    }
    let spin = [("server_id", id.as_str()), ("function", "spin")];
    assert_eq!(value(&text, "callme_call_fuel_count", &spin), 1.0);
    assert!(
        value(&text, "callme_call_fuel_sum", &spin) >= 10_000_000.0,
        "{text}"
    );
    let sleep = [("server_id", id.as_str()), ("function", "sleep")];
    assert!(
        value(&text, "callme_call_fuel_sum", &sleep) < 10_000_000.0,
        "{text}"
    );
    // Without spares, each call made its own instance.
    let made = |purpose: &str| {
        value(
            &text,
            "callme_instances_made_total",
            &[("server_id", &id), ("purpose", purpose)],
        )
    };
    assert_eq!((made("call"), made("spare")), (3.0, 0.0), "{text}");
    assert_eq!(
        value(&text, "callme_instances_kept", &[("server_id", &id)]),
        0.0
    );
    drop(host);
}

#[tokio::test]
async fn spares_made_and_kept_are_counted() {
    let (host, id, port) = host_with("calc", Some("prewarm = 3\n"), "spares", &[]).await;
    let id_is = [("server_id", id.as_str())];
    let kept = eventually(Duration::from_secs(10), || async {
        (value(&scrape(port).await, "callme_instances_kept", &id_is) == 3.0).then_some(())
    })
    .await;
    assert!(kept.is_some(), "{}", scrape(port).await);
    let p = proxy(Duration::from_secs(10)).await;
    const N: i64 = 5;
    for i in 0..N {
        let sum: i64 = p.use_server(&id).invoke("add", (i, 1)).await.unwrap();
        assert_eq!(sum, i + 1);
    }
    // Each call used up an instance, and the spares were made again.
    let settled = eventually(Duration::from_secs(10), || async {
        let text = scrape(port).await;
        let made = |purpose: &str| {
            value(
                &text,
                "callme_instances_made_total",
                &[("server_id", &id), ("purpose", purpose)],
            )
        };
        let kept = value(&text, "callme_instances_kept", &id_is);
        (kept == 3.0 && made("call") + made("spare") == (N + 3) as f64).then_some(())
    })
    .await;
    assert!(settled.is_some(), "{}", scrape(port).await);
    drop(host);
}

/// The queue wait is counted from the `timestamp_in_ms` header of the
/// requests that can be answered; a request that cannot (no `reply_to`),
/// dropped at once, is not, whatever age it claims. A first delivery
/// whose caller wrote `x-delivery-count` itself is run, not refused as
/// delivered too often: the header is the broker's only on a quorum
/// queue's redelivery (`brokers::a_request_delivered_too_often_is_not_run_again`
/// counts a real refusal).
#[tokio::test]
async fn queue_waits_are_counted_and_a_forged_delivery_count_is_not_believed() {
    let (host, id, port) = host_with_calc("refused", &[]).await;
    let mut raw = RawClient::connect().await;
    let body = Request {
        func: "add".into(),
        args: Args::positional(vec![json!(1), json!(2)]),
    }
    .encode();
    // "Delivered a hundred times already", says the caller of a request
    // the broker delivers for the first time: run.
    let mut delivered = FieldTable::default();
    delivered.insert("x-delivery-count".into(), AMQPValue::LongLongInt(100));
    raw.send_with(&id, &body, Some(CONTENT_TYPE), true, Some("c1"), delivered)
        .await;
    assert_eq!(raw.reply_body("c1").await["result"], 3);
    // Sent 3 s ago, as the caller's clock says.
    let stamped_at = |ago: Duration| {
        let sent = SystemTime::now() - ago;
        let ms = sent.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let mut stamped = FieldTable::default();
        stamped.insert(TIMESTAMP_IN_MS.into(), AMQPValue::LongLongInt(ms));
        stamped
    };
    raw.send_with(
        &id,
        &body,
        Some(CONTENT_TYPE),
        true,
        Some("c2"),
        stamped_at(Duration::from_secs(3)),
    )
    .await;
    assert_eq!(raw.reply_body("c2").await["result"], 3);
    // Sent 23 hours ago, it says, and nobody to answer: dropped, and not
    // in the queue wait.
    for _ in 0..20 {
        raw.send_with(
            &id,
            &body,
            Some(CONTENT_TYPE),
            false,
            Some("old"),
            stamped_at(Duration::from_secs(23 * 3600)),
        )
        .await;
    }
    // Not saying when it was sent: not in the queue wait. Answered after
    // the ones above (one queue, taken in order).
    raw.send(&id, &body, Some(CONTENT_TYPE), true, Some("c3"))
        .await;
    assert_eq!(raw.reply_body("c3").await["result"], 3);

    let text = scrape(port).await;
    let id_is = [("server_id", id.as_str())];
    assert_eq!(
        value(
            &text,
            "callme_requests_refused_total",
            &[("server_id", &id), ("reason", "delivery_limit")]
        ),
        0.0,
        "{text}"
    );
    assert_eq!(value(&text, "callme_calls_total", &id_is), 3.0, "{text}");
    assert_eq!(
        value(&text, "callme_queue_wait_seconds_count", &id_is),
        1.0,
        "{text}"
    );
    let waited_3s = [("server_id", id.as_str()), ("le", "2.5")];
    assert_eq!(
        value(&text, "callme_queue_wait_seconds_bucket", &waited_3s),
        0.0,
        "{text}"
    );
    assert!(
        (3.0..60.0).contains(&value(&text, "callme_queue_wait_seconds_sum", &id_is)),
        "{text}"
    );
    drop(host);
}

/// Clients that take every connection of the metrics endpoint and stop
/// reading what it answers can make neither its health probe fail nor
/// the scrapes: beyond the places they hold, a connection still gets one
/// answer, health, readiness and the metrics alike.
#[tokio::test]
async fn clients_holding_every_connection_cannot_fail_the_health_probe_or_the_scrapes() {
    let port = callme_tests::metrics_endpoint().await;
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20_000);
    let mut held = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        // Writes until the endpoint stops reading: it is stuck writing
        // answers nobody reads.
        let _ = tokio::time::timeout(
            Duration::from_millis(300),
            stream.write_all(pipelined.as_bytes()),
        )
        .await;
        held.push(stream);
    }
    let health = tokio::time::timeout(Duration::from_secs(5), http_get(port, "/healthz")).await;
    assert_eq!(health.expect("no answer to /healthz"), (200, "ok\n".into()));
    let ready = tokio::time::timeout(Duration::from_secs(5), http_get(port, "/readyz")).await;
    assert!(ready.is_ok(), "no answer to /readyz");
    let metrics = tokio::time::timeout(Duration::from_secs(5), http_get(port, "/metrics")).await;
    let (status, text) = metrics.expect("no answer to /metrics");
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    drop(held);
}

/// A client that keeps opening connections and sends nothing on them
/// takes every place and every extra one; the oldest extra connection
/// gives way to the newest, so the liveness probe is still answered.
#[tokio::test]
async fn clients_opening_connections_without_end_cannot_fail_the_health_probe() {
    let port = callme_tests::metrics_endpoint().await;
    let mut held = Vec::new();
    // 32 places, 256 extra, and more.
    for _ in 0..(32 + 256 + 40) {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    // Time for the endpoint to take them all in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = tokio::time::timeout(Duration::from_secs(5), http_get(port, "/healthz")).await;
    assert_eq!(health.expect("no answer to /healthz"), (200, "ok\n".into()));
    drop(held);
}

/// A call that finds every instance slot of the host in a call waits for
/// one, and says so: counted by server id, and warned of in the log.
#[tokio::test]
async fn a_call_waiting_for_an_instance_slot_is_counted_and_warned_of() {
    let (host, id, port) = host_with_calc("slot-wait", &["--max-instances", "1"]).await;
    let p = proxy(Duration::from_secs(20)).await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let sp = p.use_server(&id);
            tokio::spawn(async move {
                sp.call("slow-version", callme_tests::pos(json!([400])))
                    .await
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), json!("1"));
    }
    let text = scrape(port).await;
    let waits = callme_tests::value_of(&text, "callme_instance_waits_total", &[("server_id", &id)]);
    assert!(waits.is_some_and(|n| n >= 1.0), "waits counted: {waits:?}");
    let log = host.log_text();
    assert!(
        log.contains("all instance slots are in calls") && log.contains("max_instances=1"),
        "{log}"
    );
}
