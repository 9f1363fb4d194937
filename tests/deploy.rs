//! Hot deploy: copy, rename, move, swap under load, broken files, delete, sidecars.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use callme::protocol::Args;
use callme::{Error, ErrorKind, Proxy};
use callme_tests::{Host, deploy, eventually, plugin_path, pos, proxy, tempdir, unique};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn version(p: &Proxy, id: &str) -> Result<Value, Error> {
    p.use_server(id).call("version", Args::default()).await
}

/// Waits until `id` answers `version` with `want`.
async fn wait_version(p: &Proxy, id: &str, want: &str) {
    let got = eventually(WAIT, || async {
        (version(p, id).await.ok() == Some(json!(want))).then_some(())
    })
    .await;
    assert!(got.is_some(), "{id} never answered version {want}");
}

/// Waits until calls to `id` fail with `NoSuchServer`: its plugin was
/// withdrawn and its queue deleted. Each try waits 300 ms at most, so the
/// tries themselves do not keep requests waiting in the queue, which a
/// stopped id's queue deletion waits for (up to 30 s, `if-empty`).
async fn wait_withdrawn(p: &Proxy, id: &str) -> bool {
    eventually(WAIT, || async {
        let r = p
            .use_server(id)
            .call_timeout("version", Args::default(), Duration::from_millis(300))
            .await;
        matches!(r, Err(Error::NoSuchServer(_))).then_some(())
    })
    .await
    .is_some()
}

/// A host serving `dir`, ready, its watcher's debug lines in its log
/// (what it reads, and what it leaves for a writer).
fn watcher_told(dir: &Path) -> Host {
    let mut host = Host::start(
        std::process::Command::new(callme_tests::callme_bin()),
        dir,
        &[],
        "callme=info,callme::server=debug",
    );
    host.wait_ready(WAIT);
    host
}

/// Waits up to [`WAIT`] for a line of `host`'s log that names `id` and
/// says `what`.
async fn logged(host: &Host, id: &str, what: &str) -> bool {
    eventually(WAIT, || async {
        host.log_text()
            .lines()
            .any(|l| l.contains(id) && l.contains(what))
            .then_some(())
    })
    .await
    .is_some()
}

/// Serves `dir` as [`Host::serve`] does, with a metrics endpoint for
/// [`barrier`].
fn observed(dir: &Path, extra: &[&str]) -> Host {
    let addr = format!("127.0.0.1:{}", callme_tests::free_port());
    let mut args = extra.to_vec();
    args.extend(["--metrics-addr", &addr]);
    Host::serve(dir, &args)
}

/// Waits until `host` (served by [`observed`]) has acted on every change
/// made to `dir` before this: deploys a good plugin under another name,
/// waits for it, then for the host's count of changes under way to be 0
/// (changes to different plugins are applied at once, so the one
/// deployed here may be served before an earlier one is handled).
async fn barrier(p: &Proxy, host: &Host, dir: &Path) {
    let id = unique("barrier");
    deploy(&plugin_path("calc"), dir, &format!("{id}.wasm"));
    wait_version(p, &id, "1").await;
    let port = host.metrics.expect("the host serves its metrics");
    let settled = eventually(WAIT, || async {
        let text = callme_tests::scrape(port).await;
        (callme_tests::value_of(&text, "callme_plugin_changes_pending", &[]) == Some(0.0))
            .then_some(())
    })
    .await;
    assert!(settled.is_some(), "changes still pending after {WAIT:?}");
}

#[tokio::test]
async fn deploy_by_cp_rename_and_move() {
    let dir = tempdir();
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;

    let by_cp = unique("cp");
    std::fs::copy(plugin_path("calc"), dir.join(format!("{by_cp}.wasm"))).unwrap();
    let by_rename = unique("rename");
    deploy(&plugin_path("calc"), &dir, &format!("{by_rename}.wasm"));
    let by_move = unique("move");
    let elsewhere = tempdir();
    let staged = elsewhere.join(format!("{by_move}.wasm"));
    std::fs::copy(plugin_path("calc"), &staged).unwrap();
    std::fs::rename(&staged, dir.join(format!("{by_move}.wasm"))).unwrap();

    for id in [&by_cp, &by_rename, &by_move] {
        wait_version(&p, id, "1").await;
    }
    // Ignored names are never served.
    std::fs::copy(plugin_path("calc"), dir.join(".hidden.wasm")).unwrap();
    barrier(&p, &host, &dir).await;
    let e = version(&p, "hidden").await.unwrap_err();
    assert!(matches!(e, Error::NoSuchServer(_)), "{e:?}");
}

#[tokio::test]
async fn swap_under_load_never_fails_a_call() {
    let dir = tempdir();
    let id = unique("swap");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &["--concurrency", "16"]);
    host.wait_ready(WAIT);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let p = proxy(Duration::from_secs(20)).await;
        let (id, stop, ok, failed) = (id.clone(), stop.clone(), ok.clone(), failed.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match version(&p, &id).await {
                    Ok(v) if v == json!("1") || v == json!("2") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("bad answer during swaps: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let p = proxy(Duration::from_secs(20)).await;
    let swaps = 50;
    for i in 0..swaps {
        let (file, want) = if i % 2 == 0 {
            ("calc-v2", "2")
        } else {
            ("calc", "1")
        };
        // Alternate the two ways users deploy: rename into place, and cp over.
        if i % 4 < 2 {
            deploy(&plugin_path(file), &dir, &format!("{id}.wasm"));
        } else {
            std::fs::copy(plugin_path(file), dir.join(format!("{id}.wasm"))).unwrap();
        }
        wait_version(&p, &id, want).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("swaps: {swaps}, calls answered: {ok}, failed: {failed}");
    assert_eq!(failed, 0, "calls failed during swaps");
    assert!(ok > 100, "the load was real: {ok} calls");
    // The last swap put version 1 in place: only it answers now.
    for _ in 0..20 {
        assert_eq!(version(&p, &id).await.unwrap(), json!("1"));
    }
}

#[tokio::test]
async fn broken_files_leave_the_old_version_serving() {
    let dir = tempdir();
    let id = unique("broken");
    let file = format!("{id}.wasm");
    deploy(&plugin_path("calc"), &dir, &file);
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &id, "1").await;

    let v2 = std::fs::read(plugin_path("calc-v2")).unwrap();
    let junk = tempdir();
    let cases: [(&str, Vec<u8>); 3] = [
        ("corrupt", b"\0asm this is not a component".to_vec()),
        ("truncated", v2[..v2.len() / 2].to_vec()),
        (
            "unknown import",
            std::fs::read(plugin_path("bad-import")).unwrap(),
        ),
    ];
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("refused") && l.contains(&id))
            .count()
    };
    for (what, bytes) in cases {
        let before = refusals(&host.log_text());
        let staged = junk.join(format!("{what}.wasm"));
        std::fs::write(&staged, bytes).unwrap();
        deploy(&staged, &dir, &file);
        barrier(&p, &host, &dir).await;
        assert_eq!(
            version(&p, &id).await.unwrap(),
            json!("1"),
            "after a {what} file"
        );
        // A line of its own for each broken file.
        let log = host.log_text();
        assert!(refusals(&log) > before, "no clear error for {what}: {log}");
    }
    // Each broken version counted once, however many times the directory
    // is looked over (every 5 s) while the last one stays there.
    let port = host.metrics.expect("the host serves its metrics");
    let failed = || async {
        let text = callme_tests::scrape(port).await;
        let labels = [
            ("server_id", id.as_str()),
            ("action", "reload"),
            ("outcome", "failed"),
        ];
        callme_tests::value_of(&text, "callme_plugin_loads_total", &labels)
    };
    assert_eq!(failed().await, Some(3.0));
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(failed().await, Some(3.0), "a broken version counted again");
    // A good file after the broken ones is picked up.
    deploy(&plugin_path("calc-v2"), &dir, &file);
    wait_version(&p, &id, "2").await;
}

