"""Broker URLs from the seed's arguments, and passwords kept out of sight."""

from __future__ import annotations

import os
import subprocess
import traceback
from pathlib import Path

import pytest

import callme_client as callme
from callme_client import redact_url
from callme_client.options import ConnectOptions


def test_the_seeds_arguments_make_a_url() -> None:
    options = ConnectOptions.build(
        amqp_host="rabbit", amqp_user="olivia", amqp_password="p@ss/w:rd",
        amqp_vhost="/", amqp_port=5673,
    )
    assert options.url == "amqp://olivia:p%40ss%2Fw%3Ard@rabbit:5673/%2F"
    assert options.user == "olivia"
    assert "p%40ss" not in options.redacted and "p@ss" not in options.redacted


def test_the_seeds_defaults_and_ssl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLME_AMQP_URL", raising=False)
    assert ConnectOptions.build(amqp_host="h").url == "amqp://guest:guest@h:5672/%2F"
    assert ConnectOptions.build(amqp_host="h", ssl=True).url == "amqps://guest:guest@h:5671/%2F"
    # The seed's first positional argument was the host.
    assert ConnectOptions.build("h").url == "amqp://guest:guest@h:5672/%2F"


def test_arguments_override_parts_of_the_url() -> None:
    options = ConnectOptions.build("amqp://a:b@h:1/v", amqp_vhost="w")
    assert options.url == "amqp://a:b@h:1/w"


def test_the_environment_gives_the_default_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLME_AMQP_URL", "amqp://x:y@env-host:5999/%2f")
    assert ConnectOptions.build().url == "amqp://x:y@env-host:5999/%2f"
    monkeypatch.delenv("CALLME_AMQP_URL")
    assert ConnectOptions.build().url == "amqp://guest:guest@localhost/%2f"


def test_the_seeds_arguments_override_the_environments_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no URL, ``CALLME_AMQP_URL`` is the URL the seed's arguments
    override parts of, as ``ssl`` always did: any other of them made the
    proxy go to ``guest@localhost:5672`` instead."""
    monkeypatch.setenv("CALLME_AMQP_URL", "amqp://x:y@env-host:5999/prod")
    assert ConnectOptions.build(amqp_vhost="w").url == "amqp://x:y@env-host:5999/w"
    assert ConnectOptions.build(amqp_host="h").url == "amqp://x:y@h:5999/prod"
    assert ConnectOptions.build("h").url == "amqp://x:y@h:5999/prod"
    assert ConnectOptions.build(amqp_port=1).url == "amqp://x:y@env-host:1/prod"
    assert ConnectOptions.build(amqp_user="u", amqp_password="p").url == (
        "amqp://u:p@env-host:5999/prod"
    )
    assert ConnectOptions.build(ssl=True).url == "amqps://x:y@env-host:5999/prod"
    # A URL given is the one overridden.
    assert ConnectOptions.build("amqp://a:b@h:1/v", amqp_vhost="w").url == "amqp://a:b@h:1/w"


@pytest.fixture
def tls() -> Path:
    """The test broker's TLS files (``scripts/broker env``)."""
    directory = os.environ.get("CALLME_TEST_TLS_DIR")
    if not directory:
        pytest.fail('CALLME_TEST_TLS_DIR is not set: eval "$(scripts/broker env)" first')
    return Path(directory)


def test_a_client_certificate_means_external_login(tls: Path) -> None:
    c, k = str(tls / "client.pem"), str(tls / "client.key")
    options = ConnectOptions.build("amqps://h/%2f", cert_file=c, key_file=k)
    assert "auth=external" in options.connection_url()
    assert options.user == "external"
    plain = ConnectOptions.build("amqps://u:p@h/%2f?auth=plain", cert_file=c, key_file=k)
    assert "auth=plain" in plain.connection_url()
    # RabbitMQ's spelling, which the Rust proxy reads, is read here too.
    rabbit = ConnectOptions.build(
        "amqps://u:p@h/%2f?auth_mechanism=PLAIN", cert_file=c, key_file=k
    )
    assert "auth=plain" in rabbit.connection_url()
    assert "auth_mechanism" not in rabbit.connection_url()


