"""The `{{name}}` callme plugin.

componentize-py looks up the class `WitWorld` in this module: its methods
are the functions the world in wit/world.wit exports, callable by name once
the component is served. `wit_world` is generated from wit/ at build time.
"""

import wit_world
from wit_world.imports import host

from greeting import greeting


class WitWorld(wit_world.WitWorld):
    def greet(self, name: str) -> str:
        host.log(host.Level.INFO, f"greeting {name}")
        return greeting(name)
