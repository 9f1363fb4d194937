"""The seed's README examples, with only the import line changed."""

from __future__ import annotations

import logging
import time

import pytest

import callme_client as callme
from conftest import Host, rabbitmqctl, url_parts


def test_seed_add_example_with_the_seeds_constructor_arguments(amqp_url: str, host: Host) -> None:
    proxy = callme.Proxy(**url_parts(amqp_url))
    try:
        assert proxy.use_server(host.calc).add(1, 1) == 2
    finally:
        proxy.close()


def test_url_comes_from_callme_amqp_url_by_default(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLME_AMQP_URL", amqp_url)
    with callme.Proxy() as proxy:
        assert proxy.use_server(host.calc).add(20, 22) == 42


def test_a_timeout_of_none_is_the_default(amqp_url: str, host: Host) -> None:
    """As for ``use_server`` and ``call``; the constructors raised a bare
    ``TypeError``."""
    assert callme.AsyncProxy(amqp_url, timeout=None).timeout == callme.DEFAULT_TIMEOUT
    with callme.Proxy(amqp_url, timeout=None) as proxy:
        assert proxy.timeout == callme.DEFAULT_TIMEOUT == 60
        calc = proxy.use_server(host.calc, timeout=None)
        assert calc.timeout == callme.DEFAULT_TIMEOUT
        assert calc.add(1, 2) == 3


def test_keyword_arguments(proxy: callme.Proxy, host: Host) -> None:
    calc = proxy.use_server(host.calc)
    assert calc.add(a=1, b=2) == 3
    assert calc.add(1, b=-5) == -4


def test_names_that_are_not_identifiers_go_through_call(proxy: callme.Proxy, host: Host) -> None:
    calc = proxy.use_server(host.calc)
    assert calc.call("stats.mean", [1, 2, 6]) == 3.0
    assert calc.call("stats.mean", []) is None
    assert calc.call("slow-version", 0) == "1"
    assert calc.call("add", a=2, b=3) == 5


def test_results_keep_their_json_types(proxy: callme.Proxy, host: Host) -> None:
    calc = proxy.use_server(host.calc)
    assert calc.divide(1, 4) == 0.25
    assert calc.fib(10) == 55
    assert calc.version() == "1"
    assert calc.add(2**62, 2**62 - 1) == 2**63 - 1


def test_a_function_called_on_the_proxy_itself_says_to_choose_a_server(proxy: callme.Proxy) -> None:
    with pytest.raises(AttributeError, match="use_server"):
        proxy.add(1, 1)


def test_use_server_timeout_applies_to_its_calls_and_late_replies_are_dropped(
    proxy: callme.Proxy, host: Host
) -> None:
    quick = proxy.use_server(host.calc, timeout=0.5)
    assert quick.timeout == 0.5
    start = time.monotonic()
    with pytest.raises(callme.Timeout) as caught:
        quick.call("slow-version", 3000)
    assert 0.5 <= time.monotonic() - start < 2.5  # the timeout, not the reply
    assert not isinstance(caught.value, callme.RemoteError)
    # The reply that comes later (at about 3 s) is dropped: calls made
    # one after another while it lands each get their own answer.
    calc = proxy.use_server(host.calc)
    i = 0
    while time.monotonic() < start + 3.5:
        assert calc.add(i, i) == 2 * i
        i += 1
    assert i > 0
    assert proxy.timeout == 30


def test_describe_lists_the_functions(proxy: callme.Proxy, host: Host) -> None:
    described = proxy.use_server(host.calc).describe()
    assert described["server"] == host.calc
    names = {f["name"] for f in described["functions"]}
    assert {"add", "divide", "fib", "slow-version", "stats.mean", "version"} <= names
    assert len(described["version"]) == 64


def test_the_reply_exchange_follows_the_protocols_names(proxy: callme.Proxy) -> None:
    exchange = proxy.reply_exchange
    assert exchange is not None and exchange.startswith("client_guest_ex_")


def test_a_closed_proxy_leaves_no_queue_and_warns_of_nothing(
    amqp_url: str, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """The reply queue outlives its connection (for the replies an
    unreadable one would cost), so the proxy deletes it when it closes:
    its consumer first, since aiormq 7 warns when the broker cancels one
    under it."""
    caplog.set_level(logging.WARNING)
    with callme.Proxy(amqp_url, timeout=10) as proxy:
        assert proxy.use_server(host.calc).add(2, 2) == 4
        exchange = proxy.reply_exchange
        assert exchange is not None
    # Asked for before the close returned (a slow broker may finish it a
    # moment after); long before the broker's own 30 s expiry.
    queue = exchange.replace("_ex_", "_queue_", 1)
    deadline = time.monotonic() + 10
    while queue in rabbitmqctl("list_queues", "name").split():
        assert time.monotonic() < deadline, "the reply queue was left"
        time.sleep(0.2)
    # The client's and its AMQP library's (asyncio's own may report what
    # an earlier test left to the garbage collector).
    ours = ("callme", "aiormq", "aio_pika")
    assert [
        r.getMessage() for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(ours)
    ] == []