def test_a_tls_file_that_cannot_serve_is_refused_naming_it(tls: Path, tmp_path: Path) -> None:
    """Said when the options are made, naming the file and what it is
    for; it was a ``ConnectionError`` at each connect, with no file name
    (``No such file or directory``, ``[SSL] PEM lib``)."""
    missing = str(tmp_path / "gone.pem")
    with pytest.raises(ValueError, match=f"cannot read ca_file '{missing}'"):
        ConnectOptions.build("amqps://h/%2f", ca_file=missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="ca_file .*junk.pem.* holds no CA certificate"):
        ConnectOptions.build("amqps://h/%2f", ca_file=str(junk))
    with pytest.raises(ValueError, match="cert_file .*client.pem.* and key_file .*junk.pem"):
        ConnectOptions.build(
            "amqps://h/%2f", cert_file=str(tls / "client.pem"), key_file=str(junk)
        )
    with pytest.raises(ValueError, match="cannot read key_file"):
        ConnectOptions.build("amqps://h/%2f", cert_file=str(tls / "client.pem"), key_file=missing)
    assert ConnectOptions.build("amqps://h/%2f", ca_file=str(tls / "ca.pem")).ca_file


def test_an_encrypted_key_is_refused_without_asking_for_its_passphrase(
    tls: Path, tmp_path: Path
) -> None:
    """OpenSSL asks for the passphrase of an encrypted key on the terminal
    when it is given no other way, and waits for it there, at every
    connect."""
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(tls / "client.key"), "-aes256",
         "-passout", "pass:hunter2", "-out", str(encrypted)],
        check=True,
    )
    with pytest.raises(ValueError, match="encrypted.pem.* holds an encrypted private key"):
        ConnectOptions.build(
            "amqps://h/%2f", cert_file=str(tls / "client.pem"), key_file=str(encrypted)
        )


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="amqps"):
        ConnectOptions.build("amqp://h/%2f", ca_file="ca.pem")
    with pytest.raises(ValueError, match="key"):
        ConnectOptions.build("amqps://h/%2f", cert_file="c.pem")
    with pytest.raises(ValueError, match="expected"):
        ConnectOptions.build("http://u:secret@h/")
    for bad in ("soon", "-5", "1.5", ""):
        with pytest.raises(ValueError, match="connection_timeout") as refused:
            ConnectOptions.build(f"amqp://u:secret@h/%2f?connection_timeout={bad}")
        assert "secret" not in str(refused.value)
    with pytest.raises(ValueError, match="connection_timeout"):
        ConnectOptions(url="amqp://h/%2f?connection_timeout=soon")
    assert ConnectOptions.build("amqp://h/%2f?connection_timeout=250").handshake_timeout(15) == 0.25


@pytest.mark.parametrize(
    "url, shown",
    [
        ("amqp://guest:s3cret@localhost:5672/%2f", "amqp://guest:***@localhost:5672/%2f"),
        ("amqps://host/%2f", "amqps://host/%2f"),
        ("amqp://u:p@ss@h", "amqp://u:***@h"),
        ("amqp://bob@h/v", "amqp://bob@h/v"),
        ("amqp//user:pass@host", "***@host"),
        ("not a url", "not a url"),
    ],
)
def test_passwords_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url) and "pass@" not in redact_url(url)


def test_the_connection_name_goes_in_the_url() -> None:
    assert "name=callme+proxy" in ConnectOptions.build("amqp://h/%2f").connection_url()
    named = ConnectOptions.build("amqp://h/%2f", connection_name="mine")
    assert "name=mine" in named.connection_url()
    from_url = ConnectOptions.build("amqp://h/%2f?name=fromurl")
    assert "name=fromurl" in from_url.connection_url()


def test_no_password_in_the_options_repr_or_a_bad_url_s_error() -> None:
    options = ConnectOptions.build("amqp://bob:s3cret@host:5672/%2f", ca_file=None)
    assert "s3cret" not in repr(options) and "bob:***@host" in repr(options)
    assert "s3cret" not in repr(ConnectOptions(url="amqp://bob:s3cret@h/%2f"))
    # urllib reads `s3cr3t` as the port of `bob:s3cr3t/x@host`; its own
    # message would quote it.
    with pytest.raises(ValueError) as refused:
        ConnectOptions.build("amqp://bob:s3cr3t/x@host/%2f", amqp_vhost="v")
    assert "s3cr3t" not in str(refused.value), refused.value
    assert "port is not a number" in str(refused.value)


