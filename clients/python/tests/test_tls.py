"""TLS: the broker verified with a CA file, and mutual TLS with EXTERNAL login."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

import callme_client as callme
from conftest import Host, rabbitmqctl


@pytest.fixture(scope="module")
def tls_dir() -> Path:
    directory = os.environ.get("CALLME_TEST_TLS_DIR")
    if not directory:
        pytest.fail('CALLME_TEST_TLS_DIR is not set: eval "$(scripts/broker env)" first')
    return Path(directory)


@pytest.fixture(scope="module")
def amqps_port() -> int:
    return int(os.environ.get("CALLME_TEST_AMQPS_PORT", "5681"))


def test_tls_with_a_ca_file(tls_dir: Path, amqps_port: int, host: Host) -> None:
    url = f"amqps://guest:guest@localhost:{amqps_port}/%2f"
    with callme.Proxy(url, ca_file=str(tls_dir / "ca.pem")) as proxy:
        assert proxy.use_server(host.calc).add(1, 1) == 2


def test_the_seeds_ssl_flag_with_a_ca_file(tls_dir: Path, amqps_port: int, host: Host) -> None:
    with callme.Proxy(amqp_host="localhost", amqp_port=amqps_port, ssl=True,
                      ca_file=str(tls_dir / "ca.pem")) as proxy:
        assert proxy.use_server(host.calc).add(2, 2) == 4


def test_a_broker_the_ca_did_not_sign_is_refused(amqps_port: int) -> None:
    # The system's CAs do not know the test broker's CA.
    with pytest.raises(callme.ConnectionError, match="CERTIFICATE|certificate"):
        callme.Proxy(f"amqps://guest:guest@localhost:{amqps_port}/%2f")


def test_mutual_tls_logs_in_with_the_client_certificate(
    tls_dir: Path, amqps_port: int, host: Host
) -> None:
    name = f"callme-py-tls-{uuid.uuid4().hex[:8]}"
    with callme.Proxy(
        f"amqps://localhost:{amqps_port}/%2f",
        ca_file=str(tls_dir / "ca.pem"),
        cert_file=str(tls_dir / "client.pem"),
        key_file=str(tls_dir / "client.key"),
        connection_name=name,
    ) as proxy:
        assert proxy.use_server(host.calc).add(20, 22) == 42
        listing = rabbitmqctl(
            "list_connections", "--no-table-headers", "-q", "user", "auth_mechanism", "client_properties"
        )
        mine = [line for line in listing.splitlines() if f'"{name}"' in line]
        assert len(mine) == 1
        user, mechanism = mine[0].split("\t")[:2]
        assert (user, mechanism) == ("callme-tls", "EXTERNAL")
