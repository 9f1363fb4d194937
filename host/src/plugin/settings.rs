//! A plugin's settings: its call [`Limits`], instance policy, concurrency, guest log level and [`Capabilities`], and the sidecar they are read from.
//!
//! A sidecar `NAME.toml` beside a plugin sets any of them, with flat keys
//! (`fuel`, `deadline_ms`, `prewarm`, `rpc`, ...) and one table,
//! `[config]`, of the plugin's own settings. It is parsed and checked as a
//! whole by [`PluginSettings::from_toml`], so settings are either all
//! valid or not applied at all; secrets (`"${NAME}"` config values) are
//! read from the environment then.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::QueueType;

use super::caps::http::{MAX_HTTP_REQUESTS, MAX_HTTP_RESPONSE_BYTES};
use super::caps::rpc::{MAX_CALL_DEPTH, MAX_CALLS};
use super::caps::{
    Capabilities, Config, ConfigError, DEFAULT_HTTP_MAX_REQUESTS, DEFAULT_HTTP_MAX_RESPONSE_BYTES,
    DEFAULT_HTTP_TIMEOUT, DEFAULT_MAX_CALL_DEPTH, DEFAULT_MAX_CALLS, HttpGrant, InvalidGrant,
    InvalidHost, RpcGrant,
};
use super::limits::{
    Limits, MAX_DEADLINE, MAX_FUEL, MAX_LOCAL_DEADLINE, MAX_MEMORY_BYTES, MAX_OUTPUT_BYTES,
    MAX_RESULT_BYTES, MIN_MEMORY_BYTES,
};

/// Spare instances a served plugin keeps by default: enough to answer a
/// small burst without waiting for instantiation, while holding few pool
/// slots and little memory.
pub const DEFAULT_PREWARM: usize = 2;

/// Most spare instances per plugin: each holds a slot of the instance
/// pool that every plugin's calls share, and one plugin asking for more
/// is a typo, not a setting.
pub(crate) const MAX_PREWARM: usize = 64;

/// Most calls in flight per plugin: the AMQP prefetch count that carries
/// it is a 16-bit number.
pub(crate) const MAX_CONCURRENCY: usize = u16::MAX as usize;

/// Everything that can be set for one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSettings {
    /// What each call may spend and return.
    pub limits: Limits,
    /// Keep instances between calls instead of a fresh sandbox per call.
    /// Faster for big guests (interpreters), but state a guest keeps in
    /// memory is seen by the next call it serves. An instance whose call
    /// was stopped part-way (a trap, a limit) is discarded; one whose
    /// function returned, an error value (`GuestError`) included, is
    /// kept. Off by default.
    pub reuse_instances: bool,
    /// Spare instances kept ready, fresh and never called, so a call need
    /// not wait for its instance to be made; each one a call takes is
    /// replaced in the background. Every call still runs in an instance of
    /// its own. Only a server keeps spares (see `Plugin::start_prewarm`);
    /// with `reuse_instances` there are none.
    pub prewarm: usize,
    /// Calls in flight for this plugin, overriding the server's
    /// `--concurrency` (its share of the host).
    pub concurrency: Option<usize>,
    /// Lowest level of the guest's log lines (host import and captured
    /// stdout/stderr) that reach the host log.
    pub log_level: GuestLogLevel,
    /// The type of this plugin's server queue, overriding the server's
    /// `--queue-type`. It cannot change while the plugin is served.
    pub queue_type: Option<QueueType>,
    /// What the plugin is granted beyond the sandbox: nothing by default.
    pub capabilities: Capabilities,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings {
            limits: Limits::default(),
            reuse_instances: false,
            prewarm: DEFAULT_PREWARM,
            concurrency: None,
            log_level: GuestLogLevel::Trace,
            queue_type: None,
            capabilities: Capabilities::default(),
        }
    }
}

/// Lowest level of guest log lines kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestLogLevel {
    /// Everything.
    #[default]
    Trace,
    /// Debug and above.
    Debug,
    /// Info and above (captured stdout/stderr is info).
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
    /// Nothing.
    Off,
}