@pytest.mark.parametrize("via", ["argument", "environment"])
@pytest.mark.parametrize(
    "password, secret",
    [
        ("s3cr3t/x", "s3cr3t"),
        ("s3cr3t#x", "s3cr3t"),
        ("s3cr3t?x", "s3cr3t"),
        ("4711903/x", "4711903"),
        ("4711903?x", "4711903"),
        ("?s3cr3t", "s3cr3t"),
        ("ab?Key=s3cr3t", "s3cr3t"),
    ],
)
def test_a_password_not_percent_encoded_is_refused_without_showing_it(
    password: str, secret: str, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``/``, ``#`` or ``?`` in a password ends the URL's host part: the
    AMQP library read ``s3cr3t`` as the port when it connected, and its
    ``ValueError`` was chained to one quoting it (``invalid literal for
    int()``); digits took the proxy to that port of the host named by the
    user."""
    url = f"amqp://bob:{password}@127.0.0.1:1/%2f"
    if via == "environment":
        monkeypatch.setenv("CALLME_AMQP_URL", url)
        args: tuple = ()
    else:
        args = (url,)
    with pytest.raises(ValueError) as refused:
        callme.Proxy(*args, timeout=2)
    error = refused.value
    shown = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert secret not in shown, shown
    assert "must be percent-encoded" in str(error), shown
    assert "bob:***@127.0.0.1:1" in str(error), shown


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {"amqp_host": "admin:Hunter2@rabbit.prod"}),
        (("admin:Hunter2@rabbit.prod",), {}),
        ((), {"amqp_host": "admin:Hunter2@[::1]"}),
    ],
)
def test_a_host_holding_a_password_is_refused_without_it(args: tuple, kwargs: dict) -> None:
    """A seed-style host that holds ``user:password@`` was taken for an
    IPv6 address, and urllib's error quoted it, password and all."""
    with pytest.raises(ValueError) as caught:
        ConnectOptions.build(*args, **kwargs)
    assert "Hunter2" not in str(caught.value)
    error = caught.value
    shown = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert "Hunter2" not in shown


@pytest.mark.parametrize(
    "url, named",
    [
        ("amqps://u:p@h/%2f?cacertfile=/etc/ca.pem", "`cacertfile`"),
        ("amqp://u:p@h/%2f?hearbeat=10", "`hearbeat`"),
        ("amqp://u:p@h/%2f?no_verify_ssl=1", "`no_verify_ssl`"),
        # (An unencoded `?` in the password is refused before the query is
        # read: test_a_password_not_percent_encoded_is_refused_without_showing_it.)
    ],
)
def test_a_query_parameter_nothing_reads_is_refused_naming_it_only_if_safe(
    url: str, named: str
) -> None:
    """The AMQP library here reads TLS files from the URL only when it is given
    no TLS context, which callme always gives: ``?cacertfile=`` (RabbitMQ's
    spelling) or ``?cafile=`` would have been passed over, TLS left to the
    system's roots, as the Rust side used to."""
    with pytest.raises(ValueError) as refused:
        ConnectOptions.build(url)
    said = str(refused.value)
    assert f"unknown query parameter {named}" in said, said
    assert "s3cret" not in said, said


def test_the_query_parameters_callme_reads_are_taken() -> None:
    url = (
        "amqp://u:p@h/%2f?heartbeat=10&connection_timeout=500&channel_max=8"
        "&frame_max=8192&auth_mechanism=PLAIN&name=mine"
    )
    assert ConnectOptions.build(url).handshake_timeout(9.0) == 0.5


@pytest.mark.parametrize(
    "query, key",
    [
        ("heartbeat=abc", "heartbeat"),
        ("heartbeat=-1", "heartbeat"),
        ("heartbeat=70000", "heartbeat"),
        ("channel_max=1.5", "channel_max"),
        ("frame_max=4294967296", "frame_max"),
        ("connection_timeout=", "connection_timeout"),
        ("connection_timeout=%D9%A3", "connection_timeout"),  # a digit, but not ASCII
    ],
)
def test_a_number_in_the_query_that_is_not_one_is_refused_naming_it(query: str, key: str) -> None:
    """The AMQP library reads a heartbeat it cannot parse as none at all
    (aiormq's ``parse_heartbeat``): ``?heartbeat=abc`` turned heartbeats
    off in silence, and a dead connection went unnoticed."""
    with pytest.raises(ValueError) as refused:
        ConnectOptions.build(f"amqp://u:s3cret@h/%2f?{query}")
    said = str(refused.value)
    assert f"{key} must be a whole number" in said, said
    assert "s3cret" not in said, said
