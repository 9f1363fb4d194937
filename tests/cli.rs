//! The `callme` command end to end: inspect, invoke, serve, call, describe.

use std::process::{Command, Output};
use std::time::Duration;

use callme_tests::{Host, amqp_url, callme_bin, eventually, plugin_path, tempdir, unique};
use serde_json::Value;

fn callme(args: &[&str]) -> Output {
    Command::new(callme_bin())
        .args(args)
        .env("CALLME_AMQP_URL", amqp_url())
        .env("RUST_LOG", "off")
        .output()
        .expect("run callme")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
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

    let o = callme(&["call", &id, "divide", "1", "0"]);
    assert_eq!(stderr_json(&o)["type"], "GuestError");
    let o = callme(&["call", "--timeout", "5", &unique("nobody"), "add", "1", "1"]);
    assert_eq!(stderr_json(&o)["type"], "NoSuchServer");

    host.terminate();
    assert_eq!(host.wait(Duration::from_secs(20)), Some(0), "graceful exit");
    std::fs::remove_dir_all(&dir).ok();
}
