//! Trace context: a call's `traceparent` continued by the server, in its reply and its log.

use std::process::Command;
use std::time::{Duration, Instant};

use callme::{ServerOptions, TraceContext};
use callme_tests::{
    Host, RawClient, callme_bin, deploy, plugin_path, proxy, serve_calc, server, tempdir, unique,
};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

/// Sends `add(a, b)` to `server` under `corr`, with these headers.
async fn send_add(
    raw: &RawClient,
    server: &str,
    corr: &str,
    (a, b): (i64, i64),
    headers: FieldTable,
) {
    let body = json!({"func": "add", "args": [a, b]}).to_string();
    raw.send_with(
        server,
        body.as_bytes(),
        Some("application/json"),
        true,
        Some(corr),
        headers,
    )
    .await;
}

/// Headers holding these string values, as another client sends them.
fn headers(pairs: &[(&str, &str)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert((*k).into(), AMQPValue::LongString((*v).into()));
    }
    table
}

/// A string header of a delivery.
fn header(d: &Delivery, name: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => panic!("{name} is not a string: {other:?}"),
    }
}

/// The reply's trace context, which it must carry.
fn reply_trace(d: &Delivery) -> TraceContext {
    let tp = header(d, "traceparent").expect("the reply carries a traceparent");
    TraceContext::parse(&tp).unwrap_or_else(|| panic!("not a valid traceparent: {tp:?}"))
}

fn body(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data).expect("a JSON reply")
}

/// A traceparent of a trace no one else uses, sampled.
fn known_traceparent() -> String {
    format!("00-{}-00f067aa0ba902b7-01", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_request_traceparent_is_continued_by_the_server() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "traced").await;
    let mut raw = RawClient::connect().await;

    // As the pika and aio-pika OpenTelemetry instrumentations send it.
    let sent = known_traceparent();
    let tracestate = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
    send_add(
        &raw,
        &id,
        "c1",
        (1, 2),
        headers(&[("traceparent", sent.as_str()), ("tracestate", tracestate)]),
    )
    .await;
    let reply = raw.next_reply(Some("c1")).await;
    assert_eq!(body(&reply), json!({"result": 3}));
    let ours = TraceContext::parse(&sent).unwrap();
    let theirs = reply_trace(&reply);
    assert_eq!(theirs.trace_id(), ours.trace_id(), "the same trace");
    assert_ne!(theirs.span_id(), ours.span_id(), "the server's own span");
    assert!(theirs.sampled(), "the sampled flag is kept");
    assert_eq!(header(&reply, "tracestate").as_deref(), Some(tracestate));

    // Each call is a span of its own.
    send_add(
        &raw,
        &id,
        "c2",
        (2, 2),
        headers(&[("traceparent", sent.as_str())]),
    )
    .await;
    let again = reply_trace(&raw.next_reply(Some("c2")).await);
    assert_eq!(again.trace_id(), ours.trace_id());
    assert_ne!(again.span_id(), theirs.span_id());
}

#[tokio::test]
async fn a_malformed_traceparent_is_ignored_and_the_call_answered() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "badtrace").await;
    let mut raw = RawClient::connect().await;

    let upper = format!(
        "00-A{}-00F067AA0BA902B7-01",
        &uuid::Uuid::new_v4().simple().to_string()[1..]
    );
    let cases: Vec<(&str, FieldTable)> = vec![
        ("uppercase hex", headers(&[("traceparent", upper.as_str())])),
        ("too short", headers(&[("traceparent", "00-abc-def-01")])),
        (
            "all-zero trace id",
            headers(&[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )]),
        ),
        ("not a string", {
            let mut t = FieldTable::default();
            t.insert("traceparent".into(), AMQPValue::LongInt(7));
            t
        }),
        ("none at all", FieldTable::default()),
    ];
    let mut seen = Vec::new();
    for (i, (what, h)) in cases.into_iter().enumerate() {
        let corr = format!("m{i}");
        send_add(&raw, &id, &corr, (i as i64, 1), h).await;
        let reply = raw.next_reply(Some(&corr)).await;
        assert_eq!(body(&reply), json!({"result": i as i64 + 1}), "{what}");
        let trace = reply_trace(&reply);
        assert!(!trace.sampled(), "{what}: a new trace is not sampled");
        assert_eq!(header(&reply, "tracestate"), None, "{what}");
        seen.push(trace.trace_id());
    }
    let upper_id = upper.to_lowercase()[3..35].to_string();
    assert!(
        seen.iter().all(|t| t.to_string() != upper_id),
        "the malformed trace is not continued"
    );
    seen.sort_by_key(|t| t.to_bytes());
    seen.dedup();
    assert_eq!(seen.len(), 5, "a new trace per call");
}

