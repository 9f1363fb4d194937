// The `relay` example plugin in JavaScript: the capabilities of
// callme:plugin@0.2.0 in use, as in the Rust `plugins/relay`. Built by
// scripts/build-plugins with componentize-js into
// target/plugins/relay-js.wasm.
//
// `rpc.call` takes and returns JSON text, and throws the `remote-error`
// record (`type`, `message`, `data`) when the call fails; `config.get`
// returns the value or `undefined`. s64 values are BigInt. `fetch` makes
// an HTTP GET with the `wasi:http` imports directly (its own `fetch()` is
// asynchronous, and an export here is not).

import { get } from 'callme:plugin/config@0.2.0';
import { call } from 'callme:plugin/rpc@0.2.0';
import { handle } from 'wasi:http/outgoing-handler@0.2.4';
import { Fields, OutgoingRequest, httpErrorCode } from 'wasi:http/types@0.2.4';

/** `add(a, b)` of `server`, through the host; throws "Type: message". */
export function addVia(server, a, b) {
  let result;
  try {
    result = call(server, 'add', `[${a}, ${b}]`);
  } catch (e) {
    const error = e.payload ?? e;
    throw `${error.type}: ${error.message}`;
  }
  // An s64, or the answer is not one this function can give.
  const value = /^-?\d+$/.test(result) ? BigInt(result) : null;
  if (value === null || BigInt.asIntN(64, value) !== value) {
    throw `BadResponse: ${server}.add answered ${result.slice(0, 100)}, not an s64`;
  }
  return value;
}

/** The plugin's setting `key`, or `undefined`. */
export function setting(key) {
  return get(key);
}

/**
 * The body of an HTTP GET of `url` through `wasi:http`; throws the
 * failure as text, a `wasi:http` error code by name
 * (`cannot fetch URL: HttpRequestDenied`).
 */
export function fetch(url) {
  try {
    return httpGet(url);
  } catch (e) {
    throw `cannot fetch ${url}: ${typeof e === 'string' ? e : describe(e.payload ?? e)}`;
  }
}

const READ_CHUNK = 64n * 1024n;

function httpGet(url) {
  const match = /^(https?):\/\/([^/?]*)(.*)$/.exec(url);
  if (!match) {
    throw 'only http:// and https:// URLs are supported';
  }
  const [, scheme, authority, rest] = match;
  if (!authority) {
    throw 'the URL has no host';
  }
  const request = new OutgoingRequest(new Fields());
  request.setMethod({ tag: 'get' });
  request.setScheme({ tag: scheme.toUpperCase() }); // WIT cases `HTTP`, `HTTPS`
  request.setAuthority(authority);
  request.setPathWithQuery(rest.startsWith('/') ? rest : `/${rest}`);
  const pending = handle(request, undefined);
  let outcome = pending.get();
  while (outcome === undefined) {
    pending.subscribe().block();
    outcome = pending.get();
  }
  if (outcome.tag === 'err') {
    throw 'the response was already taken';
  }
  if (outcome.val.tag === 'err') {
    throw describe(outcome.val.val);
  }
  const response = outcome.val.val;
  const status = response.status();
  const stream = response.consume().stream();
  const chunks = [];
  for (;;) {
    try {
      chunks.push(stream.blockingRead(READ_CHUNK));
    } catch (e) {
      const error = e.payload ?? e;
      if (error.tag === 'closed') {
        break;
      }
      const code = httpErrorCode(error.val);
      throw code === undefined ? error.val.toDebugString() : describe(code);
    }
  }
  const text = new TextDecoder().decode(concat(chunks));
  if (status < 200 || status >= 300) {
    throw `HTTP status ${status}: ${text}`;
  }
  return text;
}

function concat(chunks) {
  const all = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return all;
}

/** `{ tag: 'HTTP-request-denied' }` as `HttpRequestDenied`, with its payload. */
function describe(code) {
  if (!code || typeof code.tag !== 'string') {
    return String(code);
  }
  const name = code.tag
    .split('-')
    .map((w) => w.charAt(0).toUpperCase() + w.slice(1).toLowerCase())
    .join('');
  return code.val === undefined ? name : `${name}(${String(code.val)})`;
}
