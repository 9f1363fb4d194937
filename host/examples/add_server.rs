//! The seed's example server: a native `add` (and a naive `fib`) served as `fooserver`.
//!
//! ```sh
//! cargo run -p callme --example add_server
//! cargo run -p callme --example add_client      # prints 2
//! cargo run -p callme --example fib_timeout     # fib(35) past a short timeout
//! ```

use callme::protocol::Args;
use callme::{ConnectOptions, ErrorKind, NativeFunctions, RemoteError, Server, ServerOptions};
use serde_json::json;

fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
}

fn int(args: &Args, i: usize, name: &str) -> Result<i64, RemoteError> {
    args.args
        .get(i)
        .or_else(|| args.kwargs.get(name))
        .and_then(|v| v.as_i64())
        .ok_or_else(|| {
            RemoteError::new(
                ErrorKind::InvalidArguments,
                format!("`{name}` must be an integer"),
            )
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("callme=info")
        .init();
    let url = std::env::var("CALLME_AMQP_URL").unwrap_or_else(|_| callme::DEFAULT_AMQP_URL.into());
    let server = Server::connect(&ConnectOptions::new(url), ServerOptions::default()).await?;

    let mut functions = NativeFunctions::new();
    functions
        .register("add", "func(a: s64, b: s64) -> s64", |args| {
            Ok(json!(int(&args, 0, "a")? + int(&args, 1, "b")?))
        })
        .register("fib", "func(n: u64) -> u64", |args| {
            Ok(json!(fib(int(&args, 0, "n")?.clamp(0, 90) as u64)))
        });
    server.serve_native("fooserver", functions).await?;
    println!("serving fooserver; Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    server.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}
