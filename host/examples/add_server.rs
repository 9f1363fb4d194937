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

/// The naive recursion of the seed's example: slow on purpose (`fib(35)`
/// takes seconds), so `n` is kept to what ends in minutes.
fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
}

/// The largest `n` the naive `fib` is asked for.
const MAX_FIB: i64 = 45;

/// The integer arguments named `names`, given by position or by name, as
/// a plugin's are bound: each once, and no others.
fn ints<const N: usize>(args: &Args, names: [&str; N]) -> Result<[i64; N], RemoteError> {
    let invalid = |message: String| RemoteError::new(ErrorKind::InvalidArguments, message);
    if args.args.len() > N {
        return Err(invalid(format!(
            "takes {N} arguments, {} given",
            args.args.len()
        )));
    }
    if let Some(unknown) = args.kwargs.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(invalid(format!("no parameter `{unknown}`")));
    }
    let mut out = [0; N];
    for (i, name) in names.iter().enumerate() {
        let value = match (args.args.get(i), args.kwargs.get(*name)) {
            (Some(_), Some(_)) => return Err(invalid(format!("`{name}` given twice"))),
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => return Err(invalid(format!("`{name}` is missing"))),
        };
        out[i] = value
            .as_i64()
            .ok_or_else(|| invalid(format!("`{name}` must be an integer")))?;
    }
    Ok(out)
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
            // Wrapping, as an s64 `add` of a plugin does.
            let [a, b] = ints(&args, ["a", "b"])?;
            Ok(json!(a.wrapping_add(b)))
        })
        .register("fib", "func(n: u64) -> u64", |args| {
            let [n] = ints(&args, ["n"])?;
            if !(0..=MAX_FIB).contains(&n) {
                return Err(RemoteError::new(
                    ErrorKind::InvalidArguments,
                    format!("`n` must be 0 to {MAX_FIB}"),
                ));
            }
            Ok(json!(fib(n as u64)))
        });
    server.serve_native("fooserver", functions).await?;
    println!("serving fooserver; Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    server.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}