/// Why a sidecar's settings were refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SettingsError {
    /// Not TOML, a key that does not exist, or a value of the wrong type.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// A `[config]` value refused (a secret's variable unset, a table too big).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An `rpc` entry that is not a server id.
    #[error(transparent)]
    Grant(#[from] InvalidGrant),
    /// An `allowed_hosts` entry that is not `HOST:PORT`.
    #[error(transparent)]
    Host(#[from] InvalidHost),
    /// A number outside what the setting can mean.
    #[error("`{key} = {value}` is out of range: it must be between {min} and {max}")]
    OutOfRange {
        /// The sidecar key.
        key: &'static str,
        /// The value given.
        value: u128,
        /// The smallest value allowed.
        min: u128,
        /// The largest value allowed.
        max: u128,
    },
}

impl SettingsError {
    /// The reason as one log line. TOML's own message quotes the sidecar
    /// `text` over several lines, with a caret under the fault; this gives
    /// the line number and the message instead.
    pub(crate) fn one_line(&self, text: &str) -> String {
        match self {
            SettingsError::Toml(e) => {
                let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
                match e.span() {
                    Some(span) => {
                        let before = &text.as_bytes()[..span.start.min(text.len())];
                        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                        format!("line {line}: {message}")
                    }
                    None => message,
                }
            }
            other => other.to_string(),
        }
    }
}

impl PluginSettings {
    /// Parses a sidecar and checks every value, so that settings are
    /// applied whole or not at all.
    ///
    /// # Errors
    ///
    /// [`SettingsError::Toml`] for text that is not TOML, an unknown key
    /// or a value of the wrong type (a negative number, or one over 64
    /// bits); [`SettingsError::OutOfRange`] for the first
    /// number outside its bounds (see the `MAX_*` and `MIN_*` constants).
    pub(crate) fn from_toml(text: &str) -> Result<PluginSettings, SettingsError> {
        PluginSettings::from_toml_with_env(text, |var| std::env::var(var).ok())
    }

    /// The settings of the sidecar beside `plugin_file` (`NAME.toml` beside
    /// `NAME.wasm`), read and checked as `callme serve` reads them; the
    /// defaults when there is none.
    ///
    /// # Errors
    ///
    /// [`PluginError::InvalidPlugin`](super::PluginError::InvalidPlugin)
    /// naming the sidecar and what is wrong with it (never a secret's value).
    pub fn beside(plugin_file: &std::path::Path) -> Result<PluginSettings, super::PluginError> {
        let dir = plugin_file.parent().unwrap_or(std::path::Path::new("."));
        let name = plugin_file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::watcher::read_settings(dir, &name).map_err(|e| super::PluginError::InvalidPlugin {
            message: format!("invalid settings: {e}"),
        })
    }

    /// As [`PluginSettings::from_toml`], reading secrets through `env`.
    fn from_toml_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<PluginSettings, SettingsError> {
        let sidecar: Sidecar = toml::from_str(text)?;
        within("fuel", sidecar.fuel, 1, MAX_FUEL)?;
        // What a served call may take; a program's own calls may take
        // longer (see [`PluginSettings::check`]).
        within(
            "deadline_ms",
            u128::from(sidecar.deadline_ms),
            1,
            MAX_DEADLINE.as_millis(),
        )?;
        let capabilities = Capabilities {
            config: Config::resolve(sidecar.config.clone(), env)?,
            rpc: RpcGrant::new(sidecar.rpc.clone(), sidecar.rpc_max_depth)?
                .with_max_calls(sidecar.rpc_max_calls),
            http: HttpGrant::new(
                &sidecar.allowed_hosts,
                sidecar.http_max_response_bytes,
                Duration::from_millis(sidecar.http_timeout_ms),
            )?
            .with_max_requests(sidecar.http_max_requests),
        };
        let settings = PluginSettings {
            capabilities,
            ..sidecar.into()
        };
        settings.check()?;
        Ok(settings)
    }
}

/// The sidecar as written: one flat table whose keys are the settings'
/// names. Kept apart from [`PluginSettings`] because serde cannot deny
/// unknown keys of a table it spreads over nested structs.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Sidecar {
    fuel: u64,
    deadline_ms: u64,
    memory_bytes: usize,
    result_bytes: usize,
    output_bytes: usize,
    reuse_instances: bool,
    prewarm: usize,
    concurrency: Option<usize>,
    log_level: GuestLogLevel,
    queue_type: Option<QueueType>,
    /// Server ids the plugin may call (`*`: any).
    rpc: Vec<String>,
    /// Deepest hop its calls may be.
    rpc_max_depth: u32,
    /// Most calls to other servers one call may send.
    rpc_max_calls: u32,
    /// `HOST:PORT`s it may send HTTP requests to.
    allowed_hosts: Vec<String>,
    /// Largest HTTP response body.
    http_max_response_bytes: u64,
    /// Time one HTTP request may take, response body included.
    http_timeout_ms: u64,
    /// Most HTTP requests one call may send.
    http_max_requests: u32,
    /// The plugin's own settings, as written (secrets unresolved).
    config: BTreeMap<String, String>,
}

