"""Fixtures: the project's broker, and one `callme serve` host for the session.

The host serves the real plugins built from the repository's plugins/
(target/plugins/*.wasm, by scripts/build-plugins) under ids of this run
only, so other suites sharing the broker never answer these calls.
``CALLME_AMQP_URL`` must point at the broker (``eval "$(scripts/broker
env)"``); the TLS tests also read ``CALLME_TEST_TLS_DIR`` and
``CALLME_TEST_AMQPS_PORT``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional
from urllib.parse import urlsplit, unquote

import pytest

import callme_client

REPO = Path(__file__).resolve().parents[3]


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")


def broker_url() -> str:
    url = os.environ.get("CALLME_AMQP_URL")
    if not url:
        pytest.fail('CALLME_AMQP_URL is not set: eval "$(scripts/broker env)" first')
    return url


def rabbitmqctl(*args: str) -> str:
    """Runs rabbitmqctl against the project's broker node; its output."""
    done = subprocess.run(
        [str(REPO / "scripts" / "broker"), "ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def close_connection(connection_name: str) -> None:
    """Closes, on the broker's side, the connections whose client gave
    ``connection_name``: a broker restart as one proxy sees it, without
    touching anyone else's connection."""
    listing = rabbitmqctl("list_connections", "--no-table-headers", "-q", "pid", "client_properties")
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if f'{{"connection_name","{connection_name}"}}' in line
    ]
    assert pids, f"no connection named {connection_name!r}"
    for pid in pids:
        rabbitmqctl("close_connection", pid, "closed by the callme-client tests")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Host:
    """What the session's host serves."""

    calc: str
    """Server id of the calc plugin (add, divide, fib, slow-version, stats.mean, version)."""
    hostile: str
    """Server id of the hostile plugin, limited to a 300 ms deadline and 16 MiB of memory."""
    missing: str
    """A server id nobody serves."""
    metrics_port: int = 0
    """The host's metrics endpoint, on 127.0.0.1."""


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return broker_url()


@pytest.fixture(scope="session")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    url = broker_url()
    plugins = target_dir() / "plugins"
    binary = target_dir() / "debug" / "callme"
    for needed in (plugins / "calc.wasm", plugins / "hostile.wasm", binary):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: run scripts/build-plugins and cargo build")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    served = Host(
        calc=unique("py-calc"),
        hostile=unique("py-hostile"),
        missing=unique("py-nobody"),
        metrics_port=metrics_port,
    )
    root = tmp_path_factory.mktemp("host")
    directory = root / "plugins"
    directory.mkdir()
    shutil.copy(plugins / "calc.wasm", directory / f"{served.calc}.wasm")
    shutil.copy(plugins / "hostile.wasm", directory / f"{served.hostile}.wasm")
    (directory / f"{served.hostile}.toml").write_text(
        "deadline_ms = 300\nmemory_bytes = 16777216\n"
    )
    ready = root / "ready"
    log = root / "host.log"
    cache = target_dir() / "py-client-cache"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(binary), "serve", "--plugins", str(directory), "--ready-file", str(ready),
             "--cache-dir", str(cache), "--concurrency", "16",
             "--metrics-addr", f"127.0.0.1:{metrics_port}"],
            env={**os.environ, "CALLME_AMQP_URL": url, "RUST_LOG": "callme=info", "NO_COLOR": "1"},
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 120
        while not (ready.exists() and ready.read_text().strip() == str(process.pid)):
            if process.poll() is not None:
                pytest.fail(f"callme serve exited with {process.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"callme serve not ready within 120 s: {log.read_text()}")
            time.sleep(0.05)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def proxy(amqp_url: str, host: Host) -> Iterator[callme_client.Proxy]:
    """One blocking proxy shared by the tests that need no proxy of their own."""
    with callme_client.Proxy(amqp_url, timeout=30) as shared:
        yield shared


@dataclass
class BrokerUser:
    name: str
    password: str


def _add_user(name: str, password: str, configure: str, write: str, read: str) -> BrokerUser:
    try:
        rabbitmqctl("delete_user", name)
    except RuntimeError:
        pass
    rabbitmqctl("add_user", name, password)
    rabbitmqctl("set_permissions", "-p", "/", name, configure, write, read)
    return BrokerUser(name, password)


@pytest.fixture(scope="session")
def broker_users(host: Host) -> Iterator[List[BrokerUser]]:
    """Two broker users of this run: one with every permission and a
    password easy to look for in logs, and one that may call only the calc
    server (the seed's *olivia*)."""
    tag = uuid.uuid4().hex[:8]
    users = [
        _add_user(f"py-any-{tag}", f"pw-{uuid.uuid4().hex}", ".*", ".*", ".*"),
        _add_user(
            f"py-olivia-{tag}",
            f"pw-{uuid.uuid4().hex}",
            # The anchored recipe of docs/protocol.md.
            f"^client_py-olivia-{tag}_(ex|queue)_[0-9a-f-]+$",
            f"^(client_py-olivia-{tag}_(ex|queue)_[0-9a-f-]+|server_{re.escape(host.calc)}_ex)$",
            f"^client_py-olivia-{tag}_(ex|queue)_[0-9a-f-]+$",
        ),
    ]
    try:
        yield users
    finally:
        for user in users:
            try:
                rabbitmqctl("delete_user", user.name)
            except RuntimeError:
                pass


def url_for(base: str, user: str, password: str) -> str:
    parts = urlsplit(base)
    return f"{parts.scheme}://{user}:{password}@{parts.hostname}:{parts.port}{parts.path}"


def url_parts(url: str) -> dict:
    """The seed's constructor arguments for ``url``."""
    parts = urlsplit(url)
    return {
        "amqp_host": parts.hostname,
        "amqp_port": parts.port,
        "amqp_user": unquote(parts.username or ""),
        "amqp_password": unquote(parts.password or ""),
        "amqp_vhost": unquote(parts.path[1:]) or "/",
    }


class Forwarder:
    """A TCP forwarder to the broker on a local port: a broker node of the
    test's own. ``cut()`` closes it and every connection it carries, as a
    node going away would; ``start()`` opens it again on the same port."""

    def __init__(self, broker: str) -> None:
        parts = urlsplit(broker)
        self._broker = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._url = broker
        self._listener: Optional[socket.socket] = None
        self._carried: List[socket.socket] = []
        self._lock = threading.Lock()
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        """The broker's URL through this forwarder."""
        parts = urlsplit(self._url)
        netloc = parts.netloc.rsplit("@", 1)
        userinfo = f"{netloc[0]}@" if len(netloc) == 2 else ""
        return parts._replace(netloc=f"{userinfo}127.0.0.1:{self.port}").geturl()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            carried, self._carried = self._carried, []
        for s in ([listener] if listener else []) + carried:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                inbound, _ = listener.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(self._broker)
            except OSError:
                inbound.close()
                continue
            with self._lock:
                self._carried += [inbound, outbound]
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
