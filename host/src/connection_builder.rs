//! AMQP connections from URIs: plain, TLS with a custom CA, and mutual TLS with EXTERNAL auth.
//!
//! Proxy and server connect the same way. Credentials live only in the
//! URI; every log line and error shows [`redact_uri`] of it instead.

use std::path::PathBuf;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use lapin::{Connection, ConnectionProperties};

use crate::Error;

/// The broker callme talks to when nothing else is configured.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";

/// How to reach the broker.
#[derive(Clone)]
pub struct ConnectOptions {
    /// `amqp://user:pass@host:port/vhost` or `amqps://...`.
    pub uri: String,
    /// PEM file of the CA that signed the broker's certificate (TLS).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; with it, authentication is
    /// EXTERNAL unless the URI names another mechanism.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Proxies and servers reconnect by themselves when the connection is
    /// lost, with backoff, re-declaring their exchanges, queues and
    /// consumers (on by default). Off, a lost connection is final.
    pub auto_recover: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            uri: DEFAULT_AMQP_URL.to_string(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            auto_recover: true,
        }
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("uri", &redact_uri(&self.uri))
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

impl ConnectOptions {
    /// Options for `uri` with no TLS files.
    pub fn new(uri: impl Into<String>) -> Self {
        ConnectOptions {
            uri: uri.into(),
            ..ConnectOptions::default()
        }
    }

    /// The URI with its password hidden, for logs.
    pub fn redacted(&self) -> String {
        redact_uri(&self.uri)
    }

    pub(crate) fn parse(&self) -> Result<AMQPUri, Error> {
        let mut uri: AMQPUri = self.uri.parse().map_err(|e: String| {
            // The parser's message can quote the input: never let the
            // password through.
            let _ = e;
            Error::Config(format!("invalid AMQP URI {}", self.redacted()))
        })?;
        if self.cert_file.is_some() && uri.query.auth_mechanism.is_none() {
            uri.query.auth_mechanism = Some(SASLMechanism::External);
        }
        Ok(uri)
    }

    /// The user name the broker will see (for naming the proxy's exchange).
    pub(crate) fn user(&self, uri: &AMQPUri) -> String {
        let name = &uri.authority.userinfo.username;
        if name.is_empty() {
            "external".into()
        } else {
            name.clone()
        }
    }

    fn tls(&self, uri: &AMQPUri) -> Result<OwnedTLSConfig, Error> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))
        };
        let cert_chain = match &self.ca_file {
            Some(p) => Some(
                String::from_utf8(read(p)?)
                    .map_err(|_| Error::Config(format!("{} is not PEM text", p.display())))?,
            ),
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "a client certificate needs both a certificate and a key file".into(),
                ));
            }
        };
        if (cert_chain.is_some() || identity.is_some()) && uri.scheme != AMQPScheme::AMQPS {
            return Err(Error::Config(
                "TLS files given but the URI is not amqps://".into(),
            ));
        }
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    /// Opens one connection (which does not reconnect by itself).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a bad URI or unreadable TLS files,
    /// [`Error::AccessRefused`] when the broker refuses the login, and
    /// [`Error::Connection`] otherwise.
    pub async fn connect(&self, name: &str) -> Result<Connection, Error> {
        let uri = self.parse()?;
        let tls = self.tls(&uri)?;
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let runtime = lapin::runtime::default_runtime().map_err(Error::Connection)?;
        let connect = Connection::connect_uri_with_config(uri, props, tls, runtime);
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(classify_lapin(e)),
            Err(_) => Err(Error::Config(format!(
                "no connection to {} within {CONNECT_TIMEOUT:?}",
                self.redacted()
            ))),
        }
    }
}

/// A broker that does not answer within this time is reported as down
/// rather than left hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Maps a lapin error to ours, recognising the broker's permission refusals.
pub(crate) fn classify_lapin(e: lapin::Error) -> Error {
    let text = e.to_string();
    if text.contains("ACCESS_REFUSED") || text.contains("ACCESSREFUSED") || text.contains("403") {
        Error::AccessRefused(text)
    } else {
        Error::Connection(e)
    }
}

/// `uri` with the password replaced by `***`.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_uri("amqp://guest:s3cret@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(redact_uri("amqps://host/%2f"), "amqps://host/%2f");
        assert_eq!(redact_uri("amqp://u:p@ss@h"), "amqp://u:***@h");
        let opts = ConnectOptions::new("amqp://bob:hunter2@h:1/v");
        assert!(!format!("{opts:?}").contains("hunter2"));
    }

    #[test]
    fn bad_uri_error_hides_password() {
        let opts = ConnectOptions::new("amqp://bob:hunter2@h:notaport/v");
        let e = opts.parse().unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
