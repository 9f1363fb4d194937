//! A 3-node RabbitMQ cluster of the project's own (`scripts/broker cluster`) with quorum server queues: the node holding a queue's leader is stopped or killed mid-load, and every call still ends, answered or with a typed error, and none is answered wrongly.
//!
//! Two `callme serve` hosts, connected to nodes 1 and 2, serve one id with
//! a quorum queue; a proxy connected to node 3 calls `add` on it from
//! several tasks in a loop; then node 3 itself goes. Each test prints its counts; the figures in
//! docs/reliability.md come from them (`scripts/test cluster:: --
//! --nocapture`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use callme::{ConnectOptions, Error, Proxy};
use callme_tests::{Host, deploy, free_port, http_get, plugin_path, repo, run_ok, tempdir, unique};

/// The cluster tests take nodes down: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls from the proxy at once.
const CALLERS: usize = 4;

/// `scripts/broker cluster ARGS`; what it printed.
fn cluster(args: &[&str]) -> String {
    run_ok(
        Command::new(repo().join("scripts/broker"))
            .arg("cluster")
            .args(args),
    )
}

/// The AMQP URIs of nodes 1 to 3, starting the cluster once per run.
fn urls() -> &'static [String] {
    static URLS: OnceLock<Vec<String>> = OnceLock::new();
    URLS.get_or_init(|| {
        cluster(&["start"]);
        let env = cluster(&["env"]);
        let list = env
            .lines()
            .find_map(|l| l.strip_prefix("export CALLME_CLUSTER_URLS="))
            .expect("cluster env names its URLs")
            .trim_matches('\'');
        list.split(',').map(str::to_string).collect()
    })
}

/// Every node's URI, node `first` (1 to 3) first.
fn list_from(first: usize) -> String {
    let urls = urls();
    (0..urls.len())
        .map(|i| urls[(first - 1 + i) % urls.len()].clone())
        .collect::<Vec<_>>()
        .join(",")
}

/// The node (1 to 3) holding the leader of `queue`, as node `ask` sees it.
fn leader(queue: &str, ask: usize) -> Option<usize> {
    let out = cluster(&[
        "ctl",
        &ask.to_string(),
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "leader",
    ]);
    let line = out.lines().find(|l| l.split('\t').next() == Some(queue))?;
    let node = line.split('\t').nth(1)?;
    (1..=3).find(|n| node.starts_with(&format!("callme-c{n}@")))
}