#[tokio::test]
async fn delete_then_restore() {
    let dir = tempdir();
    let id = unique("delete");
    let file = dir.join(format!("{id}.wasm"));
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &id, "1").await;

    std::fs::remove_file(&file).unwrap();
    assert!(
        wait_withdrawn(&p, &id).await,
        "deleted plugin still answers"
    );

    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    wait_version(&p, &id, "1").await;
}

#[tokio::test]
async fn sidecar_limits_apply_and_revert() {
    let dir = tempdir();
    let id = unique("sidecar");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(20)).await;
    let fib35 = || async { p.use_server(&id).call("fib", pos(json!([35]))).await };
    assert_eq!(fib35().await.unwrap(), json!(9227465));

    let sidecar = dir.join(format!("{id}.toml"));
    std::fs::write(&sidecar, "fuel = 10000000\n").unwrap();
    let limited = eventually(WAIT, || async {
        match fib35().await {
            Err(Error::Remote(r)) if r.kind == ErrorKind::Timeout => Some(r.data),
            _ => None,
        }
    })
    .await;
    assert_eq!(limited, Some(json!("fuel")));

    // An invalid sidecar keeps the previous settings and says why.
    std::fs::write(&sidecar, "fuel = 10000000\nfeul = 1\n").unwrap();
    barrier(&p, &host, &dir).await;
    assert!(matches!(fib35().await, Err(Error::Remote(r)) if r.kind == ErrorKind::Timeout));
    assert!(host.log_text().contains("feul"), "{}", host.log_text());

    std::fs::remove_file(&sidecar).unwrap();
    let restored = eventually(WAIT, || async { fib35().await.ok() }).await;
    assert_eq!(restored, Some(json!(9227465)));
}

#[tokio::test]
async fn running_call_finishes_on_the_old_version() {
    let dir = tempdir();
    let id = unique("inflight");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(20)).await;
    wait_version(&p, &id, "1").await;

    let slow = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.call("slow-version", pos(json!([4000]))).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let swapped_at = Instant::now();
    deploy(&plugin_path("calc-v2"), &dir, &format!("{id}.wasm"));
    wait_version(&p, &id, "2").await;
    assert!(
        swapped_at.elapsed() < Duration::from_millis(1200),
        "swap finished while the call ran"
    );
    assert_eq!(slow.await.unwrap().unwrap(), json!("1"));
}

#[tokio::test]
async fn start_serves_everything_before_ready_and_describe_shows_version() {
    let dir = tempdir();
    let ids: Vec<String> = (0..3).map(|_| unique("boot")).collect();
    for id in &ids {
        deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    }
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    let hash = callme::plugin::content_hash(&std::fs::read(plugin_path("calc")).unwrap());
    for id in &ids {
        // No retry: ready means serving.
        assert_eq!(version(&p, id).await.unwrap(), json!("1"));
        let d = p.use_server(id).describe().await.unwrap();
        assert_eq!(d["version"], json!(hash));
    }
}

#[tokio::test]
async fn sidecar_sets_concurrency_reuse_prewarm_and_guest_log_level() {
    let dir = tempdir();
    let id = unique("settings");
    deploy(&plugin_path("hostile"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &["--concurrency", "8"]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(10)).await;
    let print = |text: &'static str| {
        let sp = p.use_server(&id);
        async move { sp.call("print", pos(json!([text]))).await }
    };
    print("marker-before").await.unwrap();
    let d = p.use_server(&id).describe().await.unwrap();
    assert_eq!(d["concurrency"], json!(8));
    assert_eq!(d["reuse_instances"], json!(false));
    assert_eq!(d["prewarm"], json!(2));
    // Spare instances are fresh too: nothing carries over between calls.
    for _ in 0..5 {
        let n = p.use_server(&id).call("counter", Args::default()).await;
        assert_eq!(n.unwrap(), json!(1));
    }

    std::fs::write(
        dir.join(format!("{id}.toml")),
        "concurrency = 3\nreuse_instances = true\nprewarm = 0\nlog_level = \"warn\"\n",
    )
    .unwrap();
    let applied = eventually(WAIT, || async {
        let d = p.use_server(&id).describe().await.ok()?;
        (d["concurrency"] == json!(3)
            && d["reuse_instances"] == json!(true)
            && d["prewarm"] == json!(0))
        .then_some(())
    })
    .await;
    assert!(
        applied.is_some(),
        "settings not applied: {}",
        host.log_text()
    );
    // Reused instances keep state between calls.
    let a = p
        .use_server(&id)
        .call("counter", Args::default())
        .await
        .unwrap();
    let b = p
        .use_server(&id)
        .call("counter", Args::default())
        .await
        .unwrap();
    assert!(b.as_u64() > a.as_u64(), "{a} then {b}");
    print("marker-after").await.unwrap();
    barrier(&p, &host, &dir).await;
    let log = host.log_text();
    assert!(log.contains("marker-before"), "{log}");
    assert!(
        !log.contains("marker-after"),
        "guest output below the log level leaked: {log}"
    );
}

