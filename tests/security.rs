//! TLS, mutual TLS with EXTERNAL auth, the seed's permission recipes with real broker users, and callers flooding the host's log.

use std::time::{Duration, Instant};

use callme::protocol::{Args, server_exchange, server_queue};
use callme::{ConnectOptions, Error, Proxy, Server, ServerOptions};
use callme_tests::{
    Host, amqp_url_as, amqps_port, broker_ctl, callme_bin, dedicated_vhost, deploy, native_add,
    plugin_path, pos, proxy, serve_calc, server, tempdir, tls_dir, unique,
};
use serde_json::json;

fn tls(uri: String, client_cert: bool) -> ConnectOptions {
    let dir = tls_dir();
    ConnectOptions {
        uri,
        ca_file: Some(dir.join("ca.pem")),
        cert_file: client_cert.then(|| dir.join("client.pem")),
        key_file: client_cert.then(|| dir.join("client.key")),
        auto_recover: true,
    }
}

async fn round_trip(server_opts: &ConnectOptions, proxy_opts: &ConnectOptions) {
    let s = Server::connect(server_opts, ServerOptions::default())
        .await
        .expect("server over TLS");
    let p = Proxy::connect_with(proxy_opts, Duration::from_secs(10))
        .await
        .expect("proxy over TLS");
    serve_calc(&s, &p, "tls").await;
}

#[tokio::test]
async fn tls_with_custom_ca() {
    let opts = tls(
        format!("amqps://guest:guest@localhost:{}/%2f", amqps_port()),
        false,
    );
    round_trip(&opts, &opts).await;
}

#[tokio::test]
async fn mutual_tls_with_external_auth() {
    // No user or password in the URI: the broker takes the user from the
    // client certificate's common name.
    let opts = tls(format!("amqps://localhost:{}/%2f", amqps_port()), true);
    round_trip(&opts, &opts).await;
}

/// A proxy logging in with its certificate names its reply exchange and
/// queue after the user its URI names (the user the broker maps the
/// certificate to), so the anchored recipe of docs/protocol.md can keep
/// certificate users to their own names; with none in the URI, after
/// `external`. Both were named `guest` (the URI parser's default), so a
/// certificate user had to be allowed the names of `guest` and of every
/// other certificate user.
#[tokio::test]
async fn a_certificate_login_is_named_by_its_uri_under_the_anchored_recipe() {
    let tls_user = "callme-tls";
    let guest = dedicated_vhost("tls-names", "guest", "guest");
    let vhost = guest.rsplit_once('/').unwrap().1.to_string();
    let s = Server::connect(&ConnectOptions::new(guest), ServerOptions::default())
        .await
        .unwrap();
    let id = unique("tls-named");
    s.serve_native(&id, native_add()).await.unwrap();
    let own = format!("client_{tls_user}_(ex|queue)_[0-9a-f-]+");
    broker_ctl(&[
        "set_permissions",
        "-p",
        &vhost,
        tls_user,
        &format!("^{own}$"),
        &format!("^({own}|server_{id}_ex)$"),
        &format!("^{own}$"),
    ]);

    let named = tls(
        format!("amqps://{tls_user}@localhost:{}/{vhost}", amqps_port()),
        true,
    );
    let p = Proxy::connect_with(&named, Duration::from_secs(10))
        .await
        .expect("a proxy named after its certificate's user");
    assert!(
        p.reply_exchange().starts_with("client_callme-tls_ex_"),
        "{}",
        p.reply_exchange()
    );
    let sum = p.use_server(&id).call("add", pos(json!([1, 2]))).await;
    assert_eq!(sum.unwrap(), json!(3));

    let unnamed = tls(format!("amqps://localhost:{}/{vhost}", amqps_port()), true);
    let opts = ConnectOptions {
        auto_recover: false,
        ..unnamed
    };
    let refused = Proxy::connect_with(&opts, Duration::from_secs(10)).await;
    let e = refused.err().expect("the recipe allows only its own names");
    assert!(e.to_string().contains("client_external_ex_"), "{e}");
    s.shutdown(Duration::from_secs(5)).await;
}

/// `--ca-file` names the CAs trusted, as `curl --cacert` and Python's
/// `cafile` do: a broker the system's roots would trust but the CA file
/// does not is refused. The file used to be trusted besides the system's
/// roots. Here the system's roots are the broker's CA (`SSL_CERT_FILE`)
/// and the CA file something that issued nothing.
#[test]
fn a_ca_file_is_the_only_ca_trusted() {
    let url = format!("amqps://guest:guest@localhost:{}/%2f", amqps_port());
    let describe = |ca_file: Option<&str>| {
        let mut command = std::process::Command::new(callme_bin());
        command
            .args(["describe", "nosuch", "--timeout", "10", "--amqp-url", &url])
            .env("SSL_CERT_FILE", tls_dir().join("ca.pem"))
            .env_remove("CALLME_AMQP_URL");
        if let Some(ca) = ca_file {
            command.args(["--ca-file", ca]);
        }
        let out = command.output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The system's roots alone: the broker is trusted (and the server is
    // looked for).
    let said = describe(None);
    assert!(said.contains("NoSuchServer"), "{said}");
    let not_the_ca = tls_dir().join("server.pem");
    let said = describe(Some(not_the_ca.to_str().unwrap()));
    assert!(
        said.contains("\"Connection\"") && said.contains("UnknownIssuer"),
        "a CA file that did not issue the broker's certificate: {said}"
    );
}

/// A client certificate given with a key that is not its own is refused
/// before anything is sent, naming both files.
#[tokio::test]
async fn a_client_certificate_with_a_key_not_its_own_is_refused_naming_both() {
    let opts = ConnectOptions {
        ca_file: Some(tls_dir().join("ca.pem")),
        cert_file: Some(tls_dir().join("client.pem")),
        key_file: Some(tls_dir().join("server.key")),
        ..ConnectOptions::new(format!(
            "amqps://localhost:{}/%2f?auth_mechanism=external",
            amqps_port()
        ))
    };
    let e = Proxy::connect_with(&opts, Duration::from_secs(5))
        .await
        .err()
        .expect("a key that is not the certificate's");
    let Error::Config(message) = &e else {
        panic!("expected a Config error, got {e:?}");
    };
    assert!(
        message.contains("client.pem")
            && message.contains("server.key")
            && message.contains("cannot be used together"),
        "{message}"
    );
}

#[tokio::test]
async fn tls_without_the_ca_is_refused() {
    let opts = ConnectOptions::new(format!(
        "amqps://guest:guest@localhost:{}/%2f",
        amqps_port()
    ));
    let e = Proxy::connect_with(&opts, Duration::from_secs(5))
        .await
        .err()
        .expect("untrusted certificate");
    assert!(
        matches!(e, Error::Connection(_) | Error::Config(_)),
        "{e:?}"
    );
}

#[tokio::test]
async fn wrong_password_is_refused_without_showing_it() {
    let e = Proxy::connect(&amqp_url_as("guest", "not-the-password-xyzzy"))
        .await
        .err()
        .expect("bad password");
    assert!(matches!(e, Error::AccessRefused(_)), "{e:?}");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("xyzzy"), "{text}");
}

fn add_user(user: &str, password: &str) {
    broker_ctl(&["add_user", user, password]);
}

/// Users and a server id of the permission recipes, unique per run.
struct Recipe {
    tag: String,
    /// The server id carl may serve (`fooserver` in the seed).
    server: String,
    carl: String,
    olivia: String,
}

