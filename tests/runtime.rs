//! The plugin runtime without a broker: types, arguments, limits, containment.

use std::time::Duration;

use callme::protocol::Args;
use callme::{Limits, Plugin, PluginError, PluginSettings, TimeoutCause};
use callme_tests::{eventually, kw, load, plugin_bytes, pos, runtime};
use serde_json::{Value, json};

async fn echo(p: &Plugin, func: &str, v: Value) -> Value {
    p.call(func, &pos(json!([v])))
        .await
        .unwrap_or_else(|e| panic!("{func}({v}) failed: {e}"))
}

#[tokio::test]
async fn every_wit_type_round_trips() {
    let p = load("types", "types", PluginSettings::default());
    let cases = [
        ("echo-bool", json!(true)),
        ("echo-s8", json!(-128)),
        ("echo-s16", json!(-32768)),
        ("echo-s32", json!(-2147483648i64)),
        ("echo-s64", json!(i64::MIN)),
        ("echo-u8", json!(255)),
        ("echo-u16", json!(65535)),
        ("echo-u32", json!(4294967295u64)),
        ("echo-u64", json!(u64::MAX)),
        ("echo-f32", json!(1.5)),
        ("echo-f64", json!(-2.25e100)),
        ("echo-f64", json!("NaN")),
        ("echo-f64", json!("-Infinity")),
        ("echo-char", json!("🦀")),
        ("echo-string", json!("héllo\nworld")),
        ("echo-list", json!([1, -2, 3])),
        ("echo-bytes", json!([0, 255, 7])),
        ("echo-tuple", json!([7, "seven", false])),
        ("echo-record", json!({"x": 1, "y": -2, "label": "p"})),
        ("echo-variant", json!({"circle": 2.5})),
        (
            "echo-variant",
            json!({"rect": {"x": 1, "y": 2, "label": "r"}}),
        ),
        ("echo-variant", json!({"empty": null})),
        ("echo-enum", json!("green")),
        ("echo-flags", json!(["read", "exec"])),
        ("echo-flags", json!([])),
        ("echo-option", json!("some text")),
        ("echo-option", json!(null)),
        ("echo-nested", json!([{"x": 0, "y": 0, "label": ""}, null])),
    ];
    for (func, v) in cases {
        assert_eq!(echo(&p, func, v.clone()).await, v, "{func}");
    }
    // Flags come back in declaration order, duplicates folded.
    assert_eq!(
        echo(&p, "echo-flags", json!(["exec", "read", "exec"])).await,
        json!(["read", "exec"])
    );
    // A payload-less case may be written as a bare string.
    assert_eq!(
        echo(&p, "echo-variant", json!("empty")).await,
        json!({"empty": null})
    );
    // A top-level result is the function's own outcome: ok is the value...
    assert_eq!(echo(&p, "echo-result", json!({"ok": 5})).await, json!(5));
    // ...and err is a GuestError.
    let err = p
        .call("echo-result", &pos(json!([{"err": "no"}])))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::GuestError { payload, .. } if payload == &json!("no")),
        "{err:?}"
    );
}