#[tokio::test]
async fn invalid_sidecar_changes_nothing_and_deleting_it_restores_defaults() {
    let dir = tempdir();
    let id = unique("strict");
    let sidecar = dir.join(format!("{id}.toml"));
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    std::fs::write(&sidecar, "concurrency = 3\n").unwrap();
    let mut host = observed(&dir, &["--concurrency", "5"]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(10)).await;
    let concurrency = || async {
        let d = p.use_server(&id).describe().await.unwrap();
        d["concurrency"].clone()
    };
    assert_eq!(concurrency().await, json!(3));

    // Each is logged (so it has been handled), then nothing has changed:
    // applied, even the valid ones would set the concurrency to 5.
    for bad in [
        "concurrency = 0",
        "concurrency = 70000",
        "fuel = 0",
        "deadline_ms = 18446744073709551615",
        "memory_bytes = 0",
    ] {
        std::fs::write(&sidecar, format!("{bad}\n")).unwrap();
        let logged = eventually(WAIT, || async {
            let log = host.log_text();
            log.lines()
                .any(|l| l.contains("invalid settings") && l.contains(&id) && l.contains(bad))
                .then_some(())
        })
        .await;
        assert!(logged.is_some(), "{bad} not logged: {}", host.log_text());
        assert_eq!(concurrency().await, json!(3), "after {bad}");
        let sum: i64 = p.use_server(&id).invoke("add", (1, 2)).await.unwrap();
        assert_eq!(sum, 3, "after {bad}");
    }

    // Nor is a new version taken up while the sidecar beside it is invalid.
    let v2 = callme::plugin::content_hash(&std::fs::read(plugin_path("calc-v2")).unwrap());
    deploy(&plugin_path("calc-v2"), &dir, &format!("{id}.wasm"));
    let logged = eventually(WAIT, || async {
        let log = host.log_text();
        log.lines()
            .any(|l| l.contains("invalid settings") && l.contains(&v2[..12]))
            .then_some(())
    })
    .await;
    assert!(logged.is_some(), "{}", host.log_text());
    assert_eq!(version(&p, &id).await.unwrap(), json!("1"));
    assert_eq!(concurrency().await, json!(3));
    // Each refusal counted, as what it was.
    let port = host.metrics.expect("the host serves its metrics");
    let text = callme_tests::scrape(port).await;
    let labels = [
        ("server_id", id.as_str()),
        ("action", "reload"),
        ("outcome", "invalid_settings"),
    ];
    let refused = callme_tests::value_of(&text, "callme_plugin_loads_total", &labels);
    assert_eq!(refused, Some(6.0), "{text}");

    // Without a sidecar the defaults apply, the host's --concurrency among them.
    std::fs::remove_file(&sidecar).unwrap();
    let restored = eventually(WAIT, || async {
        let d = p.use_server(&id).describe().await.ok()?;
        (d["concurrency"] == json!(5) && version(&p, &id).await.ok()? == json!("2")).then_some(())
    })
    .await;
    assert!(
        restored.is_some(),
        "defaults not restored: {}",
        host.log_text()
    );
}

#[tokio::test]
async fn bad_names_and_sidecars_are_skipped_at_start() {
    let dir = tempdir();
    let good = unique("good");
    deploy(&plugin_path("calc"), &dir, &format!("{good}.wasm"));
    let long = "a".repeat(201);
    let bad_names = ["bad name", "héllo", "x!", long.as_str()];
    for name in bad_names {
        deploy(&plugin_path("calc"), &dir, &format!("{name}.wasm"));
    }
    let (zero, over) = (unique("zero"), unique("over"));
    for (id, setting) in [(&zero, "concurrency = 0"), (&over, "concurrency = 70000")] {
        deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
        std::fs::write(dir.join(format!("{id}.toml")), format!("{setting}\n")).unwrap();
    }
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    assert_eq!(version(&p, &good).await.unwrap(), json!("1"));
    for id in [&zero, &over] {
        let e = version(&p, id).await.unwrap_err();
        assert!(matches!(e, Error::NoSuchServer(_)), "{id}: {e:?}");
    }
    // One line for each file skipped.
    let log = host.log_text();
    for name in bad_names
        .iter()
        .copied()
        .chain([zero.as_str(), over.as_str()])
    {
        let lines = log.lines().filter(|l| l.contains(name)).count();
        assert_eq!(lines, 1, "`{name}` in {lines} lines: {log}");
    }

    // Corrected, the sidecar applies like any change.
    std::fs::write(dir.join(format!("{zero}.toml")), "concurrency = 2\n").unwrap();
    wait_version(&p, &zero, "1").await;
    let d = p.use_server(&zero).describe().await.unwrap();
    assert_eq!(d["concurrency"], json!(2));
}

/// Files that are no plugin file at all never stall the host: a FIFO
/// renamed in (opening it would block until a writer comes) and a symlink
/// to `/dev/zero` (reading it never ends) are refused by name, and what
/// is deployed after them is served. A symlink to a plugin made in place,
/// which raises no event worth acting on, is served all the same.
#[tokio::test]
async fn fifos_devices_and_symlinks_in_the_directory_never_stall_the_host() {
    let dir = tempdir();
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;

    let staged = tempdir().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&staged)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let fifo = unique("fifo");
    std::fs::rename(&staged, dir.join(format!("{fifo}.wasm"))).unwrap();
    let zero = unique("zero");
    std::os::unix::fs::symlink("/dev/zero", dir.join(format!("{zero}.wasm"))).unwrap();
    barrier(&p, &host, &dir).await;

    let linked = unique("linked");
    std::os::unix::fs::symlink(plugin_path("calc"), dir.join(format!("{linked}.wasm"))).unwrap();
    wait_version(&p, &linked, "1").await;
    for id in [&fifo, &zero] {
        let e = version(&p, id).await.unwrap_err();
        assert!(matches!(e, Error::NoSuchServer(_)), "{id}: {e:?}");
    }
    let log = host.log_text();
    assert!(
        log.contains(&format!("{fifo}.wasm")) && log.contains("not a regular file"),
        "the FIFO is not named as refused"
    );
}