/// The permission recipes of docs/protocol.md.
#[derive(Clone, Copy, PartialEq)]
enum Patterns {
    /// The seed's, verbatim: unanchored, so `client_olivia_.*` also
    /// matches names of a user `olivia_x`.
    Seed,
    /// The anchored ones, with write on the default exchange for carl so
    /// that his host pipelines its replies.
    Anchored,
}

/// Adds carl (password `carl-pw`), who may serve only a new server id and
/// reply to any client, and olivia (`olivia-pw`), who may call only that
/// id, with the recipe `patterns`.
fn recipe_users(prefix: &str, patterns: Patterns) -> Recipe {
    let tag = unique(prefix).replace('-', "");
    let server = format!("foo{tag}");
    let (carl, olivia) = (format!("carl{tag}"), format!("olivia{tag}"));
    add_user(&carl, "carl-pw");
    add_user(&olivia, "olivia-pw");
    let (carl_may, olivia_may) = match patterns {
        Patterns::Seed => (
            [
                format!("server_{server}_.*"),
                format!("server_{server}_.*|client_.*_ex_.*"),
                format!("server_{server}_.*"),
            ],
            [
                format!("client_{olivia}_.*"),
                format!("client_{olivia}_.*|server_{server}_ex"),
                format!("client_{olivia}_.*"),
            ],
        ),
        Patterns::Anchored => (
            [
                format!("^server_{server}_(ex|queue)$"),
                format!("^(server_{server}_(ex|queue)|client_.+_ex_[0-9a-f-]+|amq\\.default)$"),
                format!("^server_{server}_(ex|queue)$"),
            ],
            [
                format!("^client_{olivia}_(ex|queue)_[0-9a-f-]+$"),
                format!("^(client_{olivia}_(ex|queue)_[0-9a-f-]+|server_{server}_ex)$"),
                format!("^client_{olivia}_(ex|queue)_[0-9a-f-]+$"),
            ],
        ),
    };
    for (user, [configure, write, read]) in [(&carl, carl_may), (&olivia, olivia_may)] {
        broker_ctl(&["set_permissions", user, &configure, &write, &read]);
    }
    Recipe {
        tag,
        server,
        carl,
        olivia,
    }
}

/// The seed's recipes: carl may serve only fooserver; olivia may call only
/// fooserver. Server ids and users are made unique per run.
#[tokio::test]
async fn permission_recipes_decide_who_calls_and_serves_what() {
    recipes_decide_who_calls_and_serves_what(Patterns::Seed).await;
}

/// The same with the anchored recipes.
#[tokio::test]
async fn anchored_recipes_decide_who_calls_and_serves_what() {
    recipes_decide_who_calls_and_serves_what(Patterns::Anchored).await;
}

async fn recipes_decide_who_calls_and_serves_what(patterns: Patterns) {
    let Recipe {
        tag,
        server: foo_id,
        carl,
        olivia,
    } = recipe_users("p", patterns);
    let bar = format!("bar{tag}");

    // carl serves fooserver.
    let carl_host = Server::connect(
        &ConnectOptions::new(amqp_url_as(&carl, "carl-pw")),
        ServerOptions::default(),
    )
    .await
    .expect("carl connects");
    carl_host
        .serve_native(&foo_id, native_add())
        .await
        .expect("carl may serve fooserver");
    // carl may not serve barserver, and is told so.
    let e = carl_host
        .serve_native(&bar, native_add())
        .await
        .unwrap_err();
    match &e {
        Error::AccessRefused(msg) => assert!(msg.contains(&bar), "{msg}"),
        other => panic!("expected AccessRefused, got {other:?}"),
    }
    // Someone allowed to serves barserver.
    let guest_host = server(ServerOptions::default()).await;
    guest_host.serve_native(&bar, native_add()).await.unwrap();

    // olivia calls fooserver (answered by carl's host).
    let olivia_proxy = Proxy::connect_with(
        &ConnectOptions::new(amqp_url_as(&olivia, "olivia-pw")),
        Duration::from_secs(10),
    )
    .await
    .expect("olivia connects");
    let olivia_adds = |a: i64, b: i64| {
        let fooserver = olivia_proxy.use_server(&foo_id);
        async move { fooserver.invoke::<_, i64>("add", (a, b)).await.unwrap() }
    };
    assert_eq!(olivia_adds(1, 1).await, 2);
    // olivia may not call barserver: refused at once, not a timeout.
    let started = Instant::now();
    let e = olivia_proxy
        .use_server(&bar)
        .call("add", Args::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AccessRefused(_)), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // And the refusal does not break her proxy.
    assert_eq!(olivia_adds(2, 2).await, 4);

    broker_ctl(&["delete_user", &carl]);
    broker_ctl(&["delete_user", &olivia]);
}

/// The recipe for pipelined replies: carl may also write to the default
/// exchange, and his host pipelines olivia's replies to her reply queue;
/// olivia needs nothing more.
#[tokio::test]
async fn the_recipe_for_pipelined_replies() {
    let Recipe {
        server: foo,
        carl,
        olivia,
        ..
    } = recipe_users("t", Patterns::Anchored);

    let carl_host = Server::connect(
        &ConnectOptions::new(amqp_url_as(&carl, "carl-pw")),
        ServerOptions::default(),
    )
    .await
    .expect("carl connects");
    let slow_add = {
        let mut f = callme::NativeFunctions::new();
        f.register("add", "func(a: s64, b: s64) -> s64", |args: Args| {
            std::thread::sleep(Duration::from_millis(20));
            let n = |i: usize| args.args.get(i).and_then(|v| v.as_i64()).unwrap_or(0);
            Ok(json!(n(0) + n(1)))
        });
        f
    };
    carl_host.serve_native(&foo, slow_add).await.unwrap();
    let up = callme_tests::eventually(Duration::from_secs(20), || {
        let up = carl_host.replies_pipelined();
        async move { up.then_some(()) }
    })
    .await;
    assert!(up.is_some(), "carl's host does not pipeline its replies");

    let port = callme_tests::metrics_endpoint().await;
    let olivia_proxy = Proxy::connect_with(
        &ConnectOptions::new(amqp_url_as(&olivia, "olivia-pw")),
        Duration::from_secs(10),
    )
    .await
    .expect("olivia connects");
    let sums = futures_util::future::join_all((0..32i64).map(|i| {
        let fooserver = olivia_proxy.use_server(&foo);
        async move { fooserver.invoke::<_, i64>("add", (i, 1)).await.unwrap() }
    }))
    .await;
    assert_eq!(sums, (1..=32).collect::<Vec<i64>>());
    let text = callme_tests::scrape(port).await;
    let piped = callme_tests::value(
        &text,
        "callme_replies_pipelined_total",
        &[("server_id", &foo)],
    );
    assert!(piped >= 16.0, "{piped} of 32 replies pipelined");

    broker_ctl(&["delete_user", &carl]);
    broker_ctl(&["delete_user", &olivia]);
}