#[tokio::test]
async fn wrong_arguments_name_parameter_and_type() {
    let p = load("types", "types", PluginSettings::default());
    let cases = [
        ("echo-u8", pos(json!([256])), "u8"),
        ("echo-u8", pos(json!([-1])), "u8"),
        ("echo-s8", pos(json!([1.5])), "s8"),
        ("echo-char", pos(json!(["ab"])), "char"),
        ("echo-bool", pos(json!(["true"])), "bool"),
        ("echo-record", pos(json!([{"x": 1, "y": 2}])), "label"),
        (
            "echo-record",
            pos(json!([{"x": 1, "y": 2, "label": "", "z": 0}])),
            "z",
        ),
        ("echo-enum", pos(json!(["purple"])), "enum"),
        ("echo-flags", pos(json!([["fly"]])), "fly"),
        ("echo-variant", pos(json!([{"triangle": 1}])), "triangle"),
        ("echo-tuple", pos(json!([[1, "x"]])), "tuple"),
        ("echo-list", pos(json!([[1, "x"]])), "x[1]"),
        (
            "describe-point",
            pos(json!([{"x": 1, "y": 2, "label": "a"}])),
            "scale",
        ),
        ("echo-bool", pos(json!([true, false])), "takes 1 argument"),
        (
            "echo-bool",
            kw(json!({"y": true})),
            "unknown keyword argument `y`",
        ),
    ];
    for (func, args, needle) in cases {
        match p.call(func, &args).await {
            Err(PluginError::InvalidArguments { message }) => {
                assert!(
                    message.contains(needle),
                    "{func}: `{message}` lacks `{needle}`"
                )
            }
            other => panic!("{func}: expected InvalidArguments, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn keyword_positional_and_dotted_calls() {
    let calc = load("calc", "calc", PluginSettings::default());
    assert_eq!(
        calc.call("add", &pos(json!([1, 2]))).await.unwrap(),
        json!(3)
    );
    assert_eq!(
        calc.call("add", &kw(json!({"a": 40, "b": 2})))
            .await
            .unwrap(),
        json!(42)
    );
    let mixed = Args {
        args: vec![json!(10)],
        kwargs: json!({"b": 5}).as_object().unwrap().clone(),
    };
    assert_eq!(calc.call("add", &mixed).await.unwrap(), json!(15));
    assert_eq!(
        calc.call("stats.mean", &pos(json!([[1.0, 2.0, 6.0]])))
            .await
            .unwrap(),
        json!(3.0)
    );
    assert_eq!(
        calc.call("stats.mean", &pos(json!([[]]))).await.unwrap(),
        json!(null)
    );
    assert_eq!(
        calc.call("fib", &pos(json!([20]))).await.unwrap(),
        json!(6765)
    );
    assert_eq!(
        calc.call("divide", &pos(json!([1.0, 4.0]))).await.unwrap(),
        json!(0.25)
    );
    match calc.call("divide", &pos(json!([1.0, 0.0]))).await {
        Err(PluginError::GuestError { message, payload }) => {
            assert!(message.contains("division by zero"));
            assert_eq!(payload, json!("division by zero"));
        }
        other => panic!("expected GuestError, got {other:?}"),
    }
    match calc.call("nope", &Args::default()).await {
        Err(PluginError::NoSuchFunction { name, available }) => {
            assert_eq!(name, "nope");
            assert!(available.contains(&"stats.mean".to_string()));
        }
        other => panic!("expected NoSuchFunction, got {other:?}"),
    }
    let t = load("types", "types", PluginSettings::default());
    assert_eq!(
        t.call(
            "describe-point",
            &kw(json!({"scale": 3, "p": {"x": 1, "y": 2, "label": "a"}}))
        )
        .await
        .unwrap(),
        json!("a@(3,6)")
    );
}

#[tokio::test]
async fn exports_are_listed_with_signatures() {
    let calc = load("calc", "calc", PluginSettings::default());
    let fns = calc.functions();
    let sig = |n: &str| {
        fns.iter()
            .find(|f| f.name == n)
            .map(|f| f.signature.clone())
    };
    assert_eq!(sig("add").as_deref(), Some("func(a: s64, b: s64) -> s64"));
    assert_eq!(
        sig("stats.mean").as_deref(),
        Some("func(xs: list<f64>) -> option<f64>")
    );
    assert_eq!(
        sig("divide").as_deref(),
        Some("func(a: f64, b: f64) -> result<f64, string>")
    );
    assert_eq!(sig("fib").as_deref(), Some("func(n: u32) -> u64"));
}

/// Each hostile call, then a good call on the same runtime.
async fn contained(p: &Plugin, func: &str, args: Args) -> PluginError {
    let err = p.call(func, &args).await.expect_err(func);
    let ok = p.call("counter", &Args::default()).await;
    assert_eq!(ok.unwrap(), json!(1), "the next call after {func} works");
    err
}

/// A plugin's start-up code does not take its fuel from the call that
/// makes the instance: a call that makes its own (no spare ready) and one
/// served from a spare (made ahead, its start-up on a tank of its own)
/// have the same fuel, so a call's outcome does not depend on whether a
/// spare was ready. Before, start-up code using over half the fuel left
/// too little for the call that made its instance, and only for that one.
#[tokio::test]
async fn start_up_code_takes_no_fuel_from_the_call_that_makes_the_instance() {
    let limits = Limits {
        fuel: 20_000_000,
        ..Limits::default()
    };
    let p = from_text(STARTS_HEAVY, "starts-heavy", limits);
    assert_eq!(p.spares(), 0);
    assert_eq!(p.call("work", &Args::default()).await.unwrap(), json!(1));
    p.start_prewarm(&tokio::runtime::Handle::current());
    let spare = eventually(Duration::from_secs(10), || async {
        (p.spares() > 0).then_some(())
    })
    .await;
    assert!(spare.is_some(), "no spare was made");
    assert_eq!(p.call("work", &Args::default()).await.unwrap(), json!(1));
}

/// A component whose start-up code (a core `start` function) and whose
/// `work` each burn about 13 million units of fuel; `work` returns 1.
const STARTS_HEAVY: &str = r#"
(component
  (core module $m
    (func $burn (param $n i32)
      (loop $l
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br_if $l (local.get $n))))
    (func $start (call $burn (i32.const 2000000)))
    (start $start)
    (func (export "work") (result i32) (call $burn (i32.const 2000000)) (i32.const 1)))
  (core instance $i (instantiate $m))
  (func (export "work") (result u32) (canon lift (core func $i "work"))))
"#;

#[tokio::test]
async fn runaway_loop_runs_out_of_fuel() {
    let p = load("hostile", "hostile", PluginSettings::default());
    let e = contained(&p, "spin", Args::default()).await;
    assert!(
        matches!(
            e,
            PluginError::Timeout {
                cause: TimeoutCause::Fuel,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn deadline_stops_a_loop_with_unlimited_fuel() {
    let limits = PluginSettings {
        limits: Limits {
            fuel: u64::MAX,
            deadline: Duration::from_millis(300),
            ..Limits::default()
        },
        ..PluginSettings::default()
    };
    let p = load("hostile", "hostile", limits);
    let e = contained(&p, "spin", Args::default()).await;
    assert!(
        matches!(
            e,
            PluginError::Timeout {
                cause: TimeoutCause::Deadline,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn blocking_sleep_hits_the_deadline() {
    let limits = PluginSettings {
        limits: Limits {
            deadline: Duration::from_millis(300),
            ..Limits::default()
        },
        ..PluginSettings::default()
    };
    let p = load("hostile", "hostile", limits);
    let started = std::time::Instant::now();
    let e = contained(&p, "sleep", pos(json!([60_000]))).await;
    assert!(
        matches!(
            e,
            PluginError::Timeout {
                cause: TimeoutCause::Deadline,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn memory_bomb_is_contained() {
    let p = load("hostile", "hostile", PluginSettings::default());
    let e = contained(&p, "bomb", Args::default()).await;
    assert!(matches!(e, PluginError::MemoryLimit { .. }), "{e:?}");
}

#[tokio::test]
async fn unbounded_recursion_traps() {
    let p = load("hostile", "hostile", PluginSettings::default());
    let e = contained(&p, "recurse", pos(json!([1]))).await;
    match e {
        PluginError::Trap { message } => assert!(message.contains("stack"), "{message}"),
        other => panic!("expected Trap, got {other:?}"),
    }
}

/// Plugins built here have a 256 KiB stack in linear memory (the
/// workspace's `.cargo/config.toml`), not rustc's 1 MiB: a frame larger than
/// that traps (the stack is first in memory, so an overflow runs off its
/// start rather than into the plugin's data), and the next call is fresh.
#[tokio::test]
async fn a_frame_larger_than_the_guest_stack_traps() {
    let p = load("hostile", "hostile", PluginSettings::default());
    assert_eq!(
        p.call("big-frame", &pos(json!([64]))).await.unwrap(),
        json!(64 << 10)
    );
    let e = contained(&p, "big-frame", pos(json!([512]))).await;
    assert!(matches!(e, PluginError::Trap { .. }), "{e:?}");
    assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
    assert_eq!(
        p.call("big-frame", &pos(json!([64]))).await.unwrap(),
        json!(64 << 10)
    );
}

#[tokio::test]
async fn panic_message_reaches_the_caller() {
    let p = load("hostile", "hostile", PluginSettings::default());
    let e = contained(&p, "boom", pos(json!(["the sky is falling"]))).await;
    match e {
        PluginError::Trap { message } => {
            assert!(message.contains("the sky is falling"), "{message}")
        }
        other => panic!("expected Trap, got {other:?}"),
    }
}

#[tokio::test]
async fn huge_results_are_refused() {
    // 200 MiB cannot even be built under the 64 MiB memory cap.
    let p = load("hostile", "hostile", PluginSettings::default());
    let e = contained(&p, "huge", pos(json!([200]))).await;
    assert!(matches!(e, PluginError::MemoryLimit { .. }), "{e:?}");
    // 20 MiB fits in memory but not under the 16 MiB result cap.
    let e = contained(&p, "huge", pos(json!([20]))).await;
    match e {
        PluginError::MemoryLimit { message } => assert!(message.contains("result"), "{message}"),
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    // Under the cap it comes through whole.
    let v = p.call("huge", &pos(json!([1]))).await.unwrap();
    assert_eq!(v.as_str().map(str::len), Some(1 << 20));
}

#[tokio::test]
async fn files_environment_and_network_are_denied() {
    let p = load("hostile", "hostile", PluginSettings::default());
    for (func, arg) in [
        ("read-file", "/etc/passwd"),
        ("read-file", "Cargo.toml"),
        ("read-env", "PATH"),
        ("connect", "127.0.0.1:5682"),
    ] {
        let e = contained(&p, func, pos(json!([arg]))).await;
        assert!(
            matches!(e, PluginError::GuestError { .. }),
            "{func}({arg}): {e:?}"
        );
    }
}

#[tokio::test]
async fn no_state_leaks_between_calls() {
    let p = load("hostile", "hostile", PluginSettings::default());
    for _ in 0..5 {
        assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
    }
    // A session keeps its instance: the baseline that shows the counter
    // really counts.
    let mut s = p.session().await.unwrap();
    assert_eq!(s.call("counter", &Args::default()).await.unwrap(), json!(1));
    assert_eq!(s.call("counter", &Args::default()).await.unwrap(), json!(2));
}

#[tokio::test]
async fn chatty_guests_are_captured_not_failed() {
    let p = load("hostile", "hostile", PluginSettings::default());
    let text = "x".repeat(200_000);
    assert_eq!(
        p.call("print", &pos(json!([text]))).await.unwrap(),
        json!(null)
    );
}

#[tokio::test]
async fn settings_a_program_makes_are_bounded_as_a_sidecars_are() {
    // A deadline of `Duration::MAX` overflowed the clock of every call (a
    // panic in the caller's task); the others are out of a sidecar's
    // bounds too, and a program's settings now meet the same ones.
    let bytes = plugin_bytes("calc");
    let mut http_timeout = PluginSettings::default();
    http_timeout.capabilities.http.timeout = Duration::MAX;
    let mut no_calls = PluginSettings::default();
    no_calls.capabilities.rpc.max_calls = 0;
    for (key, settings) in [
        (
            "deadline_ms",
            PluginSettings {
                limits: Limits {
                    deadline: Duration::MAX,
                    ..Limits::default()
                },
                ..PluginSettings::default()
            },
        ),
        (
            "fuel",
            PluginSettings {
                limits: Limits {
                    fuel: 0,
                    ..Limits::default()
                },
                ..PluginSettings::default()
            },
        ),
        (
            "concurrency",
            PluginSettings {
                concurrency: Some(0),
                ..PluginSettings::default()
            },
        ),
        ("http_timeout_ms", http_timeout),
        ("rpc_max_calls", no_calls),
    ] {
        match Plugin::load(&runtime(), "calc", &bytes, settings) {
            Err(PluginError::InvalidPlugin { message }) => {
                assert!(message.contains(key), "{key}: {message}");
            }
            Err(other) => panic!("{key}: expected InvalidPlugin, got {other:?}"),
            Ok(_) => panic!("{key}: loaded"),
        }
    }
}

#[tokio::test]
async fn unknown_import_is_refused_at_load() {
    let e = Plugin::load(
        &runtime(),
        "bad",
        &plugin_bytes("bad-import"),
        PluginSettings::default(),
    )
    .unwrap_err();
    match e {
        PluginError::InvalidPlugin { message } => assert!(message.contains("evil"), "{message}"),
        other => panic!("expected InvalidPlugin, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_is_refused_at_load() {
    for bytes in [&b"not wasm"[..], &plugin_bytes("calc")[..1000]] {
        let e = Plugin::load(&runtime(), "junk", bytes, PluginSettings::default()).unwrap_err();
        assert!(matches!(e, PluginError::InvalidPlugin { .. }), "{e:?}");
    }
}

#[tokio::test]
async fn second_load_hits_the_compilation_cache() {
    let rt = runtime();
    let bytes = plugin_bytes("types");
    Plugin::load(&rt, "t1", &bytes, PluginSettings::default()).unwrap();
    let (hits, _) = rt.cache_stats();
    Plugin::load(&rt, "t2", &bytes, PluginSettings::default()).unwrap();
    let (hits_after, _) = rt.cache_stats();
    assert!(hits_after > hits, "cache hits {hits} -> {hits_after}");
}

#[tokio::test]
async fn reused_instances_keep_limits_per_call_and_are_dropped_after_errors() {
    let limits = PluginSettings {
        reuse_instances: true,
        ..PluginSettings::default()
    };
    let p = load("hostile", "hostile", limits);
    // One call at a time, so the same instance serves each: state is kept
    // (that is what reuse means), which the counter shows.
    assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
    assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(2));
    // Limits still apply per call...
    let e = p.call("spin", &Args::default()).await.unwrap_err();
    assert!(
        matches!(
            e,
            PluginError::Timeout {
                cause: TimeoutCause::Fuel,
                ..
            }
        ),
        "{e:?}"
    );
    // ...and the instance that failed is gone: the next call starts fresh.
    assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
    let e = p.call("bomb", &Args::default()).await.unwrap_err();
    assert!(matches!(e, PluginError::MemoryLimit { .. }), "{e:?}");
    assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
    // Fuel is refilled per call: many cheap calls never add up to a timeout.
    let calc = load(
        "calc",
        "calc",
        PluginSettings {
            limits: Limits {
                fuel: 1_000_000,
                ..Limits::default()
            },
            reuse_instances: true,
            ..PluginSettings::default()
        },
    );
    for i in 0..200i64 {
        assert_eq!(
            calc.call("add", &pos(json!([i, 1]))).await.unwrap(),
            json!(i + 1)
        );
    }
}

#[tokio::test]
async fn spares_are_fresh_and_get_their_limits_when_taken() {
    let limits = PluginSettings {
        limits: Limits {
            deadline: Duration::from_millis(300),
            ..Limits::default()
        },
        prewarm: 3,
        ..PluginSettings::default()
    };
    let p = load("hostile", "hostile", limits);
    // Nothing is made ahead of time until a server (here: the test) asks.
    assert_eq!(p.spares(), 0);
    p.call("counter", &Args::default()).await.unwrap();
    assert_eq!(p.spares(), 0);
    p.start_prewarm(&tokio::runtime::Handle::current());
    let ready = || async { (p.spares() == 3).then_some(()) };
    assert!(
        eventually(Duration::from_secs(30), ready).await.is_some(),
        "spares made: {}",
        p.spares()
    );
    // A spare is armed when taken, not when made: one that waited longer
    // than the deadline still gets the whole deadline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.call("sleep", &pos(json!([50]))).await.unwrap(),
        json!(null)
    );
    // Every call gets an instance of its own, spare or not, and each one
    // taken is replaced.
    for _ in 0..20 {
        assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
    }
    assert!(
        eventually(Duration::from_secs(30), ready).await.is_some(),
        "spares after the calls: {}",
        p.spares()
    );
    // Limits apply to calls on spares; the spare that failed is gone.
    let e = p.call("spin", &Args::default()).await.unwrap_err();
    assert!(matches!(e, PluginError::Timeout { .. }), "{e:?}");
    let e = p.call("bomb", &Args::default()).await.unwrap_err();
    assert!(matches!(e, PluginError::MemoryLimit { .. }), "{e:?}");
    assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
}

/// A spare's monotonic clock stands still while it waits for its call:
/// read at the start of a call, it says how long the instance took to
/// make and little more, not how long ago the call before took the last
/// spare (something of another caller's call). The host's clock counted
/// from when the store was made: 3 s here.
#[tokio::test]
async fn a_spares_clock_says_nothing_of_how_long_it_waited() {
    let p = load(
        "hostile",
        "hostile",
        PluginSettings {
            prewarm: 1,
            ..PluginSettings::default()
        },
    );
    p.start_prewarm(&tokio::runtime::Handle::current());
    let ready = || async { (p.spares() == 1).then_some(()) };
    assert!(eventually(Duration::from_secs(30), ready).await.is_some());
    p.call("uptime", &Args::default()).await.unwrap();
    assert!(eventually(Duration::from_secs(30), ready).await.is_some());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let uptime = p.call("uptime", &Args::default()).await.unwrap();
    let ns = uptime.as_u64().expect("nanoseconds");
    assert!(
        ns < 1_000_000_000,
        "a spare's clock read {ns} ns at the start of its call, after it waited 3 s"
    );
}

/// Asks the kernel to page out every private writable mapping of this
/// process (`MADV_PAGEOUT`, Linux 5.4 and later): with swap on, the pages
/// written go to swap.
#[allow(unsafe_code)]
fn page_out_everything() {
    unsafe extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    const MADV_PAGEOUT: i32 = 21;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let (Some(range), Some(perms)) = (cols.next(), cols.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        if perms.starts_with("rw") {
            // SAFETY: advice only; MADV_PAGEOUT never changes what the
            // memory holds, and failures (a range it does not apply to)
            // are ignored.
            unsafe {
                madvise(start as *mut _, end - start, MADV_PAGEOUT);
            }
        }
    }
}

/// KiB of this process in swap (`VmSwap`).
fn swapped_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmSwap:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Says the swap test was skipped, and why; fails instead where
/// `CALLME_TEST_SWAP=required` (as `.ci/run` sets it once swap is on).
fn skip_without_swap(why: &str) {
    assert_ne!(
        std::env::var("CALLME_TEST_SWAP").as_deref(),
        Ok("required"),
        "CALLME_TEST_SWAP=required, but {why}"
    );
    eprintln!("skipped: {why}");
}

/// Whether a swap device is on (`/proc/swaps` lists more than its header).
fn swap_on() -> bool {
    std::fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() > 1)
}

/// An instance's memory, swapped out while it lived, does not reach the
/// next instance made in its slot: each call's state is its own even under
/// memory pressure. Needs swap (`.ci/run` turns on a swap file and sets
/// `CALLME_TEST_SWAP=required`); without it the test says so and checks
/// nothing else. The rounds run in a process of their own
/// ([`swapped_out_slot_probe`]), which pages out all of its memory: a small
/// process, so that fits in the swap, and the tests beside it keep theirs.
#[tokio::test]
async fn a_fresh_instance_never_sees_its_slots_last_memory_swapped_out() {
    if !swap_on() {
        skip_without_swap("no swap is on (swapon a file to run this test)");
        return;
    }
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .env(PROBE, "1")
            .args([
                "--exact",
                "runtime::swapped_out_slot_probe",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the probe did not run: {text}");
    if let Some(why) = text.lines().find(|l| l.starts_with("skipped:")) {
        eprintln!("{why}");
    }
}

/// Set in the process that runs [`swapped_out_slot_probe`]: the probe pages
/// out its whole process, so it runs nowhere else.
const PROBE: &str = "CALLME_SWAP_PROBE";

/// The rounds of [`a_fresh_instance_never_sees_its_slots_last_memory_swapped_out`]:
/// an instance counts to 2, everything is paged out while it lives, it is
/// dropped, and the next fresh instance must count from 1 again. Where
/// nothing goes to swap (a cgroup without swap, a kernel without
/// `MADV_PAGEOUT`) it says so and checks nothing, unless
/// `CALLME_TEST_SWAP=required`.
#[tokio::test]
#[ignore = "run in a process of its own by a_fresh_instance_never_sees_its_slots_last_memory_swapped_out"]
async fn swapped_out_slot_probe() {
    if std::env::var_os(PROBE).is_none() {
        eprintln!("not run: it pages out its whole process, so only a process of its own runs it");
        return;
    }
    // Without the pool, no slot is ever used twice.
    assert!(callme_tests::runtime().is_pooling(), "no pooling allocator");
    let p = load("hostile", "hostile", PluginSettings::default());
    for round in 0..5 {
        let mut s = p.session().await.unwrap();
        let first = s.call("counter", &Args::default()).await.unwrap();
        assert_eq!(
            first,
            json!(1),
            "round {round}: a fresh instance counted on from the last one's state"
        );
        assert_eq!(s.call("counter", &Args::default()).await.unwrap(), json!(2));
        let before = swapped_kib();
        page_out_everything();
        let after = swapped_kib();
        if after <= before {
            skip_without_swap(&format!(
                "round {round}: nothing went to swap ({before} kB, then {after} kB)"
            ));
            return;
        }
        drop(s);
    }
}

/// A component of two instances of one core module, each with a linear
/// memory of one page: `grow-a` and `grow-b` grow one memory each by
/// `pages` (`memory.grow`: the old size in pages, -1 if refused), `fail`
/// traps.
const TWO_MEMORIES: &str = r#"
(component
  (core module $m
    (memory 1)
    (func (export "grow") (param i32) (result i32)
      local.get 0
      memory.grow)
    (func (export "fail")
      unreachable))
  (core instance $a (instantiate $m))
  (core instance $b (instantiate $m))
  (func (export "grow-a") (param "pages" u32) (result s32)
    (canon lift (core func $a "grow")))
  (func (export "grow-b") (param "pages" u32) (result s32)
    (canon lift (core func $b "grow")))
  (func (export "fail")
    (canon lift (core func $a "fail"))))
"#;

/// The component written in `text`, loaded as `name` with `limits`.
fn from_text(text: &str, name: &str, limits: Limits) -> Plugin {
    let settings = PluginSettings {
        limits,
        ..PluginSettings::default()
    };
    let bytes = wat::parse_str(text).expect("the component's text");
    Plugin::load(&runtime(), name, &bytes, settings).expect("plugin loads")
}

/// [`TWO_MEMORIES`], its memory capped at 16 pages.
fn two_memories() -> Plugin {
    let limits = Limits {
        memory_bytes: 16 << 16,
        ..Limits::default()
    };
    from_text(TWO_MEMORIES, "two-memories", limits)
}

/// A component of `tables` instances of one core module with a function
/// table of no elements: `grow{i}(n)` grows the table of instance `i` by
/// `n` (`table.grow`: its old size, or -1 if refused).
fn many_tables(tables: usize) -> Vec<u8> {
    let instances: String = (0..tables)
        .map(|i| format!("  (core instance $i{i} (instantiate $m))\n"))
        .collect();
    let exports: String = (0..tables)
        .map(|i| {
            format!(
                "  (func (export \"grow{i}\") (param \"n\" u32) (result s32)\n\
                 \x20   (canon lift (core func $i{i} \"grow\")))\n"
            )
        })
        .collect();
    let text = format!(
        r#"
(component
  (core module $m
    (table $t 0 funcref)
    (func (export "grow") (param i32) (result i32)
      (table.grow $t (ref.null func) (local.get 0))))
{instances}{exports})
"#
    );
    wat::parse_str(&text).expect("the component's text")
}

/// A guest's tables are bounded alike with the pool and without it (as a
/// host short of address space makes its instances): at most 32 tables, of
/// at most 65,536 elements (512 KiB) each. Without the pool a store took
/// wasmtime's own defaults, 10,000 tables, each allowed a million
/// elements: the 30 tables here grown to that are 240 MiB of the host's
/// memory, outside the call's memory limit, for a few units of fuel.
#[tokio::test]
async fn a_guests_tables_are_bounded_with_the_pool_and_without_it() {
    let on_demand = callme::Runtime::with_config(callme::RuntimeConfig {
        pooling: false,
        cache_dir: None,
        ..callme::RuntimeConfig::default()
    })
    .unwrap();
    assert!(runtime().is_pooling() && !on_demand.is_pooling());
    for (rt, how) in [(runtime(), "pooled"), (on_demand, "made on demand")] {
        let load = |tables| {
            Plugin::load(
                &rt,
                "tables",
                &many_tables(tables),
                PluginSettings::default(),
            )
        };
        let p = load(30).unwrap_or_else(|e| panic!("{how}: {e}"));
        let mut s = p.session().await.unwrap();
        for i in 0..30 {
            let grow = format!("grow{i}");
            let mut grow = async |n: u32| s.call(&grow, &pos(json!([n]))).await.unwrap();
            assert_eq!(
                grow(1 << 20).await,
                json!(-1),
                "{how}: table {i} grown to a million"
            );
            assert_eq!(
                grow(1 << 16).await,
                json!(0),
                "{how}: table {i} grown to 65,536"
            );
            assert_eq!(
                grow(1).await,
                json!(-1),
                "{how}: table {i} grown past 65,536"
            );
        }
        // 40 tables: refused as the plugin loads or as its instance is made.
        let refused = match load(40) {
            Err(_) => true,
            Ok(p) => p.session().await.is_err(),
        };
        assert!(refused, "{how}: a component of 40 tables was instantiated");
    }
}

/// `memory_bytes` caps a call's memory, however many linear memories the
/// component has: with a cap of 16 pages, two memories of one page may
/// grow by 14 pages in all, not by 15 each.
#[tokio::test]
async fn the_memory_cap_holds_for_all_of_a_components_memories_together() {
    let p = two_memories();
    let mut session = p.session().await.unwrap();
    assert_eq!(
        session.call("grow-a", &pos(json!([10]))).await.unwrap(),
        json!(1)
    );
    // 2 + 10 pages in use: 5 more would be 17.
    assert_eq!(
        session.call("grow-b", &pos(json!([5]))).await.unwrap(),
        json!(-1),
        "the second memory grew past the cap the first one had used"
    );
    assert_eq!(
        session.call("grow-b", &pos(json!([4]))).await.unwrap(),
        json!(1)
    );
    assert_eq!(
        session.call("grow-a", &pos(json!([1]))).await.unwrap(),
        json!(-1)
    );
}

/// A growth refused in one call, which the guest got over, says nothing
/// about the next call on the same instance: a trap there is a trap, not
/// `MemoryLimit`.
#[tokio::test]
async fn a_memory_refusal_is_forgotten_by_the_next_call_of_an_instance() {
    let p = two_memories();
    let mut session = p.session().await.unwrap();
    assert_eq!(
        session.call("grow-a", &pos(json!([100]))).await.unwrap(),
        json!(-1)
    );
    let e = session.call("fail", &Args::default()).await.unwrap_err();
    assert!(matches!(e, PluginError::Trap { .. }), "{e:?}");
}

/// A call that waits for an instance slot spends its deadline waiting: it
/// ends by its deadline, counted from when it was made, not from when it
/// found a slot.
#[tokio::test]
async fn waiting_for_a_slot_counts_against_the_deadline() {
    let rt = callme::Runtime::with_config(callme::RuntimeConfig {
        max_instances: 1,
        ..callme::RuntimeConfig::default()
    })
    .unwrap();
    let settings = PluginSettings {
        limits: Limits {
            deadline: Duration::from_millis(400),
            ..Limits::default()
        },
        ..PluginSettings::default()
    };
    let p = Plugin::load(&rt, "hostile", &plugin_bytes("hostile"), settings).unwrap();
    // The first holds the only slot for 300 ms; the second, waiting that
    // long for it, has 100 ms left for its 300 ms sleep.
    let ms = pos(json!([300]));
    let (first, second) = tokio::join!(p.call("sleep", &ms), p.call("sleep", &ms));
    let outcomes = [first, second];
    assert_eq!(
        outcomes.iter().filter(|r| r.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    let late = outcomes.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(
        matches!(
            late,
            PluginError::Timeout {
                cause: TimeoutCause::Deadline,
                ..
            }
        ),
        "{late:?}"
    );
}

/// Host memory a guest can make the host hold outside its linear memory
/// is bounded too: `wasi:http` is linked for every plugin, and a request
/// never sent keeps what its body was given. A plugin granted nothing can
/// make requests and write their bodies (only sending is refused); the
/// host takes so little per body, and so few handles per call, that half
/// a GiB is out of reach.
#[tokio::test]
async fn a_guest_cannot_make_the_host_hold_memory_through_unsent_http_bodies() {
    let p = load("hostile", "hostile", PluginSettings::default());
    match p.call("hoard", &pos(json!([512]))).await {
        Ok(written) => {
            let written = written.as_u64().expect("bytes written");
            assert!(
                written < 64 << 20,
                "the host took {written} bytes of unsent request bodies"
            );
        }
        Err(PluginError::GuestError { message, .. }) => {
            // "... after N bytes": stopped, and soon.
            let written: u64 = message
                .rsplit_once(" after ")
                .and_then(|(_, n)| n.strip_suffix(" bytes"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("hoard stopped without a count: {message}"));
            assert!(
                written < 64 << 20,
                "the host took {written} bytes of unsent request bodies: {message}"
            );
        }
        Err(PluginError::Trap { message }) => {
            eprintln!("hoard stopped: {message}");
            assert!(message.contains("resource"), "{message}");
        }
        Err(other) => panic!("hoard: {other:?}"),
    }
    // And the next call is served as ever.
    assert_eq!(p.call("counter", &Args::default()).await.unwrap(), json!(1));
}

/// Nor through what it hands the host's imports: wasmtime copies a string
/// passed to `log` (or to any import) out of the guest before the host
/// sees it, and while the guest runs the host takes at most 8 MiB so at
/// once (twice `rpc.call`'s largest arguments), where a result may be
/// as large as its cap. A 24 MiB log message fails the call `MemoryLimit`
/// at once, where it used to be copied (and dropped by the log budget)
/// call after call, even after the host called into the guest (its
/// allocator, handing it random bytes) within the call; a 1 MiB one is
/// taken; a 12 MiB result is still returned.
#[tokio::test]
async fn a_guest_cannot_make_the_host_copy_more_than_an_import_takes() {
    let p = load("hostile", "hostile", PluginSettings::default());
    match p.call("shout", &pos(json!([24, 20]))).await {
        Err(PluginError::MemoryLimit { message }) => assert!(
            message.contains("arguments to a call to the host over 8388608 bytes"),
            "{message}"
        ),
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    p.call("shout", &pos(json!([1, 3]))).await.unwrap();
    let huge = p.call("huge", &pos(json!([12]))).await.unwrap();
    assert_eq!(huge.as_str().map(str::len), Some(12 << 20));
}

/// Nor through what a request not sent is given: its method, authority
/// and path with query are bounded here (`wasmtime-wasi-http` takes the
/// first two at any length, the path up to 64 KiB), so a plugin granted
/// nothing cannot make the host hold gigabytes by giving each of its
/// requests a long one. Ordinary ones are taken.
#[tokio::test]
async fn a_guest_cannot_make_the_host_hold_memory_through_long_request_parts() {
    let p = load("hostile", "hostile", PluginSettings::default());
    for (part, long) in [
        ("method", 1 << 20),
        ("authority", 1 << 20),
        ("path", 60 << 10),
        ("path", 4 << 10),
    ] {
        let taken = p
            .call("hoard-parts", &pos(json!([part, long, 64])))
            .await
            .unwrap();
        assert_eq!(taken, json!(0), "{part} of {long} bytes: taken {taken}");
        let ordinary = p
            .call("hoard-parts", &pos(json!([part, 40, 64])))
            .await
            .unwrap();
        assert_eq!(ordinary, json!(40 * 64), "{part}");
    }
    // Granted HTTP, a path as long as common servers take (8 KiB) is
    // taken, a longer one is not.
    let mut granted = PluginSettings::default();
    granted.capabilities.http = callme::plugin::HttpGrant::new(
        ["example.com:80"],
        callme::plugin::DEFAULT_HTTP_MAX_RESPONSE_BYTES,
        Duration::from_secs(1),
    )
    .unwrap();
    let p = load("hostile", "hostile", granted);
    for (bytes, taken) in [(8 << 10, 4 * (8 << 10)), ((8 << 10) + 1, 0)] {
        assert_eq!(
            p.call("hoard-parts", &pos(json!(["path", bytes, 4])))
                .await
                .unwrap(),
            json!(taken),
            "a path of {bytes} bytes, granted"
        );
    }
}

/// Used instances handed to a thread that never gets to drop them (the
/// lowest-priority thread of a host so busy it gets no CPU; here, a
/// runtime nobody drives) do not take their slots with them: past a few,
/// an instance is dropped where its call ended, so calls never run out of
/// slots (with 4 slots, 20 calls, none waits), and what that thread never
/// started is done elsewhere soon after.
#[tokio::test]
async fn used_instances_come_back_when_the_thread_that_drops_them_is_starved() {
    let rt = callme::Runtime::with_config(callme::RuntimeConfig {
        max_instances: 4,
        ..callme::RuntimeConfig::default()
    })
    .unwrap();
    let settings = PluginSettings {
        limits: Limits {
            deadline: Duration::from_secs(2),
            ..Limits::default()
        },
        prewarm: 1,
        ..PluginSettings::default()
    };
    let p = Plugin::load(&rt, "calc", &plugin_bytes("calc"), settings).unwrap();
    let starved = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    p.start_prewarm(starved.handle());
    for i in 0..20i64 {
        assert_eq!(
            p.call("add", &pos(json!([i, 1]))).await.unwrap(),
            json!(i + 1),
            "call {i}"
        );
    }
    let stats = rt.stats();
    assert_eq!(stats.waited, 0, "{stats:?}");
    assert!(stats.instances <= 4, "{stats:?}");
    // What the starved thread never started is done by the call's own
    // runtime after a few milliseconds: every used instance is dropped,
    // and the spare is made.
    let settled = eventually(Duration::from_secs(5), || async {
        let st = rt.stats();
        (st.instances == 1 && st.kept == 1).then_some(())
    })
    .await;
    assert!(settled.is_some(), "{:?}", rt.stats());
    assert_eq!(p.spares(), 1);
    starved.shutdown_background();
}

/// A component whose one function returns a type written out to some 10
/// MB: a tuple of 100 tuples of 100 copies of an enum whose one case is
/// named with 1,000 letters. Its text would grow with the name (100,000
/// bytes are allowed) and the copies (a million), to gigabytes.
fn huge_type_component() -> Vec<u8> {
    let name = "a".repeat(1000);
    let e100 = vec!["$e"; 100].join(" ");
    let t100 = vec!["$t1"; 100].join(" ");
    let text = format!(
        r#"
(component
  (type $e0 (enum "{name}"))
  (export $e "e" (type $e0))
  (type $t1 (tuple {e100}))
  (type $t2 (tuple {t100}))
  (core module $m
    (memory (export "mem") 1)
    (func (export "f") (result i32) i32.const 0))
  (core instance $i (instantiate $m))
  (alias core export $i "mem" (core memory $mem))
  (func (export "f") (result $t2)
    (canon lift (core func $i "f") (memory $mem))))
"#
    );
    wat::parse_str(&text).expect("the component's text")
}

/// A function's signature is text of at most 16 KiB, however large its
/// types are written out: loading a component, `_describe` and error
/// messages write it, and a hostile component could otherwise make the
/// host write gigabytes, and run out of memory, at load.
#[tokio::test]
async fn a_type_written_out_to_gigabytes_is_cut_short() {
    let p = Plugin::load(
        &runtime(),
        "huge-type",
        &huge_type_component(),
        PluginSettings::default(),
    )
    .expect("plugin loads");
    let functions = p.functions();
    let f = functions.iter().find(|f| f.name == "f").expect("f");
    assert!(
        f.signature.len() <= 16 * 1024 + 4,
        "a signature of {} bytes",
        f.signature.len()
    );
    assert!(f.signature.starts_with("func() -> tuple<tuple<enum { aaaa"));
    assert!(
        f.signature.ends_with('…'),
        "{}",
        &f.signature[f.signature.len() - 40..]
    );
}

/// Random bytes are made on the host before the guest gets them, and held
/// while they are copied in: a guest may ask for 1 MiB at once (or its
/// memory cap, if less), not wasmtime's 64 MiB default whatever the cap,
/// so a call's host memory does not follow its guest's.
#[tokio::test]
async fn random_bytes_are_capped_at_a_mebibyte() {
    let limits = PluginSettings {
        limits: Limits {
            memory_bytes: 4 << 20,
            ..Limits::default()
        },
        ..PluginSettings::default()
    };
    let p = load("hostile", "hostile", limits);
    assert_eq!(
        p.call("random", &pos(json!([1]))).await.unwrap(),
        json!(1 << 20)
    );
    match contained(&p, "random", pos(json!([2]))).await {
        PluginError::Trap { message } => {
            assert!(message.contains("exceeds limit 1048576"), "{message}");
        }
        e => panic!("expected a trap, got {e:?}"),
    }
}

/// A component whose `bytes(n)` returns a `list<u8>` of `n` zeros read
/// from its memory of 200 pages (12.5 MiB): each element is a byte in
/// the guest and a whole value on the host as it is lifted.
const BYTES: &str = r#"
(component
  (core module $m
    (memory (export "mem") 200)
    (func (export "bytes") (param $n i32) (result i32)
      (i32.store (i32.const 0) (i32.const 16))
      (i32.store (i32.const 4) (local.get $n))
      (i32.const 0)))
  (core instance $i (instantiate $m))
  (alias core export $i "mem" (core memory $mem))
  (func (export "bytes") (param "n" u32) (result (list u8))
    (canon lift (core func $i "bytes") (memory $mem))))
"#;

/// [`BYTES`] loaded with a result cap of `result_bytes`.
fn bytes_plugin(result_bytes: usize) -> Plugin {
    let limits = Limits {
        result_bytes,
        ..Limits::default()
    };
    from_text(BYTES, "bytes", limits)
}

/// What the host takes from a guest at once follows the plugin's result
/// cap, and going over it is a `MemoryLimit`: 12 million bytes of
/// `list<u8>` (12 MB in the guest, about 480 MB of lifted values on the
/// host) are refused before they are lifted, under the default cap;
/// 4 million, whose JSON fits a cap of 64 MiB, come through under that
/// cap. wasmtime's own limit (128 MiB of lifted values, whatever the
/// plugin's limits) refused both as a `Trap` of the guest.
#[tokio::test]
async fn a_result_too_large_to_lift_is_a_memory_limit() {
    let p = bytes_plugin(Limits::default().result_bytes);
    match p.call("bytes", &pos(json!([12_000_000]))).await {
        Err(PluginError::MemoryLimit { message }) => {
            assert!(message.contains("more data at once"), "{message}")
        }
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    let small = p.call("bytes", &pos(json!([1000]))).await.unwrap();
    assert_eq!(small, json!(vec![0; 1000]));

    let p = bytes_plugin(64 << 20);
    let v = p.call("bytes", &pos(json!([4_000_000]))).await.unwrap();
    let items = v.as_array().expect("a list");
    assert_eq!(items.len(), 4_000_000);
    assert!(items.iter().all(|b| b == &json!(0)));
}

/// A component exporting `count` functions `f0`, `f1`, ... (each named
/// `prefix` and its number) that return nothing.
fn many_functions(prefix: &str, count: usize) -> Vec<u8> {
    let funcs: String = (0..count)
        .map(|i| format!("  (func (export \"{prefix}{i}\") (canon lift (core func $i \"f\")))\n"))
        .collect();
    let text = format!(
        r#"
(component
  (core module $m (func (export "f")))
  (core instance $i (instantiate $m))
{funcs})
"#
    );
    wat::parse_str(&text).expect("the component's text")
}

/// A function's name is a metric label and a log field of every call to
/// it, so a plugin may export at most 1,024 functions of names up to 256
/// bytes: a component exporting functions named with 90,000 letters each
/// made the metrics endpoint tens of megabytes and each call's log lines
/// as long. Refused at load, the message quoting only a name's start.
#[tokio::test]
async fn a_plugin_exports_at_most_1024_functions_of_short_names() {
    let load = |bytes: &[u8]| Plugin::load(&runtime(), "names", bytes, PluginSettings::default());
    let long = "f".repeat(252);
    let p = load(&many_functions(&long, 10)).expect("names of 253 bytes load");
    assert_eq!(p.functions().len(), 10);
    let longer = "f".repeat(90_000);
    match load(&many_functions(&longer, 1)) {
        Err(PluginError::InvalidPlugin { message }) => {
            assert!(message.contains("over the 256"), "{message}");
            assert!(message.len() < 400, "{} bytes", message.len());
        }
        other => panic!("expected InvalidPlugin, got {:?}", other.map(|_| ())),
    }
    assert!(load(&many_functions("f", 1024)).is_ok());
    match load(&many_functions("f", 1025)) {
        Err(PluginError::InvalidPlugin { message }) => {
            assert!(message.contains("more than 1024 functions"), "{message}");
        }
        other => panic!("expected InvalidPlugin, got {:?}", other.map(|_| ())),
    }
}

/// A component whose `f` asks the host for 2 GB of random bytes from a
/// function whose name (in the name section) is 100,000 characters: the
/// host refuses, and wasmtime's text of that failure ends in a backtrace
/// naming the guest's functions.
fn long_named_failure() -> String {
    let name = "a".repeat(100_000);
    format!(
        r#"
(component
  (import "wasi:random/random@0.2.0" (instance $random
    (export "get-random-bytes" (func (param "len" u64) (result (list u8))))))
  (core module $mem
    (memory (export "mem") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024)))
  (core instance $mi (instantiate $mem))
  (core func $get (canon lower (func $random "get-random-bytes")
    (memory (core memory $mi "mem")) (realloc (core func $mi "realloc"))))
  (core module $m
    (import "c" "get" (func $get (param i64 i32)))
    (func ${name} (export "f") (call $get (i64.const 2000000000) (i32.const 0))))
  (core instance $i (instantiate $m (with "c" (instance (export "get" (func $get))))))
  (func (export "f") (canon lift (core func $i "f"))))
"#
    )
}

/// A trap's text is cut to a few KiB: a guest's function names, which
/// wasmtime's backtrace quotes, went to the caller whole, whatever the
/// plugin's result cap.
#[tokio::test]
async fn a_traps_text_is_cut_short() {
    let p = from_text(&long_named_failure(), "long-named", Limits::default());
    match p.call("f", &Args::default()).await {
        Err(PluginError::Trap { message }) => {
            assert!(message.len() < 8 << 10, "{} bytes", message.len());
            assert!(message.contains("bytes more)"), "{}", &message[..200]);
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

/// A session's instance is made within the plugin's deadline, as a
/// call's is: a start function blocked in a host call fails the session
/// with `Timeout` once the deadline passes, and does not hold its caller.
#[tokio::test]
async fn a_session_whose_instance_blocks_as_it_starts_ends_by_its_deadline() {
    let limits = Limits {
        deadline: Duration::from_millis(300),
        ..Limits::default()
    };
    let p = from_text(callme_tests::BLOCKED_AT_START, "blocked-at-start", limits);
    let made = tokio::time::timeout(Duration::from_secs(20), p.session()).await;
    let Ok(made) = made else {
        panic!("making the session's instance was not stopped by its deadline");
    };
    let e = made.err().expect("the instance cannot be made");
    assert!(matches!(e, PluginError::Timeout { .. }), "{e:?}");
}

/// Two exported interfaces of one short name (`test:a/util` and
/// `test:b/util`, or two versions of one interface) would both be called
/// `util.f`: refused, where the last one took every call meant for the
/// first.
#[tokio::test]
async fn interfaces_callers_could_not_tell_apart_are_refused() {
    let text = r#"
(component
  (core module $m (func (export "f")))
  (core instance $i (instantiate $m))
  (func $f (canon lift (core func $i "f")))
  (instance $a (export "f" (func $f)))
  (instance $b (export "f" (func $f)))
  (export "test:a/util" (instance $a))
  (export "test:b/util" (instance $b)))
"#;
    let bytes = wat::parse_str(text).expect("the component's text");
    match Plugin::load(&runtime(), "clash", &bytes, PluginSettings::default()) {
        Err(PluginError::InvalidPlugin { message }) => {
            assert!(message.contains("`util.f`"), "{message}")
        }
        Err(other) => panic!("expected InvalidPlugin, got {other:?}"),
        Ok(p) => panic!("loaded, serving {:?}", p.functions()),
    }
}

/// A component whose `f()` returns all 32 flags of a type whose every
/// flag has a 200-character name: 6.4 KB of JSON from one 4-byte value.
fn long_flags() -> String {
    let names: String = (0..32)
        .map(|i| format!(" \"f{i:02}{}\"", "x".repeat(197)))
        .collect();
    format!(
        r#"
(component
  (core module $m (func (export "f") (result i32) (i32.const -1)))
  (core instance $i (instantiate $m))
  (type $fl (flags{names}))
  (export $fl2 "fl" (type $fl))
  (func (export "f") (result $fl2) (canon lift (core func $i "f"))))
"#
    )
}

/// The result cap counts the JSON a result becomes: every flag's name,
/// a string's escapes (a control character is 6 bytes of JSON), a
/// number's digits, and a `GuestError`'s text twice (as its message and
/// its data). Each of these went through a cap of 1,000 bytes at several
/// times its size.
#[tokio::test]
async fn the_result_cap_counts_the_json_a_result_becomes() {
    let limits = Limits {
        result_bytes: 1000,
        ..Limits::default()
    };
    let over = |e: Result<Value, PluginError>, what: &str| match e {
        Err(PluginError::MemoryLimit { .. }) => {}
        Ok(v) => panic!(
            "{what}: expected MemoryLimit, got {} bytes",
            v.to_string().len()
        ),
        Err(e) => panic!("{what}: expected MemoryLimit, got {e:?}"),
    };
    let flags = from_text(&long_flags(), "long-flags", limits.clone());
    over(flags.call("f", &Args::default()).await, "32 long flags");

    let settings = PluginSettings {
        limits: limits.clone(),
        ..PluginSettings::default()
    };
    let types = load("types", "types", settings);
    let control = "\u{1}".repeat(900);
    over(
        types.call("echo-string", &pos(json!([control]))).await,
        "900 control characters",
    );
    // 900 plain characters are 902 bytes of JSON: within the cap.
    let plain = "a".repeat(900);
    assert_eq!(
        types
            .call("echo-string", &pos(json!([plain])))
            .await
            .unwrap(),
        json!(plain)
    );
    let wide = vec![i32::MIN; 100];
    over(
        types.call("echo-list", &pos(json!([wide]))).await,
        "100 numbers of 11 digits",
    );
    let narrow = vec![1; 100];
    assert_eq!(
        types
            .call("echo-list", &pos(json!([narrow])))
            .await
            .unwrap(),
        json!(narrow)
    );
    // A string `err` is the reply's message and its data: 140 control
    // characters are 842 bytes of JSON each time.
    let control = "\u{1}".repeat(140);
    over(
        types
            .call("echo-result", &pos(json!([{ "err": control }])))
            .await,
        "an error of 140 control characters",
    );
    let plain = "a".repeat(400);
    match types
        .call("echo-result", &pos(json!([{ "err": plain }])))
        .await
    {
        Err(PluginError::GuestError { message, .. }) => assert_eq!(message, plain),
        other => panic!("an error of 400 characters: {other:?}"),
    }
    // A case without a payload is `{"ok":null}`: 12 bytes each, with its
    // comma, in a list of 100.
    let oks = from_text(&payloadless_results(100), "oks", limits);
    over(
        oks.call("f", &Args::default()).await,
        "100 payloadless results",
    );
}

/// A record type of 1,000 optional fields makes each `{}` of a request
/// 2,000 values on the host: a request of 3,000 of them (9 KB) would have
/// been 6 million values (over 500 MB) before any limit applied. The
/// values one call's arguments make are bounded, an absent optional field
/// counting two.
#[tokio::test]
async fn absent_optional_fields_cannot_make_a_small_request_huge() {
    let p = from_text(&sparse_records(1000), "sparse", Limits::default());
    let few = vec![json!({}); 3];
    assert_eq!(
        p.call("f", &pos(json!([few, few]))).await.unwrap(),
        json!(3)
    );
    let many = vec![json!({}); 3000];
    match p.call("f", &pos(json!([many, few]))).await {
        Err(PluginError::InvalidArguments { message }) => {
            assert!(
                message.contains("make more than 4194304 values"),
                "{message}"
            )
        }
        other => panic!("3,000 empty records of 1,000 optional fields: {other:?}"),
    }
    // The bound is the call's, not each argument's: 1,500 records in each
    // of two arguments are as many.
    let half = vec![json!({}); 1500];
    match p.call("f", &pos(json!([half, half]))).await {
        Err(PluginError::InvalidArguments { message }) => {
            assert!(
                message.contains("make more than 4194304 values"),
                "{message}"
            )
        }
        other => panic!("1,500 and 1,500 empty records: {other:?}"),
    }
}

/// A record type of 4 optional fields named in 50,000 bytes each (a
/// plugin may name them so) makes each `{}` of a request 200 KB of names
/// on the host: a request of 4,000 of them (12 KB) would have been 800 MB
/// before its values were counted. An absent field counts its name's
/// length too.
#[tokio::test]
async fn absent_optional_fields_with_long_names_cannot_make_a_small_request_huge() {
    let p = from_text(
        &sparse_records_named(4, &"a".repeat(50_000)),
        "long-names",
        Limits::default(),
    );
    let few = vec![json!({}); 3];
    assert_eq!(
        p.call("f", &pos(json!([few, few]))).await.unwrap(),
        json!(3)
    );
    let many = vec![json!({}); 4000];
    match p.call("f", &pos(json!([many, few]))).await {
        Err(PluginError::InvalidArguments { message }) => {
            assert!(message.contains("make more than"), "{message}")
        }
        other => panic!("4,000 empty records of long-named fields: {other:?}"),
    }
}

/// A value of an enum or variant type of 10,000 names is found by looking
/// the names over one by one, outside the call's fuel and deadline: 30,000
/// values of the last name (a 390 KB request) were 300 million comparisons
/// (for a variant, each with a type made), and a 4 MiB request billions.
/// Names looked past count as values made; the first name costs nothing.
#[tokio::test]
async fn names_of_a_wide_enum_or_variant_cost_what_they_are_looked_past() {
    const NAMES: usize = 10_000;
    let p = from_text(&wide_types(NAMES), "wide", Limits::default());
    let last_name = format!("n{}", NAMES - 1);
    let last_case = format!("c{}", NAMES - 1);
    for (f, first, last) in [
        ("enums", json!("n0"), json!(last_name)),
        ("cases", json!({"c0": null}), json!({ last_case: null })),
    ] {
        let firsts = vec![first; 30_000];
        assert_eq!(
            p.call(f, &pos(json!([firsts]))).await.unwrap(),
            json!(30_000),
            "{f}"
        );
        let lasts = vec![last.clone(); 100];
        assert_eq!(
            p.call(f, &pos(json!([lasts]))).await.unwrap(),
            json!(100),
            "{f}"
        );
        let lasts = vec![last; 30_000];
        match p.call(f, &pos(json!([lasts]))).await {
            Err(PluginError::InvalidArguments { message }) => {
                assert!(message.contains("make more than"), "{f}: {message}")
            }
            other => panic!("{f}: 30,000 values of the last of 10,000 names: {other:?}"),
        }
    }
}

/// What a caller named and the plugin does not have (a function, a
/// keyword, a record field, a variant case, a flag) comes back in its
/// error cut, as an id is: a made-up name as long as the request made a
/// reply as long.
#[tokio::test]
async fn names_a_caller_made_up_come_back_cut() {
    let p = load("types", "types", PluginSettings::default());
    let long = "x".repeat(1 << 20);
    let point = json!({"x": 1, "y": 2, "label": "p", long.clone(): 3});
    let calls = [
        (long.as_str(), Args::default()),
        ("echo-s32", kw(json!({ long.clone(): 1 }))),
        ("echo-record", pos(json!([point]))),
        ("echo-variant", pos(json!([{ long.clone(): null }]))),
        ("echo-flags", pos(json!([[long.clone()]]))),
    ];
    for (func, args) in calls {
        let e = p.call(func, &args).await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.len() < 2_000 && text.contains("xxxx"),
            "{}: {} bytes",
            &func[..func.len().min(20)],
            text.len()
        );
    }
}

/// A component whose `enums(xs)` takes a list of an enum of `n` names
/// (`n0`, `n1`, ...) and `cases(xs)` a list of a variant of `n` cases
/// without payloads (`c0`, ...); each returns how many it was given.
fn wide_types(n: usize) -> String {
    let names: String = (0..n).map(|i| format!(" \"n{i}\"")).collect();
    let cases: String = (0..n).map(|i| format!(" (case \"c{i}\")")).collect();
    format!(
        r#"
(component
  (core module $m
    (memory (export "mem") 2)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "f") (param i32 i32) (result i32) (local.get 1)))
  (core instance $i (instantiate $m))
  (type $e (enum{names}))
  (export $e2 "e" (type $e))
  (type $v (variant{cases}))
  (export $v2 "v" (type $v))
  (type $le (list $e2))
  (type $lv (list $v2))
  (func (export "enums") (param "xs" $le) (result u32)
    (canon lift (core func $i "f") (memory (core memory $i "mem"))
      (realloc (core func $i "realloc"))))
  (func (export "cases") (param "xs" $lv) (result u32)
    (canon lift (core func $i "f") (memory (core memory $i "mem"))
      (realloc (core func $i "realloc")))))
"#
    )
}

/// A component whose `f(xs, ys)` takes two lists of records of `n`
/// `option<u8>` fields and returns how many the first had.
fn sparse_records(n: usize) -> String {
    sparse_records_named(n, "f")
}

/// As [`sparse_records`], the fields named `{prefix}b0`, `{prefix}b1`, ...
fn sparse_records_named(n: usize, prefix: &str) -> String {
    let fields: String = (0..n)
        .map(|i| format!(" (field \"{prefix}b{i}\" (option u8))"))
        .collect();
    format!(
        r#"
(component
  (core module $m
    (memory (export "mem") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "f") (param i32 i32 i32 i32) (result i32) (local.get 1)))
  (core instance $i (instantiate $m))
  (type $r (record{fields}))
  (export $r2 "r" (type $r))
  (type $l (list $r2))
  (func (export "f") (param "xs" $l) (param "ys" $l) (result u32)
    (canon lift (core func $i "f") (memory (core memory $i "mem"))
      (realloc (core func $i "realloc")))))
"#
    )
}

/// A component whose `f` returns a `list<result>` of `n` `ok`s.
fn payloadless_results(n: u8) -> String {
    format!(
        r#"
(component
  (core module $m
    (memory (export "mem") 1)
    (data (i32.const 0) "\08\00\00\00\{n:02x}\00\00\00")
    (func (export "f") (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (type $r (list (result)))
  (func (export "f") (result $r) (canon lift (core func $i "f") (memory (core memory $i "mem")))))
"#
    )
}

/// An `f32` argument out of its range is refused, whether too large or so
/// small it would become 0 (which it silently did); a subnormal one is
/// kept, and 0 is 0.
#[tokio::test]
async fn an_f32_out_of_range_is_refused_not_changed() {
    let p = load("types", "types", PluginSettings::default());
    for v in [1e39, -1e39, 1e-50, -1e-50] {
        match p.call("echo-f32", &pos(json!([v]))).await {
            Err(PluginError::InvalidArguments { message }) => {
                assert!(message.contains("out of range for f32"), "{v}: {message}")
            }
            other => panic!("{v}: expected InvalidArguments, got {other:?}"),
        }
    }
    let subnormal = f64::from(f32::from_bits(1));
    assert_eq!(
        echo(&p, "echo-f32", json!(subnormal)).await,
        json!(subnormal)
    );
    assert_eq!(echo(&p, "echo-f32", json!(0.0)).await, json!(0.0));
}