/// A version no instance can be made of (here: settings whose memory cap
/// is below what the module needs to start) is refused when it is
/// deployed, and the version before it serves on: served, it would fail
/// every call.
#[tokio::test]
async fn a_version_no_instance_can_be_made_of_is_refused_and_the_old_one_serves() {
    let dir = tempdir();
    let id = unique("cannot-start");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &id, "1").await;

    // One page of 64 KiB: calc's module starts with more.
    std::fs::write(dir.join(format!("{id}.toml")), "memory_bytes = 65536\n").unwrap();
    barrier(&p, &host, &dir).await;
    assert_eq!(version(&p, &id).await.unwrap(), json!("1"));
    let sum = p.use_server(&id).call("add", pos(json!([2, 3]))).await;
    assert_eq!(sum.ok(), Some(json!(5)));
    let log = host.log_text();
    assert!(log.contains("an instance of it cannot be made"), "{log}");
}

/// A plugin deployed as a symbolic link (`NAME.wasm -> releases/v1/...`)
/// whose link is pointed at a file that is not there yet (a typo, a
/// release not unpacked) keeps its version serving, and the host says
/// why; pointed at a file that is there, the new version is served.
#[tokio::test]
async fn a_symlink_to_nothing_keeps_the_version_serving() {
    let dir = tempdir();
    let releases = tempdir();
    std::fs::create_dir_all(releases.join("v1")).unwrap();
    std::fs::copy(plugin_path("calc"), releases.join("v1/calc.wasm")).unwrap();
    let id = unique("linked-release");
    let link = dir.join(format!("{id}.wasm"));
    // Re-pointed the safe way: a link made aside, then renamed over.
    let point = |to: &Path| {
        let aside = dir.join(format!(".{id}.wasm.incoming"));
        std::os::unix::fs::symlink(to, &aside).unwrap();
        std::fs::rename(&aside, &link).unwrap();
    };
    point(&releases.join("v1/calc.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &id, "1").await;

    point(&releases.join("v2/calc.wasm"));
    barrier(&p, &host, &dir).await;
    assert_eq!(version(&p, &id).await.unwrap(), json!("1"));
    let log = host.log_text();
    assert!(
        log.contains("a symbolic link to a file that is not there"),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains(&id) && l.contains("removed")),
        "{log}"
    );

    std::fs::create_dir_all(releases.join("v2")).unwrap();
    std::fs::copy(plugin_path("calc-v2"), releases.join("v2/calc.wasm")).unwrap();
    point(&releases.join("v2/calc.wasm"));
    wait_version(&p, &id, "2").await;
}

/// The plugins directory removed and made again (or replaced by another)
/// is followed: what is deployed in the new one is served.
#[tokio::test]
async fn a_plugins_directory_made_again_is_followed() {
    let dir = tempdir();
    let first = unique("before");
    deploy(&plugin_path("calc"), &dir, &format!("{first}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &first, "1").await;

    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let second = unique("after");
    deploy(&plugin_path("calc-v2"), &dir, &format!("{second}.wasm"));
    wait_version(&p, &second, "2").await;
    // What went with the old directory is withdrawn.
    assert!(wait_withdrawn(&p, &first).await, "{first} is still served");
}

/// A plugins directory moved away for a moment (a deploy that swaps
/// directories, `mv plugins plugins.old; mv plugins.new plugins`)
/// withdraws nothing: what serves keeps serving while there is no
/// directory, and the one put back in its place is followed as before.
#[tokio::test]
async fn a_plugins_directory_moved_away_for_a_moment_withdraws_nothing() {
    let dir = tempdir();
    let id = unique("dir-away");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &id, "1").await;

    let away = dir.with_extension("away");
    std::fs::rename(&dir, &away).unwrap();
    // The host looks the directory over within milliseconds of an event
    // on it; this is many times that.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        version(&p, &id).await.ok(),
        Some(json!("1")),
        "withdrawn while its directory was away: {}",
        host.log_text()
    );
    assert!(
        host.log_text()
            .contains("cannot read the plugins directory"),
        "{}",
        host.log_text()
    );

    std::fs::rename(&away, &dir).unwrap();
    deploy(&plugin_path("calc-v2"), &dir, &format!("{id}.wasm"));
    wait_version(&p, &id, "2").await;
}

/// A version refused is tried again once its files change, if only by a
/// `touch`: a refusal for a passing reason (a first instance out of time
/// on a busy machine, a file the host could not read until its
/// permissions were mended) is not for good. Here the sidecar is
/// invalid, so each try is refused and logged again.
#[tokio::test]
async fn a_refused_version_is_tried_again_once_its_file_is_touched() {
    let dir = tempdir();
    let id = unique("touched");
    let sidecar = dir.join(format!("{id}.toml"));
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &id, "1").await;

    let refusals = || {
        host.log_text()
            .lines()
            .filter(|l| l.contains("invalid settings") && l.contains(&id))
            .count()
    };
    std::fs::write(&sidecar, "concurrency = 0\n").unwrap();
    let refused = eventually(WAIT, || async { (refusals() == 1).then_some(()) }).await;
    assert!(refused.is_some(), "{}", host.log_text());
    // Touched: its modification time, nothing else.
    let later = std::time::SystemTime::now() + Duration::from_secs(1);
    std::fs::File::options()
        .write(true)
        .open(&sidecar)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let again = eventually(WAIT, || async { (refusals() == 2).then_some(()) }).await;
    assert!(again.is_some(), "not tried again: {}", host.log_text());
    assert_eq!(version(&p, &id).await.unwrap(), json!("1"));
}

