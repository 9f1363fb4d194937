// The logic of `greet`, apart from the host's imports so that `npm test`
// runs it with Node.js.

export function greeting(name) {
  return `hello, ${name}`;
}
