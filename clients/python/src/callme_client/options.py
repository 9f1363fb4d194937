"""Where the broker is and how to log in: a URL, the seed's arguments, TLS files.

:class:`ConnectOptions` turns what a caller gives (an ``amqp://`` or
``amqps://`` URL, the seed's ``amqp_host``/``amqp_user``/... arguments, or
``CALLME_AMQP_URL``) into the one URL the connection uses, the TLS context,
and the user name the reply exchange is named after. :func:`redact_url` is
what every log line and error message shows instead of the URL.
"""

from __future__ import annotations

import os
import ssl as _ssl
from dataclasses import dataclass
from typing import Optional
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["ConnectOptions", "redact_url", "ENV_URL"]

#: The environment variable read when no URL is given, as the ``callme``
#: command does: the URL the seed's arguments then override parts of.
ENV_URL = "CALLME_AMQP_URL"

_DEFAULT_URL = "amqp://guest:guest@localhost/%2f"


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``.

    Everything before the last ``@`` is user info, whether or not the URL is
    well formed, since a password may hold ``/``, ``?``, ``#`` or ``@``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head, at, tail = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = head.partition(":")
    shown = f"{user}:***" if colon else user
    if "/" in user or "?" in user or "#" in user:
        shown = "***"
    return f"{scheme}{sep}{shown}@{tail}"


# The query parameters read: RabbitMQ's URI parameters the Rust side reads
# too (so one URL serves both clients; anything else, such as the guide's
# ``cacertfile``, would be passed over in silence) and ``name``, the
# connection's name as the broker shows it.
_QUERY_KEYS = (
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
    "auth",
    "name",
)


# The query parameters that are numbers: what they count, and their
# largest value (AMQP's: a short for the heartbeat and the channel count,
# a long for the frame size).
_NUMBERS = (
    ("connection_timeout", "milliseconds", None),
    ("heartbeat", "seconds", 65535),
    ("channel_max", "channels", 65535),
    ("frame_max", "bytes", 4294967295),
)


def _named_key(url: str, key: str) -> str:
    """An unknown query key as an error names it: quoted only when it cannot
    be part of a password (an unencoded ``?`` in a password makes the rest
    of it the query), so a plain lowercase word with no ``@`` after the
    ``?``."""
    from_password = "@" in url.partition("?")[2]
    plain = 1 <= len(key) <= 32 and all(c == "_" or ("a" <= c <= "z") for c in key)
    return f"`{key}`" if plain and not from_password else "that is not one of them"


def _split(url: str) -> SplitResult:
    """``urlsplit(url)``, whose errors quote what they could not parse
    (a host that holds ``user:password@``): raised again without it."""
    try:
        return urlsplit(url)
    except ValueError:
        raise ValueError(f"invalid AMQP URL {redact_url(url)!r}") from None


def _check_authority(url: str) -> None:
    """Raises ``ValueError`` for a URL whose user name or password holds a
    ``/``, ``?``, ``#`` or ``@`` that is not percent-encoded.

    Such a character ends the URL's host part early: ``amqp://bob:s3cr3t/x@h``
    is the host ``bob`` with the port ``s3cr3t``, which the AMQP library
    fails to read when it connects, quoting it, and ``amqp://bob:123/x@h``
    goes to port 123 of the host ``bob``. So a port that is not a number,
    or an ``@`` after the host part (where, in the vhost or the query, it
    must be written ``%40`` too), is refused here, quoting nothing of the
    password, and with no error chained to this one that would."""
    parts = _split(url)
    problem: Optional[str] = None
    try:
        parts.port
    except ValueError:
        problem = "its port is not a number from 0 to 65535"
    if problem is None and "@" not in parts.netloc:
        if "@" in parts.path + parts.query + parts.fragment:
            problem = "an '@' comes after its host (in a vhost or a query it is written %40)"
    if problem is not None:
        raise ValueError(
            f"invalid AMQP URL {redact_url(url)!r}: {problem}; a user name or password "
            "holding '/', '?', '#' or '@' must be percent-encoded (%2F, %3F, %23, %40)"
        ) from None


