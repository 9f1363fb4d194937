"""The `relay` example plugin in Python: the capabilities of
callme:plugin@0.2.0 in use, as in the Rust `plugins/relay`. Built by
scripts/build-plugins with componentize-py into
target/plugins/relay-py.wasm.

`rpc.call` takes and returns JSON text; a failure raises
`componentize_py_types.Err` carrying the `remote-error` record (its
`type`, `message` and `data`). `config.get` returns the value or `None`.
`fetch` makes an HTTP GET through `wasi:http` (`fetch.py`).
"""

import json
from typing import Optional

import fetch as http_get
import wit_world
from componentize_py_types import Err
from wit_world.imports import config, rpc


class WitWorld(wit_world.WitWorld):
    def add_via(self, server: str, a: int, b: int) -> int:
        """`add(a, b)` of `server`, through the host; a failure raises
        `Err("Type: message")`, the `err` of `result<s64, string>`."""
        try:
            result = rpc.call(server, "add", json.dumps([a, b]))
        except Err as e:
            raise Err(f"{e.value.type}: {e.value.message}")
        value = json.loads(result)
        # An s64, or the answer is not one this function can give.
        if type(value) is not int or not -(2**63) <= value < 2**63:
            raise Err(f"BadResponse: {server}.add answered {result[:100]}, not an s64")
        return value

    def setting(self, key: str) -> Optional[str]:
        return config.get(key)

    def add(self, a: int, b: int) -> int:
        """`add(a, b)` of the server the setting `next` names: a relay
        whose `next` leads back to it makes a cycle, which the host ends at
        its call-depth limit (`CallDepthExceeded`)."""
        server = config.get("next")
        if server is None:
            raise Err("no `next` server in the settings")
        return self.add_via(server, a, b)

    def fetch(self, url: str) -> str:
        """The body of an HTTP GET of `url` (see `fetch.py`); a failure
        raises `Err("cannot fetch URL: ...")`."""
        try:
            return http_get.get(url)
        except Err as e:
            raise Err(f"cannot fetch {url}: {e.value}")
