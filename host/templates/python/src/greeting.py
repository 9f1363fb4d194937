"""The logic of `greet`, apart from the component's bindings so that the
tests run with any python3."""


def greeting(name: str) -> str:
    return f"hello, {name}"