impl Default for Sidecar {
    fn default() -> Self {
        let PluginSettings {
            limits,
            reuse_instances,
            prewarm,
            concurrency,
            log_level,
            queue_type,
            capabilities: _,
        } = PluginSettings::default();
        Sidecar {
            fuel: limits.fuel,
            // The default deadline is seconds, far inside 64 bits of ms.
            deadline_ms: u64::try_from(limits.deadline.as_millis()).unwrap_or(u64::MAX),
            memory_bytes: limits.memory_bytes,
            result_bytes: limits.result_bytes,
            output_bytes: limits.output_bytes,
            reuse_instances,
            prewarm,
            concurrency,
            log_level,
            queue_type,
            rpc: Vec::new(),
            rpc_max_depth: DEFAULT_MAX_CALL_DEPTH,
            rpc_max_calls: DEFAULT_MAX_CALLS,
            allowed_hosts: Vec::new(),
            http_max_response_bytes: DEFAULT_HTTP_MAX_RESPONSE_BYTES,
            // Seconds, far inside 64 bits of ms.
            http_timeout_ms: u64::try_from(DEFAULT_HTTP_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
            http_max_requests: DEFAULT_HTTP_MAX_REQUESTS,
            config: BTreeMap::new(),
        }
    }
}

/// Everything but the capabilities, which need the environment.
impl From<Sidecar> for PluginSettings {
    fn from(s: Sidecar) -> Self {
        PluginSettings {
            limits: Limits {
                fuel: s.fuel,
                deadline: Duration::from_millis(s.deadline_ms),
                memory_bytes: s.memory_bytes,
                result_bytes: s.result_bytes,
                output_bytes: s.output_bytes,
            },
            reuse_instances: s.reuse_instances,
            prewarm: s.prewarm,
            concurrency: s.concurrency,
            log_level: s.log_level,
            queue_type: s.queue_type,
            capabilities: Capabilities::default(),
        }
    }
}

/// `value` if it is within `min..=max`, else the sidecar key's refusal.
fn within<T: Into<u128>>(key: &'static str, value: T, min: T, max: T) -> Result<(), SettingsError> {
    let (value, min, max) = (value.into(), min.into(), max.into());
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(SettingsError::OutOfRange {
            key,
            value,
            min,
            max,
        })
    }
}

