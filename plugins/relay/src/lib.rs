//! The relay plugin: the capabilities of `callme:plugin@0.2.0` in use.
//!
//! `add-via` calls `add` of another callme server through the host
//! (`rpc`; `add-via-times` in a loop), `setting` reads the plugin's own
//! settings (`config`), and `fetch` makes an HTTP GET through the
//! standard `wasi:http/outgoing-handler` (`http`; `fetch-times` and
//! `fetch-all` in a loop). Each works only once the plugin's sidecar
//! grants it; without a grant the host refuses in the guest, and this
//! plugin passes the refusal on as its own error. The integration tests
//! (`tests/capabilities.rs`) use it.

callme_guest::generate_v0_2!();

mod fetch;

use callme_guest::{config, rpc};

struct Relay;

impl Guest for Relay {
    fn add_via(server: String, a: i64, b: i64) -> Result<i64, String> {
        rpc::call(&server, "add", (a, b)).map_err(|e| e.to_string())
    }

    fn add_via_times(server: String, a: i64, b: i64, times: u32) -> Result<i64, String> {
        let mut sum = 0;
        for n in 1..=times {
            sum = Self::add_via(server.clone(), a, b).map_err(|e| format!("call {n}: {e}"))?;
        }
        Ok(sum)
    }

    fn setting(key: String) -> Option<String> {
        config::get(&key)
    }

    fn fetch(url: String) -> Result<String, String> {
        fetch::get(&url).map_err(|e| format!("cannot fetch {url}: {e}"))
    }

    fn fetch_times(url: String, times: u32) -> Result<u32, String> {
        for n in 1..=times {
            Self::fetch(url.clone()).map_err(|e| format!("request {n}: {e}"))?;
        }
        Ok(times)
    }

    fn fetch_all(url: String, times: u32) -> u32 {
        let fetched = (0..times)
            .filter(|_| Self::fetch(url.clone()).is_ok())
            .count();
        u32::try_from(fetched).unwrap_or(u32::MAX)
    }
}

export!(Relay);
