//! The seed's example client: `proxy.use_server("fooserver").add(1, 1)`.
//!
//! Works against `add_server` or against `callme serve` with the calc
//! plugin deployed as `fooserver.wasm` (what `scripts/quickstart` does).

use callme::Proxy;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("CALLME_AMQP_URL").unwrap_or_else(|_| callme::DEFAULT_AMQP_URL.into());
    let proxy = Proxy::connect(&url).await?;
    let sum: i64 = proxy.use_server("fooserver").invoke("add", (1, 1)).await?;
    println!("{sum}");
    Ok(())
}
