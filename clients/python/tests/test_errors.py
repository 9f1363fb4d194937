"""Every error a call can end with, as the exception a caller catches."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
import traceback
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

import callme_client as callme
from callme_client.protocol import decode_response
from conftest import BrokerUser, Host, _add_user, rabbitmqctl, url_for


def test_every_error_is_exported() -> None:
    """``TooLarge`` was left out of ``errors.__all__``: a star import of
    the module missed it."""
    from callme_client import errors

    raised = {
        name for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.CallmeError)
    }
    assert "TooLarge" in raised
    assert raised <= set(errors.__all__), raised - set(errors.__all__)
    assert raised <= set(callme.__all__), raised - set(callme.__all__)
    starred: dict = {}
    exec("from callme_client.errors import *", starred)
    assert starred["TooLarge"] is callme.TooLarge


def test_a_missing_server_fails_at_once(proxy: callme.Proxy, host: Host) -> None:
    start = time.monotonic()
    with pytest.raises(callme.NoSuchServer) as caught:
        proxy.use_server(host.missing).add(1, 1)
    assert time.monotonic() - start < 5  # not the 30 s timeout
    assert caught.value.server_id == host.missing
    # The channel the broker closed for it cost the proxy nothing.
    assert proxy.use_server(host.calc).add(1, 1) == 2


def test_a_server_id_no_server_can_have_is_no_such_server(proxy: callme.Proxy) -> None:
    for bad in ("", "has space", "x" * 300, "ünicode"):
        with pytest.raises(callme.NoSuchServer):
            proxy.use_server(bad).add(1, 1)


def test_guest_error_carries_the_plugins_error_value(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(callme.GuestError) as caught:
        proxy.use_server(host.calc).divide(1, 0)
    error = caught.value
    assert isinstance(error, callme.RemoteError)
    assert error.type == "GuestError"
    assert error.data == "division by zero"
    assert "division by zero" in error.message


def test_invalid_arguments(proxy: callme.Proxy, host: Host) -> None:
    calc = proxy.use_server(host.calc)
    for call in (lambda: calc.add(1), lambda: calc.add(1, "two"), lambda: calc.add(a=1, c=2),
                 lambda: calc.fib(-1)):
        with pytest.raises(callme.InvalidArguments) as caught:
            call()
        assert caught.value.type == "InvalidArguments"
        assert caught.value.data is None


def test_no_such_function(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(callme.NoSuchFunction, match="nosuch"):
        proxy.use_server(host.calc).nosuch()


def test_trap_carries_what_the_guest_wrote(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(callme.Trap) as caught:
        proxy.use_server(host.hostile).boom("kaboom-from-python")
    assert "kaboom-from-python" in caught.value.message


def test_a_call_past_its_deadline_is_a_remote_timeout(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(callme.Timeout) as caught:
        proxy.use_server(host.hostile).sleep(3000)
    error = caught.value
    assert isinstance(error, callme.RemoteTimeout) and isinstance(error, callme.RemoteError)
    assert error.type == "Timeout"
    assert error.data == "deadline"


def test_a_call_out_of_fuel_is_a_remote_timeout(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(callme.RemoteTimeout) as caught:
        proxy.use_server(host.calc).fib(90)
    assert caught.value.data == "fuel"


def test_memory_limit(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(callme.MemoryLimit):
        proxy.use_server(host.hostile).bomb()


def test_a_request_too_large_is_a_bad_request(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(callme.BadRequest):
        proxy.use_server(host.calc).add("x" * (5 << 20), 1)


def test_a_request_over_the_proxys_limit_is_too_large_and_not_sent(
    proxy: callme.Proxy, host: Host
) -> None:
    assert proxy.max_request_bytes == callme.DEFAULT_MAX_REQUEST_BYTES == 16 << 20
    with pytest.raises(callme.TooLarge, match="over the proxy's max_request_bytes"):
        proxy.use_server(host.calc).add("x" * (17 << 20), 1)
    assert proxy.use_server(host.calc).add(1, 2) == 3
    with pytest.raises(ValueError, match="max_request_bytes"):
        callme.Proxy(max_request_bytes=-1)


def test_a_request_over_the_brokers_size_limit_is_too_large_and_costs_nothing_else(
    amqp_url: str, host: Host
) -> None:
    # The test broker's max_message_size is 16 MiB, as RabbitMQ 4.x's
    # default: past the proxy's own limit, the broker refuses it.
    proxy = callme.Proxy(amqp_url, timeout=30, max_request_bytes=64 << 20)
    try:
        with pytest.raises(callme.TooLarge, match="max size"):
            proxy.use_server(host.calc).add("x" * (17 << 20), 1)
        assert proxy.use_server(host.calc).add(1, 2) == 3
    finally:
        proxy.close()


def test_arguments_that_are_not_json_fail_before_sending(proxy: callme.Proxy, host: Host) -> None:
    with pytest.raises(TypeError):
        proxy.use_server(host.calc).add(object(), 1)
    with pytest.raises(ValueError):
        proxy.use_server(host.calc).divide(float("nan"), 1)


def test_internal_and_unknown_types_map_to_remote_errors() -> None:
    with pytest.raises(callme.Internal) as internal:
        decode_response(b'{"error": {"type": "Internal", "message": "m", "data": null}}')
    assert internal.value.message == "m"
    with pytest.raises(callme.RemoteError) as later:
        decode_response(b'{"error": {"type": "SomethingNew", "message": "m", "data": [1]}}')
    assert type(later.value) is callme.RemoteError
    assert later.value.type == "SomethingNew" and later.value.data == [1]
    assert decode_response(b'{"result": null}') is None


def test_a_wrong_password_is_access_refused_without_the_password(
    amqp_url: str, broker_users: "list[BrokerUser]"
) -> None:
    user = broker_users[0]
    wrong = "not-" + user.password
    with pytest.raises(callme.AccessRefused) as caught:
        callme.Proxy(url_for(amqp_url, user.name, wrong))
    shown = "".join(traceback.format_exception(caught.type, caught.value, caught.tb))
    assert "refused" in str(caught.value)
    assert wrong not in shown and user.password not in shown


def test_a_connection_limit_is_a_connection_error_not_a_refusal(amqp_url: str) -> None:
    # RabbitMQ refuses a connection over a user's limit with the code of a
    # refused virtual host (530); the limit ends when a connection does.
    user = _add_user(f"py-limit-{uuid.uuid4().hex[:8]}", "pw-limit", ".*", ".*", ".*")
    try:
        rabbitmqctl("set_user_limits", user.name, '{"max-connections": 0}')
        with pytest.raises(callme.ConnectionError) as caught:
            callme.Proxy(url_for(amqp_url, user.name, user.password), timeout=5)
        assert not isinstance(caught.value, callme.AccessRefused)
        assert user.password not in str(caught.value)
    finally:
        rabbitmqctl("delete_user", user.name)


@pytest.mark.parametrize(
    "name",
    [
        "CN=py-{tag},O=acme",  # a certificate's distinguished name
        "josé-{tag}",
        "py-long-{tag}-" + "x" * 140,  # past pamqp's 127 characters
    ],
)
def test_any_user_name_the_broker_takes_names_the_reply_queue(
    amqp_url: str, host: Host, name: str
) -> None:
    """The reply exchange and queue carry the user's name as it is, as the
    Rust proxy's do (``client_USER_ex_UUID``); the AMQP library here
    refuses names of more than 127 characters or of any but a few
    (``ValueError: Invalid value for exchange``), which RabbitMQ takes."""
    user = _add_user(name.format(tag=uuid.uuid4().hex[:8]), f"pw-{uuid.uuid4().hex}",
                     ".*", ".*", ".*")
    try:
        url = url_for(amqp_url, quote(user.name, safe=""), user.password)
        with callme.Proxy(url, timeout=10) as proxy:
            assert proxy.use_server(host.calc).add(1, 1) == 2
            exchange = proxy.reply_exchange
            assert exchange is not None and exchange.startswith(f"client_{user.name}_ex_")
            assert proxy.use_server(host.calc).add(2, 3) == 5
        # Deleted when the proxy closed, as any reply queue.
        queue = exchange.replace("_ex_", "_queue_", 1)
        deadline = time.monotonic() + 10
        while queue in rabbitmqctl("list_queues", "name").splitlines():
            assert time.monotonic() < deadline, "the reply queue was left"
            time.sleep(0.2)
    finally:
        rabbitmqctl("delete_user", user.name)


def test_a_user_name_too_long_for_the_reply_names_is_refused_at_once() -> None:
    """AMQP names are at most 255 bytes, and the reply queue's is the
    user's and 50 more: refused before anything is sent, saying so, as
    the Rust proxy does."""
    callme.AsyncProxy(f"amqp://{'é' * 102}:pw@127.0.0.1:1/%2f")
    for user in ("u" * 206, "é" * 103):
        with pytest.raises(ValueError, match="user name is .* bytes.* at most 205"):
            callme.Proxy(f"amqp://{quote(user)}:pw@127.0.0.1:1/%2f")
        with pytest.raises(ValueError, match="user name is .* bytes.* at most 205"):
            callme.AsyncProxy(amqp_user=user, amqp_host="127.0.0.1", amqp_port=1)


def test_a_server_the_user_may_not_call_is_access_refused(
    amqp_url: str, host: Host, broker_users: "list[BrokerUser]"
) -> None:
    olivia = broker_users[1]
    with callme.Proxy(url_for(amqp_url, olivia.name, olivia.password), timeout=10) as proxy:
        assert proxy.reply_exchange is not None
        assert proxy.reply_exchange.startswith(f"client_{olivia.name}_ex_")
        assert proxy.use_server(host.calc).add(1, 1) == 2
        with pytest.raises(callme.AccessRefused):
            proxy.use_server(host.hostile).counter()
        # The refused publish closed only its own channel.
        assert proxy.use_server(host.calc).add(2, 2) == 4


def test_a_broker_that_is_not_there_is_a_connection_error() -> None:
    start = time.monotonic()
    with pytest.raises(callme.ConnectionError) as caught:
        callme.Proxy("amqp://guest:hidden-pw@127.0.0.1:1/%2f")
    assert time.monotonic() - start < 10
    assert isinstance(caught.value, ConnectionError)  # the built-in one too
    assert "hidden-pw" not in str(caught.value)
    assert "guest:***@127.0.0.1:1" in str(caught.value)


def test_the_urls_connection_timeout_bounds_a_silent_broker() -> None:
    # A port that accepts connections and never says a word.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(callme.ConnectionError) as caught:
            callme.Proxy(f"amqp://guest:hidden-pw@127.0.0.1:{port}/%2f?connection_timeout=500")
        assert time.monotonic() - start < 10  # not the 15 s default
        assert "did not answer within 0.5 s" in str(caught.value)
        assert "hidden-pw" not in str(caught.value)
    finally:
        silent.close()


def test_every_error_is_a_callme_error() -> None:
    for error in (callme.Timeout, callme.NoSuchServer, callme.AccessRefused,
                  callme.ConnectionError, callme.RemoteError, callme.GuestError,
                  callme.InvalidArguments, callme.NoSuchFunction, callme.Trap,
                  callme.MemoryLimit, callme.BadRequest, callme.Internal,
                  callme.RemoteTimeout, callme.Rejected, callme.TooLarge):
        assert issubclass(error, callme.CallmeError)


def test_malformed_responses_are_value_errors_not_other_exceptions() -> None:
    # Callers turn a ValueError into RemoteError("BadResponse").
    for body in (b'{"error": "x"}', b'{"error": [1]}', b"[" * 5000, b"{}", b"7",
                 b'{"error": null}', b'{"error": 0}', b'{"result": 1, "error": null}',
                 b'{"result": 1, "error": {"type": "Internal"}}', b'{"result": 1, "result": 2}',
                 b'{"result": {"a": 1, "a": 2}}', b'{"result": NaN}', b'{"result": -Infinity}'):
        with pytest.raises(ValueError):
            decode_response(body)


def test_replies_over_the_limit_are_refused_unread() -> None:
    limit = 1 << 20
    with pytest.raises(callme.Internal, match="2000013 bytes, the limit is 1048576"):
        decode_response(b'{"result":"' + b"x" * 2_000_000 + b'"}', limit)
    # 300 kB of tiny objects would parse into some 7 MB.
    tiny = b'{"result":[' + b"{}," * 100_000 + b"{}]}"
    with pytest.raises(callme.Internal, match="100002 JSON objects and 1 arrays"):
        decode_response(tiny, limit)
    assert len(decode_response(tiny, 64 << 20)) == 100_001
    # Braces and brackets in strings, escaped quotes among them, count for nothing.
    text = '\\"{[' * 100_000
    body = ('{"result": %s}' % json.dumps(text)).encode()
    assert decode_response(body, limit) == text
    # A small limit still takes a reply of a few objects.
    assert decode_response(b'{"result":[{},{"a":[1]}]}', 64) == [{}, {"a": [1]}]


def test_arguments_that_are_not_a_list_are_refused_unsent(proxy: callme.Proxy, host: Host) -> None:
    # A string used to go as its characters (["1","2"]), a dict as its
    # keys, and 0 as no arguments at all.
    for args in ("12", {"a": 1}, 0, b"12"):
        with pytest.raises(TypeError, match="must be a list or a tuple"):
            proxy.call(host.calc, "add", args)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping with string keys"):
        proxy.call(host.calc, "add", [], {1: 2})  # type: ignore[dict-item]
    assert proxy.call(host.calc, "add", (1, 2)) == 3
    assert proxy.call(host.calc, "add", None, {"a": 1, "b": 2}) == 3  # type: ignore[arg-type]


def test_a_reply_with_a_string_never_closed_is_refused_at_once() -> None:
    # Over the count of objects, so strings are looked for: an escaped
    # quote after another, never closed. Before, each quote started the
    # search anew, a time growing with the square of their number: 3.8 s
    # for 16,000 of them, so some 10 minutes for these 200,000 (1 MB), on
    # the loop every caller of the proxy waits on; now 0.03 s.
    body = b"{" * 600_000 + b'"' + b'\\"' * 200_000
    refused: "list[BaseException]" = []

    def decode() -> None:
        try:
            decode_response(body)
        except BaseException as e:
            refused.append(e)

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the reply is still being looked at after 60 s"
    assert len(refused) == 1 and isinstance(refused[0], callme.RemoteError), refused


def test_a_reply_over_the_proxys_limit_fails_its_call_alone(amqp_url: str, host: Host) -> None:
    with pytest.raises(ValueError, match="max_reply_bytes"):
        callme.Proxy(amqp_url, max_reply_bytes=0)
    small = callme.Proxy(amqp_url, timeout=30, max_reply_bytes=1 << 20)
    try:
        assert small.max_reply_bytes == 1 << 20
        with pytest.raises(callme.Internal, match="the limit is 1048576 .max_reply_bytes."):
            small.use_server(host.hostile).huge(2)
        assert small.use_server(host.calc).add(1, 2) == 3
    finally:
        small.close()
    default = callme.Proxy(amqp_url, timeout=30)
    try:
        assert default.max_reply_bytes == callme.DEFAULT_MAX_REPLY_BYTES == 16 << 20
        assert len(default.use_server(host.hostile).huge(2)) == 2 << 20
    finally:
        default.close()


def test_any_timeout_works(proxy: callme.Proxy, host: Host) -> None:
    # Infinite, and past RabbitMQ's longest expiration (2**32 - 1 ms).
    assert proxy.use_server(host.calc, timeout=math.inf).add(1, 1) == 2
    # An int past float's range.
    assert proxy.use_server(host.calc, timeout=10**400).add(1, 2) == 3
    assert proxy.use_server(host.calc, timeout=60 * 24 * 3600).add(2, 2) == 4


def test_a_blocking_call_inside_a_running_event_loop_is_refused_before_sending(
    proxy: callme.Proxy, host: Host
) -> None:
    async def inside() -> None:
        with pytest.raises(RuntimeError, match="AsyncProxy"):
            proxy.use_server(host.calc).add(1, 1)

    asyncio.run(inside())
    assert proxy.use_server(host.calc).add(3, 4) == 7


def test_keyword_arguments_named_func_or_self_go_to_the_server(
    proxy: callme.Proxy, host: Host
) -> None:
    # calc's add takes `a` and `b`: the server, not Python, refuses these.
    for kwargs in ({"func": 1, "b": 2}, {"self": 1, "b": 2}):
        with pytest.raises(callme.InvalidArguments):
            proxy.use_server(host.calc).add(**kwargs)
        with pytest.raises(callme.InvalidArguments):
            proxy.use_server(host.calc).call("add", **kwargs)


def test_a_broker_that_stalls_after_the_handshake_is_given_up_on_in_time(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection's time limit (``connection_timeout``) covers the
    reply queue's set-up too: a broker that takes the handshake and then
    never answers a declare (a node cut off from its cluster's majority)
    fails the proxy's start with ``ConnectionError``, where it waited
    until the heartbeat gave up (minutes), or for ever without one."""
    import aiormq
    import pamqp.commands

    rpc = aiormq.Channel.rpc

    async def stalls(self: Any, frame: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(frame, pamqp.commands.Queue.Declare):
            await asyncio.sleep(3600)
        return await rpc(self, frame, *args, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "rpc", stalls)
    url = amqp_url + ("&" if "?" in amqp_url else "?") + "connection_timeout=2000"
    start = time.monotonic()
    with pytest.raises(callme.ConnectionError, match="did not set up the reply queue"):
        callme.Proxy(url, timeout=5).close()
    assert time.monotonic() - start < 8


def test_a_server_id_the_broker_would_name_unreadably_is_refused_before_it_is_sent(
    amqp_url: str,
) -> None:
    """In a vhost whose name is not ASCII (87 ``v``, then ``ö``), a call to
    a missing 117-character server id would have the broker close the
    lane with ``NOT_FOUND - no exchange 'server_aaa..._ex' in vhost
    'vvv...\\xc3...``, cut at byte 252 inside the ``ö``: a frame aiormq
    cannot read, which ends the connection and every call on it. The call
    is refused before anything is sent (``ValueError``), and the proxy
    keeps its connection; a short missing id is ``NoSuchServer`` as ever,
    and an id over 117 characters, which pamqp cannot write, is a
    ``ValueError`` saying so."""
    vhost = f"{'v' * 87}ö-{uuid.uuid4().hex[:8]}"
    user = _add_user(f"py-echo-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}", ".*", ".*", ".*")
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user.name, ".*", ".*", ".*")
        url = url_for(amqp_url, user.name, user.password)
        url = urlsplit(url)._replace(path="/" + quote(vhost, safe="")).geturl()

        async def main() -> None:
            async with callme.AsyncProxy(url, timeout=10) as proxy:
                with pytest.raises(callme.NoSuchServer):
                    await proxy.call("nobody-here", "add", [1, 2])
                link = proxy._link
                assert link is not None
                connection = link._connection
                with pytest.raises(ValueError, match="too long to call"):
                    await proxy.call("a" * 117, "add", [1, 2])
                with pytest.raises(ValueError, match="at most 117"):
                    await proxy.call("a" * 118, "add", [1, 2])
                with pytest.raises(callme.NoSuchServer):
                    await proxy.call("nobody-here", "add", [1, 2])
                assert link._connection is connection and link.connected

        asyncio.run(main())
    finally:
        rabbitmqctl("delete_vhost", vhost)
        rabbitmqctl("delete_user", user.name)