/// A plugin deployed while the host is away from its broker is served
/// once the broker is back, without anything touching the file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_deployed_while_the_broker_is_away_is_served_when_it_is_back() {
    let forwarder = callme_tests::Forwarder::start().await;
    let port = forwarder.port();
    let dir = tempdir();
    let url = forwarder.url();
    let mut host = observed(&dir, &["--amqp-url", &url]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    barrier(&p, &host, &dir).await;

    forwarder.cut();
    // Long enough for the host to see its connection gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = unique("late");
    deploy(&plugin_path("calc"), &dir, &format!("{late}.wasm"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _back = callme_tests::Forwarder::on(port).await;
    wait_version(&p, &late, "1").await;
}

/// An idle host looks its plugins directory over once every few seconds:
/// reading the directory raises an event on it (opened, closed), which
/// was taken as a change and made the host look it over again, every few
/// milliseconds, for as long as it ran. Moving the directory away and
/// making a new one is still seen.
#[tokio::test]
async fn an_idle_host_does_not_look_its_directory_over_in_a_loop() {
    let dir = tempdir();
    assert!(dir.is_absolute());
    let id = unique("idle-dir");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::start(
        std::process::Command::new(callme_tests::callme_bin()),
        &dir,
        &[],
        "callme::server=debug",
    );
    host.wait_ready(Duration::from_secs(60));
    let looked = || {
        host.log_text()
            .matches("looking over the plugins directory")
            .count()
    };
    let before = looked();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = looked() - before;
    // The periodic look (every 5 s) is what is counted: once or twice in
    // those 6 s, never in a loop.
    assert!(
        (1..=2).contains(&during),
        "looked over {during} times in 6 s idle"
    );

    // The directory replaced: the new one is served.
    let moved = dir.with_extension("moved");
    std::fs::rename(&dir, &moved).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let next = unique("idle-dir-next");
    deploy(&plugin_path("calc"), &dir, &format!("{next}.wasm"));
    let p = proxy(Duration::from_secs(30)).await;
    let start = Instant::now();
    loop {
        match p.use_server(&next).invoke::<_, i64>("add", (1, 2)).await {
            Ok(sum) => break assert_eq!(sum, 3),
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&moved);
}

/// A component whose module's start function never returns: trying its
/// first instance takes the plugin's whole deadline.
const SLOW_TO_START: &str = r#"
(component
  (core module $m
    (func $spin (loop $again (br $again)))
    (func (export "noop"))
    (start $spin))
  (core instance $i (instantiate $m))
  (func (export "noop") (canon lift (core func $i "noop"))))
"#;

/// Deploys [`SLOW_TO_START`] as `id` in `dir`, its first instance given
/// `deadline_ms` (and fuel enough to spin until then).
fn deploy_slow_to_start(dir: &Path, id: &str, deadline_ms: u64) {
    std::fs::write(
        dir.join(format!("{id}.toml")),
        format!("deadline_ms = {deadline_ms}\nfuel = 100000000000000\n"),
    )
    .unwrap();
    let incoming = dir.join(format!(".{id}.incoming"));
    std::fs::write(&incoming, wat::parse_str(SLOW_TO_START).unwrap()).unwrap();
    std::fs::rename(&incoming, dir.join(format!("{id}.wasm"))).unwrap();
}

/// A plugin slow to load (its first instance spins until a 30 s
/// deadline) holds up no other change: a plugin deployed and another
/// removed meanwhile are acted on at once, and the slow one is refused
/// in the end. Changes were applied one at a time, and both waited the
/// 30 s out.
#[tokio::test]
async fn a_plugin_slow_to_load_holds_up_no_other_deploy() {
    let dir = tempdir();
    let old = unique("slow-old");
    deploy(&plugin_path("calc"), &dir, &format!("{old}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &old, "1").await;

    let slow = unique("slow-start");
    deploy_slow_to_start(&dir, &slow, 30_000);
    // Well into trying its first instance: a change under way, as the
    // gauge [`barrier`] waits on says.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let port = host.metrics.expect("the host serves its metrics");
    let text = callme_tests::scrape(port).await;
    let pending = callme_tests::value_of(&text, "callme_plugin_changes_pending", &[]);
    assert!(
        pending.is_some_and(|n| n >= 1.0),
        "the slow plugin's change is not counted as under way: {pending:?}"
    );

    let started = Instant::now();
    let fast = unique("slow-fast");
    deploy(&plugin_path("calc"), &dir, &format!("{fast}.wasm"));
    std::fs::remove_file(dir.join(format!("{old}.wasm"))).unwrap();
    let soon = Duration::from_secs(10);
    let served = eventually(soon, || async {
        (version(&p, &fast).await.ok() == Some(json!("1"))).then_some(())
    })
    .await;
    assert!(served.is_some(), "{fast} not served within {soon:?}");
    let withdrawn = eventually(soon, || async {
        let r = p
            .use_server(&old)
            .call_timeout("version", Args::default(), Duration::from_millis(300))
            .await;
        matches!(r, Err(Error::NoSuchServer(_))).then_some(())
    })
    .await;
    assert!(withdrawn.is_some(), "{old} not withdrawn within {soon:?}");
    let refused = |log: &str| {
        log.lines()
            .any(|l| l.contains(&slow) && l.contains("an instance of it cannot be made"))
    };
    assert!(
        !refused(&host.log_text()),
        "{slow} was refused before its deadline ({:?} after the others changed): {}",
        started.elapsed(),
        host.log_text()
    );

    let given_up = eventually(WAIT, || async { refused(&host.log_text()).then_some(()) }).await;
    assert!(
        given_up.is_some(),
        "{slow} never refused: {}",
        host.log_text()
    );
    assert!(matches!(
        version(&p, &slow).await,
        Err(Error::NoSuchServer(_))
    ));
}

/// A sidecar being written in place (open, part written) when its
/// `.wasm` arrives is not read until its writer closes it: read at the
/// `.wasm`'s event, the part written (no limits yet) served the plugin
/// with the default limits until the sidecar's close a moment later. A
/// removal is not held up by a sidecar being written.
#[tokio::test]
async fn a_sidecar_being_written_is_read_once_it_is_whole() {
    use std::io::Write;
    let dir = tempdir();
    let host = watcher_told(&dir);
    let p = proxy(Duration::from_secs(20)).await;
    let id = unique("half-sidecar");

    let mut sidecar = std::fs::File::create(dir.join(format!("{id}.toml"))).unwrap();
    sidecar.write_all(b"# calls of this plugin get\n").unwrap();
    sidecar.flush().unwrap();
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let waiting = logged(&host, &id, "being written").await;
    assert!(
        waiting,
        "not left to the sidecar's writer: {}",
        host.log_text()
    );
    assert!(
        matches!(version(&p, &id).await, Err(Error::NoSuchServer(_))),
        "served while its sidecar is being written"
    );

    sidecar.write_all(b"fuel = 10000000\n").unwrap();
    drop(sidecar);
    let fib35 = eventually(WAIT, || async {
        match p.use_server(&id).call("fib", pos(json!([35]))).await {
            Err(Error::NoSuchServer(_)) => None,
            other => Some(other),
        }
    })
    .await
    .expect("served once its sidecar is closed");
    assert!(
        matches!(&fib35, Err(Error::Remote(r)) if r.kind == ErrorKind::Timeout && r.data == json!("fuel")),
        "the first version served ran without the sidecar's fuel: {fib35:?}"
    );
    let log = host.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains(&id) && l.contains("swapped in")),
        "served twice: {log}"
    );

    // Its `.wasm` deleted while its sidecar is being written again: the
    // removal is not held up by the writer.
    let mut sidecar = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(format!("{id}.toml")))
        .unwrap();
    sidecar.write_all(b"# and more\n").unwrap();
    sidecar.flush().unwrap();
    std::fs::remove_file(dir.join(format!("{id}.wasm"))).unwrap();
    assert!(
        wait_withdrawn(&p, &id).await,
        "not withdrawn while its sidecar is open"
    );
    drop(sidecar);
}

/// The size of a plugin padded by [`deploy_padded`].
const PADDED_BYTES: u64 = 240 << 20;

/// Deploys the component `bytes` as `id`, padded to [`PADDED_BYTES`] with
/// a custom section (sparse: no disk), so that reading and hashing it
/// takes the host a while.
fn deploy_padded(bytes: &[u8], dir: &Path, id: &str) {
    use std::io::Write;
    let incoming = dir.join(format!(".{id}.incoming"));
    let mut file = std::fs::File::create(&incoming).unwrap();
    file.write_all(bytes).unwrap();
    // A custom section (id 0) named "pad", its size in five bytes of
    // LEB128.
    let size = PADDED_BYTES - bytes.len() as u64 - 6;
    let mut header = vec![0u8];
    header.extend((0..5).map(|i| {
        let byte = (size >> (7 * i)) as u8 & 0x7f;
        if i < 4 { byte | 0x80 } else { byte }
    }));
    file.write_all(&header).unwrap();
    file.write_all(b"\x03pad").unwrap();
    file.set_len(PADDED_BYTES).unwrap();
    std::fs::rename(&incoming, dir.join(format!("{id}.wasm"))).unwrap();
}

/// A sidecar rewritten in place while its plugin's new `.wasm` is being
/// read is not read cut. The `.wasm` here is `calc` with a custom section
/// padding it to 240 MiB (sparse: no disk), so reading and hashing it
/// takes a while; the sidecar is cut to nothing (opened for writing,
/// truncated, left open) once the host logs that it reads the file. The
/// sidecar was read after the `.wasm`, and its empty file served the new
/// version with the default limits until its writer closed it.
#[tokio::test]
async fn a_sidecar_cut_while_its_plugin_is_read_is_not_served_cut() {
    use std::io::Write;
    let dir = tempdir();
    let id = unique("cut-sidecar");
    let sidecar = dir.join(format!("{id}.toml"));
    std::fs::write(&sidecar, "fuel = 10000000\n").unwrap();
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let host = watcher_told(&dir);
    let p = proxy(Duration::from_secs(20)).await;
    let out_of_fuel = |r: &Result<Value, Error>| matches!(r, Err(Error::Remote(r)) if r.kind == ErrorKind::Timeout && r.data == json!("fuel"));
    let fib35 = p.use_server(&id).call("fib", pos(json!([35]))).await;
    assert!(out_of_fuel(&fib35), "{fib35:?}");

    deploy_padded(&std::fs::read(plugin_path("calc")).unwrap(), &dir, &id);
    let reading = format!("bytes={PADDED_BYTES}");
    let started = Instant::now();
    while !host
        .log_text()
        .lines()
        .any(|l| l.contains(&id) && l.contains("reading") && l.contains(&reading))
    {
        assert!(started.elapsed() < WAIT, "never read: {}", host.log_text());
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&sidecar)
        .unwrap();
    let waiting = logged(&host, &id, "being written").await;
    assert!(
        waiting,
        "not left to the sidecar's writer: {}",
        host.log_text()
    );
    let fib35 = p.use_server(&id).call("fib", pos(json!([35]))).await;
    assert!(
        out_of_fuel(&fib35),
        "served with the sidecar read cut: {fib35:?}"
    );

    writer.write_all(b"fuel = 10000000\n").unwrap();
    drop(writer);
    let swapped = logged(&host, &id, "swapped in").await;
    assert!(
        swapped,
        "the padded version is not served once its sidecar is whole: {}",
        host.log_text()
    );
    let fib35 = p.use_server(&id).call("fib", pos(json!([35]))).await;
    assert!(out_of_fuel(&fib35), "{fib35:?}");
}

/// An id served by native functions beside the plugins directory (a
/// program's own `Host::server().serve_native`) is not withdrawn by a
/// file of its name coming and going in the directory: the removal of
/// `N.toml` (or of a `N.wasm` the host refused) stopped serving `N`,
/// whatever served it.
#[tokio::test]
async fn a_file_removed_from_the_directory_leaves_a_native_id_of_its_name_served() {
    let dir = tempdir();
    let host = callme::serve::Host::start(callme::serve::ServeOptions {
        connect: callme::ConnectOptions::new(callme_tests::amqp_url()),
        plugins_dir: dir.clone(),
        server: callme::ServerOptions::default(),
        runtime: callme::RuntimeConfig::default(),
        grace: Duration::from_secs(5),
    })
    .await
    .unwrap();
    let id = unique("native-beside");
    let server = host.server().clone();
    server
        .serve_native(&id, callme_tests::native_add())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let following = tokio::spawn(host.run_until(async {
        let _ = stopped.await;
    }));
    let p = proxy(Duration::from_secs(5)).await;
    let add = || async { p.use_server(&id).invoke::<_, i64>("add", (1, 2)).await };
    assert_eq!(add().await.unwrap(), 3);

    let sidecar = dir.join(format!("{id}.toml"));
    std::fs::write(&sidecar, "concurrency = 2\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::remove_file(&sidecar).unwrap();
    let wasm = dir.join(format!("{id}.wasm"));
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::remove_file(&wasm).unwrap();
    // Each removal is acted on within moments; calls must go on being
    // answered meanwhile and after.
    let watching = Instant::now();
    while watching.elapsed() < Duration::from_secs(3) {
        let sum = add().await;
        assert_eq!(
            sum.as_ref().ok(),
            Some(&3),
            "a removed file withdrew the native id: {sum:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    following.await.unwrap().unwrap();
}

/// A change the broker failed half-way, then undone, is undone: the
/// host's link stalls, a sidecar raising `concurrency` from 3 to 4 is
/// swapped in and its new prefetch never confirmed, and the sidecar is
/// put back. The host compared the sidecar put back with what it had
/// last served, found them the same, and left concurrency 4 serving for
/// good (with whatever grants came with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_broker_failed_half_way_and_then_undone_is_undone() {
    let node = callme_tests::Forwarder::start().await;
    let port = node.port();
    let dir = tempdir();
    let id = unique("undone");
    let put = |text: &str| {
        let incoming = dir.join(format!(".{id}.toml.incoming"));
        std::fs::write(&incoming, text).unwrap();
        std::fs::rename(&incoming, dir.join(format!("{id}.toml"))).unwrap();
    };
    put("concurrency = 3\n");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::serve(&dir, &["--amqp-url", &node.url()]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(10)).await;
    let concurrency = async || {
        let d = p.use_server(&id).describe().await.ok()?;
        d["concurrency"].as_u64()
    };
    assert_eq!(concurrency().await, Some(3));

    node.stall();
    put("concurrency = 4\n");
    let swapped = logged(&host, &id, "concurrency changed").await;
    assert!(swapped, "never swapped: {}", host.log_text());
    put("concurrency = 3\n");
    // The new prefetch waits 5 s for the broker before it fails.
    tokio::time::sleep(Duration::from_secs(7)).await;
    node.cut();
    // Its listener is closed once its task is: a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _node = callme_tests::Forwarder::on(port).await;
    let undone = eventually(WAIT, || async {
        (concurrency().await == Some(3)).then_some(())
    })
    .await;
    assert!(
        undone.is_some(),
        "the change undone still serves: concurrency {:?}; {}",
        concurrency().await,
        host.log_text()
    );
}

/// Plugins replaced by larger files while they wait for their turn to
/// load take the share of the loads the larger files need: two plugins
/// waiting with the share of a small file, each replaced by a 240 MiB
/// one while a third (240 MiB, slow to start) loads, are read one after
/// the other, not together. Each took the share its file had when it
/// began waiting, so four such could read and compile a gibibyte at once
/// where the loads allow 256 MiB.
#[tokio::test]
async fn a_plugin_replaced_by_a_larger_file_while_it_waits_to_load_takes_its_share() {
    let dir = tempdir();
    let host = watcher_told(&dir);
    let reading = format!("bytes={PADDED_BYTES}");
    let read = |id: &str| {
        host.log_text()
            .lines()
            .position(|l| l.contains(id) && l.contains("reading") && l.contains(&reading))
    };
    let slow = unique("share-slow");
    std::fs::write(
        dir.join(format!("{slow}.toml")),
        "deadline_ms = 6000\nfuel = 100000000000000\n",
    )
    .unwrap();
    deploy_padded(&wat::parse_str(SLOW_TO_START).unwrap(), &dir, &slow);
    let loading = eventually(WAIT, || async { read(&slow) }).await;
    assert!(loading.is_some(), "{}", host.log_text());

    let waiting = [unique("share-a"), unique("share-b")];
    let calc = std::fs::read(plugin_path("calc")).unwrap();
    for id in &waiting {
        deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    }
    std::thread::sleep(Duration::from_millis(500));
    for id in &waiting {
        deploy_padded(&calc, &dir, id);
    }
    let loaded = |id: &str| {
        host.log_text()
            .lines()
            .position(|l| l.contains(id) && l.contains(" loaded"))
    };
    let both = eventually(Duration::from_secs(90), || async {
        Some((loaded(&waiting[0])?, loaded(&waiting[1])?))
    })
    .await;
    assert!(both.is_some(), "not loaded: {}", host.log_text());
    // Read together, both begin as the slow one's share is given back,
    // within moments; one after the other, the second waits for the
    // first to be read, hashed, compiled and tried.
    let log = host.log_text();
    let began = |id: &str| {
        let line = log
            .lines()
            .find(|l| l.contains(id) && l.contains("reading") && l.contains(&reading))
            .unwrap_or_else(|| panic!("{id} not read as padded: {log}"));
        let stamp = line.split_whitespace().next().unwrap();
        seconds_of_day(stamp)
    };
    let apart = (began(&waiting[0]) - began(&waiting[1])).abs();
    assert!(
        apart >= 0.1,
        "the two were read at once ({apart:.3} s apart): {log}"
    );
}

/// Seconds since midnight of a log line's RFC 3339 time
/// (`2026-11-30T01:55:54.250555Z`).
fn seconds_of_day(stamp: &str) -> f64 {
    let time = stamp
        .split_once('T')
        .and_then(|(_, t)| t.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("not a log time: {stamp}"));
    time.split(':')
        .map(|part| part.parse::<f64>().unwrap())
        .fold(0.0, |total, part| total * 60.0 + part)
}

/// A host told to stop while a version is still loading (its first
/// instance spinning toward a 20 s deadline) gives that version up and
/// exits at once, serving nothing new on its way out. It waited for the
/// load to end, up to its grace period.
#[tokio::test]
async fn stopping_gives_up_a_version_still_loading() {
    let dir = tempdir();
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let slow = unique("stop-slow");
    deploy_slow_to_start(&dir, &slow, 20_000);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let stopping = Instant::now();
    host.terminate();
    let code = host.wait(Duration::from_secs(30));
    let took = stopping.elapsed();
    assert_eq!(code, Some(0), "{}", host.log_text());
    assert!(
        took < Duration::from_secs(8),
        "stopping waited {took:?} for a load to end"
    );
    let log = host.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&slow) && l.contains("the version being loaded is given up")),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains(&slow) && l.contains("refused")),
        "its first instance ran to its deadline: {log}"
    );
}

