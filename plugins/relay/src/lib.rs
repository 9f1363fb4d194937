//! The relay plugin: the capabilities of `callme:plugin@0.2.0` in use.
//!
//! `add-via` calls `add` of another callme server through the host
//! (`rpc`), `setting` reads the plugin's own settings (`config`), and
//! `fetch` makes an HTTP GET through the standard
//! `wasi:http/outgoing-handler` (`http`). Each works only once the
//! plugin's sidecar grants it; without a grant the host refuses in the
//! guest, and this plugin passes the refusal on as its own error. The
//! integration tests (`tests/capabilities.rs`) use it.

callme_guest::generate_v0_2!();

mod fetch;

use callme_guest::{config, rpc};

struct Relay;

impl Guest for Relay {
    fn add_via(server: String, a: i64, b: i64) -> Result<i64, String> {
        rpc::call(&server, "add", (a, b)).map_err(|e| e.to_string())
    }

    fn setting(key: String) -> Option<String> {
        config::get(&key)
    }

    fn fetch(url: String) -> Result<String, String> {
        fetch::get(&url).map_err(|e| format!("cannot fetch {url}: {e}"))
    }
}

export!(Relay);
