//! AMQP connections from URIs: plain, TLS with a custom CA, and mutual TLS with EXTERNAL auth.
//!
//! Proxy and server connect the same way. Credentials live only in the
//! URI; every log line and error shows [`redact_uri`] of it instead, and
//! an error about a URI that does not parse shows nothing of it.

use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::tcp::{AsyncTcpStream, RustlsConnector, RustlsConnectorConfig};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use lapin::{Connection, ConnectionProperties};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// The broker callme talks to when nothing else is configured.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";

/// How to reach the broker.
#[derive(Clone)]
pub struct ConnectOptions {
    /// `amqp://user:pass@host:port/vhost` or `amqps://...`.
    pub uri: String,
    /// PEM file of the CA(s) that signed the broker's certificate (TLS):
    /// the only roots trusted when given; without it, the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; with it, authentication is
    /// EXTERNAL unless the URI names another mechanism.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Proxies and servers reconnect by themselves when the connection is
    /// lost, with backoff, re-declaring their exchanges, queues and
    /// consumers (on by default). Off, a lost connection is final; a
    /// server's connection for its plugins' calls out still reconnects
    /// (the server serves on without it), and closes with the server's.
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

    /// The URI(s) with passwords hidden, for logs.
    pub fn redacted(&self) -> String {
        self.entries()
            .iter()
            .map(|u| redact_uri(u))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether any of the URI(s) holds a password (or anything that
    /// [`ConnectOptions::redacted`] would hide).
    pub fn has_password(&self) -> bool {
        self.entries().iter().any(|u| redact_uri(u) != *u)
    }

    /// Broker `i` of the list (counted from 0, wrapping), passwords
    /// masked: the node a connection was made to or lost.
    pub(crate) fn redacted_node(&self, i: usize) -> String {
        let entries = self.entries();
        redact_uri(entries[i % entries.len()])
    }

    /// The broker URIs: `uri` may list several nodes of one cluster,
    /// separated by commas. A comma may also be part of a password (RFC
    /// 3986 allows it unescaped in the user information), so a comma ends
    /// an entry only past its `@`, or where what follows is a URI of its
    /// own (`amqp://` or `amqps://`): split inside a password, its first
    /// part would be read as a host name, and shown in the log. An `@` in
    /// a password is `%40`, as RFC 3986 has it, so an entry's `@` is the
    /// one before its host.
    fn entries(&self) -> Vec<&str> {
        let uri = self.uri.as_str();
        let mut entries = Vec::new();
        let mut start = 0;
        for (comma, _) in uri.match_indices(',') {
            if uri[start..comma].contains('@') || starts_a_uri(&uri[comma + 1..]) {
                entries.push(&uri[start..comma]);
                start = comma + 1;
            }
        }
        entries.push(&uri[start..]);
        let entries: Vec<&str> = entries
            .into_iter()
            .map(|u| u.trim().trim_end_matches(',').trim_end())
            .filter(|u| !u.is_empty())
            .collect();
        if entries.is_empty() {
            vec![self.uri.as_str()]
        } else {
            entries
        }
    }

    /// The first broker URI, parsed (every one is checked).
    pub(crate) fn parse(&self) -> Result<AMQPUri, Error> {
        let mut all = self.parse_all()?;
        Ok(all.swap_remove(0))
    }

    /// Every broker URI, parsed.
    pub(crate) fn parse_all(&self) -> Result<Vec<AMQPUri>, Error> {
        let entries = self.entries();
        let count = entries.len();
        entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                // Neither the URI nor the parser's message (which can quote
                // it) is shown: a URI that does not parse has no reliable
                // place where its password starts and ends.
                let which = if count > 1 {
                    format!(" (entry {} of {count})", i + 1)
                } else {
                    String::new()
                };
                let mut uri: AMQPUri = entry.parse().map_err(|e: String| {
                    Error::Config(format!(
                        "invalid AMQP URI{which}: {} (expected amqp://user:password@host:port/vhost or amqps://...)",
                        uri_problem(&e)
                    ))
                })?;
                // What amq-protocol-uri 10.6 does not read of the URI, read
                // from the same parse (it parses with the same crate, so
                // this one succeeds too).
                if let Ok(url) = url::Url::parse(entry) {
                    if let Some(mechanism) = read_query(entry, &url).map_err(|problem| {
                        Error::Config(format!("invalid AMQP URI{which}: {problem}"))
                    })? {
                        uri.query.auth_mechanism = Some(mechanism);
                    }
                    // It takes the host of an IPv6 literal
                    // (`amqp://u:p@[2001:db8::5]/`) for no host and puts its
                    // default, `localhost`, in its place: the credentials
                    // would go to whatever listens on this machine.
                    if let Some(url::Host::Ipv6(ip)) = url.host() {
                        uri.authority.host = ip.to_string();
                    }
                }
                if self.cert_file.is_some() && uri.query.auth_mechanism.is_none() {
                    uri.query.auth_mechanism = Some(SASLMechanism::External);
                }
                // The parser fills in `guest` for a URI naming no user; an
                // EXTERNAL login sends no user name, and the broker takes
                // it from the certificate, so none is what it is.
                if uri.query.auth_mechanism == Some(SASLMechanism::External)
                    && !names_a_user(entry)
                {
                    uri.authority.userinfo.username.clear();
                }
                Ok(uri)
            })
            .collect()
    }

