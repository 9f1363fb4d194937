//! Plugin capabilities: `config` and `rpc` of `callme:plugin@0.2.0` and outbound HTTP (`wasi:http`), granted per plugin by its sidecar.
//!
//! The `relay` plugin (`plugins/relay`) reads its settings (`setting`),
//! calls `add` of another server (`add-via`) and makes HTTP GETs
//! (`fetch`). These tests grant it settings, secrets, servers and HTTP
//! hosts (of a real HTTP server on 127.0.0.1 that counts its
//! connections), in process and through a `callme serve` host and its
//! sidecar files, and check what it may and may not do.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use callme::plugin::{Capabilities, Config, HttpGrant, RpcGrant};
use callme::protocol::{Args, CALL_DEPTH, server_exchange};
use callme::{
    CallOptions, Error, ErrorKind, NativeFunctions, PluginSettings, RemoteError, ServerOptions,
};
use callme_tests::*;
use serde_json::{Value, json};

/// Settings granting `config` and calls to `servers`.
fn granted(config: &[(&str, &str)], servers: &[&str]) -> PluginSettings {
    PluginSettings {
        capabilities: Capabilities {
            config: Config::plain(config.iter().copied()),
            rpc: RpcGrant::new(
                servers.iter().copied(),
                callme::plugin::DEFAULT_MAX_CALL_DEPTH,
            )
            .expect("valid grant"),
            ..Capabilities::default()
        },
        ..PluginSettings::default()
    }
}

/// The guest's error message of a failed call.
fn guest_error(outcome: Result<Value, Error>) -> String {
    match outcome {
        Err(Error::Remote(RemoteError {
            kind: ErrorKind::GuestError,
            message,
            ..
        })) => message,
        other => panic!("expected a GuestError, got {other:?}"),
    }
}

/// Native `add` functions that count their calls and take `delay` each.
fn counting_add(delay: Duration) -> (NativeFunctions, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut f = NativeFunctions::new();
    f.register("add", "func(a: s64, b: s64) -> s64", move |args: Args| {
        counter.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
        let sum: i64 = args.args.iter().filter_map(Value::as_i64).sum();
        Ok(json!(sum))
    });
    (f, calls)
}

/// A native `add` served under a fresh id, counting its calls, and a raw
/// client hearing every request published to it: the id, the count and
/// the listener.
async fn watched_target(srv: &callme::Server) -> (String, Arc<AtomicUsize>, RawClient) {
    let target = unique("cap-target");
    let (add, calls) = counting_add(Duration::ZERO);
    srv.serve_native(&target, add).await.unwrap();
    let overheard = RawClient::overhear(&server_exchange(&target)).await;
    (target, calls, overheard)
}

/// The call-depth header of the next request `overheard` hears.
async fn depth_sent(overheard: &mut RawClient) -> Option<lapin::types::AMQPValue> {
    let sent = overheard.next_reply(None).await;
    sent.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(CALL_DEPTH).cloned())
}

/// Asserts that `overheard` hears no request within half a second.
async fn nothing_published(overheard: &mut RawClient) {
    let published = tokio::time::timeout(Duration::from_millis(500), overheard.next_reply(None));
    assert!(published.await.is_err(), "a request was published");
}

#[tokio::test]
async fn config_values_reach_the_guest_and_missing_keys_are_none() {
    let p = load(
        "relay",
        "relay",
        granted(&[("greeting", "hello"), ("empty", "")], &[]),
    );
    assert_eq!(
        p.call("setting", &pos(json!(["greeting"]))).await.unwrap(),
        json!("hello")
    );
    assert_eq!(
        p.call("setting", &pos(json!(["empty"]))).await.unwrap(),
        json!("")
    );
    assert_eq!(
        p.call("setting", &pos(json!(["missing"]))).await.unwrap(),
        Value::Null
    );
    assert_eq!(p.capabilities(), ["config", "http", "rpc"]);
}

#[tokio::test]
async fn a_plugin_without_grants_gets_nothing() {
    let p = load("relay", "relay", PluginSettings::default());
    assert_eq!(
        p.call("setting", &pos(json!(["greeting"]))).await.unwrap(),
        Value::Null
    );
    let refused = p.call("add-via", &pos(json!(["calc", 1, 2]))).await;
    let message = match refused {
        Err(callme::PluginError::GuestError { message, .. }) => message,
        other => panic!("expected a GuestError, got {other:?}"),
    };
    assert!(message.starts_with("NotGranted: "), "{message}");
    // Plugins on 0.1.0 import no capability and load as before.
    assert!(
        load("calc", "calc", PluginSettings::default())
            .capabilities()
            .is_empty()
    );
}

#[tokio::test]
async fn add_via_calls_a_served_calc_and_describe_names_the_capabilities() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let calc = serve_calc(&srv, &p, "cap-calc").await;
    let relay = unique("cap-relay");
    srv.serve_plugin(load("relay", &relay, granted(&[], &[&calc])))
        .await
        .unwrap();
    let sum: i64 = p
        .use_server(&relay)
        .invoke("add-via", (&calc, 20, 22))
        .await
        .unwrap();
    assert_eq!(sum, 42);

    let described = p.use_server(&relay).describe().await.unwrap();
    assert_eq!(described["capabilities"], json!(["config", "http", "rpc"]));
    let described = p.use_server(&calc).describe().await.unwrap();
    assert!(described.get("capabilities").is_none(), "{described}");
    srv.shutdown(Duration::from_secs(5)).await;
}

/// A plugin's arguments to another server are refused before they are
/// parsed when their text is larger than a server takes by default (4
/// MiB): parsed, `[0,0,...]` would take the host 16 times its text, outside
/// every limit of the plugin's. Nothing is published; arguments within the
/// limit go out as before.
#[tokio::test]
async fn arguments_larger_than_a_request_may_be_are_refused_before_they_are_parsed() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let (target, _calls, mut overheard) = watched_target(&srv).await;
    let hostile = unique("cap-hostile");
    srv.serve_plugin(load("hostile", &hostile, granted(&[], &[&target])))
        .await
        .unwrap();
    let guest = p.use_server(&hostile);
    let flood = |kib: u32| {
        guest.call(
            "flood-call",
            callme::args_from((&target, kib, "0")).unwrap(),
        )
    };
    let refused = guest_error(flood(5 * 1024).await);
    assert!(
        refused.starts_with("InvalidArguments: the arguments are 5242")
            && refused.contains("at most 4194304"),
        "{refused}"
    );
    nothing_published(&mut overheard).await;
    // 1 KiB goes out, and the target adds its 500 zeros.
    assert_eq!(flood(1).await.unwrap(), json!("0"));
    assert!(depth_sent(&mut overheard).await.is_some(), "not published");
    srv.shutdown(Duration::from_secs(5)).await;
}

