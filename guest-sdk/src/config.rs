//! The plugin's own settings (`callme:plugin/config@0.2.0`): the `[config]` table of its sidecar.
//!
//! A plugin on `callme:plugin@0.2.0` reads a setting with [`get`]. The
//! host answers from the `[config]` table of the sidecar `NAME.toml`
//! beside the plugin; a value written `"${CALLME_SECRET_NAME}"` there is
//! the host's environment variable of that name (a secret: the host never
//! logs or shows it). Only variables whose names start with
//! `CALLME_SECRET_` can be named; a sidecar naming any other is refused.
//! A plugin without a `[config]` table gets `None` for every key.

/// The value of `key` in the plugin's `[config]` table, if it is set.
///
/// Off wasm (native unit tests) there is no host: it reads the
/// environment variable `CALLME_CONFIG_<KEY>` (the key upper-cased, `-`
/// as `_`), so tests can give settings.
pub fn get(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return crate::v0_2::config::get(key);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let var = format!("CALLME_CONFIG_{}", key.to_uppercase().replace('-', "_"));
        std::env::var(var).ok()
    }
}
