//! Per-call limits of a plugin, with the defaults every plugin starts from and the bounds a sidecar must keep to.
//!
//! Each call of a plugin function gets its own fuel, deadline and memory
//! cap: a runaway call ends by its limits without touching any other call.
//! A sidecar `NAME.toml` is parsed and checked as a whole by
//! [`Limits::from_toml`], so settings are either all valid or not applied
//! at all.

use std::time::Duration;

use serde::Deserialize;

/// Fuel is spent per WebAssembly instruction (roughly one unit each).
/// Measured on the 2-core development machine (`callme invoke --fuel N
/// hostile.wasm spin`), a guest in a tight loop burns about 5e9 units a
/// second, so this default stops a runaway in about a second, while naive
/// `fib(35)` (about 0.45e9 units, 0.25 s) stays well inside it.
pub const DEFAULT_FUEL: u64 = 5_000_000_000;

/// Wall-clock time a call may take, including time the guest spends
/// blocked in WASI calls (sleeping, polling) where fuel is not spent.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Linear memory a single call may grow to: enough for ordinary guests,
/// including interpreters, while a memory bomb stops early.
pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;

/// Largest JSON result a call may return. A bigger result is refused with
/// `MemoryLimit` rather than pushed through the broker.
pub const DEFAULT_RESULT_BYTES: usize = 16 << 20;

/// Guest stdout and stderr kept per call and stream for the log; the rest
/// is dropped (the guest is not told, so printing never fails).
pub const DEFAULT_OUTPUT_BYTES: usize = 64 << 10;

/// Spare instances a served plugin keeps by default: enough to answer a
/// small burst without waiting for instantiation, while holding few pool
/// slots and little memory.
pub const DEFAULT_PREWARM: usize = 2;

/// Most fuel a sidecar may give a call: about 5.5 hours of CPU at the
/// measured 5e9 units a second, more than a call can burn within
/// [`MAX_DEADLINE`] even on a machine ten times faster. To rely on the
/// deadline alone, set this.
pub(crate) const MAX_FUEL: u64 = 100_000_000_000_000;

/// Longest deadline a sidecar may set. The server acks a request once it
/// is answered, and RabbitMQ closes the channel of a consumer that holds a
/// delivery unacked longer than its `consumer_timeout` (30 minutes by
/// default): a longer call could never be answered.
pub(crate) const MAX_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Smallest memory cap: one WebAssembly page. Below it no guest with a
/// linear memory can even be instantiated.
pub(crate) const MIN_MEMORY_BYTES: usize = 64 << 10;

/// Largest memory cap: the whole address space of a 32-bit linear memory.
/// The runtime's own maximum (`RuntimeConfig::max_memory_bytes`, 1 GiB by
/// default) is checked when the plugin is loaded.
pub(crate) const MAX_MEMORY_BYTES: usize = 4 << 30;

/// Largest result cap: RabbitMQ refuses messages over 512 MiB whatever its
/// `max_message_size`, so a bigger result could never be delivered.
pub(crate) const MAX_RESULT_BYTES: usize = 512 << 20;

/// Largest capture of stdout/stderr per stream: it is held in memory for
/// every call in flight, while only its first 4 KiB reach the log and its
/// last lines a trap message.
pub(crate) const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Most spare instances per plugin: each holds a slot of the instance
/// pool that every plugin's calls share, and one plugin asking for more
/// is a typo, not a setting.
pub(crate) const MAX_PREWARM: usize = 64;

/// Most calls in flight per plugin: the AMQP prefetch count that carries
/// it is a 16-bit number.
pub(crate) const MAX_CONCURRENCY: usize = u16::MAX as usize;

/// Why a sidecar's settings were refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SettingsError {
    /// Not TOML, a key that does not exist, or a value of the wrong type.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
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

/// The limits of each call of one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Fuel per call.
    pub fuel: u64,
    /// Wall-clock deadline per call.
    #[serde(with = "millis", rename = "deadline_ms")]
    pub deadline: Duration,
    /// Linear memory cap per call, in bytes.
    pub memory_bytes: usize,
    /// Result size cap, in bytes of JSON.
    pub result_bytes: usize,
    /// Captured stdout/stderr per stream, in bytes.
    pub output_bytes: usize,
    /// Keep instances between calls instead of a fresh sandbox per call.
    /// Faster for big guests (interpreters), but state a guest keeps in
    /// memory is seen by the next call it serves; an instance is
    /// discarded after any error. Off by default.
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

impl Limits {
    /// Parses a sidecar and checks every value, so that settings are
    /// applied whole or not at all.
    ///
    /// # Errors
    ///
    /// [`SettingsError::Toml`] for text that is not TOML, an unknown key
    /// or a value of the wrong type (a negative number, or one over 64
    /// bits); [`SettingsError::OutOfRange`] for the first
    /// number outside its bounds (see the `MAX_*` and `MIN_*` constants).
    pub(crate) fn from_toml(text: &str) -> Result<Limits, SettingsError> {
        let limits: Limits = toml::from_str(text)?;
        limits.check()?;
        Ok(limits)
    }

    /// Checks every numeric setting against its bounds.
    fn check(&self) -> Result<(), SettingsError> {
        fn within<T: Into<u128>>(
            key: &'static str,
            value: T,
            min: T,
            max: T,
        ) -> Result<(), SettingsError> {
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
        // usize is at most 64 bits on every target wasmtime supports.
        let size = |n: usize| n as u64;
        within("fuel", self.fuel, 1, MAX_FUEL)?;
        within(
            "deadline_ms",
            self.deadline.as_millis(),
            1,
            MAX_DEADLINE.as_millis(),
        )?;
        within(
            "memory_bytes",
            size(self.memory_bytes),
            size(MIN_MEMORY_BYTES),
            size(MAX_MEMORY_BYTES),
        )?;
        within(
            "result_bytes",
            size(self.result_bytes),
            1,
            size(MAX_RESULT_BYTES),
        )?;
        within(
            "output_bytes",
            size(self.output_bytes),
            0,
            size(MAX_OUTPUT_BYTES),
        )?;
        within("prewarm", size(self.prewarm), 0, size(MAX_PREWARM))?;
        if let Some(concurrency) = self.concurrency {
            within("concurrency", size(concurrency), 1, size(MAX_CONCURRENCY))?;
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: DEFAULT_FUEL,
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            result_bytes: DEFAULT_RESULT_BYTES,
            output_bytes: DEFAULT_OUTPUT_BYTES,
            reuse_instances: false,
            prewarm: DEFAULT_PREWARM,
            concurrency: None,
            log_level: GuestLogLevel::Trace,
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_within_bounds_is_taken_whole() {
        let limits = Limits::from_toml(
            "fuel = 1\ndeadline_ms = 1800000\nmemory_bytes = 65536\nresult_bytes = 1\n\
             output_bytes = 0\nprewarm = 64\nconcurrency = 65535\nlog_level = \"off\"\n",
        )
        .unwrap();
        assert_eq!(limits.fuel, 1);
        assert_eq!(limits.deadline, MAX_DEADLINE);
        assert_eq!(limits.concurrency, Some(65535));
        assert_eq!(Limits::from_toml("").unwrap(), Limits::default());
        Limits::default().check().unwrap();
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
            ("deadline_ms = 1800001", "deadline_ms"),
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
            let e = Limits::from_toml(text).unwrap_err();
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
        ] {
            assert!(
                matches!(Limits::from_toml(text), Err(SettingsError::Toml(_))),
                "{text}"
            );
        }
    }
}
