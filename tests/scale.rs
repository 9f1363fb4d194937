//! Many plugins on one host, many versions of one: the instance limit and what old versions hold.
//!
//! A host runs at most `RuntimeConfig::max_instances` instances at once,
//! calls, spares and idle instances together. These tests serve more
//! plugins than that has room for spares, swap versions under calls, and
//! run a runtime with a handful of slots, and check that no call fails for
//! want of an instance and that nothing outlives its version. Resident
//! memory is printed, not asserted: it depends on the machine.

use std::time::{Duration, Instant};

use callme::{
    Limits, Plugin, PluginError, PluginSettings, Runtime, RuntimeConfig, ServerOptions,
    TimeoutCause,
};
use callme_tests::{
    Host, deploy, eventually, plugin_bytes, plugin_path, pos, proxy, server, target_dir, tempdir,
    unique,
};
use futures_util::future::join_all;
use serde_json::json;

/// Resident memory of process `pid` in KiB (`VmRSS`), where /proc has it.
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// A runtime of the test's own, so its counts are not shared with tests
/// running beside it; compiled artifacts come from the shared cache.
fn own_runtime(max_instances: u32) -> Runtime {
    Runtime::with_config(RuntimeConfig {
        cache_dir: Some(target_dir().join("test-cache")),
        max_instances,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_plugins_each_answer_concurrent_calls() {
    const PLUGINS: usize = 500;
    const CALLS_EACH: usize = 4;
    let dir = tempdir();
    let prefix = unique("many");
    let calc = plugin_path("calc");
    let ids: Vec<String> = (0..PLUGINS).map(|i| format!("{prefix}-{i:03}")).collect();
    for id in &ids {
        let to = dir.join(format!("{id}.wasm"));
        if std::fs::hard_link(&calc, &to).is_err() {
            std::fs::copy(&calc, &to).expect("copy calc");
        }
    }
    // The binary's defaults (2 spares a plugin and a concurrency of 8,
    // which 500 plugins could never all have at once), with the instance
    // cap set by its flag.
    let mut host = Host::serve(&dir, &["--max-instances", "1200"]);
    let loading = host.wait_ready(Duration::from_secs(120));
    let pid = host.child.id();
    let loaded_kib = resident_kib(pid).unwrap_or(0);

    let p = proxy(Duration::from_secs(60)).await;
    let started = Instant::now();
    let calls = ids.iter().enumerate().flat_map(|(i, id)| {
        let p = &p;
        (0..CALLS_EACH).map(move |k| async move {
            let sum: Result<usize, _> = p.use_server(id).invoke("add", (i, k)).await;
            (id, sum.as_ref().ok() == Some(&(i + k)), sum)
        })
    });
    let results = join_all(calls).await;
    let calling = started.elapsed();
    let called_kib = resident_kib(pid).unwrap_or(0);
    let failed: Vec<_> = results.iter().filter(|(_, ok, _)| !ok).collect();
    eprintln!(
        "{PLUGINS} plugins: ready in {loading:?}, {} calls in {calling:?}, {} failed; host \
         resident {} MiB when ready, {} MiB after the calls ({} KiB per plugin)",
        results.len(),
        failed.len(),
        loaded_kib / 1024,
        called_kib / 1024,
        called_kib / PLUGINS as u64,
    );
    for (id, _, r) in failed.iter().take(5) {
        eprintln!("  {id}: {r:?}");
    }
    assert!(
        failed.is_empty(),
        "{} of {} calls failed",
        failed.len(),
        results.len()
    );
    let log = host.log_text();
    assert!(
        log.contains("instance pool:") && log.contains("max_instances=1200"),
        "the host says its instance limit at start-up: {log}"
    );
}

/// The two versions hot swaps alternate between: the Python and the
/// JavaScript calc, which answer alike. Both are big guests (tens of MiB of
/// compiled code each) and both are cached, so a swap loads in a fraction
/// of a second.
const VERSIONS: [&str; 2] = ["calc-py", "calc-js"];

/// Swaps a server id 50 times, as a deployment would.
const SWAPS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_release_old_versions() {
    const CALLS: usize = 4;
    let rt = own_runtime(RuntimeConfig::default().max_instances);
    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(60)).await;
    let id = unique("swapped");
    let versions = VERSIONS.map(plugin_bytes);
    let started = Instant::now();
    let mut in_flight = Vec::new();
    for i in 0..SWAPS {
        let (rt, name, bytes) = (rt.clone(), id.clone(), versions[i % 2].clone());
        let plugin = tokio::task::spawn_blocking(move || {
            Plugin::load(&rt, &name, &bytes, PluginSettings::default())
        })
        .await
        .expect("load task")
        .expect("plugin loads");
        // Calls sent before the swap run on the old version or the new.
        s.serve_plugin(plugin).await.expect("swapped in");
        for r in join_all(in_flight.drain(..)).await {
            let r: Result<Result<serde_json::Value, _>, _> = r;
            r.expect("call task").expect("call during swaps");
        }
        for k in 0..CALLS {
            let sp = p.use_server(&id);
            in_flight.push(tokio::spawn(async move {
                sp.call("add", pos(json!([i, k]))).await
            }));
        }
    }
    for r in join_all(in_flight).await {
        r.expect("call task").expect("call after the swaps");
    }
    eprintln!(
        "{SWAPS} swaps in {:?}, right after: {:?}",
        started.elapsed(),
        rt.stats()
    );

    // Once their calls end, old versions are gone with everything they
    // held: only the version serving is loaded, and only its spares are
    // alive.
    let settled = eventually(Duration::from_secs(30), || async {
        let st = rt.stats();
        (st.plugins == 1 && st.instances == st.kept && st.kept <= PluginSettings::default().prewarm)
            .then_some(st)
    })
    .await;
    assert!(
        settled.is_some(),
        "old versions still hold instances after {SWAPS} swaps: {:?}",
        rt.stats()
    );
    // Stopping the server id lets its last version go too.
    assert!(s.stop_serving(&id).await.expect("stop serving"));
    let empty = eventually(Duration::from_secs(30), || async {
        let st = rt.stats();
        (st.plugins == 0 && st.instances == 0).then_some(())
    })
    .await;
    assert!(empty.is_some(), "after stopping: {:?}", rt.stats());
}

/// Bytes of compiled code mapped in process `pid`: its anonymous
/// executable mappings, where wasmtime puts the code of loaded components.
fn compiled_code_bytes(pid: u32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // address perms offset dev inode [path]: anonymous has inode 0
            // and no path.
            let anonymous_code = fields.len() == 5 && fields[1].contains('x') && fields[4] == "0";
            let (start, end) = fields[0].split_once('-')?;
            let size = u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?;
            anonymous_code.then_some(size)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_free_the_code_of_old_versions() {
    let dir = tempdir();
    let id = unique("swapcode");
    let file = format!("{id}.wasm");
    let hashes = VERSIONS.map(|v| callme::plugin::content_hash(&plugin_bytes(v)));
    deploy(&plugin_path(VERSIONS[0]), &dir, &file);
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let pid = host.child.id();
    let one_version = compiled_code_bytes(pid);
    let p = proxy(Duration::from_secs(30)).await;
    let sp = p.use_server(&id);
    let started = Instant::now();
    for i in 1..=SWAPS {
        let v = i % 2;
        deploy(&plugin_path(VERSIONS[v]), &dir, &file);
        let swapped = eventually(Duration::from_secs(30), || async {
            let d = sp.describe().await.ok()?;
            (d["version"] == json!(hashes[v])).then_some(())
        })
        .await;
        assert!(
            swapped.is_some(),
            "swap {i} not served: {}",
            host.log_text()
        );
        assert_eq!(
            sp.call("add", pos(json!([i, 1]))).await.expect("call"),
            json!(i + 1)
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let code = compiled_code_bytes(pid);
    eprintln!(
        "{SWAPS} swaps in {:?}: compiled code mapped {} MiB before, {} MiB after; host \
         resident {} MiB",
        started.elapsed(),
        one_version >> 20,
        code >> 20,
        resident_kib(pid).unwrap_or(0) / 1024
    );
    // The same version serves as before the swaps (50 is even). Kept
    // alive, every old version would add tens of MiB.
    assert!(
        code <= one_version * 2,
        "old versions' code is still mapped after {SWAPS} swaps: {} MiB, from {} MiB",
        code >> 20,
        one_version >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_give_way_to_calls_when_slots_run_short() {
    // 40 plugins want 80 spares and get 8 (a quarter of 32 slots); then
    // 160 calls at once want 160 instances.
    const PLUGINS: usize = 40;
    const CALLS_EACH: usize = 4;
    let rt = own_runtime(32);
    let bytes = plugin_bytes("hostile");
    let plugins: Vec<Plugin> = (0..PLUGINS)
        .map(|i| {
            Plugin::load(&rt, &format!("p{i}"), &bytes, PluginSettings::default()).expect("loads")
        })
        .collect();
    let handle = tokio::runtime::Handle::current();
    for p in &plugins {
        p.start_prewarm(&handle);
    }
    let full = eventually(Duration::from_secs(30), || async {
        (rt.stats().kept == rt.stats().max_kept).then_some(())
    })
    .await;
    assert!(full.is_some(), "spares made: {:?}", rt.stats());
    assert_eq!(rt.stats().max_kept, 8);

    // Each call sleeps for 50 ms, so all of them are in flight at once.
    let sleep = pos(json!([50]));
    let calls = plugins
        .iter()
        .flat_map(|p| (0..CALLS_EACH).map(|_| p.call("sleep", &sleep)));
    for got in join_all(calls).await {
        assert_eq!(got.expect("no call fails for want of a slot"), json!(null));
    }
    let st = rt.stats();
    eprintln!("after {} calls on 32 slots: {st:?}", PLUGINS * CALLS_EACH);
    assert!(st.waited > 0, "the calls did run short of slots: {st:?}");
    assert!(
        st.instances <= st.max_instances && st.kept <= st.max_kept,
        "{st:?}"
    );
}

/// Spares still being made give way to calls as made ones do: a plugin
/// whose start-up code blocks (a minute, here) holds a slot for each spare
/// it is making, and a call short of slots takes one of those. Such spares
/// used to hold their slots until their start-up ended or their deadline
/// passed, and the call waited for them, here past its own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_being_made_give_way_to_calls() {
    // 8 slots, 2 of them for spares: both are taken by spares being made,
    // the other 6 by calls sleeping for a minute.
    let rt = own_runtime(8);
    assert_eq!(rt.stats().max_kept, 2);
    let with_deadline = |seconds: u64| PluginSettings {
        limits: Limits {
            deadline: Duration::from_secs(seconds),
            ..Limits::default()
        },
        ..PluginSettings::default()
    };
    let blocked = wat::parse_str(callme_tests::BLOCKED_AT_START).expect("the component's text");
    let blocked =
        Plugin::load(&rt, "blocked-at-start", &blocked, with_deadline(60)).expect("loads");
    blocked.start_prewarm(&tokio::runtime::Handle::current());
    let making = eventually(Duration::from_secs(20), || async {
        (rt.stats().instances == 2).then_some(())
    })
    .await;
    assert!(making.is_some(), "{:?}", rt.stats());
    let slow =
        Plugin::load(&rt, "hostile", &plugin_bytes("hostile"), with_deadline(60)).expect("loads");
    let slow = std::sync::Arc::new(slow);
    let sleepers: Vec<_> = (0..6)
        .map(|_| {
            let slow = std::sync::Arc::clone(&slow);
            tokio::spawn(async move { slow.call("sleep", &pos(json!([60_000]))).await })
        })
        .collect();
    let full = eventually(Duration::from_secs(20), || async {
        (rt.stats().instances == 8).then_some(())
    })
    .await;
    assert!(full.is_some(), "{:?}", rt.stats());

    let quick = Plugin::load(&rt, "calc", &plugin_bytes("calc"), with_deadline(5)).expect("loads");
    let sum = quick.call("add", &pos(json!([1, 2]))).await;
    assert_eq!(sum.expect("a spare being made gave its slot up"), json!(3));
    assert_eq!(blocked.spares(), 0);
    for sleeper in sleepers {
        sleeper.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_for_a_slot_up_to_its_deadline() {
    let rt = own_runtime(2);
    let slow = Plugin::load(
        &rt,
        "hostile",
        &plugin_bytes("hostile"),
        PluginSettings::default(),
    )
    .expect("loads");
    let quick = Plugin::load(
        &rt,
        "calc",
        &plugin_bytes("calc"),
        PluginSettings {
            limits: Limits {
                deadline: Duration::from_millis(300),
                ..Limits::default()
            },
            ..PluginSettings::default()
        },
    )
    .expect("loads");
    let patient = Plugin::load(
        &rt,
        "calc",
        &plugin_bytes("calc"),
        PluginSettings::default(),
    )
    .expect("loads");
    // Two calls sleeping for 2 s hold both slots.
    let sleep = pos(json!([2_000]));
    let sleepers = join_all([slow.call("sleep", &sleep), slow.call("sleep", &sleep)]);
    let late = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let timed_out = quick.call("add", &pos(json!([1, 2]))).await;
        let waited = started.elapsed();
        // With the default deadline a slot comes free once a sleeper is done.
        let on_time = patient.call("add", &pos(json!([2, 3]))).await;
        (timed_out, waited, on_time)
    };
    let (slept, (timed_out, waited, on_time)) = tokio::join!(sleepers, late);
    for r in slept {
        assert_eq!(r.expect("sleeps"), json!(null));
    }
    match timed_out {
        Err(PluginError::Timeout {
            cause: TimeoutCause::Deadline,
            message,
        }) => assert!(message.contains("no sandbox free"), "{message}"),
        other => panic!("expected a Timeout waiting for a slot, got {other:?}"),
    }
    assert!(waited >= Duration::from_millis(300), "waited {waited:?}");
    assert_eq!(on_time.expect("a slot came free"), json!(5));
    assert_eq!(rt.stats().waited, 2);
}
