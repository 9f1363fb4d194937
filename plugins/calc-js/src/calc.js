// The `calc` example plugin in JavaScript: the same functions as the Rust
// `plugins/calc`, plus `boom`. Built by scripts/build-plugins with
// componentize-js into target/plugins/calc-js.wasm.
//
// WIT to JavaScript: s64/u64 are BigInt, other integers and floats are
// Number, `option<T>` is the value or `undefined`, an enum case is its name
// as a string, and a function returning `result<T, E>` returns `T` or
// throws `E` (its `err`).

import { log } from 'callme:plugin/host@0.1.0';

/**
 * `a + b`, wrapping on overflow (s64 arrives and leaves as BigInt).
 *
 * componentize-js 0.23.0 cannot return a negative s64: the guest traps
 * while lowering it (upstream ComponentizeJS issue #343), so `add(-1, -2)`
 * traps here where the Rust and Python plugins answer -3.
 */
export function add(a, b) {
  log('debug', `add ${a} ${b}`);
  return BigInt.asIntN(64, a + b);
}

/** The `n`th Fibonacci number, computed naively (slow on purpose). */
export function fib(n) {
  return BigInt.asUintN(64, BigInt(fibNumber(n)));
}

function fibNumber(n) {
  return n < 2 ? n : fibNumber(n - 1) + fibNumber(n - 2);
}

/** `a / b`; throwing a string makes the `err` of `result<f64, string>`. */
export function divide(a, b) {
  log('debug', `divide ${a} ${b}`);
  if (b === 0) {
    throw 'division by zero';
  }
  return a / b;
}

/** The plugin's version. */
export function version() {
  return '1';
}

/** Throws an Error carrying `message`, to show how a guest exception reaches the caller. */
export function boom(message) {
  throw new Error(message);
}

/** The exported interface `stats`. */
export const stats = {
  /** The arithmetic mean, or none (`undefined`) for an empty list. */
  mean(xs) {
    if (xs.length === 0) {
      return undefined;
    }
    let sum = 0;
    for (const x of xs) {
      sum += x;
    }
    return sum / xs.length;
  },
};