/// Arguments within the limit as the plugin wrote them, but over it as
/// the request is written out (`9e15` is sent as `9000000000000000.0`,
/// 18 bytes for 4), are refused before anything is published: they went
/// out at up to 16 MiB on the connection every plugin's calls share,
/// for the server to refuse.
#[tokio::test]
async fn arguments_that_grow_past_a_requests_limit_as_written_out_are_not_sent() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let (target, _calls, mut overheard) = watched_target(&srv).await;
    let hostile = unique("cap-grown");
    srv.serve_plugin(load("hostile", &hostile, granted(&[], &[&target])))
        .await
        .unwrap();
    let guest = p.use_server(&hostile);
    let args = callme::args_from((&target, 3 * 1024u32, "9e15")).unwrap();
    let refused = guest_error(guest.call("flood-call", args).await);
    assert!(refused.starts_with("TooLarge"), "{refused}");
    nothing_published(&mut overheard).await;
    srv.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_server_not_granted_is_refused_in_the_guest_and_nothing_is_published() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let (target, calls, mut overheard) = watched_target(&srv).await;
    let relay = unique("cap-relay");
    srv.serve_plugin(load("relay", &relay, granted(&[], &["someone-else"])))
        .await
        .unwrap();

    let message = guest_error(
        p.use_server(&relay)
            .call("add-via", pos(json!([target, 1, 2])))
            .await,
    );
    assert!(
        message.starts_with("NotGranted: ") && message.contains(&target),
        "{message}"
    );
    nothing_published(&mut overheard).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    srv.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_server_that_does_not_exist_gives_the_guest_no_such_server() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let relay = unique("cap-relay");
    srv.serve_plugin(load("relay", &relay, granted(&[], &["*"])))
        .await
        .unwrap();
    let missing = unique("cap-nobody");
    let started = Instant::now();
    let message = guest_error(
        p.use_server(&relay)
            .call("add-via", pos(json!([missing, 1, 2])))
            .await,
    );
    assert!(
        message.starts_with("NoSuchServer: ") && message.contains(&missing),
        "{message}"
    );
    // At once, not after the deadline.
    assert!(started.elapsed() < Duration::from_secs(5));
    // Counted under `*`, the grant that allowed it: the ids a guest makes
    // up never become series.
    let text = callme::observe::render();
    assert!(!text.contains(&missing), "{text}");
    assert_eq!(
        value(
            &text,
            "callme_plugin_rpc_calls_total",
            &[
                ("server_id", &relay),
                ("target", "*"),
                ("outcome", "NoSuchServer")
            ]
        ),
        1.0,
        "{text}"
    );
    srv.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn calls_carry_their_depth_and_stop_at_the_limit() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let (target, calls, mut overheard) = watched_target(&srv).await;
    let relay = unique("cap-relay");
    let mut settings = granted(&[], &[&target]);
    settings.capabilities.rpc = RpcGrant::new([target.as_str()], 3).unwrap();
    srv.serve_plugin(load("relay", &relay, settings))
        .await
        .unwrap();
    let relay_at = |depth: u32| {
        p.call_with(
            &relay,
            "add-via",
            pos(json!([target, 2, 3])),
            CallOptions::new(Duration::from_secs(30)).with_depth(depth),
        )
    };

    // A client's call (no header, depth 0): the relay's call is one hop on.
    let sum = p
        .use_server(&relay)
        .call("add-via", pos(json!([target, 2, 3])))
        .await
        .unwrap();
    assert_eq!(sum, json!(5));
    let depth = depth_sent(&mut overheard).await;
    assert_eq!(depth, Some(lapin::types::AMQPValue::LongUInt(1)));

    // Called two hops deep, its call is the third: the last one allowed.
    assert_eq!(relay_at(2).await.unwrap(), json!(5));
    let depth = depth_sent(&mut overheard).await;
    assert_eq!(depth, Some(lapin::types::AMQPValue::LongUInt(3)));
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Three hops deep (a cycle's third round): refused before sending.
    let message = guest_error(relay_at(3).await);
    assert!(
        message.starts_with("CallDepthExceeded: call depth limit of 3 reached"),
        "{message}"
    );
    nothing_published(&mut overheard).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    srv.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_call_sends_at_most_its_limit_of_calls_and_the_next_call_starts_afresh() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let (target, calls, _overheard) = watched_target(&srv).await;
    let relay = unique("cap-relay");
    let mut settings = granted(&[], &[&target]);
    settings.capabilities.rpc = settings.capabilities.rpc.with_max_calls(3);
    srv.serve_plugin(load("relay", &relay, settings))
        .await
        .unwrap();
    let relay_calls = async |times: u32| {
        p.use_server(&relay)
            .call("add-via-times", pos(json!([&target, 1, 2, times])))
            .await
    };
    assert_eq!(relay_calls(3).await.unwrap(), json!(3));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // A plugin looping on calls: the fourth is refused in the guest, and
    // never sent.
    let message = guest_error(relay_calls(1000).await);
    assert!(message.starts_with("call 4: TooManyCalls"), "{message}");
    assert!(message.contains("rpc_max_calls"), "{message}");
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    // The count is per call: the next call of the plugin may send 3 again.
    assert_eq!(relay_calls(3).await.unwrap(), json!(3));
    assert_eq!(calls.load(Ordering::SeqCst), 9);
    srv.shutdown(Duration::from_secs(5)).await;
}

/// A plugin's call to another server is one hop of its caller's call: it
/// is sent with what is left of the serving call's deadline as its
/// expiration, continues the caller's trace, and ends with the deadline
/// (the server it calls, played by the test, never answers).
/// A call another server's plugin made ends when its caller stops
/// waiting (the request's `expiration`, which the host's proxy sets to
/// the time the calling call has left), not at its own plugin's later
/// deadline: a plugin with a short deadline calling one with a long one
/// left calls running, holding their slots, long after its own had ended.
/// A client's call runs to its plugin's deadline, whatever its request's
/// `expiration`.
#[tokio::test]
async fn a_sub_call_ends_when_its_caller_stops_waiting() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(20)).await;
    let id = serve_calc(&srv, &p, "cap-ends-by").await;
    let mut raw = RawClient::connect().await;
    let body = callme::protocol::Request {
        func: "slow-version".into(),
        args: pos(json!([3000])),
    }
    .encode();
    let mut sub = lapin::types::FieldTable::default();
    sub.insert(CALL_DEPTH.into(), lapin::types::AMQPValue::LongUInt(1));
    let started = Instant::now();
    raw.send_expiring(&id, &body, "sub", sub, 500).await;
    let reply = raw.reply_body("sub").await;
    assert_eq!(reply["error"]["type"], "Timeout", "{reply}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "ran {:?}",
        started.elapsed()
    );
    raw.send_expiring(
        &id,
        &body,
        "client",
        lapin::types::FieldTable::default(),
        500,
    )
    .await;
    assert_eq!(raw.reply_body("client").await["result"], "1");
    srv.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_sub_call_ends_with_its_callers_deadline_and_continues_its_trace() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(60)).await;
    let slow = unique("cap-slow");
    let mut played = PlayedServer::start(&slow).await;
    let relay = unique("cap-relay");
    let mut settings = granted(&[], &[&slow]);
    settings.limits.deadline = Duration::from_millis(1000);
    srv.serve_plugin(load("relay", &relay, settings))
        .await
        .unwrap();
    let mut outer = RawClient::overhear(&server_exchange(&relay)).await;

    let started = Instant::now();
    let outcome = p
        .use_server(&relay)
        .call("add-via", pos(json!([slow, 1, 2])))
        .await;
    let elapsed = started.elapsed();
    // The guest's sub-call times out with the relay's deadline (or the
    // deadline stops the relay itself): never the proxy's 60 s.
    match &outcome {
        Err(Error::Remote(RemoteError {
            kind: ErrorKind::GuestError,
            message,
            ..
        })) => assert!(message.starts_with("Timeout: "), "{message}"),
        Err(Error::Remote(RemoteError {
            kind: ErrorKind::Timeout,
            ..
        })) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    let request = outer.next_reply(None).await;
    let sub = played.requests.next_reply(None).await;
    assert!(
        played.requests.try_reply().is_none(),
        "the sub-call was sent more than once"
    );
    let expiration: u64 = sub
        .properties
        .expiration()
        .as_ref()
        .expect("the sub-call has an expiration")
        .as_str()
        .parse()
        .expect("milliseconds");
    assert!(
        expiration <= 1000,
        "the sub-call may wait {expiration} ms, past its caller's 1000 ms deadline"
    );
    let traceparent = |d: &lapin::message::Delivery| match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent").cloned())
    {
        Some(lapin::types::AMQPValue::LongString(s)) => {
            String::from_utf8_lossy(s.as_bytes()).into_owned()
        }
        other => panic!("no traceparent: {other:?}"),
    };
    // `00-TRACE-SPAN-FLAGS`: the same trace, a span of its own.
    let (caller, hop) = (traceparent(&request), traceparent(&sub));
    let parts = |t: &str| t.split('-').map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        parts(&hop)[1],
        parts(&caller)[1],
        "{hop} is not in {caller}'s trace"
    );
    assert_ne!(
        parts(&hop)[2],
        parts(&caller)[2],
        "{hop} has its caller's span"
    );
    srv.shutdown(Duration::from_secs(1)).await;
}