/// Each call may put a few KiB in the host's log, however much its guest
/// prints and logs; what was dropped is counted.
#[tokio::test]
async fn guest_output_cannot_flood_the_host_log() {
    const CALLS: usize = 20;
    const PER_CALL: usize = 16 << 10;
    let dir = tempdir();
    let (noisy, calm) = (unique("noisy"), unique("calm"));
    deploy(&plugin_path("hostile"), &dir, &format!("{noisy}.wasm"));
    deploy(&plugin_path("calc"), &dir, &format!("{calm}.wasm"));
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(30));
    let p = proxy(Duration::from_secs(30)).await;
    let before = host.log_text().len();

    // 3300 lines of 20 bytes: 64 KiB on stdout and on stderr, and 3300
    // `host.log` records, in each call.
    let spam: Vec<_> = (0..CALLS)
        .map(|_| {
            let sp = p.use_server(&noisy);
            tokio::spawn(async move { sp.call("spam", pos(json!([3300]))).await })
        })
        .collect();
    for i in 0..20 {
        let sum: i64 = p.use_server(&calm).invoke("add", (i, 1)).await.unwrap();
        assert_eq!(sum, i + 1);
    }
    for call in spam {
        call.await.unwrap().unwrap();
    }

    let log = host.log_text();
    let grown = log.len() - before;
    assert!(
        grown < CALLS * PER_CALL,
        "{CALLS} calls wrote {grown} bytes of log; the start of it: {}",
        log[before..].chars().take(2000).collect::<String>()
    );
    assert!(log.contains("spam line 00000000"), "no output kept: {log}");
    assert!(log.contains("dropped_bytes="), "drops not noted: {log}");
    assert!(
        log.contains("more guest log records dropped"),
        "drops not noted: {log}"
    );
}

/// However many calls a caller makes a plugin print on, its output takes
/// at most 64 KiB of the host's log a second (256 KiB at once): the log is
/// every plugin's and every caller's. What was held back is counted. A
/// plugin beside it logs as before.
#[tokio::test]
async fn a_plugin_called_again_and_again_cannot_flood_the_host_log() {
    const CALLS: usize = 200;
    let dir = tempdir();
    let noisy = unique("noisier");
    deploy(&plugin_path("hostile"), &dir, &format!("{noisy}.wasm"));
    let mut host = Host::serve(&dir, &["--concurrency", "16"]);
    host.wait_ready(Duration::from_secs(30));
    let p = proxy(Duration::from_secs(60)).await;
    let before = host.log_text().len();
    let started = std::time::Instant::now();
    // Each call: 64 KiB on stdout and on stderr and 3300 `host.log`
    // records, some 13 KiB of log once cut to a call's share.
    spam_at_once(&p, &noisy, CALLS, 3300).await;
    let seconds = started.elapsed().as_secs_f64();
    let log = host.log_text();
    let grown = (log.len() - before) as f64;
    // The burst, and a second's worth for each second it took (each line
    // counted with its fields), and room for the host's own lines.
    let allowed = (256 << 10) as f64 + seconds * (64 << 10) as f64 + (64 << 10) as f64;
    let lines = log[before..].lines().count() as f64;
    assert!(
        grown < allowed,
        "{CALLS} calls in {seconds:.1} s wrote {grown} bytes of log in {lines} lines"
    );
    assert!(
        log.contains("guest lines") && log.contains("held back"),
        "what was held back is not said: {}",
        &log[log.len().saturating_sub(3000)..]
    );
}

/// Makes `calls` calls of `hostile.spam(records)` of `id` at once; each
/// must succeed.
async fn spam_at_once(p: &Proxy, id: &str, calls: usize, records: u32) {
    let spam: Vec<_> = (0..calls)
        .map(|_| {
            let sp = p.use_server(id);
            tokio::spawn(async move { sp.call("spam", pos(json!([records]))).await })
        })
        .collect();
    for call in spam {
        call.await.unwrap().unwrap();
    }
}

