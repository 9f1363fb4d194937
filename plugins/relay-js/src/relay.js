// The `relay` example plugin in JavaScript: the capabilities of
// callme:plugin@0.2.0 in use, as in the Rust `plugins/relay`. Built by
// scripts/build-plugins with componentize-js into
// target/plugins/relay-js.wasm.
//
// `rpc.call` takes and returns JSON text, and throws the `remote-error`
// record (`type`, `message`, `data`) when the call fails; `config.get`
// returns the value or `undefined`. s64 values are BigInt.

import { get } from 'callme:plugin/config@0.2.0';
import { call } from 'callme:plugin/rpc@0.2.0';

/** `add(a, b)` of `server`, through the host; throws "Type: message". */
export function addVia(server, a, b) {
  let result;
  try {
    result = call(server, 'add', `[${a}, ${b}]`);
  } catch (e) {
    const error = e.payload ?? e;
    throw `${error.type}: ${error.message}`;
  }
  return BigInt(result);
}

/** The plugin's setting `key`, or `undefined`. */
export function setting(key) {
  return get(key);
}
