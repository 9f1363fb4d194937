"""An HTTP GET through the standard `wasi:http/outgoing-handler`, with the
bindings componentize-py generates for it: the request is built, sent,
waited for and its body read to the end, each resource dropped (`with`)
before the one it came from. A refusal or a limit of the host comes back
as the `wasi:http` error code by name (`HttpRequestDenied`, ...)."""

from componentize_py_types import Err, Ok
from wit_world.imports import outgoing_handler, streams
from wit_world.imports import types as http

READ_CHUNK = 64 * 1024


def _code(code: object) -> str:
    """`ErrorCode_HttpRequestDenied()` as `HttpRequestDenied`, with its
    payload when it has one."""
    name = type(code).__name__.removeprefix("ErrorCode_")
    value = getattr(code, "value", None)
    return name if value is None else f"{name}({value!r})"


def get(url: str) -> str:
    """The body of `url` as text; raises `Err(text)` on any failure."""
    if url.startswith("http://"):
        scheme, rest = http.Scheme_Http(), url[len("http://"):]
    elif url.startswith("https://"):
        scheme, rest = http.Scheme_Https(), url[len("https://"):]
    else:
        raise Err("only http:// and https:// URLs are supported")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority:
        raise Err("the URL has no host")
    if not path.startswith("/"):
        path = "/" + path

    request = http.OutgoingRequest(http.Fields())
    request.set_method(http.Method_Get())
    request.set_scheme(scheme)
    request.set_authority(authority)
    request.set_path_with_query(path)
    try:
        pending = outgoing_handler.handle(request, None)
    except Err as e:
        raise Err(_code(e.value))
    with pending:
        outcome = pending.get()
        while outcome is None:
            with pending.subscribe() as ready:
                ready.block()
            outcome = pending.get()
    if isinstance(outcome, Err) or isinstance(outcome.value, Err):
        raise Err(_code(outcome.value.value) if isinstance(outcome, Ok) else "no response")
    with outcome.value.value as response:
        status = response.status()
        with response.consume() as body:
            chunks = []
            with body.stream() as stream:
                while True:
                    try:
                        chunks.append(stream.blocking_read(READ_CHUNK))
                    except Err as e:
                        if isinstance(e.value, streams.StreamError_Closed):
                            break
                        code = http.http_error_code(e.value.value)
                        raise Err(
                            _code(code) if code is not None else e.value.value.to_debug_string()
                        )
    text = b"".join(chunks).decode("utf-8", errors="replace")
    if not 200 <= status < 300:
        raise Err(f"HTTP status {status}: {text}")
    return text