    /// The user name the proxy's reply exchange and queue are named
    /// after: the URI's, or `external` for an EXTERNAL login whose URI
    /// names none (write the user the broker maps the certificate to in
    /// the URI, `amqps://USER@host/vhost`, to have the names carry it).
    pub(crate) fn user(&self, uri: &AMQPUri) -> String {
        let name = &uri.authority.userinfo.username;
        if name.is_empty() {
            "external".into()
        } else {
            name.clone()
        }
    }

    /// The TLS connector for `uri` (`None` for `amqp://`). With a CA file,
    /// its certificates are the only roots trusted, as with `curl
    /// --cacert` or Python's `cafile`; without, the system's.
    fn tls(&self, uri: &AMQPUri) -> Result<Option<RustlsConnector>, Error> {
        let files = self.tls_files(uri)?;
        if uri.scheme != AMQPScheme::AMQPS {
            return Ok(None);
        }
        let config = match files.roots {
            Some(roots) => RustlsConnectorConfig::default().with_parsable_certificates(roots),
            None => RustlsConnectorConfig::new_with_platform_verifier(),
        };
        // The files are named (as given), never quoted.
        let shown = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        };
        let connector = match files.identity {
            Some((chain, key)) => config.connector_with_single_cert(chain, key).map_err(|e| {
                format!(
                    "the client certificate {} and the key {} cannot be used together \
                     (is the key the certificate's own?): {e}",
                    shown(&self.cert_file),
                    shown(&self.key_file)
                )
            }),
            None => config
                .connector_with_no_client_auth()
                .map_err(|e| format!("the TLS settings cannot be used: {e}")),
        };
        connector.map(Some).map_err(|e| {
            Error::Config(match &self.ca_file {
                Some(ca) => format!("{e} (CA file {})", ca.display()),
                None => e,
            })
        })
    }

    /// The TLS files, read as the TLS library will read them.
    fn tls_files(&self, uri: &AMQPUri) -> Result<TlsFiles, Error> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))
        };
        // A file without what it is named for would be passed over without
        // a word (a CA file of no certificate leaves nothing to trust), and
        // one the TLS library cannot read fails each connect: read here,
        // and refused naming the file (never quoting it: a key file's text
        // is the key).
        let certificates = |p: &PathBuf| {
            let bytes = read(p)?;
            let found = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| Error::Config(format!("{} is not valid PEM", p.display())))?;
            if found.is_empty() {
                return Err(Error::Config(format!(
                    "{} holds no certificate in PEM form",
                    p.display()
                )));
            }
            Ok(found)
        };
        let private_key = |p: &PathBuf| {
            let bytes = read(p)?;
            match PrivateKeyDer::from_pem_slice(&bytes) {
                Ok(key) => Ok(key),
                Err(pem::Error::NoItemsFound) => {
                    let encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----";
                    Err(Error::Config(
                        if bytes.windows(encrypted.len()).any(|w| w == encrypted) {
                            format!(
                                "{} holds an encrypted private key, which callme cannot read: give it unencrypted (openssl pkey -in KEY -out KEY.plain)",
                                p.display()
                            )
                        } else {
                            format!("{} holds no private key in PEM form", p.display())
                        },
                    ))
                }
                Err(_) => Err(Error::Config(format!("{} is not valid PEM", p.display()))),
            }
        };
        let roots = self.ca_file.as_ref().map(certificates).transpose()?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((certificates(cert)?, private_key(key)?)),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "a client certificate needs both a certificate and a key file".into(),
                ));
            }
        };
        if (roots.is_some() || identity.is_some()) && uri.scheme != AMQPScheme::AMQPS {
            return Err(Error::Config(
                "TLS files given but the URI is not amqps://".into(),
            ));
        }
        Ok(TlsFiles { roots, identity })
    }

    /// Opens one connection (which does not reconnect by itself).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a bad URI or unreadable TLS files,
    /// [`Error::AccessRefused`] when the broker refuses the login,
    /// [`Error::ConnectTimeout`] when the handshake does not complete in
    /// time, [`Error::NotAmqp`] when the peer is not an AMQP broker, and
    /// [`Error::Connection`] otherwise.
    pub async fn connect(&self, name: &str) -> Result<Connection, Error> {
        self.connect_from(name, 0).await.map(|(conn, _)| conn)
    }

    /// Connects to the first broker that answers, trying them in turn
    /// from the one at `start` (round robin over the list); the
    /// connection and the index of the broker that answered. The error is
    /// the first refusal ([`Error::AccessRefused`], or an
    /// [`Error::Config`] of one entry), else the last broker's.
    ///
    /// A broker that refuses the login does not end the round: another
    /// node of the list may take it (this one's authentication backend
    /// is down, or the entry names another broker), and a link that
    /// lost its node starts each round at the next one, so ending there
    /// would keep it from ever reaching the rest.
    pub(crate) async fn connect_from(
        &self,
        name: &str,
        start: usize,
    ) -> Result<(Connection, usize), Error> {
        let uris = self.parse_all()?;
        let entries = self.entries();
        let mut refused = None;
        let mut last = None;
        for k in 0..uris.len() {
            let i = (start + k) % uris.len();
            match self.connect_one(name, uris[i].clone(), entries[i]).await {
                Ok(conn) => return Ok((conn, i)),
                // Waiting cannot cure these; another broker may.
                Err(e @ (Error::Config(_) | Error::AccessRefused(_))) => {
                    refused.get_or_insert(e);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(refused.or(last).unwrap_or(Error::BrokerLost))
    }

    async fn connect_one(
        &self,
        name: &str,
        uri: AMQPUri,
        entry: &str,
    ) -> Result<Connection, Error> {
        let tls = self.tls(&uri)?;
        let limit = handshake_limit(&uri);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let runtime = lapin::runtime::default_runtime().map_err(Error::Connection)?;
        let socket = Handshake::default();
        let opening = socket.clone();
        let connect = Connection::connector(
            uri,
            runtime,
            async move |uri: AMQPUri, runtime| {
                let addresses =
                    runtime.to_socket_addrs((uri.authority.host.clone(), uri.authority.port));
                let stream = AsyncTcpStream::connect(&runtime, addresses).await?;
                if let AsyncTcpStream::Plain(plain) = &stream {
                    opening.hold(plain.get_ref().as_fd().try_clone_to_owned()?)?;
                }
                Ok(match uri.scheme {
                    AMQPScheme::AMQP => stream,
                    AMQPScheme::AMQPS => match &tls {
                        Some(connector) => {
                            stream.into_rustls(connector, &uri.authority.host).await?
                        }
                        None => {
                            return Err(
                                std::io::Error::other("no TLS connector for amqps://").into()
                            );
                        }
                    },
                })
            },
            props,
        );
        // Given up if this future is dropped before the handshake ends
        // (the caller's own timeout, a host stopping), not only on its
        // limit here.
        let attempt = Attempt(Some(socket));
        let connected = tokio::time::timeout(limit, connect).await;
        attempt.end(matches!(connected, Ok(Ok(_))));
        match connected {
            Ok(Ok(conn)) => Ok(conn),
            // Bytes that do not parse as AMQP frames: the peer speaks
            // another protocol, and the parser's own message says nothing
            // a user can act on.
            Ok(Err(e)) if matches!(e.kind(), lapin::ErrorKind::ParsingError(_)) => {
                Err(Error::NotAmqp {
                    broker: redact_uri(entry),
                    source: e,
                })
            }
            Ok(Err(e)) => Err(classify_lapin(e)),
            Err(_) => Err(Error::ConnectTimeout {
                broker: redact_uri(entry),
                timeout: limit,
            }),
        }
    }
}

/// The query parameters a broker URI may have: those of RabbitMQ's "URI
/// Query Parameters" guide that the AMQP client reads, and `auth`, the
/// Python client's (aio-pika's) spelling of `auth_mechanism`.
const QUERY_KEYS: [&str; 6] = [
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
    "auth",
];

/// Checks the query of a broker URI (`entry`, parsed as `url`): a parameter nothing reads (a
/// misspelling, or the guide's `cacertfile`, which would leave TLS to the
/// system's roots) is refused rather than passed over. The mechanism an
/// `auth` parameter names, if any.
fn read_query(entry: &str, url: &url::Url) -> Result<Option<SASLMechanism>, String> {
    let mut mechanism = None;
    for (key, value) in url.query_pairs() {
        if !QUERY_KEYS.contains(&&*key) {
            // A password holding an unencoded `?` ends the authority early
            // and the rest of it is read as the query: a key is named only
            // when it cannot be that (no `@` after the `?`, a plain word).
            let from_password = entry.split_once('?').is_some_and(|(_, q)| q.contains('@'));
            let plain = (1..=32).contains(&key.len())
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            let named = if plain && !from_password {
                format!("`{key}`")
            } else {
                "that is not one of them".to_string()
            };
            return Err(format!(
                "unknown query parameter {named} (callme reads {}; TLS files are given by --ca-file, --cert-file and --key-file)",
                QUERY_KEYS.join(", ")
            ));
        }
        if key == "auth" {
            mechanism = Some(
                value
                    .parse()
                    .map_err(|_| "unknown auth mechanism in `auth`".to_string())?,
            );
        }
    }
    Ok(mechanism)
}

/// TLS files as read: the CA's certificates and the client's identity.
struct TlsFiles {
    roots: Option<Vec<CertificateDer<'static>>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

/// The socket of a connection being opened, so that a handshake given up
/// ends there too. lapin runs a connection on a thread of its own from
/// the start, and dropping the future of a connection not yet open leaves
/// that thread and its socket waiting for the broker for good (lapin
/// 4.12): a broker that accepts connections and never answers cost the
/// host a thread and a descriptor at each attempt. The thread ends on the
/// end of its socket, so the socket is shut down.
#[derive(Clone, Default)]
struct Handshake(Arc<Mutex<(bool, Option<std::net::TcpStream>)>>);

impl Handshake {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, Option<std::net::TcpStream>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a duplicate of the socket being opened; refused, and shut
    /// down, once the handshake is given up.
    fn hold(&self, socket: OwnedFd) -> std::io::Result<()> {
        let socket = std::net::TcpStream::from(socket);
        let mut state = self.lock();
        if state.0 {
            let _ = socket.shutdown(Shutdown::Both);
            return Err(std::io::Error::other("the connection was given up"));
        }
        state.1 = Some(socket);
        Ok(())
    }

    /// The handshake ended well: the connection owns its socket.
    fn forget(&self) {
        self.lock().1 = None;
    }

    /// The handshake is given up: its socket, and any made later, shut
    /// down.
    fn give_up(&self) {
        let mut state = self.lock();
        state.0 = true;
        if let Some(socket) = state.1.take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// A [`Handshake`] under way: given up when dropped before it ends.
struct Attempt(Option<Handshake>);

impl Attempt {
    /// The handshake ended: the connection keeps its socket if `opened`.
    fn end(mut self, opened: bool) {
        if let Some(socket) = self.0.take() {
            if opened {
                socket.forget();
            } else {
                socket.give_up();
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(socket) = self.0.take() {
            socket.give_up();
        }
    }
}

/// A broker that does not answer within this time is reported as down
/// rather than left hanging, unless its URI says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The time the AMQP handshake with `uri`'s broker is given: the URI's
/// `connection_timeout` query parameter, in milliseconds, as RabbitMQ's
/// "URI Query Parameters" guide defines it; else [`CONNECT_TIMEOUT`].
/// lapin parses the parameter but does not apply it.
fn handshake_limit(uri: &AMQPUri) -> Duration {
    uri.query
        .connection_timeout
        .filter(|&ms| ms > 0)
        .map_or(CONNECT_TIMEOUT, Duration::from_millis)
}

/// Whether the broker answered `NOT_FOUND` (404): an exchange or queue
/// that does not exist.
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// Maps a lapin error to ours, recognising the broker's permission
/// refusals by their reply code: 403 `ACCESS_REFUSED`, as a channel error
/// (no permission on a resource) or a connection error (a refused login),
/// and 530 `NOT_ALLOWED` (a virtual host the user may not open).
pub(crate) fn classify_lapin(e: lapin::Error) -> Error {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let refused = match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => true,
            // Also how RabbitMQ refuses a connection over a user's or a
            // virtual host's connection limit ("... connection limit (N)
            // is reached", `rabbit_reader`, 3.x and 4.x), which ends as
            // soon as another connection does: not a refusal to give up on.
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                !amqp.get_message().as_str().contains("connection limit")
            }
            _ => false,
        },
        _ => false,
    };
    if refused {
        Error::AccessRefused(e.to_string())
    } else {
        Error::Connection(e)
    }
}

/// Whether `text` (after any spaces) begins with an AMQP URI's scheme.
fn starts_a_uri(text: &str) -> bool {
    let text = text.trim_start().as_bytes();
    [&b"amqp://"[..], b"amqps://"].iter().any(|scheme| {
        text.get(..scheme.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(scheme))
    })
}

/// `uri` with the password replaced by `***`, for logs and errors.
///
/// Everything before the last `@` is taken as user info, whether or not
/// the URI is well formed: a password may hold `/`, `?`, `#` or `@`, and a
/// URI with a typo (`amqp//user:pass@host`) still carries a password. The
/// user name is kept only when it is plainly one; otherwise the whole user
/// info is hidden.
pub fn redact_uri(uri: &str) -> String {
    let (scheme, rest) = match uri.split_once("://") {
        Some((scheme, rest)) if is_scheme(scheme) => (format!("{scheme}://"), rest),
        _ => (String::new(), uri),
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return uri.to_string();
    };
    let plain_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~%!$&'()*+,;=".contains(c))
    };
    match userinfo.split_once(':') {
        Some((user, _)) if plain_name(user) => format!("{scheme}{user}:***@{host}"),
        None if plain_name(userinfo) => uri.to_string(),
        _ => format!("{scheme}***@{host}"),
    }
}

/// Whether `s` is a URI scheme (RFC 3986: a letter, then letters, digits,
/// `+`, `-` or `.`).
fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// What is wrong with a URI, from the parser's message, in words that
/// cannot quote the URI. Messages that can quote it (`Invalid URL: '...'`,
/// a scheme or an auth mechanism) are replaced; the rest come from a
/// fixed set of texts.
fn uri_problem(parser_message: &str) -> &'static str {
    const FIXED: [(&str, &str); 9] = [
        ("relative URL without a base", "it has no scheme"),
        ("Invalid URL", "the scheme is not followed by //"),
        ("Invalid AMQP scheme", "the scheme is not amqp or amqps"),
        ("Invalid SASL mechanism", "unknown auth_mechanism"),
        (
            "invalid port number",
            "the port is not a number up to 65535",
        ),
        ("empty host", "no host"),
        ("invalid IPv4 address", "invalid IPv4 address"),
        ("invalid IPv6 address", "invalid IPv6 address"),
        ("invalid domain character", "invalid character in the host"),
    ];
    FIXED
        .iter()
        .find(|(prefix, _)| parser_message.starts_with(prefix))
        .map_or("malformed", |(_, problem)| problem)
}

/// Whether the URI `entry` has user information (`user@`, `user:pw@`)
/// in its authority.
fn names_a_user(entry: &str) -> bool {
    let rest = entry.split_once("://").map_or(entry, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_external_login_is_named_by_its_uri_or_external() {
        let user = |uri: &str, cert: bool| {
            let options = ConnectOptions {
                cert_file: cert.then(|| PathBuf::from("client.pem")),
                ..ConnectOptions::new(uri)
            };
            options.user(&options.parse().unwrap())
        };
        assert_eq!(user("amqps://broker/%2f", true), "external");
        assert_eq!(user("amqps://broker:5671", true), "external");
        assert_eq!(user("amqps://callme-tls@broker/%2f", true), "callme-tls");
        assert_eq!(user("amqps://ann:pw@broker/%2f?auth=plain", true), "ann");
        // A PLAIN login naming no user is the parser's `guest`, as the
        // broker sees it.
        assert_eq!(user("amqp://broker/%2f", false), "guest");
        assert_eq!(user("amqp://broker/a@b", false), "guest");
        assert_eq!(user("amqps://broker/a@b", true), "external");
    }

    #[test]
    fn a_password_is_found_in_any_uri_of_a_list_and_only_there() {
        let has = |uri: &str| ConnectOptions::new(uri).has_password();
        assert!(!has("amqp://h1/%2f, amqp://h2/%2f"));
        assert!(!has("amqp://ann@h1/%2f"));
        assert!(has("amqp://h1/%2f, amqp://ann:pw@h2/%2f"));
        assert!(has("amqp://ann:pw@h1/%2f"));
    }

    #[test]
    fn the_uri_may_set_the_handshake_limit() {
        let limit = |uri: &str| handshake_limit(&uri.parse::<AMQPUri>().unwrap());
        assert_eq!(limit("amqp://h/%2f"), CONNECT_TIMEOUT);
        assert_eq!(
            limit("amqp://h/%2f?connection_timeout=2500"),
            Duration::from_millis(2500)
        );
        // 0 would fail every connection at once: the default instead.
        assert_eq!(limit("amqp://h/%2f?connection_timeout=0"), CONNECT_TIMEOUT);
    }

    fn broker_said(kind: lapin::protocol::AMQPErrorKind) -> lapin::Error {
        let amqp = lapin::protocol::AMQPError::new(kind, "said by the broker".into());
        lapin::ErrorKind::ProtocolError(amqp).into()
    }

    #[test]
    fn refusals_are_told_by_their_reply_code() {
        use lapin::protocol::{AMQPHardError, AMQPSoftError};
        assert!(matches!(
            classify_lapin(broker_said(AMQPSoftError::ACCESSREFUSED.into())),
            Error::AccessRefused(_)
        ));
        assert!(matches!(
            classify_lapin(broker_said(AMQPHardError::NOTALLOWED.into())),
            Error::AccessRefused(_)
        ));
        assert!(matches!(
            classify_lapin(broker_said(AMQPSoftError::NOTFOUND.into())),
            Error::Connection(_)
        ));
        // A message that merely mentions 403 is no refusal.
        let io = std::io::Error::other("port 5403 refused the connection: ACCESS_REFUSED?");
        assert!(matches!(classify_lapin(io.into()), Error::Connection(_)));
    }

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
    fn a_comma_in_a_password_is_the_passwords() {
        let opts = ConnectOptions::new("amqp://u:a,b@h1/%2f, AMQPS://v:c,,d@h2/%2f,");
        assert_eq!(
            opts.entries(),
            ["amqp://u:a,b@h1/%2f", "AMQPS://v:c,,d@h2/%2f"]
        );
        assert_eq!(opts.redacted(), "amqp://u:***@h1/%2f,AMQPS://v:***@h2/%2f");
        assert!(ConnectOptions::new("amqp://u:a,b@h").has_password());
        // Past an entry's `@`, a comma ends it, whatever follows.
        assert_eq!(
            ConnectOptions::new("amqp://u:p@h1,amqp//v:q@h2").entries(),
            ["amqp://u:p@h1", "amqp//v:q@h2"]
        );
        assert_eq!(
            ConnectOptions::new("amqp://u:a,b@h")
                .parse()
                .unwrap()
                .authority
                .host,
            "h"
        );
    }

    #[test]
    fn the_node_of_a_list_is_named_without_its_password() {
        let opts = ConnectOptions::new("amqp://u:pw1@a:1/%2f, amqp://v:pw2@b:2/%2f");
        assert_eq!(opts.redacted_node(0), "amqp://u:***@a:1/%2f");
        assert_eq!(opts.redacted_node(1), "amqp://v:***@b:2/%2f");
        assert_eq!(opts.redacted_node(2), "amqp://u:***@a:1/%2f");
    }

    #[test]
    fn malformed_uris_are_redacted() {
        for (uri, shown) in [
            ("amqp//guest:s3cret@127.0.0.1:5672", "***@127.0.0.1:5672"),
            ("amqpx://u:s3cret@h", "amqpx://u:***@h"),
            ("amqp://u:s3cret@h:notaport", "amqp://u:***@h:notaport"),
            ("amqp://u:s3/c?r#et@h/%2f", "amqp://u:***@h/%2f"),
            ("amqp://u:1/s3cret@h", "amqp://u:***@h"),
            ("amqp:/guest:s3cret@h", "amqp:***@h"),
            ("amqp//s3cret@h", "***@h"),
            ("//u/x:s3cret@h", "***@h"),
            ("amqp://u s3cret@h", "amqp://***@h"),
        ] {
            assert_eq!(redact_uri(uri), shown, "{uri}");
        }
        assert_eq!(redact_uri("amqp://bob@h/v"), "amqp://bob@h/v");
        assert_eq!(redact_uri("not a uri"), "not a uri");
    }

    #[test]
    fn tls_files_without_what_they_are_named_for_are_refused() {
        let dir = std::env::temp_dir().join(format!("callme-tls-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Some(path)
        };
        let uri: AMQPUri = "amqps://localhost/%2f".parse().unwrap();
        let options = |ca, cert_file, key_file| ConnectOptions {
            ca_file: ca,
            cert_file,
            key_file,
            ..ConnectOptions::new("amqps://localhost/%2f")
        };
        let refused = |o: ConnectOptions, what: &str| match o.tls_files(&uri) {
            Err(Error::Config(message)) => assert!(message.contains(what), "{message}"),
            other => panic!("{what}: expected a Config error, got {:?}", other.map(drop)),
        };
        refused(
            options(file("empty.pem", ""), None, None),
            "empty.pem holds no certificate",
        );
        refused(
            options(file("key-as-ca.pem", key), None, None),
            "key-as-ca.pem holds no certificate",
        );
        refused(
            options(None, file("c.pem", cert), file("no-key.pem", cert)),
            "no-key.pem holds no private key",
        );
        refused(
            options(None, file("k-as-cert.pem", key), file("k.pem", key)),
            "k-as-cert.pem holds no certificate",
        );
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIE\n-----END ENCRYPTED PRIVATE KEY-----\n";
        refused(
            options(None, file("c.pem", cert), file("enc.pem", encrypted)),
            "enc.pem holds an encrypted private key",
        );
        let damaged = "-----BEGIN PRIVATE KEY-----\nM!*I\n-----END PRIVATE KEY-----\n";
        refused(
            options(None, file("c.pem", cert), file("damaged.pem", damaged)),
            "damaged.pem is not valid PEM",
        );
        refused(
            options(
                file("cut.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n"),
                None,
                None,
            ),
            "cut.pem is not valid PEM",
        );
        // PKCS#1 and SEC1 keys are read as well as PKCS#8 ones.
        let rsa = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n";
        assert!(
            options(None, file("c.pem", cert), file("rsa.pem", rsa))
                .tls_files(&uri)
                .is_ok()
        );
        assert!(
            options(
                file("ca.pem", cert),
                file("c.pem", cert),
                file("k.pem", key)
            )
            .tls_files(&uri)
            .is_ok()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_query_parameter_nothing_reads_is_refused_and_auth_is_read() {
        for (uri, says) in [
            (
                "amqps://u:pw@h/%2f?cacertfile=/etc/ca.pem",
                "unknown query parameter `cacertfile`",
            ),
            (
                "amqp://u:pw@h/%2f?heartbeat=5&hearbeat=5",
                "unknown query parameter `hearbeat`",
            ),
            ("amqp://u:pw@h/%2f?auth=nope", "unknown auth mechanism"),
        ] {
            match ConnectOptions::new(uri).parse() {
                Err(Error::Config(message)) => {
                    assert!(message.contains(says), "{uri}: {message}");
                    assert!(!message.contains("pw"), "{uri}: {message}");
                }
                other => panic!("{uri}: expected a Config error, got {other:?}"),
            }
        }
        let uri = ConnectOptions::new("amqp://u:pw@h/%2f?auth=external&heartbeat=5")
            .parse()
            .unwrap();
        assert_eq!(uri.query.auth_mechanism, Some(SASLMechanism::External));
        assert_eq!(uri.query.heartbeat, Some(5));
        let uri =
            ConnectOptions::new("amqp://u:pw@h/%2f?auth_mechanism=plain&connection_timeout=9")
                .parse()
                .unwrap();
        assert_eq!(uri.query.auth_mechanism, Some(SASLMechanism::Plain));
    }

    #[test]
    fn an_ipv6_host_is_the_host_connected_to() {
        let uri = ConnectOptions::new("amqp://svc:pw@[2001:db8::5]:5999/%2f")
            .parse()
            .unwrap();
        assert_eq!(uri.authority.host, "2001:db8::5");
        assert_eq!(uri.authority.port, 5999);
        let uri = ConnectOptions::new("amqps://[::1]/%2f").parse().unwrap();
        assert_eq!(uri.authority.host, "::1");
        assert_eq!(uri.authority.port, 5671);
        let uri = ConnectOptions::new("amqp://svc:pw@10.0.0.7:5672/%2f")
            .parse()
            .unwrap();
        assert_eq!(uri.authority.host, "10.0.0.7");
        let uri = ConnectOptions::new("amqp://svc:pw@broker.example/%2f")
            .parse()
            .unwrap();
        assert_eq!(uri.authority.host, "broker.example");
    }

    #[test]
    fn bad_uri_error_hides_password() {
        for uri in [
            "amqp://bob:hunter2@h:notaport/v",
            "amqp//bob:hunter2@h:5672",
            "amqpx://bob:hunter2@h",
            "amqp:bob:hunter2@h",
            "amqp://bob:hunter2@h:99999/v",
            "amqp://bob:hunter2@h/v?auth_mechanism=hunter2",
            "amqp://bob:hunter2@h/v?heartbeat=hunter2",
            "amqp://bob:hunter2@[::hunter2]/v",
            "amqp://bob:?hunter2@h/v",
            "amqp://bob:123/x?hunter2@h/v",
            "amqp://bob:?x&hunter2=1@h/v",
            "hunter2",
        ] {
            let e = ConnectOptions::new(uri).parse().unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(!text.contains("hunter2"), "{uri}: {text}");
            assert!(text.contains("invalid AMQP URI"), "{uri}: {text}");
        }
    }

    #[test]
    fn bad_uri_error_says_what_is_wrong() {
        let problem = |uri: &str| ConnectOptions::new(uri).parse().unwrap_err().to_string();
        assert!(problem("amqp//u:p@h").contains("no scheme"));
        assert!(problem("http://u:p@h").contains("not amqp or amqps"));
        assert!(problem("amqp://u:p@h:99999").contains("port"));
    }
}
