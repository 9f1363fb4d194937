"""The calls of one proxy waiting for their replies, each with the reply queue its request named.

A reply is matched to its call by correlation id. Each call is tagged
with the reply queue its request named, so that when a connection is lost
only the calls waiting on that connection's queue are failed, and a queue
drained after an unreadable reply (see :mod:`callme_client.drain`) hands
its replies to, or fails, its own calls only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, Optional, Set, Tuple

from . import errors

__all__ = ["Pending", "LOST"]

log = logging.getLogger("callme.proxy")

#: Why a call waiting for its reply fails when the connection goes.
LOST = "the connection to the broker was lost before the reply came"


class Pending:
    """Calls waiting for replies, by correlation id."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: "Dict[str, Tuple[asyncio.Future[bytes], str]]" = {}

    def add(self, correlation_id: str, queue: str) -> "asyncio.Future[bytes]":
        """The future a call made with ``correlation_id``, its reply to come
        to ``queue``, awaits its reply's body on."""
        reply: "asyncio.Future[bytes]" = asyncio.get_running_loop().create_future()
        self._calls[correlation_id] = (reply, queue)
        return reply

    def remove(self, correlation_id: str) -> None:
        """The call is over, answered or not."""
        self._calls.pop(correlation_id, None)

    def reply(self, correlation_id: str, body: bytes) -> None:
        """Hands ``body`` to the call waiting for it; a reply nobody waits
        for (its call timed out, or a duplicate) is dropped."""
        waiting = self._calls.get(correlation_id)
        if waiting is None or waiting[0].done():
            log.debug("dropped a reply nobody waits for: correlation_id=%r", correlation_id)
            return
        waiting[0].set_result(body)

    def waiting_on(self, queue: str) -> Set[str]:
        """The calls waiting for a reply to ``queue``."""
        return {cid for cid, (reply, q) in self._calls.items() if q == queue and not reply.done()}

    def still_waiting(self, calls: Set[str], queue: str) -> bool:
        """Whether any of ``calls`` still waits for a reply to ``queue``;
        those that do not are taken out of ``calls``."""
        for cid in list(calls):
            waiting = self._calls.get(cid)
            if waiting is None or waiting[1] != queue or waiting[0].done():
                calls.discard(cid)
        return bool(calls)

    def fail(self, why: str, queue: Optional[str] = None, calls: Optional[Set[str]] = None) -> None:
        """Fails with :class:`ConnectionError` the calls waiting for a reply
        to ``queue`` (any queue if None), of ``calls`` only if given."""
        chosen = self._calls if calls is None else {
            cid: self._calls[cid] for cid in calls if cid in self._calls
        }
        for reply, q in chosen.values():
            if (queue is None or q == queue) and not reply.done():
                reply.set_exception(errors.ConnectionError(why))
                # Taken as seen: a call still publishing when the
                # connection goes fails on its own and never awaits this
                # future, which asyncio would report as "never retrieved".
                reply.exception()
