"""The `calc` example plugin in Python: the same functions as the Rust
`plugins/calc`, plus `boom`. Built by scripts/build-plugins with
componentize-py into target/plugins/calc-py.wasm.

WIT to Python: integers are `int` (range-checked when they leave the
guest), floats are `float`, `option<T>` is the value or `None`, an enum is
a Python `Enum`, and a function returning `result<T, E>` returns `T` or
raises `componentize_py_types.Err(E)`. Functions of the world are methods
of a class named `WitWorld`; those of the exported interface `stats` are
methods of a class named `Stats`.
"""

from typing import List, Optional

import wit_world
from componentize_py_types import Err
from wit_world.imports import host

_S64_RANGE = 1 << 64
_S64_MIN = -(1 << 63)


def _debug(message: str) -> None:
    host.log(host.Level.DEBUG, message)


class WitWorld(wit_world.WitWorld):
    def add(self, a: int, b: int) -> int:
        """`a + b`, wrapping on overflow like the Rust plugin."""
        _debug(f"add {a} {b}")
        return (a + b - _S64_MIN) % _S64_RANGE + _S64_MIN

    def fib(self, n: int) -> int:
        """The `n`th Fibonacci number, computed naively (slow on purpose)."""
        if n < 2:
            return n
        return (self.fib(n - 1) + self.fib(n - 2)) % _S64_RANGE

    def divide(self, a: float, b: float) -> float:
        """`a / b`; raising `Err` makes the `err` of `result<f64, string>`."""
        _debug(f"divide {a} {b}")
        if b == 0.0:
            raise Err("division by zero")
        return a / b

    def version(self) -> str:
        return "1"

    def boom(self, message: str) -> None:
        """Raises an ordinary exception: the call traps, and the traceback
        goes to stderr, which the host captures into its log and the
        error message."""
        raise RuntimeError(message)


class Stats:
    """The exported interface `stats`."""

    def mean(self, xs: List[float]) -> Optional[float]:
        """The arithmetic mean, or None for an empty list."""
        if not xs:
            return None
        return sum(xs) / len(xs)
