//! Support for the integration tests: the broker, built plugins, hosts and proxies.
//!
//! The tests talk to the project's own RabbitMQ node (`scripts/broker`)
//! and call plugins built from `plugins/` by `scripts/build-plugins` in the
//! same run. Each test uses its own server ids, so tests run in parallel
//! without seeing each other's traffic.

pub mod raw_amqp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use callme::protocol::{Args, client_exchange, client_queue, server_exchange};
use callme::{
    ConnectOptions, ErrorKind, NativeFunctions, Plugin, PluginSettings, Proxy, RemoteError,
    Runtime, RuntimeConfig, Server, ServerOptions,
};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// The built plugin `name` (`target/plugins/NAME.wasm`).
pub fn plugin_path(name: &str) -> PathBuf {
    let path = target_dir().join("plugins").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-plugins first (scripts/test does)",
        path.display()
    );
    path
}

/// The bytes of the built plugin `name`.
pub fn plugin_bytes(name: &str) -> Vec<u8> {
    std::fs::read(plugin_path(name)).expect("read plugin")
}

/// The `callme` binary built by `cargo build -p callme`.
pub fn callme_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/integration-HASH -> target/debug/callme
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/PROFILE/deps")
        .join("callme");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p callme` first (scripts/test does)",
        path.display()
    );
    path
}

/// The broker URL the tests use.
pub fn amqp_url() -> String {
    std::env::var("CALLME_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5682/%2f".to_string())
}

/// `HOST:PORT` of the test broker.
pub fn amqp_host_port() -> String {
    let url = amqp_url();
    let rest = url.split_once('@').map_or(url.as_str(), |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Connection options for the test broker as `user`/`password`.
pub fn amqp_url_as(user: &str, password: &str) -> String {
    let url = amqp_url();
    let rest = url
        .split_once('@')
        .map(|(_, r)| r)
        .unwrap_or("127.0.0.1:5682/%2f");
    format!("amqp://{user}:{password}@{rest}")
}

/// A virtual host of its own, `user` allowed everything on it, for a test
/// that changes what every host and proxy of its vhost shares (a user's
/// permissions, the connections of a user): its URL as `user`.
pub fn dedicated_vhost(prefix: &str, user: &str, password: &str) -> String {
    let vhost = unique(prefix);
    broker_ctl(&["add_vhost", &vhost]);
    broker_ctl(&["set_permissions", "-p", &vhost, user, ".*", ".*", ".*"]);
    let url = amqp_url_as(user, password);
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    format!("{base}/{vhost}")
}

/// The TLS port and certificate directory of the test broker.
pub fn tls_dir() -> PathBuf {
    std::env::var_os("CALLME_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("broker").join("tls"))
}

/// The AMQPS port of the test broker.
pub fn amqps_port() -> u16 {
    std::env::var("CALLME_TEST_AMQPS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5681)
}

/// Runs `command` to its end; what it printed on stdout. Panics with
/// what it printed on stderr if it fails.
pub fn run_ok(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `scripts/broker ctl ARGS` (rabbitmqctl against the test node).
pub fn broker_ctl(args: &[&str]) -> String {
    run_ok(
        Command::new(repo().join("scripts/broker"))
            .arg("ctl")
            .args(args),
    )
}

/// Native functions with the seed's `add(a, b)`, which refuses anything
/// but two integers with `InvalidArguments`.
pub fn native_add() -> NativeFunctions {
    let mut f = NativeFunctions::new();
    f.register("add", "func(a: s64, b: s64) -> s64", |args: Args| {
        let sum = match args.args.as_slice() {
            [a, b] => a.as_i64().zip(b.as_i64()).map(|(a, b)| a + b),
            _ => None,
        };
        sum.map(|n| json!(n)).ok_or_else(|| {
            RemoteError::new(
                ErrorKind::InvalidArguments,
                format!("add takes 2 integers, got {}", args.args.len()),
            )
        })
    });
    f
}

/// A fresh unique id with a readable prefix: `calc-1a2b3c4d`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The runtime shared by the tests, with its cache under `target/`.
pub fn runtime() -> Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Runtime::with_config(RuntimeConfig {
            cache_dir: Some(target_dir().join("test-cache")),
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
    .clone()
}

/// A broker user of its own, so the broker's connection and channel
/// counts of that user are this test's alone.
pub fn dedicated_user(prefix: &str) -> (String, String) {
    let user = unique(prefix);
    let password = format!("{user}-pw");
    broker_ctl(&["add_user", &user, &password]);
    broker_ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    (user, password)
}

/// The pid of `user`'s connection named `name` (`callme server`).
pub fn connection_pid(user: &str, name: &str) -> Option<String> {
    let out = broker_ctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "user",
        "pid",
        "client_properties",
    ]);
    out.lines()
        .filter(|l| l.starts_with(&format!("{user}\t")) && l.contains(name))
        .find_map(|l| l.split('\t').nth(1).map(str::to_string))
}

/// Publishes to `exchange` a message lapin cannot read (a `message_id`
/// that is not UTF-8, which RabbitMQ passes on as it got it), whose body
/// is a request to `add`.
pub async fn publish_unreadable_to(exchange: &str) {
    raw_amqp::publish(
        &amqp_host_port(),
        exchange,
        raw_amqp::RawProperties {
            content_type: b"application/json",
            correlation_id: b"poison",
            reply_to: b"nobody",
            message_id: b"\xff\xfe not UTF-8",
            headers: None,
        },
        br#"{"func":"add","args":[1,2]}"#,
    )
    .await;
}

/// Asserts that `add(i, 1)` of `id` answers `i + 1` (a server of
/// [`native_add`] or calc).
pub async fn answers_add(p: &Proxy, id: &str, i: i64) {
    let sum: i64 = p
        .use_server(id)
        .invoke("add", (i, 1))
        .await
        .unwrap_or_else(|e| panic!("{id}, add({i}, 1): {e}"));
    assert_eq!(sum, i + 1);
}

/// Loads a built plugin under `name` with `limits`.
pub fn load(plugin: &str, name: &str, limits: PluginSettings) -> Plugin {
    Plugin::load(&runtime(), name, &plugin_bytes(plugin), limits).expect("plugin loads")
}

/// Connection options for the test broker.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new(amqp_url())
}

/// A server connected to the test broker.
pub async fn server(options: ServerOptions) -> Server {
    Server::connect(&connect_options(), options)
        .await
        .expect("server connects to the test broker (is scripts/broker running?)")
}

/// A proxy connected to the test broker with a default timeout.
pub async fn proxy(timeout: Duration) -> Proxy {
    Proxy::connect_with(&connect_options(), timeout)
        .await
        .expect("proxy connects to the test broker")
}

/// Positional arguments from a JSON array: `pos(json!([1, "two"]))`.
pub fn pos(args: Value) -> Args {
    match args {
        Value::Array(args) => Args::positional(args),
        other => panic!("positional arguments are a JSON array, not {other}"),
    }
}

/// Keyword arguments from a JSON object: `kw(json!({"a": 1}))`.
pub fn kw(args: Value) -> Args {
    match args {
        Value::Object(args) => Args::keywords(args),
        other => panic!("keyword arguments are a JSON object, not {other}"),
    }
}

/// Serves the calc plugin on `server` under a fresh id (`PREFIX-…`) and
/// checks through `proxy` that it answers `add`; the id.
pub async fn serve_calc(server: &Server, proxy: &Proxy, prefix: &str) -> String {
    let id = unique(prefix);
    server
        .serve_plugin(load("calc", &id, PluginSettings::default()))
        .await
        .expect("calc is served");
    let sum: i64 = proxy
        .use_server(&id)
        .invoke("add", (20, 22))
        .await
        .expect("calc answers add");
    assert_eq!(sum, 42);
    id
}

/// A `callme` child process, killed when dropped.
pub struct Host {
    /// The process.
    pub child: Child,
    /// Where its log goes.
    pub log: PathBuf,
    /// Its `--ready-file`.
    pub ready_file: PathBuf,
    /// The port of its metrics endpoint, when given `--metrics-addr`.
    pub metrics: Option<u16>,
}

impl Host {
    /// Starts `callme serve --plugins DIR` with extra arguments; its log
    /// goes to `DIR.log`, its ready file is `DIR.ready`.
    pub fn serve(dir: &Path, extra: &[&str]) -> Host {
        Host::serve_with_cache(dir, extra, &target_dir().join("test-cache"))
    }

    /// As [`Host::serve`], with its own compilation cache directory.
    pub fn serve_with_cache(dir: &Path, extra: &[&str], cache: &Path) -> Host {
        let mut command = Command::new(callme_bin());
        command.env("CALLME_CACHE_DIR", cache);
        Host::start(command, dir, extra, "callme=info")
    }

    /// `callme serve` of a directory of its own, with `plugin` (built
    /// in `plugins/`) under each of `ids`, `extra` arguments and
    /// `RUST_LOG=log_level`; returned ready.
    pub fn serving(plugin: &str, ids: &[&str], extra: &[&str], log_level: &str) -> Host {
        let dir = tempdir();
        for id in ids {
            deploy(&plugin_path(plugin), &dir, &format!("{id}.wasm"));
        }
        let mut host = Host::start(Command::new(callme_bin()), &dir, extra, log_level);
        host.wait_ready(Duration::from_secs(60));
        host
    }

    /// Runs `command` (the `callme` binary, or a program that runs it with
    /// the arguments that follow) with `serve --plugins DIR`, a ready
    /// file, `extra` arguments and `RUST_LOG=log_level` (no `RUST_LOG` if
    /// it is empty: the host's default filter), against the test broker,
    /// as [`Host::serve`] does.
    pub fn start(mut command: Command, dir: &Path, extra: &[&str], log_level: &str) -> Host {
        let log = dir.with_extension("log");
        let ready_file = dir.with_extension("ready");
        let log_file = std::fs::File::create(&log).expect("create host log");
        if command.get_envs().all(|(k, _)| k != "CALLME_CACHE_DIR") {
            command.env("CALLME_CACHE_DIR", target_dir().join("test-cache"));
        }
        if log_level.is_empty() {
            command.env_remove("RUST_LOG");
        } else {
            command.env("RUST_LOG", log_level);
        }
        let child = command
            .arg("serve")
            .arg("--plugins")
            .arg(dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(extra)
            .env("CALLME_AMQP_URL", amqp_url())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start callme serve");
        let metrics = extra
            .iter()
            .skip_while(|arg| **arg != "--metrics-addr")
            .nth(1)
            .and_then(|addr| addr.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok());
        Host {
            child,
            log,
            ready_file,
            metrics,
        }
    }

    /// The host's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether its ready file says it is ready: there, and naming this
    /// process (not one that ran before it).
    pub fn is_ready(&self) -> bool {
        std::fs::read_to_string(&self.ready_file)
            .is_ok_and(|pid| pid.trim() == self.child.id().to_string())
    }

    /// Waits until the host is ready (every plugin already in the
    /// directory served), as its ready file says; panics with the log if
    /// it exits or takes longer than `limit`.
    pub fn wait_ready(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.is_ready() {
                return start.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("callme serve exited with {status}: {}", self.log_text());
            }
            assert!(
                start.elapsed() < limit,
                "host not ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends it `signal` (a name: `INT`, `TERM`, ...).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory under the target dir.
pub fn tempdir() -> PathBuf {
    let dir = target_dir().join("test-dirs").join(unique("d"));
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Copies `from` into `dir/name` the safe way: a dotfile, then a rename.
pub fn deploy(from: &Path, dir: &Path, name: &str) {
    let tmp = dir.join(format!(".{name}.incoming"));
    std::fs::copy(from, &tmp).expect("copy plugin");
    std::fs::rename(&tmp, dir.join(name)).expect("rename plugin into place");
}

/// Polls `f` every 50 ms until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sets up logging for a test binary once (`RUST_LOG` applies).
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Starts `n` calls of the calc plugin's `slow-version(ms)` at once.
pub fn slow_calls(
    p: &Proxy,
    id: &str,
    n: usize,
    ms: u64,
) -> Vec<tokio::task::JoinHandle<Result<serde_json::Value, callme::Error>>> {
    (0..n)
        .map(|_| {
            let sp = p.use_server(id);
            tokio::spawn(async move { sp.call("slow-version", pos(json!([ms]))).await })
        })
        .collect()
}

/// The broker's `host:port`, from the test URL.
fn broker_authority() -> String {
    let url = amqp_url();
    url.split_once('@')
        .map_or("127.0.0.1:5682", |(_, rest)| {
            rest.split('/').next().unwrap_or(rest)
        })
        .to_string()
}

/// Waits up to `limit` (the broker's counts lag a moment behind the calls
/// just answered) for `queue` to hold nothing, neither ready nor
/// unacknowledged.
pub async fn wait_queue_settled(queue: &str, limit: Duration) {
    let line = || {
        let listed = broker_ctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        listed
            .lines()
            .find(|l| l.split('\t').next() == Some(queue))
            .unwrap_or_else(|| panic!("no queue {queue}:\n{listed}"))
            .to_string()
    };
    let settled = eventually(limit, || async {
        (line() == format!("{queue}\t0\t0")).then_some(())
    })
    .await;
    assert!(settled.is_some(), "requests left: {}", line());
}

/// A TCP forwarder to the test broker on a local port: a broker node of
/// the test's own. Cutting it closes every connection it carries, as a
/// node going away would.
pub struct Forwarder {
    port: u16,
    task: tokio::task::JoinHandle<()>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stalled: tokio::sync::watch::Sender<bool>,
    lifetime: tokio::sync::watch::Sender<Option<std::time::Duration>>,
}

impl Forwarder {
    /// A forwarder on a free port.
    pub async fn start() -> Forwarder {
        Forwarder::on(0).await
    }

    /// A forwarder on `port` (0: a free one).
    pub async fn on(port: u16) -> Forwarder {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the forwarder");
        let port = listener.local_addr().expect("its address").port();
        let broker = broker_authority();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        let (stalled, stall) = tokio::sync::watch::channel(false);
        let (lifetime, lifetimes) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            // Dropped with the task: every connection ends with it.
            let mut carried = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let broker = broker.clone();
                let mut stall = stall.clone();
                let mut lifetime = lifetimes.clone();
                carried.spawn(async move {
                    // Accepted while connections are cut short, it lives
                    // that long; accepted before, it ends as they begin to be.
                    let short = *lifetime.borrow_and_update();
                    let ends = async move {
                        match short {
                            Some(lives) => tokio::time::sleep(lives).await,
                            None => {
                                if lifetime.wait_for(Option::is_some).await.is_err() {
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    };
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&broker).await {
                        let stalled = tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                            r = stall.wait_for(|s| *s) => r.is_ok(),
                            () = ends => false,
                        };
                        if stalled {
                            // Both ends stay open, carrying nothing.
                            std::future::pending::<()>().await;
                        }
                    }
                });
                while carried.try_join_next().is_some() {}
            }
        });
        Forwarder {
            port,
            task,
            accepted,
            stalled,
            lifetime,
        }
    }

    /// Ends every connection it carries, and each one it takes from now
    /// on `lives` after it is taken: a node (or a balancer in front of
    /// it) that closes connections as soon as they are open.
    pub fn cut_short(&self, lives: std::time::Duration) {
        let _ = self.lifetime.send(Some(lives));
    }

    /// Carries the connections it takes from now on for as long as they
    /// last, again.
    pub fn carry_on(&self) {
        let _ = self.lifetime.send(None);
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections it has taken.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The test broker's URL through this forwarder.
    pub fn url(&self) -> String {
        url_via(self.port)
    }

    /// Stops carrying bytes either way, with every connection left open:
    /// a node that hangs (cut off from its cluster's majority, say)
    /// rather than going away.
    pub fn stall(&self) {
        let _ = self.stalled.send(true);
    }

    /// Closes the listener and every connection it carries.
    pub fn cut(&self) {
        self.task.abort();
    }

    /// The test broker's URLs through `nodes`, as a list to connect with.
    pub fn list(nodes: &[Forwarder]) -> String {
        nodes
            .iter()
            .map(Forwarder::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The test broker's URL with its port replaced by `port`.
pub fn url_via(port: u16) -> String {
    let url = amqp_url();
    let (head, rest) = url.split_once('@').unwrap_or(("amqp://guest:guest", &url));
    let vhost = rest.split_once('/').map_or("%2f", |(_, v)| v);
    format!("{head}@127.0.0.1:{port}/{vhost}")
}

/// A client on a raw AMQP connection, as another language's would be:
/// sends arbitrary requests (bytes, properties, headers of its choosing)
/// and sees the replies whole.
pub struct RawClient {
    _conn: Connection,
    channel: lapin::Channel,
    /// The exchange its queue is bound to, where replies come.
    exchange: String,
    queue: String,
    replies: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
}

impl RawClient {
    /// A client with a reply exchange of its own, named as a proxy's.
    pub async fn connect() -> RawClient {
        let uid = uuid::Uuid::new_v4().simple().to_string();
        let exchange = client_exchange("guest", &uid);
        let (conn, channel) = raw_channel().await;
        declare_reply_exchange(&channel, &exchange).await.unwrap();
        RawClient::listen(conn, channel, exchange, &uid).await
    }

    /// A client that sees every reply sent to `exchange` (a proxy's).
    pub async fn overhear(exchange: &str) -> RawClient {
        let uid = uuid::Uuid::new_v4().simple().to_string();
        let (conn, channel) = raw_channel().await;
        RawClient::listen(conn, channel, exchange.to_string(), &uid).await
    }

    async fn listen(
        conn: Connection,
        channel: lapin::Channel,
        exchange: String,
        uid: &str,
    ) -> RawClient {
        let queue = client_queue("guest", uid);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        bind_queue(&channel, &queue, &exchange).await;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "raw".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (tx, replies) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let _ = tx.send(d);
            }
        });
        RawClient {
            _conn: conn,
            channel,
            exchange,
            queue,
            replies,
        }
    }

    /// Its reply queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Sends `body` to `server`: with `content_type` when given, this
    /// client's exchange as `reply_to` when `reply`, `corr` as the
    /// correlation id when given, and `headers`.
    pub async fn send_with(
        &self,
        server: &str,
        body: &[u8],
        content_type: Option<&str>,
        reply: bool,
        corr: Option<&str>,
        headers: FieldTable,
    ) {
        let mut props = BasicProperties::default().with_headers(headers);
        if let Some(ct) = content_type {
            props = props.with_content_type(ct.into());
        }
        if reply {
            props = props.with_reply_to(self.exchange.as_str().into());
        }
        if let Some(c) = corr {
            props = props.with_correlation_id(c.into());
        }
        self.channel
            .basic_publish(
                server_exchange(server).as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Sends `body` to `server` as a proxy does, with `headers`, this
    /// client's exchange as `reply_to`, `corr` as the correlation id and
    /// an `expiration` of `expiration_ms`.
    pub async fn send_expiring(
        &self,
        server: &str,
        body: &[u8],
        corr: &str,
        headers: FieldTable,
        expiration_ms: u64,
    ) {
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_content_type(callme::protocol::CONTENT_TYPE.into())
            .with_reply_to(self.exchange.as_str().into())
            .with_correlation_id(corr.into())
            .with_expiration(expiration_ms.to_string().into());
        self.channel
            .basic_publish(
                server_exchange(server).as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// As [`RawClient::send_with`], without headers.
    pub async fn send(
        &self,
        server: &str,
        body: &[u8],
        content_type: Option<&str>,
        reply: bool,
        corr: Option<&str>,
    ) {
        self.send_with(
            server,
            body,
            content_type,
            reply,
            corr,
            FieldTable::default(),
        )
        .await;
    }

    /// The JSON body of the reply to `corr`.
    pub async fn reply_body(&mut self, corr: &str) -> Value {
        let reply = self.next_reply(Some(corr)).await;
        serde_json::from_slice(&reply.data).unwrap_or(Value::Null)
    }

    /// A reply already received, if there is one.
    pub fn try_reply(&mut self) -> Option<Delivery> {
        self.replies.try_recv().ok()
    }

    /// The next reply (to `corr`, when given).
    pub async fn next_reply(&mut self, corr: Option<&str>) -> Delivery {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.replies.recv()).await {
                Ok(Some(d)) => {
                    let theirs = d.properties.correlation_id().as_ref().map(|c| c.as_str());
                    if corr.is_none() || theirs == corr {
                        return d;
                    }
                }
                _ => panic!("no reply for {corr:?}"),
            }
        }
    }
}

/// Declares `name` on `channel` as a proxy declares its reply exchange:
/// direct, auto-delete.
pub async fn declare_reply_exchange(channel: &lapin::Channel, name: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Binds `queue` to `exchange` with the routing key `""`, as a server's
/// queue and a proxy's reply queue are bound.
pub async fn bind_queue(channel: &lapin::Channel, queue: &str, exchange: &str) {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Queue arguments for a queue that holds `n` messages and refuses more:
/// with `x-overflow` `reject-publish`, RabbitMQ nacks a confirmed publish
/// to a full queue (its "Queue Length Limit" guide, 3.7 and later).
pub fn reject_publish_over(n: i32) -> FieldTable {
    let mut limit = FieldTable::default();
    limit.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(n));
    limit.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    limit
}

/// Answers `request` as a server would: `value` as its result, to its
/// `reply_to` with its correlation id, confirmed.
pub async fn answer(channel: &lapin::Channel, request: &Delivery, value: Value) {
    let properties = &request.properties;
    let reply_to = properties.reply_to().as_ref().expect("a reply address");
    let corr = properties
        .correlation_id()
        .clone()
        .expect("a correlation id");
    channel
        .basic_publish(
            reply_to.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &callme::protocol::Response::Result(value).encode(),
            BasicProperties::default().with_correlation_id(corr),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The test playing the server `id`: its exchange, declared, and every
/// request sent to it, seen (a queue of the test's bound to it). Answer
/// them with [`answer`] on `channel`.
pub struct PlayedServer {
    /// The connection `channel` is on.
    pub conn: Connection,
    /// A channel to answer on.
    pub channel: lapin::Channel,
    /// The requests sent to the server.
    pub requests: RawClient,
}

impl PlayedServer {
    /// Plays the server `id`.
    pub async fn start(id: &str) -> PlayedServer {
        let (conn, channel) = raw_channel().await;
        let exchange = server_exchange(id);
        declare_reply_exchange(&channel, &exchange).await.unwrap();
        let requests = RawClient::overhear(&exchange).await;
        PlayedServer {
            conn,
            channel,
            requests,
        }
    }
}

/// A plain AMQP connection to the test broker, and a channel on it.
pub async fn raw_channel() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// A local port free now: for a host to listen on, or to find nobody at.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `127.0.0.1:port` (a host's metrics endpoint): the status
/// and the body.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot reach 127.0.0.1:{port}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (status, body.to_string())
}

/// Serves this process's metrics on a free local port, as a host's
/// `--metrics-addr` does: the port, for [`scrape`].
pub async fn metrics_endpoint() -> u16 {
    let endpoint = callme::observe::Endpoint::bind("127.0.0.1:0")
        .await
        .expect("bind a local port");
    let port = endpoint.local_addr().expect("its address").port();
    tokio::spawn(endpoint.run());
    port
}

/// Scrapes `/metrics`.
pub async fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Every sample of a scrape: name, labels, value.
pub fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label=value");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().expect("a number"))
        })
        .collect()
}

/// The sum of the samples of `name` having `labels` (0 when there are none).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value_of(text, name, labels).unwrap_or(0.0)
}

/// The sum of the samples of `name` having `labels`, or `None` when there
/// are none: for a series that must be there (a gauge read as 0 when it is
/// missing would pass for one that is 0).
pub fn value_of(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}

/// A component whose module's start function blocks in a WASI call (a
/// 60 s sleep on a pollable), where no fuel or epoch can stop it.
pub const BLOCKED_AT_START: &str = r#"
(component
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow 0))))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:clocks/monotonic-clock@0.2.0" (instance $clock
    (alias outer 1 $pollable (type))
    (export "pollable" (type (eq 0)))
    (export "subscribe-duration" (func (param "when" u64) (result (own 1))))))
  (core func $sub (canon lower (func $clock "subscribe-duration")))
  (core func $block (canon lower (func $poll "[method]pollable.block")))
  (core module $m
    (import "c" "sub" (func $sub (param i64) (result i32)))
    (import "c" "block" (func $block (param i32)))
    (func $sleep (call $block (call $sub (i64.const 60000000000))))
    (func (export "noop"))
    (start $sleep))
  (core instance $i (instantiate $m
    (with "c" (instance (export "sub" (func $sub)) (export "block" (func $block))))))
  (func (export "noop") (canon lift (core func $i "noop"))))
"#;