#[tokio::test]
async fn the_proxy_sends_the_callers_trace_or_a_new_one() {
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(10)).await;
    let id = serve_calc(&s, &p, "proxytrace").await;
    let mut overheard = RawClient::overhear(&p.reply_exchange()).await;

    let ours = TraceContext::parse(&known_traceparent())
        .unwrap()
        .with_tracestate("rojo=00f067aa0ba902b7");
    let calc = p.use_server(&id).with_trace(ours.clone());
    let sum: i64 = calc.invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    let reply = overheard.next_reply(None).await;
    let theirs = reply_trace(&reply);
    assert_eq!(theirs.trace_id(), ours.trace_id());
    assert_ne!(theirs.span_id(), ours.span_id());
    assert!(theirs.sampled());
    assert_eq!(
        header(&reply, "tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7")
    );

    // Without a trace of the caller's, each call starts its own.
    let plain = p.use_server(&id);
    let mut fresh = Vec::new();
    for _ in 0..2 {
        let sum: i64 = plain.invoke("add", (2, 2)).await.unwrap();
        assert_eq!(sum, 4);
        fresh.push(reply_trace(&overheard.next_reply(None).await).trace_id());
    }
    assert_ne!(fresh[0], ours.trace_id());
    assert_ne!(fresh[0], fresh[1]);
}

#[tokio::test]
async fn every_log_line_of_a_call_names_its_trace() {
    let dir = tempdir();
    let id = unique("tracelog");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::start(Command::new(callme_bin()), &dir, &[], "callme=debug");
    host.wait_ready(Duration::from_secs(60));

    let p = proxy(Duration::from_secs(10)).await;
    let ours = TraceContext::parse(&known_traceparent()).unwrap();
    let trace_id = ours.trace_id().to_string();
    let sum: i64 = p
        .use_server(&id)
        .with_trace(ours.clone())
        .invoke("add", (40, 2))
        .await
        .unwrap();
    assert_eq!(sum, 42);

    // The reply is sent before the last line is written.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = host.log_text();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains(&trace_id))
            .map(str::to_string)
            .collect();
        if lines.iter().any(|l| l.contains("answered")) || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = host.log_text();
    let answered = lines
        .iter()
        .find(|l| l.contains("callme::server") && l.contains("answered"))
        .unwrap_or_else(|| panic!("no `answered` line with trace id {trace_id}:\n{log}"));
    assert!(
        answered.contains(&format!("parent_span_id={}", ours.span_id())),
        "{answered}"
    );
    assert!(answered.contains("function=\"add\""), "{answered}");
    // The plugin's own line, written on the plugin executor, too.
    assert!(
        lines.iter().any(|l| l.contains("callme::plugin")),
        "no plugin line with trace id {trace_id}:\n{log}"
    );
    // And no line about the call without it.
    let stray: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("func=\"add\"") || l.contains("function=\"add\""))
        .filter(|l| !l.contains(&trace_id))
        .collect();
    assert!(
        stray.is_empty(),
        "lines of the call without its trace: {stray:#?}"
    );
}
