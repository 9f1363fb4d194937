//! The same calc in Rust, Python and JavaScript: same inputs, same JSON, same error types.

use std::sync::OnceLock;
use std::time::Duration;

use callme::protocol::Args;
use callme::{Limits, Plugin, PluginError, PluginSettings, TimeoutCause};
use callme_tests::{
    Host, deploy, eventually, kw, load, plugin_bytes, plugin_path, pos, proxy, runtime, tempdir,
    unique,
};
use serde_json::{Value, json};

const LANGUAGES: [&str; 3] = ["calc", "calc-py", "calc-js"];

/// Each language's plugin, compiled once per test binary (big guests take
/// a while to compile; the cache makes later loads cheap).
fn plugin(lang: &str) -> &'static Plugin {
    static CELLS: [OnceLock<Plugin>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = LANGUAGES
        .iter()
        .position(|l| *l == lang)
        .expect("known language");
    CELLS[i].get_or_init(|| load(lang, lang, PluginSettings::default()))
}

#[tokio::test]
async fn same_answers_in_every_language() {
    for lang in LANGUAGES {
        let p = plugin(lang);
        let call = |f: &'static str, a: Value| async move { p.call(f, &pos(a)).await };
        assert_eq!(
            call("add", json!([1, 2])).await.unwrap(),
            json!(3),
            "{lang}"
        );
        let kw = kw(json!({"a": 40, "b": 2}));
        assert_eq!(p.call("add", &kw).await.unwrap(), json!(42), "{lang}");
        assert_eq!(
            call("divide", json!([1.0, 4.0])).await.unwrap(),
            json!(0.25),
            "{lang}"
        );
        assert_eq!(
            call("stats.mean", json!([[1.0, 2.0, 6.0]])).await.unwrap(),
            json!(3.0),
            "{lang}"
        );
        assert_eq!(
            call("stats.mean", json!([[]])).await.unwrap(),
            json!(null),
            "{lang}"
        );
        assert_eq!(
            call("fib", json!([20])).await.unwrap(),
            json!(6765),
            "{lang}"
        );
        assert_eq!(
            call("version", json!([])).await.unwrap(),
            json!("1"),
            "{lang}"
        );
    }
}

#[tokio::test]
async fn same_errors_in_every_language() {
    for lang in LANGUAGES {
        let p = plugin(lang);
        match p.call("divide", &pos(json!([1.0, 0.0]))).await {
            Err(PluginError::GuestError { payload, .. }) => {
                assert_eq!(payload, json!("division by zero"), "{lang}")
            }
            other => panic!("{lang}: expected GuestError, got {other:?}"),
        }
        let e = p.call("add", &pos(json!(["one", 2]))).await.unwrap_err();
        assert!(
            matches!(e, PluginError::InvalidArguments { .. }),
            "{lang}: {e:?}"
        );
        let e = p.call("nope", &Args::default()).await.unwrap_err();
        assert!(
            matches!(e, PluginError::NoSuchFunction { .. }),
            "{lang}: {e:?}"
        );
    }
}

#[tokio::test]
async fn guest_exceptions_reach_the_caller() {
    for lang in ["calc-py", "calc-js"] {
        match plugin(lang).call("boom", &pos(json!(["kaboom-42"]))).await {
            Err(PluginError::Trap { message }) | Err(PluginError::GuestError { message, .. }) => {
                assert!(message.contains("kaboom-42"), "{lang}: {message}")
            }
            other => panic!("{lang}: expected Trap or GuestError, got {other:?}"),
        }
        // And the next call works.
        let v = plugin(lang).call("add", &pos(json!([2, 2]))).await.unwrap();
        assert_eq!(v, json!(4), "{lang}");
    }
}

#[tokio::test]
async fn limits_apply_in_every_language() {
    for lang in LANGUAGES {
        // Warm the shared cache, then load with tight limits.
        let _ = plugin(lang);
        let tight = PluginSettings {
            limits: Limits {
                fuel: 20_000_000,
                ..Limits::default()
            },
            ..PluginSettings::default()
        };
        let p = Plugin::load(&runtime(), lang, &plugin_bytes(lang), tight).unwrap();
        let e = p.call("fib", &pos(json!([35]))).await.unwrap_err();
        assert!(
            matches!(
                e,
                PluginError::Timeout {
                    cause: TimeoutCause::Fuel,
                    ..
                }
            ),
            "{lang}: {e:?}"
        );

        let small = PluginSettings {
            limits: Limits {
                memory_bytes: 1 << 20,
                ..Limits::default()
            },
            ..PluginSettings::default()
        };
        let p = Plugin::load(&runtime(), lang, &plugin_bytes(lang), small).unwrap();
        let r = p.call("add", &pos(json!([1, 1]))).await;
        if lang == "calc" {
            // The Rust guest fits in 1 MiB... or nearly: either way no panic.
            assert!(
                matches!(r, Ok(_) | Err(PluginError::MemoryLimit { .. })),
                "{lang}: {r:?}"
            );
        } else {
            assert!(
                matches!(r, Err(PluginError::MemoryLimit { .. })),
                "{lang}: {r:?}"
            );
        }
    }
}

#[tokio::test]
async fn python_and_javascript_plugins_hot_deploy_and_serve() {
    for lang in ["calc-py", "calc-js"] {
        let _ = plugin(lang); // compiled into the shared cache first
    }
    let dir = tempdir();
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(30)).await;
    for lang in ["calc-py", "calc-js"] {
        let id = unique(lang);
        deploy(&plugin_path(lang), &dir, &format!("{id}.wasm"));
        let v = eventually(Duration::from_secs(120), || async {
            p.use_server(&id)
                .call("add", pos(json!([20, 22])))
                .await
                .ok()
        })
        .await;
        assert_eq!(v, Some(json!(42)), "{lang}: {}", host.log_text());
        let e = p
            .use_server(&id)
            .call("divide", pos(json!([1, 0])))
            .await
            .unwrap_err();
        assert_eq!(
            e.remote().map(|r| r.data.clone()),
            Some(json!("division by zero")),
            "{lang}"
        );
    }
}