/// How many times a host ran `add`, from its `/metrics`.
async fn runs_of_add(port: u16) -> u64 {
    let (status, text) = http_get(port, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with("callme_calls_total{") && l.contains("function=\"add\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// What the callers saw.
#[derive(Default, Debug)]
struct Counts {
    made: u64,
    answered: u64,
    /// Answered with a value that is not `a + b`: another call's reply,
    /// say. Must stay 0.
    wrong: u64,
    /// Ended by a typed error, by type.
    failed: BTreeMap<&'static str, u64>,
    /// Still not ended 3 s after their timeout. Must stay 0.
    hung: u64,
}

impl Counts {
    fn failed(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Callers calling `add` on `id` until `stop`, counting what they see.
fn load(
    proxy: &Proxy,
    id: &str,
    retry: bool,
    stop: &Arc<AtomicBool>,
    counts: &Arc<Mutex<Counts>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..CALLERS as i64)
        .map(|caller| {
            let server = proxy
                .use_server(id)
                .with_timeout(CALL_TIMEOUT)
                .with_retry(retry);
            let (stop, counts) = (stop.clone(), counts.clone());
            tokio::spawn(async move {
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let a = caller * 1_000_000 + i;
                    let call = server.invoke::<_, i64>("add", (a, 7));
                    let ended =
                        tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(3), call).await;
                    let mut c = counts.lock().unwrap();
                    c.made += 1;
                    match ended {
                        Ok(Ok(sum)) if sum == a + 7 => c.answered += 1,
                        Ok(Ok(_)) => c.wrong += 1,
                        Ok(Err(e)) => *c.failed.entry(e.type_name()).or_default() += 1,
                        Err(_) => c.hung += 1,
                    }
                }
            })
        })
        .collect()
}

/// Which node goes away.
#[derive(Clone, Copy, Debug)]
enum Victim {
    /// The one holding the server queue's leader.
    Leader,
    /// The one the proxy is connected to (node 3).
    Callers,
}

/// How the node goes away.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// `rabbitmqctl stop_app`, then `start_app`.
    StopApp,
    /// SIGKILL, then the node is started again.
    Kill,
}

/// Serves calc on two hosts, loads it from a third node, takes the
/// leader's node away mid-load and brings it back; the counts.
async fn node_lost_mid_load(outage: Outage, victim: Victim, retry: bool) -> (Counts, u64) {
    let id = unique("cluster");
    let queue = callme::protocol::server_queue(&id);
    let dirs = [tempdir(), tempdir()];
    let ports = [free_port(), free_port()];
    let mut hosts = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        deploy(&plugin_path("calc"), dir, &format!("{id}.wasm"));
        let metrics = format!("127.0.0.1:{}", ports[i]);
        let amqp = list_from(i + 1);
        let mut host = Host::serve(
            dir,
            &[
                "--amqp-url",
                &amqp,
                "--queue-type",
                "quorum",
                "--metrics-addr",
                &metrics,
            ],
        );
        host.wait_ready(Duration::from_secs(60));
        hosts.push(host);
    }
    let proxy = Proxy::connect_with(&ConnectOptions::new(list_from(3)), CALL_TIMEOUT)
        .await
        .expect("proxy on node 3");
    let first: i64 = proxy
        .use_server(&id)
        .invoke("add", (1, 2))
        .await
        .expect("served before the outage");
    assert_eq!(first, 3);

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let callers = load(&proxy, &id, retry, &stop, &counts);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let leader_node = leader(&queue, 3).expect("the queue has a leader");
    let node = match victim {
        Victim::Leader => leader_node,
        Victim::Callers => 3,
    };
    let n = node.to_string();
    let made_before = counts.lock().unwrap().made;
    println!(
        "{outage:?} of node {node}: leader on node {leader_node}, {made_before} calls made before"
    );
    match outage {
        Outage::StopApp => cluster(&["stop-app", &n]),
        Outage::Kill => cluster(&["kill", &n]),
    };
    let asked = if node == 3 { 1 } else { 3 };
    let now = callme_tests::eventually(Duration::from_secs(20), || async {
        leader(&queue, asked).filter(|l| *l != node)
    })
    .await;
    println!("{outage:?} of node {node}: leader now on node {now:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    match outage {
        Outage::StopApp => cluster(&["start-app", &n]),
        Outage::Kill => cluster(&["start"]),
    };
    // Back: calls go on being answered.
    let back = callme_tests::eventually(Duration::from_secs(30), || async {
        let r: Result<i64, Error> = proxy.use_server(&id).invoke("add", (2, 2)).await;
        (r.ok() == Some(4)).then_some(())
    })
    .await;
    assert!(back.is_some(), "not answered after the node came back");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let mut runs = 0;
    for port in ports {
        runs += runs_of_add(port).await;
    }
    drop(hosts);
    for dir in &dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    let counts = std::mem::take(&mut *counts.lock().unwrap());
    (counts, runs)
}

fn report(what: &str, counts: &Counts, runs: u64) {
    println!(
        "{what}: made {} answered {} failed {} {:?} hung {} wrong {}; add ran {} times on the hosts (calls made, plus the checks)",
        counts.made,
        counts.answered,
        counts.failed(),
        counts.failed,
        counts.hung,
        counts.wrong,
        runs
    );
}

async fn outage(outage: Outage, victim: Victim) {
    let _one = SERIAL.lock().await;
    assert!(Path::new(&repo().join("scripts/broker")).exists());
    for retry in [false, true] {
        let (counts, runs) = node_lost_mid_load(outage, victim, retry).await;
        report(
            &format!("{outage:?} of {victim:?}, retry {retry}"),
            &counts,
            runs,
        );
        assert!(counts.made > 0 && counts.answered > 0, "{counts:?}");
        assert_eq!(counts.hung, 0, "calls hung: {counts:?}");
        assert_eq!(counts.wrong, 0, "wrong answers: {counts:?}");
        if retry {
            assert_eq!(counts.failed(), 0, "failed with retry on: {counts:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_server_survives_its_leader_node_stopping() {
    outage(Outage::StopApp, Victim::Leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_server_survives_its_leader_node_being_killed() {
    outage(Outage::Kill, Victim::Leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_with_retry_survive_their_own_node_being_killed() {
    outage(Outage::Kill, Victim::Callers).await;
}
