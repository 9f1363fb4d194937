"""One blocking proxy shared by many threads."""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import logging
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

import pytest

import callme_client as callme
from conftest import Host, rabbitmqctl, unique

THREADS = 8
CALLS = 200


def test_eight_threads_share_one_proxy_and_every_answer_is_their_own(
    amqp_url: str, host: Host
) -> None:
    with callme.Proxy(amqp_url, timeout=30) as proxy:
        start = threading.Barrier(THREADS)

        def caller(thread: int) -> List[int]:
            calc = proxy.use_server(host.calc)
            start.wait()
            wrong = []
            for i in range(CALLS):
                a, b = thread * 1_000_000, i
                if calc.add(a, b) != a + b:
                    wrong.append(i)
            return wrong

        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(caller, range(THREADS)))
        assert results == [[] for _ in range(THREADS)]


def test_threads_calling_a_missing_server_cost_the_others_nothing(
    proxy: callme.Proxy, host: Host
) -> None:
    def caller(i: int) -> str:
        if i % 2:
            try:
                proxy.use_server(host.missing).add(i, 1)
            except callme.NoSuchServer:
                return "missing"
            return "answered?"
        return "ok" if proxy.use_server(host.calc).add(i, 1) == i + 1 else "wrong"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(caller, range(200)))
    assert results.count("ok") == 100
    assert results.count("missing") == 100


@pytest.mark.parametrize("callers", [1, 4])
def test_closing_a_proxy_ends_every_call_waiting_on_it(
    amqp_url: str, host: Host, callers: int
) -> None:
    # The first waiting call runs the proxy's loop in its own thread; the
    # others, made meanwhile, are handed to the proxy's thread. Closing
    # ends them all at once.
    proxy = callme.Proxy(amqp_url, timeout=30)
    outcome: List[BaseException] = []

    def waiting() -> None:
        try:
            proxy.use_server(host.calc).call("slow-version", 5000)
        except BaseException as e:
            outcome.append(e)

    threads = [threading.Thread(target=waiting) for _ in range(callers)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    closed_at = time.monotonic()
    proxy.close()
    for thread in threads:
        thread.join(timeout=5)
    assert not any(thread.is_alive() for thread in threads)
    assert time.monotonic() - closed_at < 5
    assert len(outcome) == callers
    assert all(isinstance(e, callme.ConnectionError) for e in outcome), outcome
    with pytest.raises(callme.ConnectionError, match="closed"):
        proxy.use_server(host.calc).add(1, 1)


def test_a_proxy_closed_where_an_event_loop_runs_closes_its_connection(
    amqp_url: str, host: Host
) -> None:
    """``close`` (or the finalizer) called in async code, in a thread
    whose event loop runs: the proxy's own loop cannot run there, and the
    close was skipped in silence, the connection left open and the reply
    queue to the broker's expiry."""
    name = unique("py-close-in-async")
    proxy = callme.Proxy(amqp_url, timeout=10, connection_name=name)
    assert proxy.use_server(host.calc).add(1, 1) == 2
    exchange = proxy.reply_exchange
    assert exchange is not None
    queue = exchange.replace("_ex_", "_queue_", 1)

    def open_connections() -> int:
        listing = rabbitmqctl("list_connections", "--no-table-headers", "-q", "client_properties")
        return sum(f'{{"connection_name","{name}"}}' in line for line in listing.splitlines())

    assert open_connections() == 1

    async def shutdown() -> None:
        proxy.close()

    asyncio.run(shutdown())
    deadline = time.monotonic() + 5
    while open_connections() or queue in rabbitmqctl("list_queues", "name").split():
        assert time.monotonic() < deadline, "the connection or the reply queue was left"
        time.sleep(0.2)
    with pytest.raises(callme.ConnectionError, match="closed"):
        proxy.use_server(host.calc).add(1, 1)


def test_closing_a_proxy_while_its_thread_drives_calls_ends_them_quietly(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call runs the loop and ends; the calls handed over
    meanwhile are then driven by the proxy's own thread, which a close must
    end as quietly as it ends the calls: no thread dies with a traceback."""
    crashed: List[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    proxy = callme.Proxy(amqp_url, timeout=30)
    outcome: List[BaseException] = []

    def calling(ms: int) -> None:
        try:
            proxy.use_server(host.calc).call("slow-version", ms)
        except BaseException as e:
            outcome.append(e)

    first = threading.Thread(target=calling, args=(300,))
    first.start()
    time.sleep(0.1)
    others = [threading.Thread(target=calling, args=(5000,)) for _ in range(3)]
    for thread in others:
        thread.start()
    time.sleep(1.0)  # the first is answered; the proxy's thread drives the rest
    proxy.close()
    for thread in [first, *others]:
        thread.join(timeout=5)
    assert len(outcome) == 3 and all(isinstance(e, callme.ConnectionError) for e in outcome), outcome
    time.sleep(0.3)
    assert [args.exc_type for args in crashed] == []


def test_an_interrupt_that_reaches_the_proxys_own_thread_does_not_end_it(
    amqp_url: str, host: Host
) -> None:
    """A KeyboardInterrupt meant for the main thread can surface later in
    a task of the proxy's loop (aiormq's reader re-raises it after its
    clean-up), while the proxy's own thread runs the loop. It ended that
    thread, and with it the calls handed to it: a thread calling while
    another held the loop waited forever. Played here by a callback that
    raises it, run by the proxy's thread while nobody calls."""
    with callme.Proxy(amqp_url, timeout=10) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2

        def interrupt() -> None:
            raise KeyboardInterrupt

        loop = proxy._loop
        loop.loop.call_soon_threadsafe(interrupt)
        # The proxy's thread runs the loop within 0.4 s while idle.
        time.sleep(0.6)
        assert loop._driver.is_alive(), "the proxy's thread ended"

        def caller(thread: int) -> int:
            return sum(calc.add(thread, i) for i in range(20))

        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(caller, t) for t in range(THREADS)]
            sums = [f.result(timeout=30) for f in futures]
        assert sums == [20 * t + sum(range(20)) for t in range(THREADS)]


