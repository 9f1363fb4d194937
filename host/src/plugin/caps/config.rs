//! The `config` capability: a plugin's own settings, from the `[config]` table of its sidecar, secrets read from the host's environment.
//!
//! A value written `"${NAME}"` is a secret: it is read from the host's
//! environment variable `NAME` when the sidecar is read (so when the
//! plugin is loaded or its sidecar changes). Only variables named
//! `CALLME_SECRET_...` ([`SECRET_PREFIX`]) are plugin secrets: the rest of
//! the host's environment (its broker URLs, a cloud key) is nothing a
//! sidecar can name. A variable that is not set, or not a secret, makes
//! the sidecar invalid, the error naming the key and the variable, never
//! a value. A secret's value is kept only here and handed
//! to the guest that asks for it: `Debug` shows the variable's name in its
//! place, and nothing else prints config values.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Most keys a `[config]` table may hold: settings, not a data store.
pub(crate) const MAX_CONFIG_KEYS: usize = 256;

/// Largest value, secrets included, in bytes: every call's guest may ask
/// for it.
pub(crate) const MAX_CONFIG_VALUE_BYTES: usize = 64 << 10;

/// One value of a plugin's `[config]` table.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigValue {
    value: String,
    /// The environment variable a secret was read from.
    env: Option<String>,
}

impl ConfigValue {
    /// The value the guest gets.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether it was read from the environment (a secret).
    pub fn is_secret(&self) -> bool {
        self.env.is_some()
    }
}

impl fmt::Debug for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.env {
            Some(var) => write!(f, "<secret from ${{{var}}}>"),
            None => fmt::Debug::fmt(&self.value, f),
        }
    }
}

/// A plugin's `[config]` table, resolved. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    values: Arc<BTreeMap<String, ConfigValue>>,
}

/// Why a `[config]` table was refused. Never holds a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A `"${NAME}"` value whose variable is not set (or not UTF-8).
    #[error("config key `{key}`: the environment variable `{var}` is not set")]
    MissingEnv {
        /// The key.
        key: String,
        /// The variable named.
        var: String,
    },
    /// A value naming a variable that is not a plugin secret (not named
    /// `CALLME_SECRET_`...): the host's own settings, the broker's
    /// credentials among them, never reach a plugin.
    #[error(
        "config key `{key}`: `${{{var}}}` is not a plugin secret: plugins are given only environment variables whose names start with `{SECRET_PREFIX}`"
    )]
    NotASecret {
        /// The key.
        key: String,
        /// The variable named.
        var: String,
    },
    /// More keys than allowed (256).
    #[error("`[config]` has {count} keys: at most {MAX_CONFIG_KEYS} are allowed")]
    TooManyKeys {
        /// How many it has.
        count: usize,
    },
    /// A value longer than allowed (64 KiB).
    #[error(
        "config key `{key}`: the value has {bytes} bytes, at most {MAX_CONFIG_VALUE_BYTES} are allowed"
    )]
    TooLong {
        /// The key.
        key: String,
        /// Its value's length.
        bytes: usize,
    },
}

/// How the names of the environment variables a plugin may be given
/// start: an operator exports `CALLME_SECRET_BILLING_KEY` for a sidecar
/// naming `${CALLME_SECRET_BILLING_KEY}`, and nothing else of the host's
/// environment is within a sidecar's reach (as Spin gives its components
/// only `SPIN_VARIABLE_...` variables).
pub const SECRET_PREFIX: &str = "CALLME_SECRET_";

/// The variable a value names, if it is written `${NAME}`.
fn env_reference(raw: &str) -> Option<&str> {
    let name = raw.strip_prefix("${")?.strip_suffix('}')?;
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then_some(name)
}