/// Starts `callme serve` on `dir` with `env` set, logging everything of
/// callme's (trace level, so a secret logged anywhere is seen).
fn serve_with_env(dir: &std::path::Path, env: &[(&str, &str)]) -> Host {
    let mut command = Command::new(callme_bin());
    command.envs(env.iter().copied());
    Host::start(command, dir, &[], "callme=trace")
}

#[tokio::test]
async fn a_secret_reaches_the_guest_but_not_describe_the_log_or_errors() {
    let dir = tempdir();
    let relay = unique("cap-secret");
    let secret = format!("s3cret-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(
        dir.join(format!("{relay}.toml")),
        "rpc = [\"nobody-here\"]\n[config]\ntoken = \"${CALLME_SECRET_TEST_RELAY_TOKEN}\"\nplain = \"visible\"\n",
    )
    .unwrap();
    deploy(&plugin_path("relay"), &dir, &format!("{relay}.wasm"));
    let mut host = serve_with_env(&dir, &[("CALLME_SECRET_TEST_RELAY_TOKEN", &secret)]);
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(30)).await;
    let sp = p.use_server(&relay);

    assert_eq!(
        sp.call("setting", pos(json!(["token"]))).await.unwrap(),
        json!(secret)
    );
    assert_eq!(
        sp.call("setting", pos(json!(["plain"]))).await.unwrap(),
        json!("visible")
    );
    let described = sp.describe().await.unwrap().to_string();
    assert!(!described.contains(&secret), "{described}");
    for failing in [
        sp.call("add-via", pos(json!(["elsewhere", 1, 2]))).await,
        sp.call("setting", pos(json!([1]))).await,
        sp.call("no-such-function", pos(json!(["token"]))).await,
    ] {
        let e = failing.unwrap_err();
        assert!(!format!("{e:?}").contains(&secret), "{e:?}");
    }
    host.terminate();
    host.wait(Duration::from_secs(10));
    let log = host.log_text();
    assert!(
        log.contains(&relay),
        "the log says nothing of the plugin: {log}"
    );
    assert!(!log.contains(&secret), "the secret is in the log: {log}");
}

#[tokio::test]
async fn a_missing_environment_variable_is_a_load_error_naming_the_key() {
    let dir = tempdir();
    let relay = unique("cap-unset");
    let var = format!("CALLME_SECRET_TEST_UNSET_{}", uuid::Uuid::new_v4().simple());
    std::fs::write(
        dir.join(format!("{relay}.toml")),
        format!("[config]\napi_key = \"${{{var}}}\"\n"),
    )
    .unwrap();
    deploy(&plugin_path("relay"), &dir, &format!("{relay}.wasm"));
    let mut host = serve_with_env(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let log = host.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("invalid settings") && l.contains(&relay))
        .unwrap_or_else(|| panic!("no load error for {relay}: {log}"));
    assert!(line.contains("api_key") && line.contains(&var), "{line}");

    let p = proxy(Duration::from_secs(10)).await;
    let outcome = p
        .use_server(&relay)
        .call("setting", pos(json!(["api_key"])))
        .await;
    assert!(
        matches!(outcome, Err(Error::NoSuchServer(_))),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_sidecar_reaches_only_the_variables_named_as_plugin_secrets() {
    // The host's environment holds more than plugin secrets: here a
    // cluster's broker URLs, with their password, as `scripts/broker
    // cluster env` exports them for the host.
    let dir = tempdir();
    let relay = unique("cap-hostenv");
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let urls = format!("amqp://ops:{password}@node1:5672/%2f");
    std::fs::write(
        dir.join(format!("{relay}.toml")),
        "[config]\nbroker = \"${CALLME_CLUSTER_URLS}\"\n",
    )
    .unwrap();
    deploy(&plugin_path("relay"), &dir, &format!("{relay}.wasm"));
    let mut host = serve_with_env(&dir, &[("CALLME_CLUSTER_URLS", &urls)]);
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(10)).await;
    let outcome = p
        .use_server(&relay)
        .call("setting", pos(json!(["broker"])))
        .await;
    assert!(
        matches!(outcome, Err(Error::NoSuchServer(_))),
        "a plugin was served the host's variable: {outcome:?}"
    );
    host.terminate();
    host.wait(Duration::from_secs(10));
    let log = host.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("invalid settings") && l.contains(&relay))
        .unwrap_or_else(|| panic!("no load error for {relay}: {log}"));
    assert!(
        line.contains("not a plugin secret") && line.contains("CALLME_CLUSTER_URLS"),
        "{line}"
    );
    assert!(
        !log.contains(&password),
        "the variable's value is in the log: {log}"
    );
}

#[tokio::test]
async fn grants_apply_on_hot_deploy() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let calc = serve_calc(&srv, &p, "cap-calc").await;

    let dir = tempdir();
    let relay = unique("cap-hot");
    deploy(&plugin_path("relay"), &dir, &format!("{relay}.wasm"));
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let sp = p.use_server(&relay);
    let message = guest_error(sp.call("add-via", pos(json!([calc, 1, 2]))).await);
    assert!(message.starts_with("NotGranted: "), "{message}");

    let sidecar = dir.join(format!(".{relay}.toml.incoming"));
    std::fs::write(
        &sidecar,
        format!("rpc = [\"{calc}\"]\n[config]\ngreeting = \"hi\"\n"),
    )
    .unwrap();
    std::fs::rename(&sidecar, dir.join(format!("{relay}.toml"))).unwrap();
    let granted = eventually(Duration::from_secs(30), || {
        let sp = sp.clone();
        let calc = calc.clone();
        async move {
            let sum = sp.call("add-via", pos(json!([calc, 1, 2]))).await.ok()?;
            (sum == json!(3)).then_some(())
        }
    })
    .await;
    assert!(
        granted.is_some(),
        "the grant was not applied: {}",
        host.log_text()
    );
    assert_eq!(
        sp.call("setting", pos(json!(["greeting"]))).await.unwrap(),
        json!("hi")
    );
    srv.shutdown(Duration::from_secs(5)).await;
}

/// What the test's HTTP server answers.
#[derive(Clone, Copy)]
enum Answer {
    /// `200 OK` with this many bytes of `x` (after `hello from the test
    /// server`), with a `Content-Length`.
    Body(usize),
    /// `200 OK` with this many bytes of `x`, without a length: the body
    /// ends when the connection closes.
    Unsized(usize),
    /// Reads the request and never answers.
    Never,
    /// Sends the headers and the start of the body, then nothing more.
    Stalls,
    /// Reads the request, never answers, and reads on until the client
    /// closes the connection (counted in [`HttpServer::open`]).
    Hold,
    /// As [`Answer::Hold`], after sending the headers and the start of a
    /// body: the client has its response and holds its connection.
    HoldAnswered,
    /// `200 OK` with a header this many bytes long, and the body of
    /// [`Answer::Body`]`(0)`.
    BigHead(usize),
    /// As [`Answer::BigHead`], the header's value this many spaces and one
    /// letter: its value, once read, is one byte.
    PaddedHead(usize),
    /// `200 OK`, a chunked body of [`Answer::Body`]`(0)`, then a trailer
    /// this many bytes long.
    Trailer(usize),
}

/// The `relay` plugin served under a new id (`prefix` and a number) by a
/// `callme serve` of its own, with `sidecar` as its sidecar, logging at
/// `log_level`, its metrics on a free port: the host, the id and the port.
fn serve_relay(prefix: &str, sidecar: &str, log_level: &str) -> (Host, String, u16) {
    serve_plugin("relay", prefix, sidecar, log_level)
}

