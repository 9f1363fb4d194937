//! The `callme` command: serve plugins, call servers, inspect and invoke plugins locally.
//!
//! A thin layer over the `callme` library: it parses arguments, sets up
//! logging, and prints results as JSON (errors as JSON on stderr with a
//! non-zero exit code).

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use callme::protocol::Args;
use callme::{ConnectOptions, Plugin, PluginSettings, Proxy, RemoteError, Runtime, RuntimeConfig};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "callme",
    version,
    about = "RPC over AMQP with sandboxed WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Broker {
    /// Broker URI: amqp://user:pass@host:port/vhost or amqps://...; a
    /// comma-separated list of nodes of a cluster is tried in turn.
    #[arg(
        long,
        env = "CALLME_AMQP_URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// PEM file of the CA(s) that signed the broker's certificate: the only ones trusted (without it, the system's roots).
    #[arg(long, env = "CALLME_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS, EXTERNAL authentication).
    #[arg(long, env = "CALLME_CERT_FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "CALLME_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
}

impl Broker {
    /// One-shot commands fail fast; `serve` rides out broker restarts.
    fn options(&self, recover: bool) -> ConnectOptions {
        ConnectOptions {
            uri: self.amqp_url.clone(),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            auto_recover: recover,
        }
    }
}

#[derive(clap::Args)]
struct CallArgs {
    /// Function name (dotted for interface functions: `stats.mean`).
    func: String,
    /// Positional arguments, each parsed as JSON (`1`, `-1`, `"text"`, `[1,2]`);
    /// a negative number with a signed exponent (`-1e-5`) after `--`.
    #[arg(allow_negative_numbers = true)]
    args: Vec<String>,
    /// Keyword arguments as a JSON object: `--kwargs '{"a": 1, "b": 2}'`.
    #[arg(long)]
    kwargs: Option<String>,
}

