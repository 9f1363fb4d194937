//! The `callme` command end to end: inspect, invoke, serve, call, describe.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use callme_tests::{
    Forwarder, Host, amqp_url, callme_bin, deploy, eventually, plugin_path, tempdir, unique,
};
use serde_json::{Value, json};

fn callme(args: &[&str]) -> Output {
    Command::new(callme_bin())
        .args(args)
        .env("CALLME_AMQP_URL", amqp_url())
        .env("RUST_LOG", "off")
        .output()
        .expect("run callme")
}

/// Runs `callme` with `args` and `RUST_LOG`, killing it after `limit`;
/// its output and how long it ran.
fn callme_within(args: &[&str], rust_log: &str, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(callme_bin())
        .args(args)
        .env("CALLME_AMQP_URL", amqp_url())
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run callme");
    while child.try_wait().expect("wait for callme").is_none() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("collect callme output");
    (output, started.elapsed())
}

/// A TCP port on which every connection is accepted and handed to
/// `peer`, which holds it for as long as the test binary runs.
fn fake_broker(peer: fn(&mut TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    let port = listener.local_addr().expect("local address").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut stream in listener.incoming().flatten() {
            peer(&mut stream);
            held.push(stream);
        }
    });
    port
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// What a command wrote, stdout then stderr.
fn all_output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stderr_json(o: &Output) -> Value {
    let text = String::from_utf8_lossy(&o.stderr);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("stderr is not JSON ({e}): {text}"))
}