/// Guest lines the host's log filter does not write (here every line
/// below `warn`) take nothing of a plugin's share of the log: a plugin
/// that logs at `info` on every call, called a few hundred times, still
/// has its next `error` line written, rather than held back for lines
/// nobody could read.
#[tokio::test]
async fn lines_the_host_does_not_write_cost_a_plugin_none_of_its_log() {
    let id = unique("quietlog");
    let host = Host::serving("hostile", &[&id], &["--concurrency", "16"], "callme=warn");
    let p = proxy(Duration::from_secs(60)).await;
    // 200 calls of 16 `info` lines and a few hundred bytes of stdout
    // each: about 1 MB of log at the host's reckoning, four times the
    // burst of 256 KiB, were they written.
    spam_at_once(&p, &id, 200, 16).await;
    // One `error` line: 1 MiB of '!', cut to a line's share.
    p.use_server(&id)
        .call("shout", pos(json!([1, 1])))
        .await
        .unwrap();
    let written = |log: &str| {
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&id) && l.contains("!!!!!!!!"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !written(&host.log_text()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = host.log_text();
    assert!(
        written(&log),
        "the plugin's error line was not written: {}",
        &log[log.len().saturating_sub(3000)..]
    );
    assert!(
        !log.contains("held back") && !log.contains("spam line"),
        "lines below the filter were counted or written: {}",
        &log[log.len().saturating_sub(3000)..]
    );
}

/// The seed's recipes are unanchored: `client_olivia_.*` also matches the
/// reply exchange of a user `olivia_x`, so olivia may bind a queue of her
/// own to it and read olivia_x's replies. The anchored recipes allow her
/// only her own names.
#[tokio::test]
async fn anchored_recipes_keep_each_caller_to_its_own_names() {
    for patterns in [Patterns::Seed, Patterns::Anchored] {
        let Recipe { olivia, carl, .. } = recipe_users("a", patterns);
        let uid = uuid::Uuid::new_v4().simple().to_string();
        let own = (
            callme::protocol::client_exchange(&olivia, &uid),
            callme::protocol::client_queue(&olivia, &uid),
        );
        // The reply exchange of a user named olivia_x, as her proxy declares
        // it (here by a user allowed everything).
        let theirs = callme::protocol::client_exchange(&format!("{olivia}_x"), &uid);
        let (_guest, guest) = callme_tests::raw_channel().await;
        callme_tests::declare_reply_exchange(&guest, &theirs)
            .await
            .unwrap();

        let conn = lapin::Connection::connect(
            &amqp_url_as(&olivia, "olivia-pw"),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("olivia connects");
        let channel = conn.create_channel().await.unwrap();
        // Her own exchange and queue, as her proxy makes them.
        callme_tests::declare_reply_exchange(&channel, &own.0)
            .await
            .expect("olivia declares her reply exchange");
        channel
            .queue_declare(
                own.1.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("olivia declares her reply queue");
        let bind = |exchange: String| {
            let channel = channel.clone();
            let queue = own.1.clone();
            async move {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        "".into(),
                        lapin::options::QueueBindOptions::default(),
                        lapin::types::FieldTable::default(),
                    )
                    .await
            }
        };
        bind(own.0.clone())
            .await
            .expect("olivia binds her queue to her exchange");
        let stolen = bind(theirs.clone()).await;
        match patterns {
            Patterns::Seed => {
                assert!(stolen.is_ok(), "the seed's recipe refused: {stolen:?}")
            }
            Patterns::Anchored => {
                let e = stolen.expect_err("olivia bound her queue to olivia_x's replies");
                assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
            }
        }
        // Bound to nothing (in the anchored case), it would outlive the
        // test: auto-delete goes with the last binding.
        guest
            .exchange_delete(
                theirs.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
        broker_ctl(&["delete_user", &carl]);
        broker_ctl(&["delete_user", &olivia]);
    }
}

/// A host whose plugins call out is a caller too (docs/plugins.md). Under
/// the anchored recipes carl may not declare a caller's names, so serving
/// a plugin granted calls out is refused at once, saying so; with a
/// caller's names and write on the server called, his relay plugin
/// reaches barserver for olivia.
#[tokio::test]
async fn a_host_calling_out_needs_a_callers_names_under_the_anchored_recipes() {
    use callme::plugin::{Capabilities, DEFAULT_MAX_CALL_DEPTH, RpcGrant};
    let Recipe {
        tag,
        server: foo_id,
        carl,
        olivia,
    } = recipe_users("o", Patterns::Anchored);
    let bar = format!("bar{tag}");
    let guest_host = server(ServerOptions::default()).await;
    guest_host.serve_native(&bar, native_add()).await.unwrap();
    let relay = || {
        let settings = callme::PluginSettings {
            capabilities: Capabilities {
                rpc: RpcGrant::new([bar.as_str()], DEFAULT_MAX_CALL_DEPTH).unwrap(),
                ..Capabilities::default()
            },
            ..callme::PluginSettings::default()
        };
        callme_tests::load("relay", &foo_id, settings)
    };
    let as_carl = ConnectOptions::new(amqp_url_as(&carl, "carl-pw"));
    let carl_connects = || Server::connect(&as_carl, ServerOptions::default());

    let carl_host = carl_connects().await.expect("carl connects");
    let refused = carl_host.serve_plugin(relay()).await;
    assert!(
        matches!(refused, Err(Error::AccessRefused(_))),
        "{refused:?}"
    );
    carl_host.shutdown(Duration::from_secs(5)).await;

    let own = format!("server_{foo_id}_(ex|queue)|client_{carl}_(ex|queue)_[0-9a-f-]+");
    broker_ctl(&[
        "set_permissions",
        &carl,
        &format!("^({own})$"),
        &format!(
            "^(server_{foo_id}_(ex|queue)|client_.+_ex_[0-9a-f-]+|amq\\.default|client_{carl}_queue_[0-9a-f-]+|server_{bar}_ex)$"
        ),
        &format!("^({own})$"),
    ]);
    let carl_host = carl_connects().await.expect("carl connects");
    carl_host
        .serve_plugin(relay())
        .await
        .expect("carl serves a plugin that calls out");
    let olivia_proxy = Proxy::connect_with(
        &ConnectOptions::new(amqp_url_as(&olivia, "olivia-pw")),
        Duration::from_secs(10),
    )
    .await
    .expect("olivia connects");
    let sum: i64 = olivia_proxy
        .use_server(&foo_id)
        .invoke("add-via", (&bar, 20, 22))
        .await
        .unwrap();
    assert_eq!(sum, 42);
    carl_host.shutdown(Duration::from_secs(5)).await;
    broker_ctl(&["delete_user", &carl]);
    broker_ctl(&["delete_user", &olivia]);
}

/// Publishes to `id` a request lapin cannot read: its `message_id` is
/// not UTF-8, which RabbitMQ passes on as it got it.
async fn publish_unreadable(id: &str) {
    callme_tests::publish_unreadable_to(&server_exchange(id)).await;
}

/// `callme serve` with calc deployed under each of `ids`, ready, logging
/// at `log_level`.
fn calc_host(ids: &[&str], log_level: &str) -> Host {
    calc_host_with(ids, &[], log_level)
}

/// [`calc_host`] with `extra` arguments to `callme serve`.
fn calc_host_with(ids: &[&str], extra: &[&str], log_level: &str) -> Host {
    Host::serving("calc", ids, extra, log_level)
}

/// Whether the host's log says `id` was moved to a connection of its own.
fn moved(log: &str, id: &str) -> bool {
    log.lines().any(|l| {
        l.contains("on a connection of its own from now on")
            && l.split_whitespace().any(|w| w == format!("server_id={id}"))
    })
}

/// Waits until the host's log says `id` was moved to a connection of its
/// own.
async fn wait_moved(host: &Host, id: &str) {
    let start = Instant::now();
    while !moved(&host.log_text(), id) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{id} was not moved:\n{}",
            host.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request whose properties lapin cannot read (a `message_id` that is
/// not UTF-8, which RabbitMQ passes on as it got it) takes the host's
/// connection down once: the host then takes it out of the queue, and
/// serves every id as before. Without that it would be delivered again
/// after every reconnection, and nobody would be served.
#[tokio::test]
async fn a_request_the_host_cannot_read_costs_the_other_callers_one_reconnection() {
    let srv = server(ServerOptions::default()).await;
    let (poisoned, beside) = (unique("unreadable"), unique("beside"));
    srv.serve_native(&poisoned, native_add()).await.unwrap();
    srv.serve_native(&beside, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&poisoned).invoke("add", (1, 1)).await.unwrap();
    assert_eq!(sum, 2);

    publish_unreadable(&poisoned).await;

    for id in [&poisoned, &beside, &poisoned] {
        for i in 0..5i64 {
            callme_tests::answers_add(&p, id, i).await;
        }
    }
    callme_tests::wait_queue_settled(&server_queue(&poisoned), Duration::from_secs(10)).await;
}

/// The requests taken out of a queue to reach one the host cannot read
/// are put back as their callers sent them, but for `user_id`: a caller
/// may name its own user there (RabbitMQ checks it against the user that
/// publishes), and the host publishing that back was refused, which
/// closed the channel it put requests back on. The request was lost, the
/// look ended there, and the unreadable one, left in the queue, took the
/// host's connection down again (requests taken after the refused one
/// could be lost too). Here one such request is ahead of three other
/// callers' when the unreadable one comes: the host's connection is lost
/// once, and each request is answered.
#[tokio::test]
async fn requests_put_back_past_an_unreadable_one_are_not_lost_to_a_callers_user_id() {
    let id = unique("unreadable-user-id");
    let host = calc_host(&[&id], "callme=info");

    // Olivia's request, first in the queue, names her as its user.
    let (olivia, password) = callme_tests::dedicated_user("olivia");
    let conn = lapin::Connection::connect(
        &amqp_url_as(&olivia, &password),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_publish(
            server_exchange(&id).as_str().into(),
            "".into(),
            lapin::options::BasicPublishOptions::default(),
            br#"{"func":"slow-version","args":[2000]}"#,
            lapin::BasicProperties::default()
                .with_user_id(olivia.as_str().into())
                .with_reply_to("nobody".into())
                .with_correlation_id("olivia".into())
                .with_content_type("application/json".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Three other callers' requests after it, all running when the
    // unreadable one comes: they go back to the queue behind hers.
    let p = proxy(Duration::from_secs(30)).await;
    let calls = callme_tests::slow_calls(&p, &id, 3, 2000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_unreadable(&id).await;
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!(answer.ok(), Some(json!("1")), "a request put back was lost");
    }
    let _ = conn.close(200, "done".into()).await;
    let log = host.log_text();
    let lost = log
        .lines()
        .filter(|l| l.contains("lost the broker") && l.contains("connection=\"callme server\""))
        .count();
    assert_eq!(lost, 1, "{log}");
    assert!(!log.contains("could not be put back"), "{log}");
}

/// A request the host cannot read tells every consumer of the connection
/// it took down so; only the ids with requests waiting look for it (each
/// on a connection of its own, a few at a time), and the idle ones open
/// no connection at all: a host of hundreds of ids used to open hundreds
/// of connections in one burst.
#[tokio::test]
async fn an_unreadable_request_makes_no_idle_id_open_a_connection_to_look() {
    let poisoned = unique("unreadable-idle");
    let idle: Vec<String> = (0..12).map(|i| unique(&format!("idle-look{i}"))).collect();
    let ids: Vec<&str> = [&poisoned]
        .into_iter()
        .chain(&idle)
        .map(String::as_str)
        .collect();
    let host = calc_host(&ids, "callme=debug,lapin=off");
    let p = proxy(Duration::from_secs(10)).await;
    publish_unreadable(&poisoned).await;
    wait_moved(&host, &poisoned).await;
    // The poisoned id looks again once it took the request out, on a
    // connection of its own: it is not idle.
    let not_looked = |l: &&str| {
        l.contains("not looked at for one the AMQP client cannot read") && !l.contains(&poisoned)
    };
    let skipped = |log: &str| {
        log.lines()
            .filter(not_looked)
            .filter(|l| l.contains("no connection opened"))
            .count()
    };
    // Time for every id of the lost connection to consume again; none of
    // them is called until then (a request of this test waiting in its
    // queue would rightly make it look).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = host.log_text();
    let opened = log
        .lines()
        .filter(not_looked)
        .filter(|l| !l.contains("no connection opened"))
        .count();
    assert_eq!(opened, 0, "idle ids opened connections to look:\n{log}");
    assert!(
        skipped(&log) >= 1,
        "no idle id was told of the request:\n{log}"
    );
    for id in &idle {
        callme_tests::answers_add(&p, id, 1).await;
    }
}

/// A request whose content header is a frame up to 8 bytes larger than
/// the AMQP client reads (RabbitMQ takes a publisher's frame that much over
/// `frame_max`, and may add headers of its own on the way: a quorum
/// queue's `x-delivery-count`, the timestamp interceptor's header) makes
/// lapin close the host's connection (`FRAME_ERROR`), like a request it
/// cannot parse: it costs the other callers one reconnection, and is taken
/// out of its queue. Without that it would be delivered again after every
/// reconnection, and nobody would be served.
#[tokio::test]
async fn a_request_whose_header_is_over_the_clients_frame_size_costs_the_other_callers_one_reconnection()
 {
    let srv = server(ServerOptions::default()).await;
    let (poisoned, beside) = (unique("big-header"), unique("beside-big-header"));
    srv.serve_native(&poisoned, native_add()).await.unwrap();
    srv.serve_native(&beside, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    let sum: i64 = p.use_server(&poisoned).invoke("add", (1, 1)).await.unwrap();
    assert_eq!(sum, 2);

    use callme_tests::raw_amqp::{
        BROKER_MAX_FRAME_PAYLOAD, RawProperties, content_header, padding_headers,
    };
    let body = br#"{"func":"add","args":[1,2]}"#;
    let properties = |headers| RawProperties {
        content_type: b"application/json",
        correlation_id: b"big",
        reply_to: b"nobody",
        message_id: b"big",
        headers,
    };
    let rest = content_header(body.len(), &properties(None)).len();
    let headers = padding_headers(BROKER_MAX_FRAME_PAYLOAD - rest);
    let big = properties(Some(&headers));
    assert_eq!(
        content_header(body.len(), &big).len(),
        BROKER_MAX_FRAME_PAYLOAD
    );
    callme_tests::raw_amqp::publish(
        &callme_tests::amqp_host_port(),
        &server_exchange(&poisoned),
        big,
        body,
    )
    .await;

    for id in [&poisoned, &beside, &poisoned] {
        for i in 0..5i64 {
            callme_tests::answers_add(&p, id, i).await;
        }
    }
    // The big request is gone from its queue.
    callme_tests::wait_queue_settled(&server_queue(&poisoned), Duration::from_secs(10)).await;
}

/// An id whose queue went while the host's connection was down (lost to
/// a request the AMQP client cannot read, sent to another id) is served
/// again: its queue is declared anew. The host used to ask how many
/// requests the gone queue held, again and again, and never served the id
/// again. Here the host may not reconnect (its user's connection limit at
/// 0) until the queue is deleted, as an expiry or another host's stop
/// would delete it.
#[tokio::test]
async fn an_id_whose_queue_went_while_the_connection_was_down_is_served_again() {
    let (user, password) = callme_tests::dedicated_user("qgone");
    let host = Server::connect(
        &ConnectOptions::new(amqp_url_as(&user, &password)),
        ServerOptions::default(),
    )
    .await
    .unwrap();
    let (poisoned, gone) = (unique("qgone-poison"), unique("qgone"));
    host.serve_native(&poisoned, native_add()).await.unwrap();
    host.serve_native(&gone, native_add()).await.unwrap();
    let p = proxy(Duration::from_secs(10)).await;
    callme_tests::answers_add(&p, &poisoned, 1).await;
    callme_tests::answers_add(&p, &gone, 1).await;

    broker_ctl(&["set_user_limits", &user, r#"{"max-connections": 0}"#]);
    publish_unreadable(&poisoned).await;
    let down = callme_tests::eventually(Duration::from_secs(20), || async {
        callme_tests::connection_pid(&user, "callme server")
            .is_none()
            .then_some(())
    })
    .await;
    assert!(down.is_some(), "the host's connection was not lost");
    broker_ctl(&["delete_queue", &server_queue(&gone)]);
    broker_ctl(&["clear_user_limits", &user, "max-connections"]);

    let served = callme_tests::eventually(Duration::from_secs(30), || async {
        let r = p
            .use_server(&gone)
            .call_timeout("add", pos(json!([2, 3])), Duration::from_secs(2))
            .await;
        matches!(r, Ok(v) if v == json!(5)).then_some(())
    })
    .await;
    assert!(
        served.is_some(),
        "the id whose queue went is not served again"
    );
    callme_tests::answers_add(&p, &poisoned, 2).await;
}

/// A caller who keeps sending requests the host cannot read costs the
/// callers of the host's other ids one reconnection at most: once one
/// such request has taken the host's connection down, the id it was sent
/// to is consumed on a connection of its own, and further ones take down
/// only that. Requests sent at once are taken out together.
#[tokio::test]
async fn a_flood_of_unreadable_requests_costs_the_other_ids_one_reconnection() {
    let (poisoned, beside) = (unique("unreadable-flood"), unique("beside-flood"));
    let host = calc_host(&[&poisoned, &beside], "callme=info");
    let p = proxy(Duration::from_secs(30)).await;
    callme_tests::answers_add(&p, &poisoned, 1).await;
    callme_tests::answers_add(&p, &beside, 1).await;

    let poison = || publish_unreadable(&poisoned);
    // The first one takes the host's connection down, and moves the id
    // to a connection of its own: the id it was sent to, and no other
    // (every consumer on the lost connection hears it could not be read).
    poison().await;
    wait_moved(&host, &poisoned).await;
    let flood = async {
        for _ in 0..19 {
            poison().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // One at a time, while the other id is called all along.
    let calls = async {
        for i in 0..150 {
            callme_tests::answers_add(&p, &beside, i).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // And the id the flood goes to, which answers all along too, on its
    // own connection, whatever happens to the server's.
    let attacked = async {
        for i in 0..20 {
            callme_tests::answers_add(&p, &poisoned, i).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::join!(flood, calls, attacked);
    // Both ids are served.
    for i in 0..5 {
        callme_tests::answers_add(&p, &poisoned, i).await;
        callme_tests::answers_add(&p, &beside, i).await;
    }
    let log = host.log_text();
    let lost = |connection: &str| {
        log.lines()
            .filter(|l| l.contains("reconnected") && l.contains(connection))
            .count()
    };
    let shared = lost("connection=\"callme server\"");
    assert!(
        shared <= 1,
        "the host's connection was lost {shared} times:\n{log}"
    );
    assert!(
        !moved(&log, &beside),
        "an id nobody attacked was moved:\n{log}"
    );
    // Later ones did reach the id on its own connection.
    let own = lost("connection=\"callme server (one id)\"");
    assert!(own >= 1, "the id's own connection was never lost:\n{log}");
}

/// An unreadable request behind requests the host cannot put back (its
/// queue at a length limit with `reject-publish`, as docs/deploy.md
/// advises, kept full by a caller flooding it while the host looks) costs
/// no caller its request, and the id is moved to a connection of its own
/// all the same. The host took each request ahead of the unreadable one
/// out for good before putting it back: one the broker refused was lost,
/// and, the unreadable one not taken out, the id stayed on the shared
/// connection, which it took down again each time it came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_ahead_of_an_unreadable_one_in_a_full_queue_are_not_lost() {
    let (poisoned, beside) = (unique("unreadable-full"), unique("beside-full"));
    /// Cleared however the test ends.
    struct Policy(String);
    impl Drop for Policy {
        fn drop(&mut self) {
            broker_ctl(&["clear_policy", &self.0]);
        }
    }
    let policy = Policy(format!("callme-{poisoned}"));
    broker_ctl(&[
        "set_policy",
        &policy.0,
        &format!("^{}$", server_queue(&poisoned)),
        r#"{"max-length":20,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
    let host = calc_host(&[&poisoned, &beside], "callme=info");
    let p = proxy(Duration::from_secs(60)).await;
    callme_tests::answers_add(&p, &poisoned, 1).await;
    // Seven calls in flight (of the id's eight), so that the unreadable
    // one, delivered eighth, has seven ahead of it once they go back.
    let slow: Vec<_> = (0..7)
        .map(|_| {
            let server = p.use_server(&poisoned);
            tokio::spawn(async move { server.call("slow-version", pos(json!([1500]))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flood = {
        let flooding = flooding.clone();
        let exchange = server_exchange(&poisoned);
        tokio::spawn(async move {
            let conn = lapin::Connection::connect(
                &callme_tests::amqp_url(),
                lapin::ConnectionProperties::default(),
            )
            .await
            .unwrap();
            let channel = conn.create_channel().await.unwrap();
            let body = br#"{"func":"add","args":[1,1]}"#;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                // Without a reply address: dropped by the host unanswered.
                let _ = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        lapin::options::BasicPublishOptions::default(),
                        body,
                        lapin::BasicProperties::default()
                            .with_content_type("application/json".into()),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    publish_unreadable(&poisoned).await;
    wait_moved(&host, &poisoned).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    flood.await.unwrap();
    for call in slow {
        let answer = call.await.unwrap();
        assert!(answer.is_ok(), "{answer:?}\n{}", host.log_text());
    }
    // The flood drained (the queue refuses requests while full).
    callme_tests::wait_queue_settled(&server_queue(&poisoned), Duration::from_secs(30)).await;
    for i in 0..5 {
        callme_tests::answers_add(&p, &poisoned, i).await;
        callme_tests::answers_add(&p, &beside, i).await;
    }
    drop(policy);
    let log = host.log_text();
    assert!(!log.contains("it is lost"), "{log}");
    // The id moved at the first: the other ids' connection was lost once.
    let shared = log
        .lines()
        .filter(|l| l.contains("reconnected") && l.contains("connection=\"callme server\""))
        .count();
    assert!(
        shared <= 1,
        "the host's connection was lost {shared} times:\n{log}"
    );
}

/// Calls `add-via` of `relay` (relay granted `rpc` to `target`, an `add`)
/// once; the reply address its calls out name, read off the request it
/// sent.
async fn calls_out_reply_to(p: &Proxy, relay: &str, target: &str) -> String {
    let mut overheard = callme_tests::RawClient::overhear(&server_exchange(target)).await;
    let via: i64 = p
        .use_server(relay)
        .invoke("add-via", (target, 1, 2))
        .await
        .unwrap();
    assert_eq!(via, 3);
    let request = overheard.next_reply(None).await;
    request
        .properties
        .reply_to()
        .as_ref()
        .expect("a reply address")
        .to_string()
}

/// Calls `add-via` of `relay` until it is answered, for up to 20 s: its
/// calls out work again.
async fn calls_out_answered(p: &Proxy, relay: &str, target: &str) {
    let start = Instant::now();
    loop {
        match p
            .use_server(relay)
            .invoke::<_, i64>("add-via", (target, 2, 2))
            .await
        {
            Ok(sum) => {
                assert_eq!(sum, 4);
                return;
            }
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(20),
                "the plugin's calls out did not come back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The replies to the calls plugins make (granted `rpc`) come on a
/// connection of the host's made for them, not the one its requests come
/// on: a server called (or anyone who may publish to the reply exchange,
/// whose name every such request carries) that sends a reply the AMQP
/// client cannot read costs that connection a reconnection, and the
/// host's callers nothing. The reply exchange is named anew on the new
/// connection, so it takes another call to learn where to write again.
#[tokio::test]
async fn an_unreadable_reply_to_a_plugins_call_costs_the_hosts_callers_nothing() {
    let dir = tempdir();
    let (relay, target) = (unique("relay-out"), unique("target-out"));
    deploy(&plugin_path("relay"), &dir, &format!("{relay}.wasm"));
    std::fs::write(
        dir.join(format!("{relay}.toml")),
        format!("rpc = [\"{target}\"]\n"),
    )
    .unwrap();
    deploy(&plugin_path("calc"), &dir, &format!("{target}.wasm"));
    let mut host = Host::serve(&dir, &[]);
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(30)).await;
    let mut reply_to = calls_out_reply_to(&p, &relay, &target).await;

    for round in 0..3 {
        callme_tests::publish_unreadable_to(&reply_to).await;
        for i in 0..5 {
            callme_tests::answers_add(&p, &target, i).await;
        }
        // The plugin's calls work again once their connection is back,
        // and their replies come to a reply exchange named anew: the
        // one written to is gone with the connection it served.
        calls_out_answered(&p, &relay, &target).await;
        let renamed = calls_out_reply_to(&p, &relay, &target).await;
        assert_ne!(renamed, reply_to, "round {round}: the same reply exchange");
        reply_to = renamed;
    }
    let log = host.log_text();
    let lost = |connection: &str| {
        log.lines()
            .filter(|l| l.contains("reconnected") && l.contains(connection))
            .count()
    };
    assert_eq!(lost("connection=\"callme server\""), 0, "{log}");
    assert!(
        lost("connection=\"callme server (calls out)\"") >= 1,
        "{log}"
    );
}

/// A library server connected without `auto_recover` still reconnects its
/// plugins' calls out: that connection is lost on its own (a reply the
/// AMQP client cannot read is enough, sent by anyone who may publish to
/// the reply exchange every such request names) while the server goes on
/// serving, and it used to close for good, failing every later call out
/// with "the proxy's broker connection is closed" until the server was
/// dropped. It closes with the server.
#[tokio::test]
async fn a_server_without_auto_recover_still_gets_its_calls_out_back() {
    let (user, password) = callme_tests::dedicated_user("calls-out");
    let options = ConnectOptions {
        auto_recover: false,
        ..ConnectOptions::new(amqp_url_as(&user, &password))
    };
    let srv = Server::connect(&options, ServerOptions::default())
        .await
        .unwrap();
    let (relay, target) = (unique("relay-norecover"), unique("target-norecover"));
    srv.serve_native(&target, native_add()).await.unwrap();
    let settings = callme::PluginSettings {
        capabilities: callme::plugin::Capabilities {
            rpc: callme::plugin::RpcGrant::new(
                [target.as_str()],
                callme::plugin::DEFAULT_MAX_CALL_DEPTH,
            )
            .unwrap(),
            ..callme::plugin::Capabilities::default()
        },
        ..callme::PluginSettings::default()
    };
    srv.serve_plugin(callme_tests::load("relay", &relay, settings))
        .await
        .unwrap();
    let p = proxy(Duration::from_secs(30)).await;
    let reply_to = calls_out_reply_to(&p, &relay, &target).await;
    let server_conn =
        callme_tests::connection_pid(&user, "\"callme server\"").expect("the server's connection");
    let calls_out = || callme_tests::connection_pid(&user, "callme server (calls out)");
    let before = calls_out().expect("the calls-out connection");

    callme_tests::publish_unreadable_to(&reply_to).await;
    calls_out_answered(&p, &relay, &target).await;
    let after = calls_out().expect("the calls-out connection");
    assert_ne!(before, after, "the calls-out connection was not lost");
    assert_eq!(
        callme_tests::connection_pid(&user, "\"callme server\"").as_ref(),
        Some(&server_conn),
        "the server's own connection was lost"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), srv.closed())
            .await
            .is_err(),
        "the server's link closed"
    );
    callme_tests::answers_add(&p, &target, 7).await;

    // Closed with the server's link, when that is lost for good.
    broker_ctl(&["close_connection", &server_conn, "closed by the test"]);
    tokio::time::timeout(Duration::from_secs(10), srv.closed())
        .await
        .expect("the server's link closed for good");
    let start = Instant::now();
    while calls_out().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the calls-out connection outlived its server's"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.shutdown(Duration::from_secs(5)).await;
}

/// A request whose headers nest as deep as one frame holds (some 26,000
/// arrays in RabbitMQ's default 128 KiB frame, which the broker passes on
/// as it got them) is served like any other. The AMQP client parses and
/// drops such a table by recursion, about 1 to 2 KiB of stack a level:
/// on a thread's default 2 MiB stack the host would abort, every caller's
/// calls with it, and abort again on each redelivery.
#[tokio::test]
async fn a_request_with_headers_nested_as_deep_as_a_frame_holds_costs_nobody_anything() {
    let (deep, beside) = (unique("deep-headers"), unique("beside-deep"));
    let mut host = calc_host(&[&deep, &beside], "callme=info");
    let p = proxy(Duration::from_secs(30)).await;
    callme_tests::answers_add(&p, &deep, 1).await;

    // The rest of the content header takes less than 256 bytes.
    let depth = (callme_tests::raw_amqp::MAX_FRAME_PAYLOAD - 256) / 5;
    let headers = callme_tests::raw_amqp::nested_headers(depth);
    for _ in 0..3 {
        callme_tests::raw_amqp::publish(
            &callme_tests::amqp_host_port(),
            &server_exchange(&deep),
            callme_tests::raw_amqp::RawProperties {
                content_type: b"application/json",
                correlation_id: b"deep",
                reply_to: b"nobody",
                message_id: b"deep",
                headers: Some(&headers),
            },
            br#"{"func":"add","args":[1,2]}"#,
        )
        .await;
    }
    for i in 0..5 {
        callme_tests::answers_add(&p, &deep, i).await;
        callme_tests::answers_add(&p, &beside, i).await;
    }
    assert!(
        matches!(host.child.try_wait(), Ok(None)),
        "the host exited:\n{}",
        host.log_text()
    );
    let log = host.log_text();
    assert!(
        !log.contains("reconnected"),
        "the host lost its connection:\n{log}"
    );
    // The requests were read, and answered (to an exchange that is not
    // there): they are not waiting to crash a host.
    let queued = broker_ctl(&["list_queues", "name", "messages"]);
    let left = queued
        .lines()
        .find(|l| l.starts_with(&format!("server_{deep}_queue")))
        .unwrap_or_else(|| panic!("no queue for {deep}:\n{queued}"));
    assert!(left.ends_with("\t0"), "requests left: {left}");
}

/// A caller who may call many ids of a host and sends each a request the
/// AMQP client cannot read reaches the host's connection once per id, and
/// costs an id it did not send one nothing: 10 ids attacked, more than
/// may each have a connection of their own (8), so the last ones share
/// one of those; after that, more such requests to any of them leave the
/// host's connection alone. An id with no request waiting is not looked
/// at (no connection is opened to look).
#[tokio::test]
async fn unreadable_requests_to_more_ids_than_may_have_a_connection_of_their_own_stay_off_the_servers()
 {
    let attacked: Vec<String> = (0..10)
        .map(|i| unique(&format!("unreadable-many{i}")))
        .collect();
    let bystander = unique("bystander-many");
    let ids: Vec<&str> = attacked
        .iter()
        .chain([&bystander])
        .map(String::as_str)
        .collect();
    let host = calc_host(&ids, "callme=debug,lapin=off");
    let p = proxy(Duration::from_secs(30)).await;
    for id in &attacked {
        publish_unreadable(id).await;
        wait_moved(&host, id).await;
        callme_tests::answers_add(&p, id, 1).await;
    }
    let shared_losses = |log: &str| {
        log.lines()
            .filter(|l| l.contains("reconnected") && l.contains("connection=\"callme server\""))
            .count()
    };
    let before = shared_losses(&host.log_text());
    assert!(
        before <= attacked.len(),
        "{before} losses:\n{}",
        host.log_text()
    );
    // Again, to each: only their own connections go.
    for id in &attacked {
        publish_unreadable(id).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in attacked.iter().chain([&bystander]) {
        for i in 0..3 {
            callme_tests::answers_add(&p, id, i).await;
        }
    }
    let log = host.log_text();
    assert_eq!(shared_losses(&log), before, "{log}");
    assert!(!moved(&log, &bystander), "{log}");
    let shared = log
        .lines()
        .filter(|l| l.contains("shared with other ids sent such requests"))
        .count();
    assert_eq!(shared, 2, "{log}");
    let bystander_says = |what: &str| {
        log.lines()
            .any(|l| l.contains(what) && l.contains(bystander.as_str()))
    };
    assert!(bystander_says("no request waiting: not looked at"), "{log}");
    assert!(
        !bystander_says("looking for a request the AMQP client cannot read"),
        "{log}"
    );
}

/// A request in flight when the host loses its connection goes back to
/// its queue, and a quorum queue counts that return (RabbitMQ 3.10 here)
/// as it counts the return from a host that died running it, which is
/// what the delivery limit (3) is for. A caller able to cost the host its
/// connection a few times in a row (unreadable requests to ids not yet
/// moved to a connection of their own) must not get another caller's
/// request refused by that limit: the host does not count the returns it
/// lived through, nor the times it looked at the request for an
/// unreadable one.
#[tokio::test]
async fn connection_losses_the_host_lives_through_do_not_count_against_a_callers_request() {
    let victim = unique("limit-victim");
    let attacked: Vec<String> = (0..3)
        .map(|i| unique(&format!("limit-attack{i}")))
        .collect();
    let ids: Vec<&str> = attacked
        .iter()
        .chain([&victim])
        .map(String::as_str)
        .collect();
    let host = calc_host_with(
        &ids,
        &["--queue-type", "quorum"],
        "callme=debug,lapin=off,wasmtime=off,cranelift=off",
    );
    let p = proxy(Duration::from_secs(60)).await;
    callme_tests::answers_add(&p, &victim, 1).await;
    // A call that takes longer than the whole attack (but less than the
    // default deadline, 10 s), in flight through every loss below: its
    // first run cannot answer before a refusal would.
    let slow = {
        let sp = p.use_server(&victim);
        tokio::spawn(async move { sp.call("slow-version", pos(json!([9000]))).await })
    };
    for id in &attacked {
        // The request is in flight again (the second time round, taken
        // again after the last loss).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        publish_unreadable(id).await;
        wait_moved(&host, id).await;
    }
    let answer = slow.await.unwrap();
    let log = host.log_text();
    match answer {
        Ok(v) => assert!(v.is_string(), "{v}"),
        Err(e) => panic!("the victim's call failed: {e:?}\n{log}"),
    }
    let shared_losses = log
        .lines()
        .filter(|l| l.contains("reconnected") && l.contains("connection=\"callme server\""))
        .count();
    assert!(shared_losses >= 2, "{shared_losses} losses:\n{log}");
    // Its request did go back, more often than the limit allows.
    let went_back = log
        .lines()
        .filter(|l| {
            l.contains("requests in flight went back to the queue") && l.contains(victim.as_str())
        })
        .count();
    assert!(went_back >= 2, "given back {went_back} times:\n{log}");
}

/// A broker user whose name is too long for callme's reply names (AMQP
/// names are at most 255 bytes) is told so when its proxy connects, not
/// met with a panic.
#[tokio::test]
async fn a_user_name_too_long_for_the_reply_names_is_refused_by_name() {
    let user = format!("{}-{}", unique("long"), "u".repeat(200));
    let password = "long-user-pw";
    broker_ctl(&["add_user", &user, password]);
    broker_ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let e = Proxy::connect_with(
        &ConnectOptions::new(amqp_url_as(&user, password)),
        Duration::from_secs(5),
    )
    .await
    .err()
    .expect("refused");
    assert!(
        matches!(e, Error::Config(ref m) if m.contains("at most 205")),
        "{e:?}"
    );
    broker_ctl(&["delete_user", &user]);
}

/// A server (or anyone who may publish to a caller's reply queue) that
/// floods it with replies cannot make the caller hold them: the proxy
/// takes at most 64 unacknowledged replies from the broker, the rest wait
/// in the broker's queue, and the caller's own calls are answered all the
/// while. Once the flood is over, every reply taken has been acknowledged.
#[tokio::test]
async fn a_flood_of_replies_waits_in_the_broker_not_in_the_caller() {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;

    let s = server(ServerOptions::default()).await;
    let p = proxy(Duration::from_secs(30)).await;
    let id = unique("flooded");
    s.serve_native(&id, native_add()).await.unwrap();
    let mut overheard = callme_tests::RawClient::overhear(&server_exchange(&id)).await;
    callme_tests::answers_add(&p, &id, 1).await;
    let request = overheard.next_reply(None).await;
    let queue = match request
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(callme::protocol::REPLY_QUEUE).cloned())
    {
        Some(lapin::types::AMQPValue::LongString(q)) => q.to_string(),
        other => panic!("no reply queue named: {other:?}"),
    };

    // Read until the broker's listing shows the consumer (under load it
    // has been seen to lag its consume-ok).
    let list = || {
        broker_ctl(&[
            "list_consumers",
            "-q",
            "--no-table-headers",
            "queue_name",
            "ack_required",
            "prefetch_count",
        ])
    };
    let reply_consumer = callme_tests::eventually(Duration::from_secs(20), || async {
        list()
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.first() == Some(&queue))
            .map(|f| f[1..].to_vec())
    })
    .await
    .unwrap_or_else(|| panic!("no consumer of {queue}: {}", list()));
    assert_eq!(reply_consumer, ["true", "64"], "{queue}");

    let (_conn, flood) = callme_tests::raw_channel().await;
    let body = vec![b' '; 64 << 10];
    let flooding = async {
        for i in 0..4_000 {
            let props = BasicProperties::default().with_correlation_id(format!("flood-{i}").into());
            flood
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .unwrap();
        }
    };
    let calling = async {
        for i in 0..200 {
            callme_tests::answers_add(&p, &id, i).await;
        }
    };
    tokio::join!(flooding, calling);

    // The flood taken and acknowledged.
    callme_tests::wait_queue_settled(&queue, Duration::from_secs(30)).await;
    callme_tests::answers_add(&p, &id, 7).await;
}

/// The compilation cache keeps to a directory of its own inside the one
/// given: wasmtime's cache cleaner deletes what it does not recognise in
/// its directory, two levels deep, so `--cache-dir` pointed at one that
/// holds anything else (mistaken for the plugins directory, or a home)
/// would lose it.
#[tokio::test]
async fn a_cache_directory_that_holds_other_files_keeps_them() {
    let cache = tempdir();
    std::fs::write(cache.join("keep.txt"), b"mine").unwrap();
    std::fs::create_dir_all(cache.join("a/b/c")).unwrap();
    std::fs::write(cache.join("a/b/c/d.txt"), b"mine too").unwrap();
    std::fs::write(cache.join("a/e.txt"), b"and this").unwrap();
    let dir = tempdir();
    let id = unique("cache-beside");
    deploy(&plugin_path("calc"), &dir, &format!("{id}.wasm"));
    let mut host = Host::serve_with_cache(&dir, &[], &cache);
    host.wait_ready(Duration::from_secs(60));
    let p = proxy(Duration::from_secs(10)).await;
    callme_tests::answers_add(&p, &id, 1).await;
    // The cleaner runs on its own thread after the first compilation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for kept in ["keep.txt", "a/b/c/d.txt", "a/e.txt"] {
        assert!(cache.join(kept).exists(), "{kept} was deleted");
    }
    assert!(cache.join("wasmtime").is_dir());
}

/// A cache directory other users may write to is refused, with the
/// reason: the cache holds native code the host would run.
#[test]
fn a_cache_directory_others_may_write_to_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempdir();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(callme_tests::callme_bin())
        .args([
            "invoke",
            plugin_path("calc").to_str().unwrap(),
            "add",
            "1",
            "2",
        ])
        .env("CALLME_CACHE_DIR", &cache)
        .env("RUST_LOG", "off")
        .output()
        .expect("run callme");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("may be written by other users"), "{stderr}");
    // Nothing was made or loaded there.
    assert!(!cache.join("wasmtime").exists());
}

/// A host that cannot reach its broker over TLS says why: the cause
/// (here a certificate nothing in `--ca-file` issued) is in the line that
/// says it waits, which said only "the broker connection failed", half a
/// minute after half a minute, with nothing to act on.
#[test]
fn a_host_waiting_on_a_tls_failure_logs_its_cause() {
    let dir = tempdir();
    let url = format!("amqps://guest:guest@localhost:{}/%2f", amqps_port());
    // The server's own certificate taken for a CA: it issued nothing.
    let not_the_ca = tls_dir().join("server.pem");
    let mut host = Host::start(
        std::process::Command::new(callme_bin()),
        &dir,
        &[
            "--amqp-url",
            &url,
            "--ca-file",
            not_the_ca.to_str().unwrap(),
        ],
        "callme=info",
    );
    let started = Instant::now();
    let line = loop {
        let log = host.log_text();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("the broker is unreachable"))
        {
            break line.to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no line about the broker: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    host.terminate();
    host.wait(Duration::from_secs(10));
    assert!(line.contains("certificate"), "{line}");
    assert!(!line.contains("guest:guest"), "{line}");
}