impl PluginSettings {
    /// Checks every numeric setting against its bounds, named by its
    /// sidecar key: what every sidecar is checked against, and what [`Plugin::load`](super::Plugin::load) asks of settings a
    /// program made (a deadline of `Duration::MAX` would overflow the
    /// first call's clock).
    ///
    /// # Errors
    ///
    /// [`SettingsError::OutOfRange`] for the first number outside its
    /// bounds (see the `MAX_*` and `MIN_*` constants).
    pub(crate) fn check(&self) -> Result<(), SettingsError> {
        // usize is at most 64 bits on every target wasmtime supports.
        let size = |n: usize| n as u64;
        let limits = &self.limits;
        // A program may give a call all the fuel there is (and rely on the
        // deadline); a sidecar keeps to [`MAX_FUEL`], checked as it is read.
        within("fuel", limits.fuel, 1, u64::MAX)?;
        // Served, a call keeps to [`MAX_DEADLINE`]: a sidecar's is checked
        // as it is read, a program's by the server that serves it.
        within(
            "deadline_ms",
            limits.deadline.as_millis(),
            1,
            MAX_LOCAL_DEADLINE.as_millis(),
        )?;
        within(
            "memory_bytes",
            size(limits.memory_bytes),
            size(MIN_MEMORY_BYTES),
            size(MAX_MEMORY_BYTES),
        )?;
        within(
            "result_bytes",
            size(limits.result_bytes),
            1,
            size(MAX_RESULT_BYTES),
        )?;
        within(
            "output_bytes",
            size(limits.output_bytes),
            0,
            size(MAX_OUTPUT_BYTES),
        )?;
        within("prewarm", size(self.prewarm), 0, size(MAX_PREWARM))?;
        if let Some(concurrency) = self.concurrency {
            within("concurrency", size(concurrency), 1, size(MAX_CONCURRENCY))?;
        }
        let (rpc, http) = (&self.capabilities.rpc, &self.capabilities.http);
        within("rpc_max_depth", rpc.max_depth, 1, MAX_CALL_DEPTH)?;
        within("rpc_max_calls", rpc.max_calls, 1, MAX_CALLS)?;
        within("http_max_requests", http.max_requests, 1, MAX_HTTP_REQUESTS)?;
        within(
            "http_max_response_bytes",
            http.max_response_bytes,
            1,
            MAX_HTTP_RESPONSE_BYTES,
        )?;
        within(
            "http_timeout_ms",
            http.timeout.as_millis(),
            1,
            MAX_DEADLINE.as_millis(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_within_bounds_is_taken_whole() {
        let settings = PluginSettings::from_toml(
            "fuel = 1\ndeadline_ms = 1500000\nmemory_bytes = 65536\nresult_bytes = 1\n\
             output_bytes = 0\nprewarm = 64\nconcurrency = 65535\nlog_level = \"off\"\n\
             reuse_instances = true\nqueue_type = \"quorum\"\n",
        )
        .unwrap();
        assert_eq!(settings.queue_type, Some(QueueType::Quorum));
        assert_eq!(settings.limits.fuel, 1);
        assert_eq!(settings.limits.deadline, MAX_DEADLINE);
        assert_eq!(settings.limits.memory_bytes, MIN_MEMORY_BYTES);
        assert_eq!(settings.limits.result_bytes, 1);
        assert_eq!(settings.limits.output_bytes, 0);
        assert_eq!(settings.prewarm, MAX_PREWARM);
        assert_eq!(settings.concurrency, Some(65535));
        assert_eq!(settings.log_level, GuestLogLevel::Off);
        assert!(settings.reuse_instances);
    }

    #[test]
    fn an_empty_sidecar_gives_the_defaults_and_they_are_in_bounds() {
        assert_eq!(
            PluginSettings::from_toml("").unwrap(),
            PluginSettings::default()
        );
        PluginSettings::default().check().unwrap();
    }

    #[test]
    fn capabilities_are_granted_by_the_sidecar_only() {
        assert_eq!(
            PluginSettings::default().capabilities,
            Capabilities::default()
        );
        let env = |var: &str| (var == "CALLME_SECRET_RELAY_TOKEN").then(|| "s3cret".to_string());
        let settings = PluginSettings::from_toml_with_env(
            "rpc = [\"calc\", \"billing\"]\nrpc_max_depth = 3\nrpc_max_calls = 12\n\
             [config]\ngreeting = \"hi\"\ntoken = \"${CALLME_SECRET_RELAY_TOKEN}\"\n",
            env,
        )
        .unwrap();
        let caps = &settings.capabilities;
        assert!(caps.rpc.allows("calc") && caps.rpc.allows("billing") && !caps.rpc.allows("x"));
        assert_eq!(caps.rpc.max_depth, 3);
        assert_eq!(caps.rpc.max_calls, 12);
        assert_eq!(caps.config.get("greeting").unwrap().value(), "hi");
        assert_eq!(caps.config.get("token").unwrap().value(), "s3cret");
        assert!(!format!("{settings:?}").contains("s3cret"));

        let e = PluginSettings::from_toml_with_env(
            "[config]\nkey = \"${CALLME_SECRET_UNSET}\"",
            |_| None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`key`"), "{e}");
        let settings = PluginSettings::from_toml(
            "allowed_hosts = [\"API.example.com:443\", \"127.0.0.1:8080\"]\n\
             http_max_response_bytes = 4096\nhttp_timeout_ms = 250\nhttp_max_requests = 5\n",
        )
        .unwrap();
        let http = &settings.capabilities.http;
        assert!(http.allows("api.example.com", 443) && http.allows("127.0.0.1", 8080));
        assert!(!http.allows("api.example.com", 80));
        assert_eq!(http.max_response_bytes, 4096);
        assert_eq!(http.timeout, Duration::from_millis(250));
        assert_eq!(http.max_requests, 5);
        let defaults = PluginSettings::default().capabilities;
        assert_eq!(defaults.rpc.max_calls, DEFAULT_MAX_CALLS);
        assert_eq!(defaults.http.max_requests, DEFAULT_HTTP_MAX_REQUESTS);
        assert!(!PluginSettings::default().capabilities.http.is_granted());
        for text in [
            "allowed_hosts = [\"api.example.com\"]",
            "allowed_hosts = [\"https://api.example.com:443\"]",
            "http_max_response_bytes = 0",
            "http_max_response_bytes = 4294967297",
            "http_timeout_ms = 0",
            "http_timeout_ms = 1500001",
            "rpc = [\"not an id\"]",
            "rpc_max_depth = 0",
            "rpc_max_depth = 65",
            "rpc_max_calls = 0",
            "rpc_max_calls = 100001",
            "http_max_requests = 0",
            "http_max_requests = 100001",
            "[config]\nn = 1",
            "[config.nested]\nx = \"y\"",
        ] {
            assert!(PluginSettings::from_toml(text).is_err(), "{text}");
        }
    }

    #[test]
    fn nonsense_numbers_are_refused_by_name() {
        for (text, key) in [
            ("concurrency = 0", "concurrency"),
            ("concurrency = 70000", "concurrency"),
            ("fuel = 0", "fuel"),
            ("fuel = 9223372036854775807", "fuel"),
            ("fuel = 18446744073709551615", "fuel"),
            ("deadline_ms = 0", "deadline_ms"),
            ("deadline_ms = 1500001", "deadline_ms"),
            // Would overflow the call's deadline instant.
            ("deadline_ms = 18446744073709551615", "deadline_ms"),
            ("memory_bytes = 0", "memory_bytes"),
            ("memory_bytes = 65535", "memory_bytes"),
            ("memory_bytes = 4294967297", "memory_bytes"),
            ("result_bytes = 0", "result_bytes"),
            ("result_bytes = 536870913", "result_bytes"),
            ("output_bytes = 1048577", "output_bytes"),
            ("prewarm = 1000000", "prewarm"),
        ] {
            let e = PluginSettings::from_toml(text).unwrap_err();
            assert!(
                matches!(e, SettingsError::OutOfRange { key: k, .. } if k == key),
                "{text}: {e}"
            );
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        // Values TOML or the field's type cannot hold fail while parsing.
        for text in [
            "fuel = -1",
            "fuel = 18446744073709551616",
            "concurrency = -3",
            "concurrency = \"8\"",
            "feul = 5",
            // The struct's field name, not a sidecar key.
            "deadline = 5",
        ] {
            assert!(
                matches!(PluginSettings::from_toml(text), Err(SettingsError::Toml(_))),
                "{text}"
            );
        }
    }
}