#[test]
fn inspect_lists_functions_with_signatures() {
    let calc = plugin_path("calc");
    let o = callme(&["inspect", calc.to_str().unwrap()]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("add: func(a: s64, b: s64) -> s64"), "{out}");
    assert!(
        out.contains("stats.mean: func(xs: list<f64>) -> option<f64>"),
        "{out}"
    );

    let bad = plugin_path("bad-import");
    let o = callme(&["inspect", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr_json(&o);
    assert_eq!(e["type"], "InvalidPlugin");
    assert!(e["message"].as_str().unwrap().contains("evil"));
}

/// `callme call` reads its arguments as a server reads a request: a key
/// given twice is refused before anything is sent (no broker is reached
/// here), and `--kwargs` must be an object.
#[test]
fn call_refuses_arguments_a_server_would() {
    let nowhere = "amqp://127.0.0.1:1/%2f";
    for (args, said) in [
        (&["--kwargs", r#"{"a":1,"a":2}"#][..], "`a` is given twice"),
        (&[r#"[{"k":1,"k":1}]"#], "`k` is given twice"),
        (&["--kwargs", "[1]"], "--kwargs is not a JSON object"),
        (&["1 2"], "argument 1 is not JSON"),
    ] {
        let mut argv = vec!["call", "--amqp-url", nowhere, "calc", "add"];
        argv.extend_from_slice(args);
        let o = callme(&argv);
        assert!(!o.status.success(), "{args:?}");
        let e = stderr_json(&o);
        assert_eq!(e["type"], "Error", "{args:?}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(said),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn output_to_a_pipe_nobody_reads_ends_quietly() {
    // `callme inspect x.wasm | head -1`: the reader gone before the
    // output is written. The command ends as other tools do, by SIGPIPE,
    // not with a panic and its backtrace on stderr.
    use std::os::unix::process::ExitStatusExt as _;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let calc = plugin_path("calc");
    let o = Command::new(callme_bin())
        .args(["inspect", calc.to_str().unwrap()])
        .env("RUST_LOG", "off")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run callme");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    const SIGPIPE: i32 = 13;
    assert_eq!(o.status.signal(), Some(SIGPIPE), "{:?}: {err}", o.status);
}

#[test]
fn invoke_runs_one_call_locally() {
    let calc = plugin_path("calc");
    let c = calc.to_str().unwrap();
    let o = callme(&["invoke", c, "add", "1", "2"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "3");
    let o = callme(&["invoke", c, "add", "--kwargs", r#"{"a": 40, "b": 2}"#]);
    assert_eq!(stdout(&o), "42");
    let o = callme(&["invoke", c, "divide", "1", "0"]);
    assert!(!o.status.success());
    let e = stderr_json(&o);
    assert_eq!(e["type"], "GuestError");
    assert_eq!(e["data"], "division by zero");
    let o = callme(&["invoke", c, "add", "1"]);
    assert_eq!(stderr_json(&o)["type"], "InvalidArguments");
    let o = callme(&["invoke", c, "add", "1", "not-json"]);
    assert!(!o.status.success());
}

/// `invoke` reads the sidecar beside the plugin, as `serve` does, and its
/// flags go over it; an invalid sidecar is refused, naming it.
#[test]
fn invoke_reads_the_sidecar_beside_the_plugin() {
    let dir = tempdir();
    let plugin = dir.join("hostile.wasm");
    std::fs::copy(plugin_path("hostile"), &plugin).unwrap();
    let p = plugin.to_str().unwrap();
    std::fs::write(
        dir.join("hostile.toml"),
        "fuel = 100000000000000\ndeadline_ms = 200\n",
    )
    .unwrap();
    let e = stderr_json(&callme(&["invoke", p, "spin"]));
    assert_eq!(
        (&e["type"], &e["data"]),
        (&json!("Timeout"), &json!("deadline")),
        "{e}"
    );
    let e = stderr_json(&callme(&["invoke", p, "spin", "--fuel", "100000"]));
    assert_eq!(
        (&e["type"], &e["data"]),
        (&json!("Timeout"), &json!("fuel")),
        "{e}"
    );
    std::fs::write(dir.join("hostile.toml"), "deadline_ms = 0\n").unwrap();
    let e = stderr_json(&callme(&["invoke", p, "spin"]));
    assert_eq!(e["type"], "InvalidPlugin", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("hostile.toml") && message.contains("deadline_ms"),
        "{e}"
    );
}

/// `invoke` runs the call within the limits it is given.
#[test]
fn invoke_keeps_to_the_limits_it_is_given() {
    let hostile = plugin_path("hostile");
    let h = hostile.to_str().unwrap();
    let o = callme(&["invoke", h, "spin", "--fuel", "100000"]);
    let e = stderr_json(&o);
    assert_eq!(
        (&e["type"], &e["data"]),
        (&json!("Timeout"), &json!("fuel")),
        "{e}"
    );
    let o = callme(&[
        "invoke",
        h,
        "spin",
        "--fuel",
        &u64::MAX.to_string(),
        "--deadline-ms",
        "300",
    ]);
    let e = stderr_json(&o);
    assert_eq!(
        (&e["type"], &e["data"]),
        (&json!("Timeout"), &json!("deadline")),
        "{e}"
    );
    // Stopped at the cap asked for, far below the default one.
    let o = callme(&["invoke", h, "bomb", "--memory-bytes", "2000000"]);
    let e = stderr_json(&o);
    assert_eq!(e["type"], "MemoryLimit", "{e}");
    // "linear memory would grow from FROM to TO bytes, over the cap"
    let size = |word: usize| -> u64 {
        e["message"]
            .as_str()
            .and_then(|m| m.split_whitespace().nth(word))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no size in {e}"))
    };
    assert!(size(5) <= 2_000_000 && size(7) > 2_000_000, "{e}");
}

#[tokio::test]
async fn serve_call_and_describe_end_to_end() {
    let dir = tempdir();
    let id = unique("fooserver");
    std::fs::copy(plugin_path("calc"), dir.join(format!("{id}.wasm"))).unwrap();
    let mut host = Host::serve(&dir, &["--concurrency", "4"]);

    let answered = eventually(Duration::from_secs(30), || {
        let id = id.clone();
        async move {
            let o = tokio::task::spawn_blocking(move || callme(&["call", &id, "add", "1", "1"]))
                .await
                .unwrap();
            o.status.success().then(|| stdout(&o))
        }
    })
    .await;
    assert_eq!(answered.as_deref(), Some("2"));

    let o = callme(&["describe", &id]);
    assert!(o.status.success());
    let d: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(
        d["functions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "fib")
    );
    assert_eq!(d["version"].as_str().map(str::len), Some(64));
    // Not a terminal: one line, unless asked for indented JSON.
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    let o = callme(&["describe", "--pretty", &id]);
    assert!(o.status.success());
    let pretty = stdout(&o);
    assert!(pretty.lines().count() > 1, "{pretty}");
    assert!(pretty.lines().nth(1).is_some_and(|l| l.starts_with("  ")));
    assert_eq!(serde_json::from_str::<Value>(&pretty).unwrap(), d);

    let o = callme(&["call", &id, "add", "-1", "-2"]);
    assert_eq!(stdout(&o), "-3", "{}", String::from_utf8_lossy(&o.stderr));

    let o = callme(&["call", &id, "divide", "1", "0"]);
    assert_eq!(stderr_json(&o)["type"], "GuestError");
    let o = callme(&["call", "--timeout", "5", &unique("nobody"), "add", "1", "1"]);
    assert_eq!(stderr_json(&o)["type"], "NoSuchServer");
    // An id no server could have, and a timeout of ages: typed answers,
    // never a panic.
    let o = callme(&["call", &"a".repeat(250), "add", "1", "1"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(stderr_json(&o)["type"], "Config");
    let o = callme(&["call", "--timeout", "1e19", &id, "add", "2", "3"]);
    assert_eq!(stdout(&o), "5", "{}", String::from_utf8_lossy(&o.stderr));
    // `{"result":5}` is 12 bytes: over a limit of 11, not taken.
    let o = callme(&["call", "--max-reply-bytes", "11", &id, "add", "2", "3"]);
    let e = stderr_json(&o);
    assert_eq!(e["type"], "Internal", "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("the limit is 11")),
        "{e}"
    );
    let o = callme(&["call", "--max-reply-bytes", "12", &id, "add", "2", "3"]);
    assert_eq!(stdout(&o), "5", "{}", String::from_utf8_lossy(&o.stderr));
    // The request is over a limit of 10 bytes: not sent.
    let o = callme(&["call", "--max-request-bytes", "10", &id, "add", "2", "3"]);
    let e = stderr_json(&o);
    assert_eq!(e["type"], "TooLarge", "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("over the proxy's limit of 10")),
        "{e}"
    );

    host.terminate();
    assert_eq!(host.wait(Duration::from_secs(20)), Some(0), "graceful exit");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ready_file_is_there_while_the_host_serves() {
    let dir = tempdir();
    let id = unique("ready");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(30));
    // Ready means serving: the first call is answered, without a retry.
    let o = callme(&["call", &id, "add", "1", "1"]);
    assert_eq!(stdout(&o), "2", "{}", String::from_utf8_lossy(&o.stderr));
    host.terminate();
    assert_eq!(host.wait(Duration::from_secs(20)), Some(0), "graceful exit");
    assert!(
        !host.ready_file.exists(),
        "the ready file outlived the host"
    );
}

/// A host stopping leaves the ready file alone when it names another
/// process: a host started since on the same file wrote it.
#[test]
fn a_host_leaves_a_ready_file_another_host_wrote() {
    let dir = tempdir();
    deploy(
        &plugin_path("calc"),
        &dir,
        &format!("{}.wasm", unique("ready-other")),
    );
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(30));
    let other = format!("{}\n", host.child.id() + 1);
    std::fs::write(&host.ready_file, &other).unwrap();
    host.terminate();
    assert_eq!(host.wait(Duration::from_secs(20)), Some(0), "graceful exit");
    assert_eq!(
        std::fs::read_to_string(&host.ready_file).ok().as_deref(),
        Some(other.as_str()),
        "the host removed another host's ready file"
    );
}

/// Runs `callme serve` on `dir` with `--ready-file ready` until it exits
/// (at most 60 s): its output.
fn serve_with_ready_file(dir: &Path, ready: &Path) -> Output {
    let cache = callme_tests::target_dir().join("test-cache");
    let (o, _) = callme_within(
        &[
            "serve",
            "--plugins",
            dir.to_str().unwrap(),
            "--ready-file",
            ready.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        "callme=info",
        Duration::from_secs(60),
    );
    o
}

/// A host that cannot write its ready file stops at once with an error:
/// nobody would learn that it serves. Both where its directory is missing
/// (found at start) and where only the file's writing fails, once the host
/// is serving (a name whose staging name is longer than a file name may
/// be, while its lock's is not).
#[test]
fn a_host_that_cannot_write_its_ready_file_stops() {
    let dir = tempdir();
    deploy(
        &plugin_path("calc"),
        &dir,
        &format!("{}.wasm", unique("ready-nowhere")),
    );
    let files = tempdir();
    for nowhere in [
        files.join("missing").join("ready"),
        files.join("r".repeat(230)),
    ] {
        let o = serve_with_ready_file(&dir, &nowhere);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("cannot write"), "{stderr}");
        assert!(!nowhere.exists());
    }
}

/// A second host given the ready file of one that is serving stops at
/// start, and leaves that file as it was: whoever waits on it still learns
/// that the first host serves.
#[test]
fn a_second_host_on_the_same_ready_file_stops_and_leaves_it() {
    let dir = tempdir();
    deploy(
        &plugin_path("calc"),
        &dir,
        &format!("{}.wasm", unique("ready-twice")),
    );
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(30));
    let written = std::fs::read_to_string(&host.ready_file).unwrap();
    assert_eq!(written.trim(), host.child.id().to_string());
    let o = serve_with_ready_file(&dir, &host.ready_file);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("held by another process"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&host.ready_file).ok(),
        Some(written),
        "the second host touched the first one's ready file"
    );
    host.terminate();
    assert_eq!(host.wait(Duration::from_secs(20)), Some(0), "graceful exit");
    assert!(!host.ready_file.exists());
    // Its lock goes with it: a host started now is served.
    let mut next = Host::serve(&dir, &[]);
    next.wait_ready(Duration::from_secs(30));
    next.terminate();
    assert_eq!(next.wait(Duration::from_secs(20)), Some(0), "graceful exit");
}

/// A child process killed if the test ends before it is waited for.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `callme call --retry` sends its call again on the next node when its
/// connection goes before the reply, and prints the answer; the test
/// plays the server, so it sees both requests. Its stderr stays empty:
/// the link's warning that it lost the broker, and the proxy's that its
/// reply consumer was lost, were written there (in front of the JSON of
/// a call that fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_with_retry_is_sent_again_when_its_node_goes() {
    let id = unique("cli-retry");
    let mut server = callme_tests::PlayedServer::start(&id).await;
    let nodes = [Forwarder::start().await, Forwarder::start().await];
    let mut child = KillOnDrop(Some(
        Command::new(callme_bin())
            .args(["call", "--retry", "--timeout", "30", "--amqp-url"])
            .arg(Forwarder::list(&nodes))
            .args([id.as_str(), "add", "1", "2"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run callme"),
    ));
    let first = server.requests.next_reply(None).await;
    nodes[0].cut();
    let again = server.requests.next_reply(None).await;
    assert_eq!(
        again.properties.correlation_id(),
        first.properties.correlation_id()
    );
    callme_tests::answer(&server.channel, &again, serde_json::json!(3)).await;
    let child = child.0.take().expect("the child");
    let o = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("callme ran");
    assert_eq!(stdout(&o), "3", "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    nodes[1].cut();
}

/// A grace period too long for the clock (`--grace` of `u64::MAX`
/// seconds, as "wait for every call") is a grace period: the host stops
/// gracefully, exit 0, its ready file removed. It panicked on the stop
/// signal ("overflow when adding duration to instant") and left its ready
/// file behind.
#[test]
fn a_grace_period_too_long_for_the_clock_ends_in_a_graceful_stop() {
    let dir = tempdir();
    deploy(
        &plugin_path("calc"),
        &dir,
        &format!("{}.wasm", unique("long-grace")),
    );
    let mut host = Host::serve(&dir, &["--grace", &u64::MAX.to_string()]);
    host.wait_ready(Duration::from_secs(30));
    host.terminate();
    assert_eq!(
        host.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        host.log_text()
    );
    assert!(
        !host.ready_file.exists(),
        "the ready file outlived the host"
    );
}

#[test]
fn negative_numbers_are_arguments() {
    let calc = plugin_path("calc");
    let c = calc.to_str().unwrap();
    let o = callme(&["invoke", c, "add", "-1", "-2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "-3");
    let o = callme(&["invoke", c, "add", "5", "-7"]);
    assert_eq!(stdout(&o), "-2", "{}", String::from_utf8_lossy(&o.stderr));
}

/// Checks that `call` and `describe` against `port` end within their
/// timeout with a connection error whose message contains `says`.
fn connection_error_within_timeout(port: u16, says: &str) {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let timeout = Duration::from_secs(2);
    connection_error_within(&url, timeout, timeout + Duration::from_secs(3), says);
}

/// Checks that `call` and `describe` of `url` with `timeout` end in less
/// than `limit` with a connection error whose message contains `says`.
fn connection_error_within(url: &str, timeout: Duration, limit: Duration, says: &str) {
    let secs = timeout.as_secs().to_string();
    let commands: [&[&str]; 2] = [
        &[
            "call",
            "--timeout",
            &secs,
            "--amqp-url",
            url,
            "calc",
            "add",
            "1",
            "2",
        ],
        &["describe", "--timeout", &secs, "--amqp-url", url, "calc"],
    ];
    for args in commands {
        let (o, took) = callme_within(args, "off", timeout + Duration::from_secs(20));
        assert!(took < limit, "{args:?} took {took:?}");
        assert!(!o.status.success());
        let e = stderr_json(&o);
        assert_eq!(e["type"], "Connection", "{args:?}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(says), "{args:?}: {message}");
        assert!(!message.to_lowercase().contains("pars"), "{message}");
    }
}

#[test]
fn timeout_covers_a_peer_that_never_answers() {
    let port = fake_broker(|_| {});
    connection_error_within_timeout(port, "did not complete the AMQP handshake within 2s");
}

#[test]
fn the_uris_connection_timeout_bounds_the_handshake() {
    let port = fake_broker(|_| {});
    // Well under the 15 s default and the commands' own 30 s timeout.
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f?connection_timeout=500");
    connection_error_within(
        &url,
        Duration::from_secs(30),
        Duration::from_secs(10),
        "did not complete the AMQP handshake within 500ms",
    );
}

#[test]
fn a_peer_that_is_not_amqp_is_named() {
    let port = fake_broker(|stream| {
        // Read the client's protocol header first, as a server would.
        let mut header = [0u8; 8];
        let _ = stream.read_exact(&mut header);
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    connection_error_within_timeout(port, "is not an AMQP broker");
}

/// Malformed broker URIs, each carrying the password `s3cretpw`.
const MALFORMED_URIS: [&str; 5] = [
    "amqp//guest:s3cretpw@127.0.0.1:5672",
    "amqpx://u:s3cretpw@127.0.0.1",
    "amqp://u:s3cretpw@127.0.0.1:notaport",
    "amqp://u:s3cretpw/?@127.0.0.1:5672/%2f",
    "amqp:u:s3cretpw@127.0.0.1",
];

#[test]
fn malformed_uri_never_shows_the_password() {
    for uri in MALFORMED_URIS {
        let (o, _) = callme_within(
            &[
                "call",
                "--timeout",
                "5",
                "--amqp-url",
                uri,
                "calc",
                "add",
                "1",
                "2",
            ],
            "trace",
            Duration::from_secs(30),
        );
        let out = all_output(&o);
        assert!(!out.contains("s3cretpw"), "{uri}: {out}");
        assert!(!o.status.success());
        let e = stderr_json(&o);
        assert!(
            e["message"].as_str().unwrap().contains("invalid AMQP URI"),
            "{uri}: {e}"
        );
        assert_eq!(e["type"], "Config", "{uri}: {e}");
    }
}

/// Tracing everything, lapin's included, by target or by span, never
/// writes the broker password: the connection's `start-ok` carries it
/// (SASL PLAIN), and lapin traces each frame it writes with its bytes.
#[test]
fn tracing_every_frame_never_shows_the_password() {
    let url = format!(
        "amqp://guest:s3cretpw@{}/%2f",
        callme_tests::amqp_host_port()
    );
    let bytes = b"s3cretpw".map(|b| b.to_string()).join(", ");
    // Each filter, and whether lapin logs anything with it (at other
    // levels than `trace`), when that is sure.
    for (rust_log, some_lapin) in [
        ("trace", Some(true)),
        ("lapin=trace", Some(true)),
        (
            "lapin::io_loop=trace,lapin::frames=trace,lapin::internal_rpc=trace",
            None,
        ),
        // By span: lapin's I/O thread runs in one named `io_loop`.
        ("[io_loop]=trace", None),
        // What keeps the password out keeps lapin quiet where asked.
        ("off", Some(false)),
    ] {
        let (o, _) = callme_within(
            &[
                "call",
                "--timeout",
                "5",
                "--amqp-url",
                &url,
                "calc",
                "add",
                "1",
                "2",
            ],
            rust_log,
            Duration::from_secs(30),
        );
        let out = all_output(&o);
        assert!(!o.status.success(), "{rust_log}: {out}");
        if let Some(some_lapin) = some_lapin {
            assert_eq!(
                out.contains("lapin"),
                some_lapin,
                "{rust_log}: what lapin logged: {out}"
            );
        }
        assert!(!out.contains("s3cretpw"), "{rust_log}: {out}");
        assert!(!out.contains(&bytes), "{rust_log}: {out}");
    }
}

#[test]
fn serve_with_a_malformed_uri_never_shows_the_password() {
    let dir = tempdir();
    let plugins = dir.to_str().unwrap();
    for uri in MALFORMED_URIS {
        let (o, took) = callme_within(
            &["serve", "--plugins", plugins, "--amqp-url", uri],
            "trace",
            Duration::from_secs(30),
        );
        let out = all_output(&o);
        assert!(!out.contains("s3cretpw"), "{uri}: {out}");
        assert!(!o.status.success(), "{uri}: serve did not stop ({took:?})");
        assert!(out.contains("invalid AMQP URI"), "{uri}: {out}");
        // The library's type, as `callme call` gives it.
        assert_eq!(stderr_json(&o)["type"], "Config", "{uri}: {out}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_file_that_is_not_wasm_is_refused_in_one_line_without_its_content() {
    let dir = tempdir();
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, "API_KEY=sk-live-0123456789abcdef\nsecond line\n").unwrap();
    let text = dir.join("notes.wasm");
    std::fs::copy(&secret, &text).unwrap();
    let plugins = dir.join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let link = plugins.join("linked.wasm");
    std::os::unix::fs::symlink(&secret, &link).unwrap();

    for file in [&text, &link] {
        let f = file.to_str().unwrap();
        for args in [vec!["inspect", f], vec!["invoke", f, "add", "1", "2"]] {
            let o = callme(&args);
            assert!(!o.status.success());
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
            for content in ["API_KEY", "sk-live", "second", "0x41", "65, 80"] {
                assert!(!err.contains(content), "{args:?}: {err}");
            }
            let e = stderr_json(&o);
            assert_eq!(e["type"], "InvalidPlugin");
            let message = e["message"].as_str().unwrap();
            assert!(message.contains("not a WebAssembly component"), "{message}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn one_shot_commands_print_only_their_result() {
    let srv = callme_tests::server(callme::ServerOptions::default()).await;
    let id = unique("quiet");
    srv.serve_native(&id, callme_tests::native_add())
        .await
        .unwrap();
    // The default log filter, as a user gets it.
    let run = |args: Vec<String>| {
        Command::new(callme_bin())
            .args(&args)
            .env("CALLME_AMQP_URL", amqp_url())
            .env_remove("RUST_LOG")
            .output()
            .expect("run callme")
    };
    for i in 0..20 {
        let args: Vec<String> = if i % 4 == 3 {
            vec!["describe".into(), id.clone()]
        } else {
            ["call", &id, "add", "1", "1"].map(String::from).to_vec()
        };
        let o = tokio::task::spawn_blocking({
            let args = args.clone();
            move || run(args)
        })
        .await
        .unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "",
            "{args:?} wrote to stderr"
        );
    }
}

/// `--no-pipelined-replies` turns the reply pipeline off, and the host
/// says so; it answers all the same.
#[tokio::test]
async fn serve_without_pipelined_replies() {
    let dir = tempdir();
    let id = unique("unpiped");
    std::fs::copy(plugin_path("calc"), dir.join(format!("{id}.wasm"))).unwrap();
    let port = callme_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut host = Host::serve(&dir, &["--no-pipelined-replies", "--metrics-addr", &addr]);
    host.wait_ready(Duration::from_secs(30));
    let call_id = id.clone();
    let o = tokio::task::spawn_blocking(move || callme(&["call", &call_id, "add", "1", "1"]))
        .await
        .unwrap();
    assert_eq!(stdout(&o), "2", "{}", String::from_utf8_lossy(&o.stderr));
    // A burst, whose replies a host pipelines when it may (a proxy names
    // its reply queue, and many are in flight): none is.
    let p = callme_tests::proxy(Duration::from_secs(30)).await;
    let calls = (0..48i64).map(|i| {
        let sp = p.use_server(&id);
        async move { sp.invoke::<_, i64>("add", (i, 1)).await }
    });
    for (i, sum) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(sum.unwrap(), i as i64 + 1);
    }
    let text = callme_tests::scrape(port).await;
    let served = callme_tests::value_of(&text, "callme_calls_total", &[("server_id", &id)]);
    assert!(
        served.is_some_and(|n| n >= 49.0),
        "calls counted: {served:?}"
    );
    let pipelined = callme_tests::value(&text, "callme_replies_pipelined_total", &[]);
    assert_eq!(pipelined, 0.0, "replies pipelined with the pipeline off");
    let log = host.log_text();
    assert!(
        log.contains("replies are not pipelined (turned off)"),
        "{log}"
    );
    assert!(!log.contains("replies are pipelined by"), "{log}");
}

#[test]
fn a_host_given_its_broker_password_on_the_command_line_says_where_it_belongs() {
    let said = "the broker password is on the command line";
    let dir = tempdir();
    let url = amqp_url();
    assert!(
        url.contains(":guest@"),
        "the test broker's URL names a password: {url}"
    );
    let mut in_argv = Host::start(
        Command::new(callme_bin()),
        &dir,
        &["--amqp-url", &url],
        "callme=info",
    );
    in_argv.wait_ready(Duration::from_secs(30));
    in_argv.terminate();
    in_argv.wait(Duration::from_secs(10));
    let log = in_argv.log_text();
    assert!(
        log.contains(said) && log.contains("CALLME_AMQP_URL"),
        "{log}"
    );
    assert!(!log.contains(":guest@"), "{log}");
    // A list of nodes, spaced after its comma, with no password (the
    // broker's default login): nothing to say.
    let bare = url.replacen("guest:guest@", "", 1);
    let list = format!("{bare}, {bare}");
    let mut no_password = Host::start(
        Command::new(callme_bin()),
        &dir,
        &["--amqp-url", &list],
        "callme=info",
    );
    no_password.wait_ready(Duration::from_secs(30));
    no_password.terminate();
    no_password.wait(Duration::from_secs(10));
    let log = no_password.log_text();
    assert!(log.contains("serving") || log.contains("ready"), "{log}");
    assert!(!log.contains(said), "{log}");
    // From the environment (as every other test host gets it): nothing to say.
    let mut in_env = Host::serve(&dir, &[]);
    in_env.wait_ready(Duration::from_secs(30));
    in_env.terminate();
    in_env.wait(Duration::from_secs(10));
    let log = in_env.log_text();
    assert!(log.contains("serving") || log.contains("ready"), "{log}");
    assert!(!log.contains(said), "{log}");
}

/// `callme serve` waits for a broker that is down, but ends at once, and
/// not successfully, on what waiting cannot cure: a refused login (the
/// password never shown) and a peer that is not an AMQP broker.
#[test]
fn serve_ends_at_once_on_what_waiting_cannot_cure() {
    let dir = tempdir();
    let not_amqp = fake_broker(|stream| {
        let mut header = [0u8; 8];
        let _ = stream.read_exact(&mut header);
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let cases = [
        (
            callme_tests::amqp_url_as("guest", "not-the-password-xyzzy"),
            "refused",
        ),
        (
            format!("amqp://guest:guest@127.0.0.1:{not_amqp}/%2f"),
            "is not an AMQP broker",
        ),
    ];
    for (url, says) in cases {
        let mut host = Host::start(
            Command::new(callme_bin()),
            &dir,
            &["--amqp-url", &url],
            "callme=info",
        );
        let code = host.wait(Duration::from_secs(20));
        let log = host.log_text();
        assert!(
            matches!(code, Some(c) if c != 0),
            "{says}: ended with {code:?}: {log}"
        );
        assert!(log.contains(says), "{says}: {log}");
        assert!(!log.contains("xyzzy"), "{log}");
    }
}

/// Every setting of `serve` can come from the environment, as a service
/// manager gives them: the plugins directory, concurrency, ready file,
/// metrics address, instance cap and the reply pipeline.
#[tokio::test]
async fn serve_takes_its_settings_from_the_environment() {
    let dir = tempdir();
    let id = unique("from-env");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let ready = dir.with_extension("env-ready");
    let log = dir.with_extension("env-log");
    let port = callme_tests::free_port();
    let mut child = Command::new(callme_bin())
        .arg("serve")
        .env("CALLME_AMQP_URL", amqp_url())
        .env("CALLME_PLUGINS", &dir)
        .env("CALLME_CONCURRENCY", "3")
        .env("CALLME_READY_FILE", &ready)
        .env("CALLME_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("CALLME_MAX_INSTANCES", "7")
        .env("CALLME_NO_PIPELINED_REPLIES", "1")
        .env("CALLME_DELIVERY_LIMIT", "9")
        .env("CALLME_GRACE", "7")
        .env(
            "CALLME_CACHE_DIR",
            callme_tests::target_dir().join("test-cache"),
        )
        .env("RUST_LOG", "callme=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let up = eventually(Duration::from_secs(30), || async {
        let said = std::fs::read_to_string(&ready).ok()?;
        (said.trim() == pid).then_some(())
    })
    .await;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        up.is_some(),
        "no ready file from CALLME_READY_FILE: {}",
        text()
    );
    let p = callme_tests::proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    let metrics = callme_tests::scrape(port).await;
    assert!(
        callme_tests::value_of(&metrics, "callme_calls_total", &[("server_id", &id)]).is_some(),
        "no metrics at CALLME_METRICS_ADDR: {metrics}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let said = text();
    for setting in [
        "max_instances=7",
        "concurrency=3",
        "replies are not pipelined (turned off)",
        "delivery_limit=9",
        "grace=7s",
    ] {
        assert!(said.contains(setting), "{setting}: {said}");
    }
}

/// The seed's examples run against the test broker: `add_server` serves
/// `fooserver`, `add_client` prints 2, and `fib_timeout` sees `fib(35)`
/// time out, then answered with a patient timeout. The server binds its
/// arguments as a plugin does: each once, no others, `add` wrapping.
#[tokio::test]
async fn the_seed_examples_run() {
    use std::io::BufRead as _;
    let examples = callme_bin().parent().unwrap().join("examples");
    let example = |name: &str| {
        let path = examples.join(name);
        assert!(
            path.exists(),
            "{} is missing: cargo build --examples",
            path.display()
        );
        let mut command = Command::new(path);
        command.env("CALLME_AMQP_URL", amqp_url());
        command
    };
    let mut server = example("add_server")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Its log and its word, on stdout.
    let lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let said = tokio::task::spawn_blocking(move || {
        lines
            .map_while(Result::ok)
            .take(20)
            .find(|l| l.contains("serving fooserver"))
    })
    .await
    .unwrap();
    assert!(said.is_some(), "add_server never said it serves fooserver");
    let run = |mut command: Command| async move {
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    };
    let client = run(example("add_client")).await;
    assert_eq!(stdout(&client), "2", "{client:?}");
    let fib = run(example("fib_timeout")).await;
    let said = String::from_utf8_lossy(&fib.stdout);
    assert!(fib.status.success(), "{fib:?}");
    assert!(said.contains("fib(35): timed out after"), "{said}");
    assert!(
        said.contains("fib(35) = 9227465 with a 60 s timeout"),
        "{said}"
    );

    let p = callme_tests::proxy(Duration::from_secs(10)).await;
    let foo = p.use_server("fooserver");
    let kind = |r: Result<Value, callme::Error>| match r {
        Err(callme::Error::Remote(e)) => e.kind,
        other => panic!("expected a remote error, got {other:?}"),
    };
    use callme::ErrorKind::InvalidArguments;
    let pos = callme_tests::pos;
    assert_eq!(
        kind(foo.call("add", pos(json!([1, 2, 3]))).await),
        InvalidArguments
    );
    let both = callme::protocol::Args {
        args: vec![json!(1), json!(2)],
        kwargs: json!({"a": 5}).as_object().unwrap().clone(),
    };
    assert_eq!(kind(foo.call("add", both).await), InvalidArguments);
    assert_eq!(
        kind(foo.call("fib", pos(json!([1000]))).await),
        InvalidArguments
    );
    assert_eq!(
        foo.call("add", pos(json!([i64::MAX, 1]))).await.unwrap(),
        json!(i64::MIN)
    );
    let _ = server.kill();
    let _ = server.wait();
}