impl CallArgs {
    fn parse(&self) -> anyhow::Result<Args> {
        let mut args = Args::default();
        // Read as the server reads them: a key given twice is refused
        // here, not sent to be refused there.
        for (i, a) in self.args.iter().enumerate() {
            let v = callme::protocol::parse_json(a)
                .with_context(|| format!("argument {} is not JSON: {a}", i + 1))?;
            args.args.push(v);
        }
        if let Some(k) = &self.kwargs {
            match callme::protocol::parse_json(k).context("--kwargs is not JSON")? {
                Value::Object(kwargs) => args.kwargs = kwargs,
                _ => anyhow::bail!("--kwargs is not a JSON object"),
            }
        }
        Ok(args)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve every NAME.wasm of a directory as server id NAME, following
    /// changes to the directory.
    Serve {
        #[command(flatten)]
        broker: Broker,
        /// The plugins directory.
        #[arg(long, env = "CALLME_PLUGINS", default_value = "plugins")]
        plugins: PathBuf,
        /// Calls in flight per server id.
        #[arg(long, env = "CALLME_CONCURRENCY", default_value_t = 8)]
        concurrency: usize,
        /// The type of the server queues: `classic`, or `quorum` (replicated
        /// over a RabbitMQ cluster).
        #[arg(long, env = "CALLME_QUEUE_TYPE", value_enum, default_value_t = QueueTypeArg::Classic)]
        queue_type: QueueTypeArg,
        /// Seconds a server queue nobody consumes from lives before the
        /// broker deletes it (0: until deleted).
        #[arg(long, env = "CALLME_QUEUE_EXPIRES", default_value_t = callme::DEFAULT_QUEUE_EXPIRES.as_secs())]
        queue_expires: u64,
        /// Deliveries after which a request is refused rather than run
        /// again. Quorum queues count them; a classic queue tells only
        /// whether a request was delivered before, so there any limit
        /// above 1 never refuses. RabbitMQ 4.x drops a quorum queue's
        /// message after 20 deliveries unless a policy raises that: above
        /// 3, see docs/deploy.md.
        #[arg(long, env = "CALLME_DELIVERY_LIMIT", default_value_t = callme::DEFAULT_DELIVERY_LIMIT, value_parser = clap::value_parser!(u32).range(1..))]
        delivery_limit: u32,
        /// Seconds a reply may wait for the broker's confirm before it
        /// counts as not sent (its request given back once for another
        /// try): a caller's reply queue that stops confirming holds a
        /// call's slot no longer than that.
        #[arg(long, env = "CALLME_REPLY_CONFIRM_LIMIT", default_value_t = callme::DEFAULT_REPLY_CONFIRM_LIMIT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=callme::MAX_REPLY_CONFIRM_LIMIT.as_secs()))]
        reply_confirm_limit: u64,
        /// Server queues are durable now; kept so old command lines run.
        #[arg(long, hide = true)]
        durable: bool,
        /// Server queues are no longer auto-delete (they expire instead);
        /// kept so old command lines run.
        #[arg(long, hide = true)]
        no_auto_delete: bool,
        /// Never pipeline replies by the default exchange: no second
        /// connection to the broker, every reply by its caller's own
        /// exchange (slower under load; see docs/protocol.md).
        #[arg(long, env = "CALLME_NO_PIPELINED_REPLIES", value_parser = clap::builder::BoolishValueParser::new())]
        no_pipelined_replies: bool,
        /// Seconds to finish running calls after SIGTERM or Ctrl-C.
        #[arg(long, env = "CALLME_GRACE", default_value_t = 30)]
        grace: u64,
        /// Compiled-artifact cache directory (the code is kept in its
        /// `wasmtime` subdirectory; refused if another user could write to it).
        #[arg(long, env = "CALLME_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Sandboxes alive at once over every plugin (calls in flight, kept
        /// instances and spares): the cap on the memory plugins can take.
        #[arg(long, env = "CALLME_MAX_INSTANCES", default_value_t = callme::plugin::DEFAULT_MAX_INSTANCES)]
        max_instances: u32,
        /// A file written (with the host's pid) once every plugin already
        /// in the directory is served, and removed when the host stops: a
        /// script can wait for it instead of reading the log. One host a
        /// file: a second one given the same file stops at start (the lock
        /// is `.NAME.lock` beside it).
        #[arg(long, env = "CALLME_READY_FILE")]
        ready_file: Option<PathBuf>,
        /// HOST:PORT to serve Prometheus metrics (`/metrics`), liveness
        /// (`/healthz`) and readiness (`/readyz`) on over HTTP; off unless
        /// given.
        #[arg(long, env = "CALLME_METRICS_ADDR", value_name = "HOST:PORT")]
        metrics_addr: Option<String>,
    },
    /// Call a function of a server and print its JSON result.
    Call {
        #[command(flatten)]
        broker: Broker,
        /// Seconds the command may take, connecting included.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// The server id.
        server: String,
        /// Send the call again if the connection to the broker is lost
        /// before its reply (the function may then run twice).
        #[arg(long)]
        retry: bool,
        /// The largest reply taken, in bytes (a larger one is an
        /// `Internal` error, not parsed).
        #[arg(long, value_name = "BYTES", default_value_t = callme::DEFAULT_MAX_REPLY_BYTES)]
        max_reply_bytes: usize,
        /// The largest request sent, in bytes (a larger one is a
        /// `TooLarge` error, not sent).
        #[arg(long, value_name = "BYTES", default_value_t = callme::DEFAULT_MAX_PROXY_REQUEST_BYTES)]
        max_request_bytes: usize,
        #[command(flatten)]
        call: CallArgs,
    },
    /// Print the functions a server offers, with their WIT signatures.
    Describe {
        #[command(flatten)]
        broker: Broker,
        /// Seconds the command may take, connecting included.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// The server id.
        server: String,
        /// Indent the JSON (the default when stdout is a terminal).
        #[arg(long)]
        pretty: bool,
    },
    /// Print every callable function of a plugin with its WIT signature.
    Inspect {
        /// The component file.
        plugin: PathBuf,
    },
    /// Call a plugin function locally, without a broker, with the settings
    /// of its sidecar (NAME.toml beside it) if it has one.
    Invoke {
        /// The component file.
        plugin: PathBuf,
        #[command(flatten)]
        call: CallArgs,
        /// Fuel for the call.
        #[arg(long)]
        fuel: Option<u64>,
        /// Deadline of the call, in milliseconds.
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Memory cap of the call, in bytes.
        #[arg(long)]
        memory_bytes: Option<usize>,
    },
    /// Write a new plugin project that builds as it stands: a WIT world
    /// with the callme contract, one function, a test and a README.
    New {
        /// The plugin's name, also its server id: lowercase words of
        /// letters and digits joined by `-` (`my-plugin`).
        name: String,
        /// The language of the plugin.
        #[arg(long, value_enum)]
        lang: LanguageArg,
        /// Where to write it (missing or empty); default `./NAME`.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `--lang` of `callme new`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LanguageArg {
    Rust,
    Python,
    #[value(alias = "javascript")]
    Js,
}

impl From<LanguageArg> for callme::scaffold::Language {
    fn from(arg: LanguageArg) -> Self {
        match arg {
            LanguageArg::Rust => callme::scaffold::Language::Rust,
            LanguageArg::Python => callme::scaffold::Language::Python,
            LanguageArg::Js => callme::scaffold::Language::JavaScript,
        }
    }
}

/// `--queue-type` on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum QueueTypeArg {
    Classic,
    Quorum,
}

impl From<QueueTypeArg> for callme::QueueType {
    fn from(arg: QueueTypeArg) -> Self {
        match arg {
            QueueTypeArg::Classic => callme::QueueType::Classic,
            QueueTypeArg::Quorum => callme::QueueType::Quorum,
        }
    }
}

/// Gives every thread spawned without a stack size of its own (lapin's
/// I/O threads, the runtimes' workers) the stack reading any header the
/// broker passes on takes (`callme::MIN_THREAD_STACK`).
#[allow(unsafe_code)]
fn raise_thread_stacks() {
    if let Some(bytes) =
        callme::thread_stack_to_set(std::env::var("RUST_MIN_STACK").ok().as_deref())
    {
        // SAFETY: called first thing in `main`, before any thread is
        // spawned, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var("RUST_MIN_STACK", bytes.to_string()) };
    }
}

/// Lets a write to a pipe whose reader has gone end the process by
/// `SIGPIPE`, as other command-line tools end (`callme describe x | head`),
/// instead of the write failing and `println!` panicking. Rust starts
/// programs with the signal ignored.
#[allow(unsafe_code)]
fn end_on_closed_pipe() {
    // SAFETY: called in `main` before any thread is spawned; setting a
    // signal's disposition to its default touches no memory.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> ExitCode {
    raise_thread_stacks();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Not for `serve`: a log reader that goes away must not stop the host.
    if !matches!(cli.command, Command::Serve { .. }) {
        end_on_closed_pipe();
    }
    // One-shot commands print JSON on stdout and stderr: keep the broker
    // client's own chatter out of it unless RUST_LOG asks for it.
    let default_filter = match cli.command {
        // lapin logs every channel the broker closes as an error: a caller
        // whose reply exchange is gone would put one in the log per call.
        // The link reports what matters about the connection itself.
        // wasmtime-wasi-http warns of every request a plugin hands it that
        // it cannot make a URI of or send (a request with no path, a
        // connection refused), and rustls of a server's alerts: a plugin
        // could write them by the hundred thousand a call, outside its log
        // budget. The plugin gets each as an error; its calls are counted.
        Command::Serve { .. } => "info,lapin=off,wasmtime_wasi_http=error,rustls=error",
        // A one-shot command's outcome, a lost connection included, is the
        // JSON it prints: the link or the proxy saying so too would put a
        // log line in front of the JSON on stderr.
        _ => {
            "warn,callme::link=off,callme::proxy=off,lapin=off,wasmtime_wasi_http=error,rustls=error"
        }
    };
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::{Layer, fmt};
        let log = fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(log_filter(default_filter));
        tracing_subscriber::registry().with(log).init();
    }
    if let Command::Serve { broker, .. } = &cli.command {
        warn_of_a_password_in_argv(broker, &matches);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail_local(&anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    let code = runtime.block_on(run(cli.command));
    // Leave without tearing the runtime down under the broker client's
    // background tasks, which do not expect it.
    runtime.shutdown_background();
    code
}

/// Says so when `serve` was given the broker password on its command
/// line: a host runs for months, and its arguments are there for any
/// local user to read (`ps`, `/proc/PID/cmdline`) all that time, where
/// `CALLME_AMQP_URL` is readable by its own user only.
fn warn_of_a_password_in_argv(broker: &Broker, matches: &clap::ArgMatches) {
    let given = matches
        .subcommand()
        .and_then(|(_, sub)| sub.value_source("amqp_url"));
    let options = broker.options(true);
    if given == Some(clap::parser::ValueSource::CommandLine) && options.has_password() {
        tracing::warn!(target: "callme::server", "the broker password is on the command line, where every local user can read it (ps, /proc/PID/cmdline) while the host runs: give the URL in CALLME_AMQP_URL instead");
    }
}

/// `RUST_LOG`'s filter, or `default` without it, and never the `trace`
/// level of lapin (or its protocol crates), whatever `RUST_LOG` asks (by target or by span): lapin
/// traces every frame it writes with its bytes (the connection's
/// `start-ok` holds the broker password, SASL PLAIN) and every internal
/// command (`update-secret`'s new token among them).
fn log_filter<S>(default: &str) -> impl tracing_subscriber::layer::Filter<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
    let asked = EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let no_lapin_trace = filter_fn(|meta| {
        let amqp = ["lapin", "amq_protocol"];
        !(*meta.level() == tracing::Level::TRACE
            && amqp.iter().any(|t| meta.target().starts_with(t)))
    });
    asked.and(no_lapin_trace)
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve {
            broker,
            plugins,
            concurrency,
            queue_type,
            queue_expires,
            delivery_limit,
            reply_confirm_limit,
            durable,
            no_auto_delete,
            no_pipelined_replies,
            grace,
            cache_dir,
            max_instances,
            ready_file,
            metrics_addr,
        } => {
            if durable || no_auto_delete {
                tracing::warn!(
                    "--durable and --no-auto-delete are no longer needed: server queues are durable and expire after --queue-expires seconds without consumers"
                );
            }
            let mut config = RuntimeConfig {
                max_instances,
                ..RuntimeConfig::default()
            };
            if cache_dir.is_some() {
                config.cache_dir = cache_dir;
            }
            let options = callme::serve::ServeOptions {
                connect: broker.options(true),
                plugins_dir: plugins,
                server: callme::ServerOptions {
                    concurrency,
                    queue_type: queue_type.into(),
                    queue_expires: (queue_expires > 0).then(|| Duration::from_secs(queue_expires)),
                    delivery_limit,
                    pipeline_replies: !no_pipelined_replies,
                    reply_confirm_limit: Duration::from_secs(reply_confirm_limit),
                    ..Default::default()
                },
                runtime: config,
                grace: Duration::from_secs(grace),
            };
            match serve(options, ready_file.as_deref(), metrics_addr.as_deref()).await {
                Ok(()) => ExitCode::SUCCESS,
                // The library's errors keep their type (`Config`,
                // `Connection`, `AccessRefused`, ...).
                Err(e) => match e.downcast_ref::<callme::Error>() {
                    Some(e) => fail_error(e),
                    None => fail_local(&e),
                },
            }
        }
        Command::Call {
            broker,
            timeout,
            server,
            retry,
            max_reply_bytes,
            max_request_bytes,
            call,
        } => {
            let args = match call.parse() {
                Ok(a) => a,
                Err(e) => return fail_local(&e),
            };
            // Retrying needs a connection that comes back by itself.
            let shape = Output {
                pretty: false,
                recover: retry,
            };
            remote(&broker, timeout, shape, |proxy, t| async move {
                proxy.set_max_reply_bytes(max_reply_bytes);
                proxy.set_max_request_bytes(max_request_bytes);
                proxy
                    .use_server(&server)
                    .with_retry(retry)
                    .call_timeout(&call.func, args, t)
                    .await
            })
            .await
        }
        Command::Describe {
            broker,
            timeout,
            server,
            pretty,
        } => {
            let shape = Output {
                pretty: pretty || std::io::stdout().is_terminal(),
                recover: false,
            };
            remote(&broker, timeout, shape, |proxy, t| async move {
                proxy
                    .use_server(&server)
                    .call_timeout(callme::protocol::DESCRIBE, Args::default(), t)
                    .await
            })
            .await
        }
        Command::Inspect { plugin } => match load(&plugin, PluginSettings::default()) {
            Ok(p) => {
                for f in p.functions() {
                    println!("{}: {}", f.name, f.signature);
                }
                if !p.capabilities().is_empty() {
                    println!("capabilities: {}", p.capabilities().join(", "));
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail_plugin(e),
        },
        Command::Invoke {
            plugin,
            call,
            fuel,
            deadline_ms,
            memory_bytes,
        } => {
            let args = match call.parse() {
                Ok(a) => a,
                Err(e) => return fail_local(&e),
            };
            // The sidecar beside the plugin, as `serve` reads it; the
            // flags over it.
            let mut settings = match PluginSettings::beside(&plugin) {
                Ok(s) => s,
                Err(e) => return fail_plugin(e),
            };
            if let Some(f) = fuel {
                settings.limits.fuel = f;
            }
            if let Some(d) = deadline_ms {
                settings.limits.deadline = Duration::from_millis(d);
            }
            if let Some(m) = memory_bytes {
                settings.limits.memory_bytes = m;
            }
            let p = match load(&plugin, settings) {
                Ok(p) => p,
                Err(e) => return fail_plugin(e),
            };
            match p.call(&call.func, &args).await {
                Ok(v) => {
                    println!("{v}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail_plugin(e),
            }
        }
        Command::New { name, lang, dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            match new_plugin(&dir, &name, lang.into()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail_local(&e),
            }
        }
    }
}

/// Writes the project and prints how to build and try it.
fn new_plugin(dir: &Path, name: &str, language: callme::scaffold::Language) -> anyhow::Result<()> {
    callme::scaffold::create(dir, name, language)?;
    println!("created the {language} plugin {name} in {}", dir.display());
    println!("build it (see {}):", dir.join("README.md").display());
    println!("  cd {}", shell_word(dir));
    for command in language.build_commands(name) {
        println!("  {command}");
    }
    println!(
        "  callme invoke {} greet '\"ann\"'",
        shell_word(&language.component_path(name))
    );
    Ok(())
}

/// `path` as one word of a shell command, quoted where it needs to be, so
/// a printed command can be copied as it stands.
fn shell_word(path: &Path) -> String {
    let path = path.to_string_lossy();
    shlex::try_quote(&path).map_or_else(|_| format!("{path:?}"), |quoted| quoted.into_owned())
}

/// Raises the soft limit of open files to the hard one, as servers do:
/// plugins' outbound HTTP connections are bounded by half of it, and a
/// soft limit of 1,024 (a common default) would leave them few.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(target: "callme::server", error = %e, "cannot raise the limit of open files");
        }
    }
}

/// Serves until SIGTERM or Ctrl-C, with `ready_file` present while every
/// plugin of the directory is served, and the metrics endpoint on
/// `metrics_addr` from the start (so health answers while the broker is
/// waited for).
async fn serve(
    options: callme::serve::ServeOptions,
    ready_file: Option<&Path>,
    metrics_addr: Option<&str>,
) -> anyhow::Result<()> {
    raise_open_files_limit();
    // One host a ready file: held until this function returns, and let go
    // by the kernel if the process is killed.
    let _lock = ready_file.map(lock_ready_file).transpose()?;
    // A file left by a host that was killed must not announce this one,
    // even if this one cannot start.
    if let Some(path) = ready_file {
        remove_ready_file(path)?;
    }
    // Bound before connecting: a wrong address fails at once.
    let endpoint = match metrics_addr {
        Some(addr) => Some(
            callme::observe::Endpoint::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on --metrics-addr {addr}"))?,
        ),
        None => None,
    };
    // Runs until the process exits.
    if let Some(endpoint) = endpoint {
        tokio::spawn(endpoint.run());
    }
    // Listened for from the start: plugins served first take calls while
    // the others load, and a stop then is a graceful one too.
    let mut stop = std::pin::pin!(stop_signal().context("cannot listen for SIGTERM and Ctrl-C")?);
    let Some(host) = callme::serve::Host::start_until(options, &mut stop).await? else {
        return Ok(());
    };
    let written = match ready_file {
        Some(path) => write_ready_file(path),
        None => Ok(()),
    };
    let outcome = match written {
        Ok(()) => host.run_until(stop).await.map_err(anyhow::Error::new),
        // Nobody would learn that this host is serving: stop it at once.
        Err(e) => {
            let _ = host.run_until(std::future::ready(())).await;
            Err(e)
        }
    };
    match ready_file {
        Some(path) => outcome.and(remove_own_ready_file(path)),
        None => outcome,
    }
}

/// Takes the lock of the ready file `path`, a file beside it named
/// `.NAME.lock` (left in place: removing it would let two hosts each hold
/// a lock of their own). A second host given the same ready file stops
/// here, before it touches the first one's file.
fn lock_ready_file(path: &Path) -> anyhow::Result<std::fs::File> {
    let name = path
        .file_name()
        .with_context(|| format!("--ready-file {} names no file", path.display()))?;
    let mut lock_name = std::ffi::OsString::from(".");
    lock_name.push(name);
    lock_name.push(".lock");
    let lock = path.with_file_name(lock_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    // Never through a link someone put there, as in a shared directory.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
    let file = options
        .open(&lock)
        .with_context(|| format!("cannot write the ready file's lock {}", lock.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the lock {} of --ready-file {} is held by another process (another callme serve with this ready file?): stop it, or give each host a ready file of its own",
            lock.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", lock.display()))
        }
    }
}

/// Writes the host's pid to `path` in one step: a reader never sees a
/// partial file.
fn write_ready_file(path: &Path) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("--ready-file {} names no file", path.display()))?;
    // A name nobody can guess, made new: never a file (or a link to one)
    // someone put there first, as in a shared directory like /tmp.
    let mut staged = std::ffi::OsString::from(".");
    staged.push(name);
    staged.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let staged = path.with_file_name(staged);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&staged)
        .and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "{}", std::process::id())
        })
        .with_context(|| format!("cannot write {}", staged.display()))?;
    if let Err(e) = std::fs::rename(&staged, path) {
        let _ = std::fs::remove_file(&staged);
        return Err(e).with_context(|| format!("cannot write the ready file {}", path.display()));
    }
    Ok(())
}