def test_a_call_handed_over_as_the_proxy_closes_does_not_hang() -> None:
    """A call handed to the proxy's thread just after a close ran the
    loop's last turn was left to nobody: it waited forever. Played here
    by a loop whose thread has ended, closed while the call waits."""
    import callme_client.proxy as callme_proxy

    shared = callme_proxy._SharedLoop()
    with shared._state:
        shared._stopped = True
        shared._state.notify()
    shared._driver.join(5)
    outcome: List[BaseException] = []

    async def forever() -> None:
        await asyncio.sleep(3600)

    coroutine = forever()

    def call() -> None:
        try:
            shared._wait_handed(shared._hand_over(coroutine), coroutine)
        except BaseException as e:
            outcome.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    time.sleep(0.3)
    shared.loop.close()
    caller.join(10)
    assert not caller.is_alive(), "the call waits forever"
    assert len(outcome) == 1 and isinstance(outcome[0], callme.ConnectionError), outcome
    # Closed, never run: not reported as never awaited.
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


def test_a_signal_handler_may_call_and_close_the_proxy_its_thread_is_calling(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler that calls the proxy, then closes it (a SIGTERM
    handler saying goodbye, say), while its thread is in a call of the
    proxy between taking the loop's turn and running the loop: its call
    is answered, and the close ends the call it interrupted. Both used to
    wait for ever for a turn only their own thread could give back. The
    handler is made to run at that point: making the call's coroutine
    there sends the signal."""
    import callme_client.proxy as proxy_module

    if not hasattr(signal, "SIGUSR1"):
        pytest.skip("no SIGUSR1 here")
    # A hang fails the run rather than holding it for ever.
    faulthandler.dump_traceback_later(60, exit=True)
    answered: List[int] = []
    try:
        with callme.Proxy(amqp_url, timeout=10) as proxy:
            calc = proxy.use_server(host.calc)
            assert calc.add(1, 1) == 2

            def handler(signum: int, frame: object) -> None:
                answered.append(calc.add(2, 2))
                proxy.close()

            settled = proxy_module._settled
            fired: List[bool] = []

            def interrupting(loop: Any, coroutine: Any) -> Any:
                if not fired:
                    fired.append(True)
                    os.kill(os.getpid(), signal.SIGUSR1)
                return settled(loop, coroutine)

            previous = signal.signal(signal.SIGUSR1, handler)
            try:
                monkeypatch.setattr(proxy_module, "_settled", interrupting)
                with pytest.raises(callme.ConnectionError):
                    calc.add(3, 3)
            finally:
                signal.signal(signal.SIGUSR1, previous)
            assert fired
            assert answered == [4]
            with pytest.raises(callme.ConnectionError, match="closed"):
                calc.add(4, 4)
            assert proxy._loop.loop.is_closed()
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_a_signal_handler_just_after_its_thread_took_the_loops_turn_may_call_and_close(
    amqp_url: str, host: Host
) -> None:
    """As above, the signal landing as soon as the call has taken the
    loop's turn, before it notes which thread holds it: the handler's
    call waited for ever for the turn."""
    if not hasattr(signal, "SIGUSR1"):
        pytest.skip("no SIGUSR1 here")
    faulthandler.dump_traceback_later(60, exit=True)
    answered: List[int] = []
    try:
        with callme.Proxy(amqp_url, timeout=10) as proxy:
            calc = proxy.use_server(host.calc)
            assert calc.add(1, 1) == 2
            shared = proxy._loop

            def handler(signum: int, frame: object) -> None:
                answered.append(calc.add(2, 2))
                proxy.close()

            class Interrupting:
                """The loop's turn, sending the signal once taken."""

                fired = False

                def __init__(self, turn: "threading.RLock") -> None:
                    self.turn = turn

                def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
                    taken = self.turn.acquire(blocking, timeout)
                    if taken and not Interrupting.fired and threading.current_thread() is threading.main_thread():
                        Interrupting.fired = True
                        os.kill(os.getpid(), signal.SIGUSR1)
                    return taken

                def release(self) -> None:
                    self.turn.release()

                def __enter__(self) -> bool:
                    return self.acquire()

                def __exit__(self, *_: object) -> None:
                    self.release()

            previous = signal.signal(signal.SIGUSR1, handler)
            try:
                shared._turn = Interrupting(shared._turn)  # type: ignore[assignment]
                with pytest.raises(callme.ConnectionError):
                    calc.add(3, 3)
            finally:
                signal.signal(signal.SIGUSR1, previous)
            assert Interrupting.fired
            assert answered == [4]
            assert shared.loop.is_closed()
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_a_signal_handler_that_closes_the_proxy_while_its_thread_runs_the_loop_closes_the_loop(
    amqp_url: str, host: Host
) -> None:
    """A signal landing while its thread runs the proxy's loop for a call:
    a call from the handler is refused at once (it cannot run the loop
    inside itself), and a close ends the call and, once the call's turn
    is over, the loop. The loop used to be left open, its thread and
    sockets with it."""
    if not hasattr(signal, "SIGUSR1"):
        pytest.skip("no SIGUSR1 here")
    faulthandler.dump_traceback_later(60, exit=True)
    refused: List[BaseException] = []
    try:
        with callme.Proxy(amqp_url, timeout=10) as proxy:
            calc = proxy.use_server(host.calc)
            assert calc.add(1, 1) == 2
            shared = proxy._loop

            def handler(signum: int, frame: object) -> None:
                try:
                    calc.add(2, 2)
                except RuntimeError as e:
                    refused.append(e)
                proxy.close()

            previous = signal.signal(signal.SIGUSR1, handler)
            try:
                timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))
                timer.start()
                with pytest.raises(callme.ConnectionError):
                    calc.call("slow-version", 3000)
                timer.join()
            finally:
                signal.signal(signal.SIGUSR1, previous)
            assert len(refused) == 1, refused
            assert shared.loop.is_closed()
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_ctrl_c_as_a_call_is_handed_over_leaves_nothing_behind(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C in the main thread just as its call is handed to the
    thread running the loop (another thread's call holds it) interrupts
    that call. It used to land between counting the call as handed and
    asking to hear when it ends: the call went on with nobody waiting for
    it, and stayed counted for ever, so that every later call was handed
    to the proxy's thread. Played by a SIGINT raised right inside the
    hand-over."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        pytest.skip("needs the main thread, with Python's own SIGINT handler")
    handing = asyncio.run_coroutine_threadsafe
    raised: List[int] = []

    def handing_interrupted(coroutine: Any, loop: Any) -> Any:
        future = handing(coroutine, loop)
        if threading.current_thread() is threading.main_thread() and not raised:
            raised.append(1)
            signal.raise_signal(signal.SIGINT)
        return future

    with callme.Proxy(amqp_url, timeout=30) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        holder = threading.Thread(target=lambda: calc.call("slow-version", 1500))
        holder.start()
        time.sleep(0.3)  # the other thread's call runs the loop
        monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", handing_interrupted)
        try:
            with pytest.raises(KeyboardInterrupt):
                calc.add(2, 2)
        finally:
            monkeypatch.undo()
        holder.join(10)
        assert raised == [1]
        loop = proxy._loop
        deadline = time.monotonic() + 5
        while loop._handed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop._handed == 0, "the interrupted call is still counted as handed over"
        assert calc.add(3, 3) == 6


def test_ctrl_c_costs_only_the_call_it_interrupts(
    amqp_url: str, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """A Ctrl-C while the main thread runs the proxy's loop for its call
    used to raise KeyboardInterrupt in whichever of the loop's tasks ran
    at that instant: in aiormq's reader it ended the connection, and
    every call on it failed. Now it cancels that call, which raises
    KeyboardInterrupt, and nothing else. Played by real SIGINTs, 80 of
    them at random moments while the main thread calls without pause."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        pytest.skip("needs the main thread, with Python's own SIGINT handler")
    caplog.set_level(logging.INFO, logger="callme.proxy")
    signals = 80
    sent: List[int] = []
    done = threading.Event()

    def interrupter() -> None:
        pace = random.Random(7)
        while len(sent) < signals and not done.wait(pace.uniform(0.005, 0.03)):
            os.kill(os.getpid(), signal.SIGINT)
            sent.append(1)

    answered = interrupted = stray = 0
    wrong: List[int] = []
    with callme.Proxy(amqp_url, timeout=10) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        sender = threading.Thread(target=interrupter, daemon=True)
        sender.start()
        i = 0
        try:
            while True:
                try:
                    if len(sent) >= signals:
                        break
                    try:
                        value = calc.add(i, 1)
                    except KeyboardInterrupt:
                        interrupted += 1
                        continue
                    if value != i + 1:
                        wrong.append(i)
                    answered += 1
                    i += 1
                except KeyboardInterrupt:
                    stray += 1  # landed in this test's own code, between calls
        finally:
            # No SIGINT reaches the rest: the sender may have one on its way.
            while True:
                try:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    break
                except KeyboardInterrupt:
                    stray += 1
            done.set()
            sender.join(10)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"ctrl-c: {answered} answered, {interrupted} interrupted, {stray} between calls")
        assert interrupted > 0, (answered, stray)
        assert wrong == []
        # The connection lived through it, and serves every call after.
        assert [calc.add(n, n) for n in range(20)] == [2 * n for n in range(20)]
    assert "lost the connection" not in caplog.text, caplog.text


def test_a_call_guard_left_in_place_gives_sigint_back_to_python() -> None:
    """A call's SIGINT guard left installed by an exit nobody foresaw (a
    handler of another signal raising just after the swap) must not
    swallow every later Ctrl-C: it raises KeyboardInterrupt, and puts
    Python's own handler back."""
    import asyncio

    import callme_client.proxy as callme_proxy

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        pytest.skip("needs the main thread, with Python's own SIGINT handler")
    loop = asyncio.new_event_loop()
    try:
        guard = callme_proxy._CtrlC(loop)
        guard.install()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        guard._active = False  # what an exit that skipped `restore` leaves
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        loop.close()


def test_a_thread_calling_without_pause_runs_its_calls_itself(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy's own thread runs the loop while nobody calls. It used
    to take the loop a few times a second however busy a caller was, and
    that caller's next call, finding the loop taken, was handed over to
    it (a thread hop each way) instead of run in place."""
    import callme_client.proxy as callme_proxy

    handed: List[int] = []
    hand_over = callme_proxy._SharedLoop._hand_over

    def counted(self: Any, coroutine: Any) -> Any:
        handed.append(1)
        return hand_over(self, coroutine)

    monkeypatch.setattr(callme_proxy._SharedLoop, "_hand_over", counted)
    with callme.Proxy(amqp_url, timeout=10) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        calls = 0
        start = time.monotonic()
        # Past several of the proxy thread's ticks (IDLE_TICK apart).
        while time.monotonic() - start < 2.0:
            assert calc.add(calls, 1) == calls + 1
            calls += 1
    print(f"calls without pause: {calls} in 2 s, {len(handed)} handed over")
    assert handed == []
