//! `fib(35)` against a short timeout: the call fails with `Timeout`.
//!
//! Naive `fib(35)` makes about 30 million calls; with a 10 ms timeout the
//! proxy gives up long before the answer comes back, and the late reply is
//! dropped when it arrives. With the default timeout the same call succeeds.

use std::time::Duration;

use callme::{Error, Proxy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("CALLME_AMQP_URL").unwrap_or_else(|_| callme::DEFAULT_AMQP_URL.into());
    let proxy = Proxy::connect(&url).await?;
    let fooserver = proxy
        .use_server("fooserver")
        .with_timeout(Duration::from_millis(10));
    match fooserver.invoke::<_, u64>("fib", (35,)).await {
        Err(Error::Timeout { timeout, .. }) => {
            println!("fib(35): timed out after {timeout:?}, as expected")
        }
        Ok(v) => println!("fib(35) = {v} (faster than the timeout!)"),
        Err(e) => return Err(e.into()),
    }
    let patient = proxy
        .use_server("fooserver")
        .with_timeout(Duration::from_secs(60));
    let v: u64 = patient.invoke("fib", (35,)).await?;
    println!("fib(35) = {v} with a 60 s timeout");
    Ok(())
}