@dataclass(frozen=True, repr=False)
class ConnectOptions:
    """A broker to connect to.

    ``url`` is an AMQP URI (``amqp://user:password@host:port/vhost`` or
    ``amqps://...``; the default vhost ``/`` is spelled ``%2f``). With a
    ``cert_file`` (and ``key_file``) the login is EXTERNAL (mutual TLS)
    unless the URL names another mechanism (``?auth=plain``).
    """

    url: str
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    connection_name: Optional[str] = None

    def __post_init__(self) -> None:
        _check_authority(self.url)
        pairs = parse_qsl(_split(self.url).query, keep_blank_values=True)
        for key, _ in pairs:
            if key not in _QUERY_KEYS:
                raise ValueError(
                    f"invalid AMQP URL {redact_url(self.url)!r}: unknown query parameter "
                    f"{_named_key(self.url, key)} (callme reads {', '.join(_QUERY_KEYS)}; "
                    "TLS files are given by ca_file, cert_file and key_file)"
                )
        query = dict(pairs)
        # Whole numbers, in the range AMQP gives them: the AMQP library
        # here reads a heartbeat it cannot parse as none at all, which
        # would leave a dead connection unnoticed.
        for key, what, most in _NUMBERS:
            value = query.get(key)
            if value is not None and not (
                value.isascii() and value.isdigit() and (most is None or int(value) <= most)
            ):
                bound = "" if most is None else f" up to {most}"
                raise ValueError(
                    f"invalid AMQP URL {redact_url(self.url)!r}: {key} must be "
                    f"a whole number of {what}{bound}, not {value!r}"
                )

    @classmethod
    def build(
        cls,
        amqp_url: Optional[str] = None,
        *,
        amqp_host: Optional[str] = None,
        amqp_user: Optional[str] = None,
        amqp_password: Optional[str] = None,
        amqp_vhost: Optional[str] = None,
        amqp_port: Optional[int] = None,
        ssl: bool = False,
        ca_file: Optional[str] = None,
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        connection_name: Optional[str] = None,
    ) -> "ConnectOptions":
        """Options from a URL, or from the seed's separate arguments.

        The seed's arguments (``amqp_host``, ``amqp_user``,
        ``amqp_password``, ``amqp_vhost``, ``amqp_port``, ``ssl``) override
        the matching parts of ``amqp_url``; with no URL, of
        ``CALLME_AMQP_URL``, then of ``amqp://guest:guest@localhost:5672/%2f``.

        :raises ValueError: for a URL that is not ``amqp://`` or
            ``amqps://``, or whose user name or password holds a ``/``,
            ``?``, ``#`` or ``@`` not percent-encoded (quoting neither),
            TLS files with a plain ``amqp://`` URL, a
            certificate without its key, or a TLS file that cannot be read
            or holds no PEM certificate or key (naming it).
        """
        # With no URL, the seed's arguments override the parts of this one.
        base = os.environ.get(ENV_URL) or _DEFAULT_URL
        if amqp_url is None:
            amqp_url = base
        if "://" not in amqp_url and amqp_host is None:
            # The seed's first positional argument (or CALLME_AMQP_URL) was
            # the host name.
            amqp_host, amqp_url = amqp_url, base if "://" in base else _DEFAULT_URL
        seed_args = (amqp_host, amqp_user, amqp_password, amqp_vhost, amqp_port)
        if amqp_host is not None and any(c in amqp_host for c in "@/?#"):
            # Not quoted: it may be `user:password@host`.
            raise ValueError(
                "invalid AMQP host: a host name or address, without a user, password, "
                "path or query (give those as amqp_user, amqp_password, amqp_vhost, "
                "or a whole amqp:// URL)"
            )
        parts = _split(amqp_url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"invalid AMQP URL {redact_url(amqp_url)!r}: expected "
                "amqp://user:password@host:port/vhost or amqps://..."
            )
        # Before its parts are read: a password that is not percent-encoded
        # would give them wrong (and be quoted by urllib's errors).
        _check_authority(amqp_url)
        tls = parts.scheme == "amqps" or ssl or any((ca_file, cert_file, key_file))
        if not any(a is not None for a in seed_args) and not ssl:
            url = amqp_url
        else:
            user = amqp_user if amqp_user is not None else unquote(parts.username or "")
            password = (
                amqp_password if amqp_password is not None else unquote(parts.password or "")
            )
            host = amqp_host if amqp_host is not None else (parts.hostname or "localhost")
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            # Read (checked above).
            port = amqp_port if amqp_port is not None else parts.port
            if port is None:
                port = 5671 if tls else 5672
            vhost = amqp_vhost if amqp_vhost is not None else (unquote(parts.path[1:]) or "/")
            userinfo = ""
            if user or password:
                userinfo = quote(user, safe="")
                if password:
                    userinfo += ":" + quote(password, safe="")
                userinfo += "@"
            url = urlunsplit(
                (
                    "amqps" if tls else "amqp",
                    f"{userinfo}{host}:{port}",
                    "/" + quote(vhost, safe=""),
                    parts.query,
                    "",
                )
            )
        if any((ca_file, cert_file, key_file)) and _split(url).scheme != "amqps":
            raise ValueError("TLS files given but the URL is not amqps://")
        if bool(cert_file) != bool(key_file):
            raise ValueError("a client certificate needs both a certificate and a key file")
        options = cls(
            url=url,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            connection_name=connection_name,
        )
        # The TLS files are read once here: a missing or broken one is
        # said at once, naming it, not at every connect as an outage.
        options.ssl_context()
        return options

    def __repr__(self) -> str:
        # Shown by debuggers, tracebacks with locals and error reporters:
        # never the password.
        return (
            f"ConnectOptions(url={self.redacted!r}, ca_file={self.ca_file!r}, "
            f"cert_file={self.cert_file!r}, key_file={self.key_file!r}, "
            f"connection_name={self.connection_name!r})"
        )

    @property
    def redacted(self) -> str:
        """The URL without its password, for logs and messages."""
        return redact_url(self.url)

    @property
    def user(self) -> str:
        """The user name the reply exchange and queue are named after;
        ``external`` when the URL names none (an EXTERNAL login), as the
        Rust proxy does."""
        return unquote(urlsplit(self.url).username or "") or "external"

    @property
    def login(self) -> str:
        """The user name the URL logs in as (empty for an EXTERNAL login
        naming none, whose name the broker takes from the certificate)."""
        return unquote(urlsplit(self.url).username or "")

    @property
    def vhost(self) -> str:
        """The virtual host the URL names (``/`` when it names none)."""
        return unquote(urlsplit(self.url).path[1:]) or "/"

    def connection_url(self, purpose: Optional[str] = None) -> str:
        """The URL handed to the AMQP library: with ``auth=external`` added
        when a client certificate is given and the URL names no mechanism
        (as ``auth`` or as RabbitMQ's ``auth_mechanism``),
        and the connection name: ``purpose`` for a connection the proxy
        opens for a task of its own (``callme drain``), else ``callme
        proxy`` unless the URL or ``connection_name`` names one."""
        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        # RabbitMQ's URI parameter (and the Rust proxy's) for what the
        # AMQP library here calls ``auth``: one URL serves both clients.
        if "auth_mechanism" in query:
            mechanism = query.pop("auth_mechanism")
            query.setdefault("auth", mechanism.lower())
        if self.cert_file and "auth" not in query:
            query["auth"] = "external"
        # The broker shows it as the connection's name; every aio-pika
        # version reads it from here.
        if purpose is not None:
            query["name"] = purpose
        elif self.connection_name or "name" not in query:
            query["name"] = self.connection_name or "callme proxy"
        return urlunsplit(parts._replace(query=urlencode(query)))

    def handshake_timeout(self, default: float) -> float:
        """Seconds a connection attempt is given: the URL's
        ``connection_timeout`` query parameter (milliseconds, as in
        RabbitMQ's URI query parameters guide), else ``default``."""
        raw = dict(parse_qsl(urlsplit(self.url).query)).get("connection_timeout")
        # Checked when the options were made: a whole number; 0 means the
        # default, as in the Rust client.
        ms = int(raw) if raw is not None else 0
        return ms / 1000 if ms > 0 else default

    def ssl_context(self) -> Optional[_ssl.SSLContext]:
        """The TLS context for an ``amqps://`` URL (``None`` for ``amqp://``):
        the system's CAs, or ``ca_file``'s, plus the client certificate."""
        if urlsplit(self.url).scheme != "amqps":
            return None
        files = (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                 ("key_file", self.key_file))
        for what, path in files:
            if path:
                try:
                    open(path, "rb").close()
                except OSError as e:
                    raise ValueError(f"cannot read {what} {path!r}: {e.strerror or e}") from None
        try:
            context = _ssl.create_default_context(cafile=self.ca_file)
        except _ssl.SSLError as e:
            raise ValueError(
                f"ca_file {self.ca_file!r} holds no CA certificate in PEM form: {e.reason or e}"
            ) from None
        if self.cert_file and self.key_file:
            key_file = self.key_file

            def no_passphrase() -> bytes:
                # Without it OpenSSL would ask for one on the terminal, and
                # wait there, at every connect.
                raise ValueError(
                    f"key_file {key_file!r} holds an encrypted private key, which callme "
                    "cannot read: give it unencrypted (openssl pkey -in KEY -out KEY.plain)"
                )

            try:
                context.load_cert_chain(self.cert_file, self.key_file, password=no_passphrase)
            except _ssl.SSLError as e:
                raise ValueError(
                    f"cert_file {self.cert_file!r} and key_file {self.key_file!r} are not "
                    f"a PEM certificate and its private key: {e.reason or e}"
                ) from None
        return context