/// Removes the ready file if this process wrote it: a host started since,
/// on the same file, has put its own pid there.
fn remove_own_ready_file(path: &Path) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim() == pid => remove_ready_file(path),
        _ => Ok(()),
    }
}

fn remove_ready_file(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("cannot remove the ready file {}", path.display()))
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C received from now on.
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            // A second one ends the process at once, without waiting for
            // the running calls: the broker gives their requests back to
            // the queue, as when a host is killed.
            // Its status is the shell's for a process a signal ended (128
            // and the signal's number), not 1, which says start-up failed.
            tokio::spawn(async move {
                let code = tokio::select! {
                    _ = term.recv() => 128 + 15,
                    _ = interrupt.recv() => 128 + 2,
                };
                tracing::warn!(target: "callme::server", "a second stop signal: exiting now, without finishing running calls (their requests go back to the queue)");
                std::process::exit(code);
            });
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

fn load(path: &Path, settings: PluginSettings) -> Result<Plugin, callme::PluginError> {
    let runtime = Runtime::new()?;
    Plugin::load_file(&runtime, path, settings)
}

/// Connects and runs `f`, all within `timeout` seconds: the time left
/// after connecting is what `f` gets for its call. Prints the result as
/// one line of JSON, or indented when `pretty`.
/// How a remote command connects and prints.
struct Output {
    /// Indent the JSON result.
    pretty: bool,
    /// Reconnect when the connection is lost.
    recover: bool,
}