impl Config {
    /// Resolves the table as written, reading each `"${NAME}"` value from
    /// the environment through `env`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for the first key whose variable is unset, or a
    /// table over its size bounds.
    pub(crate) fn resolve(
        raw: BTreeMap<String, String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        if raw.len() > MAX_CONFIG_KEYS {
            return Err(ConfigError::TooManyKeys { count: raw.len() });
        }
        let mut values = BTreeMap::new();
        for (key, written) in raw {
            let value = match env_reference(&written) {
                Some(var)
                    if var.len() <= SECRET_PREFIX.len() || !var.starts_with(SECRET_PREFIX) =>
                {
                    return Err(ConfigError::NotASecret {
                        key,
                        var: var.to_string(),
                    });
                }
                Some(var) => match env(var) {
                    Some(value) => ConfigValue {
                        value,
                        env: Some(var.to_string()),
                    },
                    None => {
                        return Err(ConfigError::MissingEnv {
                            key,
                            var: var.to_string(),
                        });
                    }
                },
                None => ConfigValue {
                    value: written,
                    env: None,
                },
            };
            if value.value.len() > MAX_CONFIG_VALUE_BYTES {
                let bytes = value.value.len();
                return Err(ConfigError::TooLong { key, bytes });
            }
            values.insert(key, value);
        }
        Ok(Config {
            values: Arc::new(values),
        })
    }

    /// A table of plain values, none of them secret.
    pub fn plain<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Config {
        let values = pairs
            .into_iter()
            .map(|(k, v)| {
                let value = ConfigValue {
                    value: v.into(),
                    env: None,
                };
                (k.into(), value)
            })
            .collect();
        Config {
            values: Arc::new(values),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&ConfigValue> {
        self.values.get(key)
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn plain_values_stay_and_references_are_read_from_the_environment() {
        let env = |var: &str| (var == "CALLME_SECRET_TOKEN").then(|| "s3cret".to_string());
        let config = Config::resolve(
            raw(&[
                ("greeting", "hi"),
                ("token", "${CALLME_SECRET_TOKEN}"),
                ("odd", "${not a var}"),
            ]),
            env,
        )
        .unwrap();
        assert_eq!(config.get("greeting").unwrap().value(), "hi");
        assert!(!config.get("greeting").unwrap().is_secret());
        assert_eq!(config.get("token").unwrap().value(), "s3cret");
        assert!(config.get("token").unwrap().is_secret());
        assert_eq!(config.get("odd").unwrap().value(), "${not a var}");
        assert!(config.get("missing").is_none());
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let config = Config::resolve(raw(&[("token", "${CALLME_SECRET_TOKEN}")]), |_| {
            Some("s3cret".to_string())
        })
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("TOKEN"), "{shown}");
    }

    #[test]
    fn a_missing_variable_names_the_key_and_variable() {
        let e =
            Config::resolve(raw(&[("api_key", "${CALLME_SECRET_NOT_SET}")]), |_| None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config key `api_key`: the environment variable `CALLME_SECRET_NOT_SET` is not set"
        );
    }

    #[test]
    fn only_variables_named_as_plugin_secrets_are_read() {
        let e = Config::resolve(raw(&[("broker", "${CALLME_AMQP_URL}")]), |_| {
            Some("amqp://callme:pw@broker".to_string())
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config key `broker`: `${CALLME_AMQP_URL}` is not a plugin secret: plugins are given only environment variables whose names start with `CALLME_SECRET_`"
        );
        let read = std::cell::Cell::new(0);
        for var in [
            "CALLME_CA_FILE",
            "CALLME_CLUSTER_URLS",
            "AWS_SECRET_ACCESS_KEY",
            "HOME",
            "callme_secret_lower",
            "CALLME_SECRET_",
            "X_CALLME_SECRET_Y",
        ] {
            let written = format!("${{{var}}}");
            let e = Config::resolve(raw(&[("x", &written)]), |_| {
                read.set(read.get() + 1);
                Some("v".into())
            });
            assert!(matches!(e, Err(ConfigError::NotASecret { .. })), "{var}");
        }
        assert_eq!(read.get(), 0, "a variable that is not a secret was read");
        let own = Config::resolve(raw(&[("x", "${CALLME_SECRET_TEST_TOKEN}")]), |_| {
            Some("v".into())
        });
        assert_eq!(own.unwrap().get("x").unwrap().value(), "v");
    }

    #[test]
    fn oversized_tables_and_values_are_refused() {
        let many: BTreeMap<_, _> = (0..=MAX_CONFIG_KEYS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(matches!(
            Config::resolve(many, |_| None),
            Err(ConfigError::TooManyKeys { .. })
        ));
        let long = "x".repeat(MAX_CONFIG_VALUE_BYTES + 1);
        let e = Config::resolve(raw(&[("big", "${CALLME_SECRET_BIG}")]), |_| {
            Some(long.clone())
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::TooLong { .. }), "{e}");
        assert!(!e.to_string().contains("xxx"));
    }
}