/// A file over 256 MiB is refused unread, naming its size, and the host
/// goes on serving (the file here is sparse: its size costs no disk).
#[tokio::test]
async fn a_plugin_file_over_the_size_limit_is_refused_unread() {
    let dir = tempdir();
    let id = unique("beside-huge");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = observed(&dir, &[]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(5)).await;
    wait_version(&p, &id, "1").await;

    let huge = unique("huge");
    let incoming = dir.join(format!(".{huge}.incoming"));
    std::fs::File::create(&incoming)
        .unwrap()
        .set_len((256 << 20) + 1)
        .unwrap();
    std::fs::rename(&incoming, dir.join(format!("{huge}.wasm"))).unwrap();
    barrier(&p, &host, &dir).await;
    let log = host.log_text();
    assert!(
        log.lines().any(
            |l| l.contains(&huge) && l.contains("268435457 bytes, over the limit of 268435456")
        ),
        "{log}"
    );
    let e = p
        .use_server(&huge)
        .call("add", Args::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NoSuchServer(_)), "{e:?}");
    assert_eq!(version(&p, &id).await.unwrap(), json!("1"));
}

/// A stop signal while the host still loads its directory (a plugin slow
/// to start holds "ready" back for its 30 s deadline) is a graceful stop:
/// the plugins served already take calls, and the ones running are
/// finished and answered before the host exits 0, at once rather than
/// after the slow one. The signal used to be listened for only once every
/// plugin was served: it killed the host mid-call.
#[tokio::test]
async fn a_stop_while_plugins_load_finishes_the_calls_running() {
    let dir = tempdir();
    let id = unique("load-stop");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    deploy_slow_to_start(&dir, &unique("load-stop-slow"), 30_000);
    let mut host = Host::serve(&dir, &["--grace", "20"]);
    let p = proxy(Duration::from_secs(20)).await;
    wait_version(&p, &id, "1").await;
    assert!(!host.is_ready(), "ready while a plugin is still loading");
    let call = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.call("slow-version", pos(json!([1500]))).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.terminate();
    let code = host.wait(Duration::from_secs(15));
    let log = host.log_text();
    assert_eq!(code, Some(0), "exit 0 within 15 s of the stop: {log}");
    assert!(log.contains("all calls answered"), "{log}");
    assert_eq!(call.await.unwrap().unwrap(), json!("1"));
}