async fn remote<F, Fut>(broker: &Broker, timeout: f64, output: Output, f: F) -> ExitCode
where
    F: FnOnce(Proxy, Duration) -> Fut,
    Fut: Future<Output = Result<Value, callme::Error>>,
{
    let timeout = match Duration::try_from_secs_f64(timeout) {
        Ok(t) if !t.is_zero() => t,
        _ => {
            return fail_local(&anyhow::anyhow!(
                "--timeout must be a positive number of seconds"
            ));
        }
    };
    let started = tokio::time::Instant::now();
    let Output { pretty, recover } = output;
    let options = broker.options(recover);
    let proxy = match tokio::time::timeout(timeout, Proxy::connect_with(&options, timeout)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return fail_error(&e),
        Err(_) => {
            return fail_error(&callme::Error::ConnectTimeout {
                broker: options.redacted(),
                timeout,
            });
        }
    };
    let left = timeout.saturating_sub(started.elapsed());
    let closing = proxy.clone();
    let outcome = f(proxy, left).await;
    // Closed with the broker's word: cut, it would log each command as a
    // client gone without closing its connection.
    let _ = tokio::time::timeout(Duration::from_secs(2), closing.close()).await;
    match outcome {
        Ok(v) if pretty => {
            println!("{v:#}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        // Report the timeout the user gave, not the part of it left for
        // the call.
        Err(callme::Error::Timeout { server, .. }) => {
            fail_error(&callme::Error::Timeout { server, timeout })
        }
        Err(e) => fail_error(&e),
    }
}

/// Prints a remote-style error as JSON on stderr.
fn fail(e: RemoteError) -> ExitCode {
    eprintln!(
        "{}",
        json!({"type": e.kind, "message": e.message, "data": e.data})
    );
    ExitCode::FAILURE
}

/// Prints a local plugin error as JSON on stderr, with its own type name.
fn fail_plugin(e: callme::PluginError) -> ExitCode {
    let kind = e.type_name();
    let r = RemoteError::from(e);
    eprintln!(
        "{}",
        json!({"type": kind, "message": r.message, "data": r.data})
    );
    ExitCode::FAILURE
}

/// Prints a proxy or server error as JSON on stderr: its type from the
/// library's one vocabulary, its message with every cause.
fn fail_error(e: &callme::Error) -> ExitCode {
    let data = match e {
        callme::Error::Remote(r) => return fail(r.clone()),
        callme::Error::NoSuchServer(s) => json!(s),
        _ => Value::Null,
    };
    eprintln!(
        "{}",
        json!({"type": e.type_name(), "message": e.chain(), "data": data})
    );
    ExitCode::FAILURE
}

fn fail_local(e: &anyhow::Error) -> ExitCode {
    eprintln!(
        "{}",
        json!({"type": "Error", "message": format!("{e:#}"), "data": null})
    );
    ExitCode::FAILURE
}