/// [`serve_relay`] for any plugin of `plugins/`.
fn serve_plugin(plugin: &str, prefix: &str, sidecar: &str, log_level: &str) -> (Host, String, u16) {
    let dir = tempdir();
    let relay = unique(prefix);
    std::fs::write(dir.join(format!("{relay}.toml")), sidecar).unwrap();
    deploy(&plugin_path(plugin), &dir, &format!("{relay}.wasm"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let command = Command::new(callme_bin());
    let mut host = Host::start(command, &dir, &["--metrics-addr", &addr], log_level);
    host.wait_ready(Duration::from_secs(60));
    (host, relay, port)
}

/// The body [`Answer::Body`] sends.
fn answer_body(extra: usize) -> String {
    format!("hello from the test server{}", "x".repeat(extra))
}

/// A real HTTP/1.1 server on 127.0.0.1, counting the connections it
/// accepts. It lives as long as the test's runtime.
struct HttpServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
    /// Connections the client has not closed ([`Answer::Hold`] only).
    open: Arc<AtomicUsize>,
}

impl HttpServer {
    async fn start(answer: Answer) -> HttpServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test HTTP server");
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let still_open = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let still_open = still_open.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = match answer {
                        Answer::Body(extra) => {
                            let body = answer_body(extra);
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                        }
                        Answer::BigHead(n) => {
                            let body = answer_body(0);
                            format!(
                                "HTTP/1.1 200 OK\r\nx-padding: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                "x".repeat(n),
                                body.len()
                            )
                        }
                        Answer::PaddedHead(n) => {
                            let body = answer_body(0);
                            format!(
                                "HTTP/1.1 200 OK\r\nx-padding: {}a\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                " ".repeat(n),
                                body.len()
                            )
                        }
                        Answer::Trailer(n) => {
                            let body = answer_body(0);
                            format!(
                                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trailing\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\nx-trailing: {}\r\n\r\n",
                                body.len(),
                                "t".repeat(n)
                            )
                        }
                        Answer::Unsized(n) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{}",
                            "x".repeat(n)
                        ),
                        Answer::Never => {
                            std::future::pending::<()>().await;
                            return;
                        }
                        Answer::Stalls => {
                            let start = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nthe start";
                            let _ = stream.write_all(start.as_bytes()).await;
                            std::future::pending::<()>().await;
                            return;
                        }
                        Answer::Hold | Answer::HoldAnswered => {
                            if matches!(answer, Answer::HoldAnswered) {
                                let start =
                                    "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nthe start";
                                let _ = stream.write_all(start.as_bytes()).await;
                            }
                            still_open.fetch_add(1, Ordering::SeqCst);
                            while let Ok(n) = stream.read(&mut buf).await
                                && n > 0
                            {}
                            still_open.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        HttpServer {
            port,
            accepted,
            open,
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Settings granting HTTP to `hosts`, with these limits.
fn granted_http(hosts: &[&str], max_response_bytes: u64, timeout: Duration) -> PluginSettings {
    let mut settings = PluginSettings::default();
    settings.capabilities.http =
        HttpGrant::new(hosts, max_response_bytes, timeout).expect("valid grant");
    settings
}

/// The relay's `fetch` of `url`, in process: the body, or the guest's
/// error message.
async fn fetch(p: &callme::Plugin, url: &str) -> Result<String, String> {
    match p.call("fetch", &pos(json!([url]))).await {
        Ok(Value::String(body)) => Ok(body),
        Err(callme::PluginError::GuestError { message, .. }) => Err(message),
        other => panic!("expected a body or a GuestError, got {other:?}"),
    }
}

/// A request a guest sends and keeps ends with the call that sent it,
/// even where the instance is kept for the next call (`reuse_instances`):
/// calls that each leave requests behind could otherwise pile up
/// connections past the per-call limit and the deadline.
#[tokio::test]
async fn http_requests_a_kept_instance_holds_end_with_their_call() {
    requests_end_with_their_call(Answer::Hold).await;
}

/// As above, where the guest has its responses and keeps their bodies:
/// their connections end with the call too, so the next call (perhaps
/// another caller's) cannot read on from them.
#[tokio::test]
async fn http_responses_a_kept_instance_holds_end_with_their_call() {
    requests_end_with_their_call(Answer::HoldAnswered).await;
}

async fn requests_end_with_their_call(answer: Answer) {
    let web = HttpServer::start(answer).await;
    let mut settings = granted_http(&[&web.authority()], 1 << 20, Duration::from_secs(60));
    settings.reuse_instances = true;
    let p = load("hostile", &unique("cap-fire"), settings);
    for round in 1..=3u64 {
        let sent = p
            .call("fire", &pos(json!([web.authority(), 4])))
            .await
            .unwrap();
        assert_eq!(sent, json!(4));
        assert_eq!(web.accepted(), 4 * round as usize, "round {round}");
        // The instance was kept: its state says so.
        assert_eq!(
            p.call("counter", &Args::default()).await.unwrap(),
            json!(round)
        );
        let closed = eventually(Duration::from_secs(5), || async {
            (web.open() == 0).then_some(())
        })
        .await;
        assert!(
            closed.is_some(),
            "round {round}: {} connections of ended calls still open ({} accepted)",
            web.open(),
            web.accepted()
        );
    }
}

/// A response's head is bounded by 64 KiB of read buffer (hyper stops
/// once a head is still not whole with that much read, so a head may
/// reach twice that): the host holds it outside the guest's memory for
/// as long as the guest keeps the response, and hyper's own bound (about
/// 400 KiB) let a plugin's 256 requests to a server sending long heads
/// hold 100 MiB of the host's memory.
#[tokio::test]
async fn a_response_head_over_the_bound_is_refused() {
    let relay = unique("cap-head");
    let long = HttpServer::start(Answer::BigHead(300 << 10)).await;
    let fits = HttpServer::start(Answer::BigHead(32 << 10)).await;
    let p = load(
        "relay",
        &relay,
        granted_http(
            &[&long.authority(), &fits.authority()],
            1 << 20,
            Duration::from_secs(10),
        ),
    );
    let refused = fetch(&p, &long.url("/")).await;
    assert!(refused.is_err(), "a 300 KiB head came through");
    assert_eq!(long.accepted(), 1);
    assert_eq!(fetch(&p, &fits.url("/")).await.unwrap(), answer_body(0));
}

/// The response heads one call receives are bounded (4 MiB): a plugin
/// fetching from a server that sends long heads gets its requests past
/// that refused, each call afresh. And an instance kept between calls
/// (`reuse_instances`), which may keep the responses of earlier calls,
/// is replaced once it has received 16 MiB of heads: before, one kept
/// instance could hold 4,096 heads of up to 128 KiB, 512 MiB of the
/// host's memory outside every limit of the plugin's.
#[tokio::test]
async fn the_response_heads_a_call_and_a_kept_instance_receive_are_bounded() {
    let p = proxy(Duration::from_secs(60)).await;
    let web = HttpServer::start(Answer::BigHead(60 << 10)).await;
    let sidecar = format!(
        "reuse_instances = true\nallowed_hosts = [\"{}\"]\nhttp_max_requests = 100\n",
        web.authority()
    );
    let (mut host, relay, port) = serve_relay("cap-heads", &sidecar, "callme=info");
    let sp = p.use_server(&relay);
    let made = async || {
        let text = scrape(port).await;
        value(
            &text,
            "callme_instances_made_total",
            &[("server_id", &relay), ("purpose", "call")],
        )
    };

    // 100 heads of 60 KiB: about 68 fit in a call's 4 MiB.
    for _ in 0..2 {
        let fetched = sp.call("fetch-all", pos(json!([web.url("/"), 100]))).await;
        let fetched = fetched.unwrap().as_u64().unwrap();
        assert!(
            (60..=70).contains(&fetched),
            "{fetched} heads of 60 KiB in a call"
        );
    }
    // 2 × 4 MiB so far; 2 calls of 3.5 MiB more stay under 16 MiB.
    let before = made().await;
    for _ in 0..2 {
        let fetched = sp.call("fetch-all", pos(json!([web.url("/"), 60]))).await;
        assert_eq!(fetched.unwrap(), json!(60));
    }
    assert_eq!(made().await, before, "the instance was not kept");
    // Past 16 MiB: the next call gets a fresh instance.
    let fetched = sp.call("fetch-all", pos(json!([web.url("/"), 60]))).await;
    assert_eq!(fetched.unwrap(), json!(60));
    assert_eq!(
        sp.call("fetch-all", pos(json!([web.url("/"), 0])))
            .await
            .unwrap(),
        json!(0)
    );
    assert_eq!(made().await, before + 1.0, "the spent instance was kept");
    let text = scrape(port).await;
    let too_large = value(
        &text,
        "callme_plugin_http_requests_total",
        &[("server_id", &relay), ("outcome", "too_large")],
    );
    assert!(too_large >= 60.0, "{text}");
    host.terminate();
    host.wait(Duration::from_secs(30));
}

/// A head counts as what its connection read with it, not only as the
/// headers it holds, while the guest keeps its response unread: a head
/// padded with 60 KiB of spaces around a one-byte value counted as that
/// byte, while the body read with it kept hyper's whole read buffer
/// (64 KiB and more) for as long as the guest kept the response. So an
/// instance kept between calls (`reuse_instances`) could keep thousands of
/// them, never spent. `hostile`'s `fire` keeps every response unread: five
/// calls of 60 pass the instance's 16 MiB, and the next call gets a fresh
/// instance, as with heads of 60 KiB of letters.
#[tokio::test]
async fn a_head_padded_with_blanks_counts_as_what_was_read_with_it() {
    let p = proxy(Duration::from_secs(60)).await;
    let web = HttpServer::start(Answer::PaddedHead(60 << 10)).await;
    let sidecar = format!(
        "reuse_instances = true\nallowed_hosts = [\"{}\"]\nhttp_max_requests = 100\n",
        web.authority()
    );
    let (mut host, hostile, port) = serve_plugin("hostile", "cap-padded", &sidecar, "callme=info");
    let sp = p.use_server(&hostile);
    let made = async || {
        let text = scrape(port).await;
        value(
            &text,
            "callme_instances_made_total",
            &[("server_id", &hostile), ("purpose", "call")],
        )
    };
    let fire = async |n: u32| {
        let fired = sp.call("fire", pos(json!([web.authority(), n]))).await;
        assert_eq!(fired.unwrap(), json!(n));
    };
    fire(60).await;
    let before = made().await;
    // 4 × 60 heads counted 60 KiB each: 14 MiB, kept.
    for _ in 0..3 {
        fire(60).await;
    }
    assert_eq!(made().await, before, "the instance was not kept");
    // Past 16 MiB: the next call gets a fresh instance.
    fire(60).await;
    fire(0).await;
    assert_eq!(
        made().await,
        before + 1.0,
        "an instance holding 300 responses padded to 60 KiB was kept"
    );
    host.terminate();
    host.wait(Duration::from_secs(30));
}

/// Trailers count with the heads a call receives: a plugin fetching 300
/// bodies that end in a 15 KiB trailer gets at most about 270 of them
/// within the call's 4 MiB (fewer as their heads count what was read with
/// them, here part of the trailer), the rest failing
/// `HttpResponseTrailerSectionSize`.
/// Trailers were not counted at all, and a guest may keep them as long as
/// it keeps the body's handle.
#[tokio::test]
async fn trailers_count_with_the_heads_a_call_receives() {
    let p = proxy(Duration::from_secs(60)).await;
    let web = HttpServer::start(Answer::Trailer(15 << 10)).await;
    let sidecar = format!(
        "allowed_hosts = [\"{}\"]\nhttp_max_requests = 300\n",
        web.authority()
    );
    let (mut host, relay, _port) = serve_relay("cap-trailers", &sidecar, "callme=info");
    let one = p
        .use_server(&relay)
        .call("fetch", pos(json!([web.url("/")])))
        .await;
    assert_eq!(one.unwrap(), json!(answer_body(0)), "a body with a trailer");
    let fetched = p
        .use_server(&relay)
        .call("fetch-all", pos(json!([web.url("/"), 300])))
        .await;
    let fetched = fetched.unwrap().as_u64().unwrap();
    assert!(
        (100..=275).contains(&fetched),
        "{fetched} bodies with a 15 KiB trailer in a call"
    );
    host.terminate();
    host.wait(Duration::from_secs(30));
}

/// One plugin has at most 64 connections open at once, all its calls
/// together: a plugin starting 200 requests to a server that never
/// answers (and keeping them) has 64 of them connected, the rest waiting,
/// and another plugin's requests go through meanwhile. Each request had
/// a connection of its own, so 8 such calls (the default concurrency)
/// held 2,048 descriptors, more than a host's usual limit of 1,024 open
/// files: its broker connection and its plugins directory failed with it.
#[tokio::test]
async fn one_plugin_holds_at_most_64_connections() {
    let silent = HttpServer::start(Answer::Hold).await;
    let web = HttpServer::start(Answer::Body(0)).await;
    let p = load(
        "hostile",
        &unique("cap-conns"),
        granted_http(&[&silent.authority()], 1 << 20, Duration::from_secs(60)),
    );
    let other = load(
        "relay",
        &unique("cap-conns-other"),
        granted_http(&[&web.authority()], 1 << 20, Duration::from_secs(10)),
    );
    let args = pos(json!([silent.authority(), 200]));
    let fired = p.call("fire", &args);
    let fetched = async {
        // While the 200 requests are being made.
        tokio::time::sleep(Duration::from_millis(100)).await;
        fetch(&other, &web.url("/")).await
    };
    let (fired, fetched) = tokio::join!(fired, fetched);
    fired.unwrap();
    assert_eq!(fetched.unwrap(), answer_body(0));
    let accepted = silent.accepted();
    assert!(
        (1..=64).contains(&accepted),
        "{accepted} connections of one plugin at once"
    );
}

#[tokio::test]
async fn http_from_an_allowed_host_reaches_the_caller() {
    let web = HttpServer::start(Answer::Body(0)).await;
    let relay = unique("cap-http");
    let p = load(
        "relay",
        &relay,
        granted_http(&[&web.authority()], 1 << 20, Duration::from_secs(10)),
    );
    assert_eq!(p.capabilities(), ["config", "http", "rpc"]);
    assert_eq!(
        fetch(&p, &web.url("/hello?x=1")).await.unwrap(),
        answer_body(0)
    );
    assert_eq!(web.accepted(), 1);

    // Through a server and a proxy, as a caller sees it.
    let srv = server(ServerOptions::default()).await;
    let px = proxy(Duration::from_secs(30)).await;
    srv.serve_plugin(p).await.unwrap();
    let body: String = px
        .use_server(&relay)
        .invoke("fetch", (web.url("/"),))
        .await
        .unwrap();
    assert_eq!(body, answer_body(0));
    assert_eq!(web.accepted(), 2);
    let described = px.use_server(&relay).describe().await.unwrap();
    assert_eq!(described["capabilities"], json!(["config", "http", "rpc"]));
    srv.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn http_to_a_host_not_allowed_is_refused_before_any_connection() {
    let web = HttpServer::start(Answer::Body(0)).await;
    let other_port = format!("127.0.0.1:{}", web.port.wrapping_add(1).max(1));
    let by_name = format!("localhost:{}", web.port);
    let p = load(
        "relay",
        "relay",
        granted_http(&[&other_port, &by_name], 1 << 20, Duration::from_secs(10)),
    );
    // Another port of the same address, and the address of an allowed
    // name: the authority as written is what is checked.
    for url in [web.url("/"), format!("https://127.0.0.1:{}/", web.port)] {
        let message = fetch(&p, &url).await.unwrap_err();
        assert!(message.contains("HttpRequestDenied"), "{message}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(web.accepted(), 0, "a connection was made");
}

#[tokio::test]
async fn a_plugin_without_the_http_grant_cannot_reach_the_server() {
    let web = HttpServer::start(Answer::Body(0)).await;
    // Other capabilities granted, HTTP not.
    let p = load("relay", "relay", granted(&[("greeting", "hi")], &["*"]));
    let message = fetch(&p, &web.url("/")).await.unwrap_err();
    assert!(message.contains("HttpRequestDenied"), "{message}");
    let p = load("relay", "relay", PluginSettings::default());
    let message = fetch(&p, &web.url("/")).await.unwrap_err();
    assert!(message.contains("HttpRequestDenied"), "{message}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(web.accepted(), 0, "a connection was made");
}

#[tokio::test]
async fn a_call_sends_at_most_its_limit_of_http_requests() {
    let web = HttpServer::start(Answer::Body(0)).await;
    let mut settings = granted_http(&[&web.authority()], 1 << 20, Duration::from_secs(10));
    settings.capabilities.http = settings.capabilities.http.with_max_requests(2);
    let p = load("relay", "relay", settings);
    let fetch_times = async |times: u32| {
        p.call("fetch-times", &pos(json!([web.url("/"), times])))
            .await
    };
    assert_eq!(fetch_times(2).await.unwrap(), json!(2));
    assert_eq!(web.accepted(), 2);
    // A plugin looping on requests: the third is refused before any
    // connection is made.
    match fetch_times(1000).await {
        Err(callme::PluginError::GuestError { message, .. }) => {
            assert!(message.starts_with("request 3: "), "{message}");
            assert!(message.contains("ConnectionLimitReached"), "{message}");
        }
        other => panic!("expected a GuestError, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(web.accepted(), 4, "a connection over the limit was made");
    // The count is per call.
    assert_eq!(fetch_times(2).await.unwrap(), json!(2));
    assert_eq!(web.accepted(), 6);
}

#[tokio::test]
async fn a_response_over_the_size_cap_is_an_error_not_a_short_body() {
    // Announced with a length: refused before the body is read.
    let cap = 1000u64;
    let web = HttpServer::start(Answer::Body(2000)).await;
    let id = unique("cap-http-big");
    let p = load(
        "relay",
        &id,
        granted_http(&[&web.authority()], cap, Duration::from_secs(10)),
    );
    let message = fetch(&p, &web.url("/big")).await.unwrap_err();
    let length = answer_body(2000).len();
    assert!(
        message.contains(&format!("HttpResponseBodySize(Some({length}))")),
        "{message}"
    );
    let text = callme::observe::render();
    assert_eq!(
        value(
            &text,
            "callme_plugin_http_requests_total",
            &[("server_id", &id), ("outcome", "too_large")]
        ),
        1.0,
        "{text}"
    );

    // Without a length: the body's stream fails once it passes the cap.
    let web = HttpServer::start(Answer::Unsized(100_000)).await;
    let p = load(
        "relay",
        "relay",
        granted_http(&[&web.authority()], cap, Duration::from_secs(10)),
    );
    let message = fetch(&p, &web.url("/big")).await.unwrap_err();
    assert!(
        message.contains("HTTP response body size exceeds limit"),
        "{message}"
    );

    // At the cap exactly, the body is whole.
    let web = HttpServer::start(Answer::Unsized(1000)).await;
    let p = load(
        "relay",
        "relay",
        granted_http(&[&web.authority()], cap, Duration::from_secs(10)),
    );
    assert_eq!(fetch(&p, &web.url("/")).await.unwrap(), "x".repeat(1000));
}

#[tokio::test]
async fn the_http_time_limit_cuts_a_server_that_never_answers() {
    let web = HttpServer::start(Answer::Never).await;
    let id = unique("cap-http-slow");
    let p = load(
        "relay",
        &id,
        granted_http(&[&web.authority()], 1 << 20, Duration::from_millis(300)),
    );
    let started = Instant::now();
    let message = fetch(&p, &web.url("/")).await.unwrap_err();
    assert!(message.contains("HttpResponseTimeout"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(web.accepted(), 1);

    // A body that stops coming: its stream fails, the start is not
    // passed off as the body.
    let stalls = HttpServer::start(Answer::Stalls).await;
    let p = load(
        "relay",
        &id,
        granted_http(&[&stalls.authority()], 1 << 20, Duration::from_millis(300)),
    );
    let started = Instant::now();
    let message = fetch(&p, &stalls.url("/")).await.unwrap_err();
    assert!(message.contains("HTTP response timeout"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The call's own deadline still ends a call waiting on a longer limit.
    let mut settings = granted_http(&[&web.authority()], 1 << 20, Duration::from_secs(60));
    settings.limits.deadline = Duration::from_millis(500);
    let p = load("relay", &id, settings);
    let started = Instant::now();
    let outcome = p.call("fetch", &pos(json!([web.url("/")]))).await;
    assert!(
        matches!(
            outcome,
            Err(callme::PluginError::Timeout {
                cause: callme::TimeoutCause::Deadline,
                ..
            })
        ),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Counted by what became of each: no head in time, a head and then
    // a stalled body, dropped with the call that made it (its task is
    // aborted, so a moment after the call ends).
    let counted = |host: &str, outcome: &str| {
        value(
            &callme::observe::render(),
            "callme_plugin_http_requests_total",
            &[("server_id", &id), ("host", host), ("outcome", outcome)],
        )
    };
    assert_eq!(counted(&web.authority(), "timeout"), 1.0);
    assert_eq!(counted(&stalls.authority(), "ok"), 1.0);
    let cancelled = eventually(Duration::from_secs(5), || async {
        (counted(&web.authority(), "cancelled") == 1.0).then_some(())
    })
    .await;
    assert!(cancelled.is_some(), "{}", callme::observe::render());
}

#[tokio::test]
async fn http_grants_apply_on_hot_deploy_and_inspect_names_http() {
    let web = HttpServer::start(Answer::Body(0)).await;
    let dir = tempdir();
    let relay = unique("cap-http-hot");
    deploy(&plugin_path("relay"), &dir, &format!("{relay}.wasm"));
    let inspected = run_ok(
        Command::new(callme_bin())
            .arg("inspect")
            .arg(dir.join(format!("{relay}.wasm"))),
    );
    assert!(
        inspected.contains("capabilities: config, http, rpc"),
        "{inspected}"
    );
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(30)).await;
    let sp = p.use_server(&relay);
    let message = guest_error(sp.call("fetch", pos(json!([web.url("/")]))).await);
    assert!(message.contains("HttpRequestDenied"), "{message}");
    assert_eq!(web.accepted(), 0);

    let sidecar = dir.join(format!(".{relay}.toml.incoming"));
    std::fs::write(
        &sidecar,
        format!(
            "allowed_hosts = [\"{}\"]\nhttp_max_response_bytes = 4096\nhttp_timeout_ms = 5000\n",
            web.authority()
        ),
    )
    .unwrap();
    std::fs::rename(&sidecar, dir.join(format!("{relay}.toml"))).unwrap();
    let url = web.url("/");
    let fetched = eventually(Duration::from_secs(30), || {
        let sp = sp.clone();
        let url = url.clone();
        async move { sp.call("fetch", pos(json!([url]))).await.ok() }
    })
    .await;
    assert_eq!(
        fetched,
        Some(json!(answer_body(0))),
        "the grant was not applied: {}",
        host.log_text()
    );

    // A bad entry changes nothing: the grant stays.
    std::fs::write(&sidecar, "allowed_hosts = [\"no-port.example.com\"]\n").unwrap();
    std::fs::rename(&sidecar, dir.join(format!("{relay}.toml"))).unwrap();
    let refused = eventually(Duration::from_secs(30), || {
        let log = host.log_text();
        async move { log.contains("no-port.example.com").then_some(()) }
    })
    .await;
    assert!(refused.is_some(), "no refusal logged: {}", host.log_text());
    assert_eq!(
        sp.call("fetch", pos(json!([web.url("/")]))).await.unwrap(),
        json!(answer_body(0))
    );
}

/// A plugin granted a name whose name server never answers cannot stall
/// the other plugins' requests, nor make the host hold a thread per
/// lookup: a lookup cannot be stopped once started, so each plugin has
/// a few running at most, and its other requests wait for those.
///
/// The host runs in a mount namespace of its own whose `resolv.conf`
/// names a server on 127.0.0.77 that reads nothing (30 s per lookup);
/// this needs root, as CI has.
#[tokio::test]
async fn a_plugin_whose_names_never_resolve_stalls_no_other_plugin() {
    if !run_ok(Command::new("id").arg("-u")).trim().eq("0") {
        eprintln!("skipped: needs root (a mount namespace, port 53)");
        return;
    }
    let silent = std::net::UdpSocket::bind("127.0.0.77:53")
        .expect("bind a silent name server on 127.0.0.77:53");
    silent.set_nonblocking(true).unwrap();
    let web = HttpServer::start(Answer::Body(0)).await;
    let dir = tempdir();
    let resolv = dir.with_extension("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.77\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    let (slow, fast) = (unique("cap-dns-slow"), unique("cap-dns-fast"));
    deploy(&plugin_path("hostile"), &dir, &format!("{slow}.wasm"));
    std::fs::write(
        dir.join(format!("{slow}.toml")),
        "allowed_hosts = [\"never-answers.callme.test:80\"]\nhttp_timeout_ms = 60000\n",
    )
    .unwrap();
    deploy(&plugin_path("relay"), &dir, &format!("{fast}.wasm"));
    let local = format!("localhost:{}", web.port);
    std::fs::write(
        dir.join(format!("{fast}.toml")),
        format!("allowed_hosts = [\"{local}\"]\nhttp_timeout_ms = 5000\n"),
    )
    .unwrap();

    let mut namespaced = Command::new("unshare");
    namespaced
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
        .arg(&resolv)
        .arg(callme_bin());
    let mut host = Host::start(namespaced, &dir, &[], "callme=info");
    host.wait_ready(Duration::from_secs(60));

    let px = proxy(Duration::from_secs(30)).await;
    // 3 calls, each starting 256 requests to the name that never
    // resolves (the call ends 0.3 s later, its requests with it).
    for _ in 0..3 {
        let sent = px
            .use_server(&slow)
            .call("fire", pos(json!(["never-answers.callme.test:80", 256])))
            .await
            .unwrap();
        assert_eq!(sent, json!(256));
    }
    // Another plugin's request, by a name of /etc/hosts, goes through.
    let started = Instant::now();
    let fetched = px
        .use_server(&fast)
        .call("fetch", pos(json!([format!("http://{local}/")])))
        .await;
    assert_eq!(
        fetched.ok(),
        Some(json!(answer_body(0))),
        "after {:?}; {}",
        started.elapsed(),
        host.log_text()
    );
    assert_eq!(web.accepted(), 1);
    // The slow lookups did reach the silent server (so the resolver was
    // the one of the namespace, and lookups stalled)...
    let mut query = [0u8; 512];
    assert!(
        silent.recv_from(&mut query).is_ok(),
        "no lookup reached the silent name server"
    );
    // ... and the host holds a few of them, not a thread each: the
    // threads of its HTTP runtime (one worker, and a lookup each).
    let tasks = std::fs::read_dir(format!("/proc/{}/task", host.child.id())).unwrap();
    let http_threads = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "callme-http")
        .count();
    assert!(
        (2..=8).contains(&http_threads),
        "the host's HTTP runtime runs {http_threads} threads"
    );
}

/// The Python and JavaScript relays (`plugins/relay-py`, `plugins/relay-js`)
/// use `config` and `rpc` through their languages' bindings of the same
/// contract, and are refused the same way.
#[tokio::test]
async fn python_and_javascript_plugins_relay_calls_and_read_settings() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(60)).await;
    let calc = serve_calc(&srv, &p, "cap-calc-lang").await;
    let missing = unique("cap-nobody");
    // An `add` whose answers no s64 `add-via` can give.
    let odd = unique("cap-odd");
    let mut odd_add = NativeFunctions::new();
    odd_add.register("add", "func(a: s64, b: s64) -> f64", |args: Args| {
        Ok(match args.args.first().and_then(Value::as_i64) {
            Some(0) => json!(3.5),
            Some(1) => json!(null),
            Some(2) => json!(1u64 << 63),
            // Replies the host does not take for its plugins at all: over
            // its request size limit, and of more arrays than that allows
            // (600,000 of `[0]`, 2.4 MB, about 100 MB parsed).
            Some(3) => json!("x".repeat(5 << 20)),
            _ => Value::Array(vec![json!([0]); 600_000]),
        })
    });
    srv.serve_native(&odd, odd_add).await.unwrap();
    for plugin in ["relay-py", "relay-js"] {
        let relay = unique(plugin);
        let settings = granted(&[("greeting", "hello")], &[&calc, &missing, &odd]);
        srv.serve_plugin(load(plugin, &relay, settings))
            .await
            .unwrap();
        let relay = p.use_server(&relay);
        let sum: i64 = relay.invoke("add-via", (&calc, 20, 22)).await.unwrap();
        assert_eq!(sum, 42, "{plugin}");
        let greeting: Option<String> = relay.invoke("setting", ("greeting",)).await.unwrap();
        assert_eq!(greeting.as_deref(), Some("hello"), "{plugin}");
        let none: Option<String> = relay.invoke("setting", ("missing",)).await.unwrap();
        assert_eq!(none, None, "{plugin}");
        let refused = guest_error(relay.call("add-via", pos(json!(["calc", 1, 2]))).await);
        assert!(refused.starts_with("NotGranted: "), "{plugin}: {refused}");
        let nobody = guest_error(relay.call("add-via", pos(json!([&missing, 1, 2]))).await);
        assert!(nobody.starts_with("NoSuchServer: "), "{plugin}: {nobody}");
        // Answers that are no s64 are the relay's typed error, not a
        // number cut short or a trap.
        for a in [0, 1, 2] {
            let bad = guest_error(relay.call("add-via", pos(json!([&odd, a, 0]))).await);
            assert!(bad.starts_with("BadResponse: "), "{plugin}({a}): {bad}");
        }
        for (a, said) in [
            (3, "the limit is 4194304"),
            (4, "1 JSON objects and 600001 arrays"),
        ] {
            let big = guest_error(relay.call("add-via", pos(json!([&odd, a, 0]))).await);
            assert!(
                big.starts_with("Internal: reply not taken: ") && big.contains(said),
                "{plugin}({a}): {big}"
            );
        }
        let described = relay.describe().await.unwrap();
        assert_eq!(
            described["capabilities"],
            json!(["config", "http", "rpc"]),
            "{plugin}"
        );
    }
    srv.shutdown(Duration::from_secs(5)).await;
}

/// Two Python relays whose `add` passes the call on to each other: a
/// cycle, which the call-depth limit ends with a clear error at the
/// limit's hop rather than exhausting the hosts.
#[tokio::test]
async fn a_cycle_between_two_servers_ends_at_the_depth_limit() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(60)).await;
    let (a, b) = (unique("cycle-a"), unique("cycle-b"));
    for (me, next) in [(&a, &b), (&b, &a)] {
        let settings = granted(&[("next", next.as_str())], &[next.as_str()]);
        srv.serve_plugin(load("relay-py", me, settings))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let message = guest_error(p.use_server(&a).call("add", pos(json!([1, 2]))).await);
    println!("cycle ended after {:?}: {message}", started.elapsed());
    assert!(message.contains("CallDepthExceeded"), "{message}");
    // The client's call is depth 0, and every server passes its callee's
    // failure on as its own: one `GuestError: ` per call between servers,
    // as many as the limit allows.
    let sub_calls = message.matches("GuestError: ").count();
    assert_eq!(
        sub_calls,
        callme::plugin::DEFAULT_MAX_CALL_DEPTH as usize,
        "{message}"
    );
    srv.shutdown(Duration::from_secs(5)).await;
}

/// The Python and JavaScript relays' `fetch`: an HTTP GET through
/// `wasi:http` with the bindings their toolchains generate, held to the
/// same grant and limits.
#[tokio::test]
async fn python_and_javascript_plugins_fetch_from_allowed_hosts_only() {
    for plugin in ["relay-py", "relay-js"] {
        let web = HttpServer::start(Answer::Body(0)).await;
        let big = HttpServer::start(Answer::Body(4096)).await;
        let hosts = [web.authority(), big.authority()];
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let p = load(
            plugin,
            plugin,
            granted_http(&hosts, 1024, Duration::from_secs(10)),
        );
        assert_eq!(p.capabilities(), ["config", "http", "rpc"], "{plugin}");
        assert_eq!(
            fetch(&p, &web.url("/hello")).await,
            Ok(answer_body(0)),
            "{plugin}"
        );
        assert_eq!(web.accepted(), 1, "{plugin}");
        let over = fetch(&p, &big.url("/")).await.unwrap_err();
        assert!(over.contains("HttpResponseBodySize"), "{plugin}: {over}");

        let refused = HttpServer::start(Answer::Body(0)).await;
        let message = fetch(&p, &refused.url("/")).await.unwrap_err();
        assert!(message.contains("HttpRequestDenied"), "{plugin}: {message}");
        let ungranted = load(plugin, plugin, PluginSettings::default());
        let message = fetch(&ungranted, &web.url("/")).await.unwrap_err();
        assert!(message.contains("HttpRequestDenied"), "{plugin}: {message}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(refused.accepted(), 0, "{plugin}: a connection was made");
        assert_eq!(
            web.accepted(),
            1,
            "{plugin}: a connection was made without a grant"
        );
    }
}

/// What plugins send out is counted on the host's metrics endpoint: calls
/// by target and outcome, HTTP requests by host and outcome, refusals
/// included, each sent one timed.
#[tokio::test]
async fn calls_and_http_requests_of_plugins_are_counted_in_the_metrics() {
    let srv = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let calc = serve_calc(&srv, &p, "cap-calc-counted").await;
    let web = HttpServer::start(Answer::Body(0)).await;

    let sidecar = format!(
        "rpc = [\"{calc}\"]\nrpc_max_calls = 2\nallowed_hosts = [\"{}\"]\nhttp_max_requests = 2\n",
        web.authority()
    );
    let (host, relay, port) = serve_relay("cap-counted", &sidecar, "callme=info");
    let sp = p.use_server(&relay);

    assert_eq!(
        sp.call("add-via", pos(json!([calc, 1, 2]))).await.unwrap(),
        json!(3)
    );
    let other = unique("cap-other");
    let message = guest_error(sp.call("add-via", pos(json!([other, 1, 2]))).await);
    assert!(message.starts_with("NotGranted: "), "{message}");
    let message = guest_error(sp.call("add-via-times", pos(json!([calc, 1, 2, 5]))).await);
    assert!(message.starts_with("call 3: TooManyCalls"), "{message}");

    assert_eq!(
        sp.call("fetch", pos(json!([web.url("/")]))).await.unwrap(),
        json!(answer_body(0))
    );
    let denied = format!("http://127.0.0.1:{}/", web.port.wrapping_add(1).max(1));
    let message = guest_error(sp.call("fetch", pos(json!([denied]))).await);
    assert!(message.contains("HttpRequestDenied"), "{message}");
    let message = guest_error(sp.call("fetch-times", pos(json!([web.url("/"), 5]))).await);
    assert!(message.starts_with("request 3: "), "{message}");
    assert_eq!(web.accepted(), 3);

    let text = scrape(port).await;
    let rpc = |target: &str, outcome: &str| {
        value(
            &text,
            "callme_plugin_rpc_calls_total",
            &[
                ("server_id", &relay),
                ("target", target),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(rpc(&calc, "ok"), 3.0, "{text}");
    assert_eq!(rpc(&calc, "TooManyCalls"), 1.0, "{text}");
    assert_eq!(rpc("_not_granted", "NotGranted"), 1.0, "{text}");
    assert!(
        !text.contains(&other),
        "a refused id became a label: {text}"
    );
    let timed = [("server_id", relay.as_str()), ("target", calc.as_str())];
    assert_eq!(
        value(
            &text,
            "callme_plugin_rpc_call_duration_seconds_count",
            &timed
        ),
        3.0,
        "{text}"
    );

    let allowed = web.authority();
    let http = |host: &str, outcome: &str| {
        value(
            &text,
            "callme_plugin_http_requests_total",
            &[("server_id", &relay), ("host", host), ("outcome", outcome)],
        )
    };
    assert_eq!(http(&allowed, "ok"), 3.0, "{text}");
    assert_eq!(http(&allowed, "limit"), 1.0, "{text}");
    assert_eq!(http("_not_allowed", "denied"), 1.0, "{text}");
    let timed = [("server_id", relay.as_str()), ("host", allowed.as_str())];
    assert_eq!(
        value(
            &text,
            "callme_plugin_http_request_duration_seconds_count",
            &timed
        ),
        3.0,
        "{text}"
    );
    drop(host);
    srv.shutdown(Duration::from_secs(5)).await;
}

/// A refused HTTP request is logged once a call, not once a request (a
/// guest looping on refused requests cannot flood the log), and the
/// next call's first refusal is logged again, in an instance kept
/// between calls too.
#[tokio::test]
async fn refused_http_requests_are_logged_once_a_call() {
    let p = proxy(Duration::from_secs(30)).await;
    let web = HttpServer::start(Answer::Body(0)).await;
    let sidecar = format!(
        "reuse_instances = true\nallowed_hosts = [\"{}\"]\nhttp_max_requests = 1\n",
        web.authority()
    );
    let (mut host, relay, _) = serve_relay("cap-logged", &sidecar, "callme=debug");
    let sp = p.use_server(&relay);

    // A guest that goes on past each refusal.
    let denied = format!("http://127.0.0.1:{}/", web.port.wrapping_add(1).max(1));
    for _ in 0..2 {
        let fetched = sp.call("fetch-all", pos(json!([denied, 50]))).await;
        assert_eq!(fetched.unwrap(), json!(0));
        let fetched = sp.call("fetch-all", pos(json!([web.url("/"), 50]))).await;
        assert_eq!(fetched.unwrap(), json!(1));
    }
    assert_eq!(web.accepted(), 2);
    host.terminate();
    host.wait(Duration::from_secs(30));
    let log = host.log_text();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(count("http request denied"), 2, "{log}");
    assert_eq!(count("http request over the call's limit"), 2, "{log}");
}

/// A plugin granted nothing that hands the host requests it cannot make a
/// URI of (an authority and no path) writes nothing to the host's log,
/// however many: the HTTP crate warns of each such request (and of each
/// failed connection, and the TLS library of a server's alerts), outside
/// the plugin's log budget, and the host's default filter keeps those out.
#[tokio::test]
async fn requests_the_host_cannot_send_leave_its_log_alone() {
    let dir = tempdir();
    let id = unique("cap-pathless");
    deploy(&plugin_path("hostile"), &dir, &format!("{id}.wasm"));
    let mut host = Host::start(Command::new(callme_bin()), &dir, &[], "");
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(30)).await;
    let refused = p
        .use_server(&id)
        .call("pathless", pos(json!([5000])))
        .await
        .unwrap();
    assert_eq!(refused, json!(5000));
    let log = host.log_text();
    assert!(log.contains("loaded"), "not the host's default log: {log}");
    let warned = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        warned < 5,
        "{warned} warnings:\n{}",
        &log[..log.len().min(4000)]
    );
}