/// A plugin still being tried when a stop comes at start-up is given up:
/// it is not served once the ids have been stopped, where it would take
/// requests that the process, on its way out, drops.
#[tokio::test]
async fn a_stop_while_plugins_load_serves_no_plugin_after_it() {
    let dir = tempdir();
    let id = unique("load-stop-fast");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let late = unique("load-stop-late");
    std::fs::write(
        dir.join(format!("{late}.toml")),
        "deadline_ms = 60000\nfuel = 100000000000000\n",
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{late}.wasm")),
        // A few seconds: a trial the stop comes in the middle of.
        slow_but_starts(1_600_000_000),
    )
    .unwrap();
    let mut host = Host::serve(&dir, &["--grace", "20"]);
    let p = proxy(Duration::from_secs(20)).await;
    wait_version(&p, &id, "1").await;
    assert!(!host.is_ready(), "ready while a plugin is still loading");
    let call = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.call("slow-version", pos(json!([8000]))).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.terminate();
    assert!(
        !host
            .log_text()
            .contains(&format!("serving server_id={late}")),
        "{late}'s trial ended before the stop, which this test needs it to outlive: {}",
        host.log_text()
    );
    // Its trial (a few seconds) would end within the call running.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let r = p
            .use_server(&late)
            .call_timeout("noop", Args::default(), Duration::from_secs(1))
            .await;
        // Served after the stop, it would take the request and never
        // run it (the stop holds every turn), then drop it on its way out.
        assert!(
            matches!(r, Err(Error::NoSuchServer(_))),
            "{late} served after the stop: {r:?} {}",
            host.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(call.await.unwrap().unwrap(), json!("1"));
    let code = host.wait(Duration::from_secs(15));
    let log = host.log_text();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("the version being loaded is given up"),
        "{log}"
    );
}

