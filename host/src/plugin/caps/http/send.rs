//! How an allowed request reaches its server: the name looked up under a bound per plugin, the TCP connection, TLS, and HTTP/1.1.
//!
//! Names are looked up by the system's resolver (`getaddrinfo`, as the
//! standard library does, so `/etc/hosts` and `nsswitch.conf` apply) on
//! the blocking threads of the HTTP runtime. A lookup cannot be stopped
//! once started: a request that is dropped, or runs out of time, leaves
//! its lookup running until the resolver gives up, which for a name
//! server that never answers is `timeout × attempts` of `resolv.conf`
//! (10 s by default, more with several servers). So a lookup holds a
//! permit of its plugin ([`LOOKUPS_PER_PLUGIN`]) and one of the host
//! ([`LOOKUPS_IN_ALL`]) until it returns, not until its request ends: a
//! plugin whose names resolve slowly waits for its own lookups, and the
//! other plugins' requests go on (up to 64 such plugins at once; past
//! that, lookups wait for each other). The guest's `connect-timeout`
//! bounds the wait for a lookup too (`DnsTimeout`). An IP address is
//! never looked up.
//!
//! Connections are bounded the same way: a plugin has at most
//! [`CONNECTIONS_PER_PLUGIN`] open at once, all its calls together, and
//! the host at most half the file descriptors it may open (see
//! [`connections_in_all`]); a request past either waits, within its
//! connect timeout, for one to close. So one plugin holding connections
//! open (to a server that never answers, or responses it never reads)
//! can neither starve the others of connections nor the host of the
//! descriptors its broker connection and its plugins directory need.
//! A response's head is bounded by [`MAX_HEAD_BYTES`].
//!
//! TLS is rustls with the Mozilla roots of `webpki-roots` (no client
//! certificate), the server's name checked against its certificate; the
//! configuration is made once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::http::uri::Scheme;
use hyper::http::{self, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

use super::read_count::{ReadCount, ReadWithHead};

/// Lookups one plugin may have running at once.
pub(crate) const LOOKUPS_PER_PLUGIN: usize = 4;

/// Lookups the host may have running at once, all plugins together: the
/// most threads lookups hold. Up to 64 plugins can have all theirs stalled
/// before the others' lookups wait too. The HTTP runtime has more
/// blocking threads than this.
pub(crate) const LOOKUPS_IN_ALL: usize = 256;

/// Connections one plugin may have open at once, all its calls together.
pub(crate) const CONNECTIONS_PER_PLUGIN: usize = 64;

/// hyper's read buffer, which bounds a response's head (status line and
/// headers): hyper fails a head still not whole with this much read, so
/// a head may reach twice this. The response holds it outside the
/// guest's memory as long as the guest keeps it; hyper's default is
/// about 400 KiB.
pub(crate) const MAX_HEAD_BYTES: usize = 64 << 10;

/// Connections the host may have open at once, all plugins together:
/// half the file descriptors the process may open (its soft
/// `RLIMIT_NOFILE`, which `callme serve` raises to the hard one), at
/// least 16 and at most 4,096.
pub(crate) fn connections_in_all() -> usize {
    let open_files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(open_files / 2)
        .unwrap_or(usize::MAX)
        .clamp(16, 4096)
}

/// A response, and the future that drives its connection.
pub(super) type Connected = (
    http::Response<WasiBody>,
    Pin<Box<dyn Future<Output = Result<(), HttpError>> + Send>>,
);

/// Sends `request` for `plugin`: looks up its host, connects, speaks TLS
/// for `https`, sends it, and returns once the response's head is in.
/// The guest's `connect_timeout` bounds the lookup, then the connection
/// and TLS; its `first_byte_timeout` the wait for the head; the caller
/// bounds the whole.
pub(super) async fn send(
    plugin: &Arc<str>,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<Connected, HttpError> {
    let uri = request.uri();
    let authority = uri.authority().ok_or(HttpError::HttpRequestUriInvalid)?;
    let tls = uri.scheme() == Some(&Scheme::HTTPS);
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host = authority.host().to_string();
    let forever = Duration::from_secs(600);
    let connect_timeout = options.and_then(|o| o.connect_timeout).unwrap_or(forever);
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(forever);

    let addresses = tokio::time::timeout(connect_timeout, resolve(plugin, &host, port))
        .await
        .map_err(|_| HttpError::DnsTimeout)??;
    // Taken once the name is looked up (a request waiting for a slow
    // lookup holds no socket, and must not hold the plugin's connections
    // to other hosts), held as long as the connection is open.
    let permits = tokio::time::timeout(connect_timeout, Permits::connections().acquire(plugin))
        .await
        .map_err(|_| HttpError::ConnectionLimitReached)??;
    let connecting = async {
        let stream = TcpStream::connect(&addresses[..])
            .await
            .map_err(HttpError::Connect)?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Stream> = if tls {
            let name = server_name(&host)?;
            Box::new(
                tokio_rustls::TlsConnector::from(tls_config())
                    .connect(name, stream)
                    .await
                    .map_err(HttpError::Tls)?,
            )
        } else {
            Box::new(stream)
        };
        let (stream, read) = ReadCount::new(stream);
        hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .handshake::<_, WasiBody>(TokioIo::new(stream))
            .await
            .map(|handshake| (handshake, read))
            .map_err(HttpError::from)
    };
    let ((mut sender, connection), read) = tokio::time::timeout(connect_timeout, connecting)
        .await
        .map_err(|_| HttpError::ConnectionTimeout)??;

    // On the wire the request names only its path: the authority is in
    // `Host`, which wasmtime-wasi-http set from it (guests may not).
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    *request.uri_mut() = Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    let mut response = pin!(tokio::time::timeout(
        first_byte_timeout,
        sender.send_request(request)
    ));
    let mut connection = Some(connection);
    // The connection's I/O is driven while the head is awaited.
    let head = std::future::poll_fn(|cx| {
        if let Poll::Ready(head) = response.as_mut().poll(cx) {
            return Poll::Ready(head);
        }
        if let Some(conn) = connection.as_mut()
            && let Poll::Ready(ended) = Pin::new(conn).poll(cx)
        {
            connection = None;
            if let Err(e) = ended {
                return Poll::Ready(Ok(Err(e)));
            }
            return response.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await
    .map_err(|_| HttpError::ConnectionReadTimeout)?
    .map_err(HttpError::from)?;

    let mut head = head.map(|body| body.map_err(HttpError::from).boxed_unsync());
    head.extensions_mut().insert(ReadWithHead::of(&read));
    let driven: Pin<Box<dyn Future<Output = Result<(), HttpError>> + Send>> =
        Box::pin(async move {
            let _permits = permits;
            match connection {
                Some(conn) => conn.await.map_err(|e| {
                    if e.is_timeout() {
                        HttpError::HttpResponseTimeout
                    } else {
                        HttpError::from(e)
                    }
                }),
                None => Ok(()),
            }
        });
    Ok((head, driven))
}

/// What TLS or a plain socket is, to hyper.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The addresses of `host`: an IP address as it is, a name looked up
/// under the bounds above.
async fn resolve(plugin: &Arc<str>, host: &str, port: u16) -> Result<Vec<SocketAddr>, HttpError> {
    if let Some(ip) = ip_address(host) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let permits = Permits::lookups().acquire(plugin).await?;
    let name = host.to_string();
    let found = tokio::task::spawn_blocking(move || {
        let _permits = permits;
        (name.as_str(), port)
            .to_socket_addrs()
            .map(Iterator::collect::<Vec<_>>)
    })
    .await
    .map_err(|e| HttpError::InternalError(Some(format!("the lookup failed: {e}"))))?;
    match found {
        Ok(addresses) if !addresses.is_empty() => Ok(addresses),
        Ok(_) => Err(HttpError::DestinationNotFound),
        Err(e) => {
            tracing::debug!(target: "callme::plugin", plugin = &**plugin, host, error = %e, "http lookup failed");
            Err(HttpError::DnsError {
                rcode: None,
                info_code: None,
            })
        }
    }
}

/// The address a URL's host is, if it is one (`127.0.0.1`, `[::1]`).
fn ip_address(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// Permits of one kind (lookups, connections): so many for each plugin,
/// and so many for all of them.
struct Permits {
    all: Arc<Semaphore>,
    each: usize,
    plugins: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

impl Permits {
    fn new(all: usize, each: usize) -> Permits {
        Permits {
            all: Arc::new(Semaphore::new(all)),
            each,
            plugins: Mutex::new(HashMap::new()),
        }
    }

    fn lookups() -> &'static Permits {
        static LOOKUPS: OnceLock<Permits> = OnceLock::new();
        LOOKUPS.get_or_init(|| Permits::new(LOOKUPS_IN_ALL, LOOKUPS_PER_PLUGIN))
    }

    fn connections() -> &'static Permits {
        static CONNECTIONS: OnceLock<Permits> = OnceLock::new();
        CONNECTIONS.get_or_init(|| Permits::new(connections_in_all(), CONNECTIONS_PER_PLUGIN))
    }

    /// The permits of `plugin`. Plugins holding none are forgotten once
    /// there are many.
    fn of(&self, plugin: &Arc<str>) -> Arc<Semaphore> {
        let mut plugins = self.plugins.lock().unwrap_or_else(|p| p.into_inner());
        if plugins.len() >= 1024 && !plugins.contains_key(plugin) {
            plugins.retain(|_, s| s.available_permits() < self.each);
        }
        plugins
            .entry(plugin.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.each)))
            .clone()
    }

    /// One of `plugin`'s permits and one of all, once both are free.
    async fn acquire(
        &self,
        plugin: &Arc<str>,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), HttpError> {
        let mine = self.of(plugin).acquire_owned().await;
        let all = self.all.clone().acquire_owned().await;
        match (mine, all) {
            (Ok(mine), Ok(all)) => Ok((mine, all)),
            _ => Err(HttpError::InternalError(Some("permits are closed".into()))),
        }
    }
}

/// The name a server's certificate must carry.
fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, HttpError> {
    if let Some(ip) = ip_address(host) {
        return Ok(rustls::pki_types::ServerName::from(ip));
    }
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| HttpError::HttpRequestUriInvalid)
}

/// The TLS client configuration, made once.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth());
            match config {
                Ok(config) => Arc::new(config),
                // The ring provider supports the default versions.
                Err(e) => unreachable!("rustls refused its own defaults: {e}"),
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_are_not_looked_up() {
        let p: Arc<str> = Arc::from("p");
        assert_eq!(
            resolve(&p, "127.0.0.1", 80).await.unwrap(),
            ["127.0.0.1:80".parse().unwrap()]
        );
        assert_eq!(
            resolve(&p, "[::1]", 8080).await.unwrap(),
            ["[::1]:8080".parse().unwrap()]
        );
        assert!(matches!(
            server_name("[::1]").unwrap(),
            rustls::pki_types::ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("api.example.com").unwrap(),
            rustls::pki_types::ServerName::DnsName(_)
        ));
        // The TLS configuration builds with its provider.
        assert!(!tls_config().alpn_protocols.contains(&b"h2".to_vec()));
    }

    #[test]
    fn a_plugins_permits_are_its_own() {
        for (permits, each) in [
            (Permits::lookups(), LOOKUPS_PER_PLUGIN),
            (Permits::connections(), CONNECTIONS_PER_PLUGIN),
        ] {
            let a = permits.of(&Arc::from("permits-a"));
            let _held: Vec<_> = (0..each)
                .map(|_| a.clone().try_acquire_owned().unwrap())
                .collect();
            assert!(permits.of(&Arc::from("permits-a")).try_acquire().is_err());
            assert!(permits.of(&Arc::from("permits-b")).try_acquire().is_ok());
        }
    }

    #[test]
    fn connections_in_all_are_half_the_open_files() {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let open_files = limit.current.unwrap_or(u64::MAX);
        let all = connections_in_all();
        assert!((16..=4096).contains(&all));
        assert!(
            all as u64 <= open_files / 2 || all == 16,
            "{all} of {open_files}"
        );
    }
}