/// A second stop signal ends the host at once, calls running or not
/// (their requests go back to the queue, as when a host is killed): an
/// operator's second Ctrl-C is no longer swallowed for the whole grace
/// period.
#[tokio::test]
async fn a_second_stop_signal_ends_the_host_at_once() {
    let dir = tempdir();
    let id = unique("second-stop");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::serve(&dir, &["--grace", "60"]);
    host.wait_ready(WAIT);
    let p = proxy(Duration::from_secs(30)).await;
    let _call = {
        let sp = p.use_server(&id);
        tokio::spawn(async move { sp.call("slow-version", pos(json!([20000]))).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    host.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.signal("INT");
    let code = host.wait(Duration::from_secs(10));
    let log = host.log_text();
    // The shell's status for an end by SIGINT, not start-up's 1.
    assert_eq!(code, Some(130), "{log}");
    assert!(log.contains("a second stop signal"), "{log}");
}

/// A component whose module's start function counts to `count` (400
/// million take a second or more) and then returns: trying its first
/// instance takes that long, and it is served after.
fn slow_but_starts(count: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"
(component
  (core module $m
    (func $count (local $i i32)
      (loop $again
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $again (i32.lt_u (local.get $i) (i32.const {count})))))
    (func (export "noop"))
    (start $count))
  (core instance $i (instantiate $m))
  (func (export "noop") (canon lift (core func $i "noop"))))
"#
    ))
    .unwrap()
}

/// The broker connection lost while the host serves its directory at
/// start-up (a plugin still being tried when it goes) does not end the
/// host: the plugins not served yet are once the broker is back, and the
/// host says it is ready then. It used to exit, cutting the calls the
/// plugins served first were running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_lost_while_the_plugins_load_is_waited_for() {
    let forwarder = callme_tests::Forwarder::start().await;
    let port = forwarder.port();
    let dir = tempdir();
    let fast = unique("load-lost-fast");
    deploy(&plugin_path("calc"), &dir, &format!("{fast}.wasm"));
    let slow = unique("load-lost-slow");
    std::fs::write(
        dir.join(format!("{slow}.toml")),
        "deadline_ms = 60000\nfuel = 100000000000000\n",
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{slow}.wasm")),
        slow_but_starts(400_000_000),
    )
    .unwrap();
    let url = forwarder.url();
    let mut host = Host::serve(&dir, &["--amqp-url", &url]);
    let p = proxy(Duration::from_secs(5)).await;
    // Served first, while the slow one is tried.
    wait_version(&p, &fast, "1").await;
    assert!(!host.is_ready(), "ready before the slow plugin was served");
    forwarder.cut();
    // Once the slow plugin's trial is over, it is served on a connection
    // that is gone: the host says it waits for the broker, and lives.
    let until = Instant::now() + WAIT;
    while !host.log_text().contains("trying again once it is back") {
        assert!(
            matches!(host.child.try_wait(), Ok(None)),
            "the host exited: {}",
            host.log_text()
        );
        assert!(Instant::now() < until, "{}", host.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _back = callme_tests::Forwarder::on(port).await;
    host.wait_ready(WAIT);
    wait_version(&p, &fast, "1").await;
    let served = eventually(WAIT, || async {
        let r = p
            .use_server(&slow)
            .call_timeout("noop", Args::default(), Duration::from_secs(2))
            .await;
        r.is_ok().then_some(())
    })
    .await;
    assert!(served.is_some(), "{slow} not served: {}", host.log_text());
}
