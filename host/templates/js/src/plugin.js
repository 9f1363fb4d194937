// The `{{name}}` callme plugin: an ES module whose exports are the
// functions the world in wit/world.wit exports, callable by name once the
// component is served. Imports named after a WIT interface are the host's.

import { log } from 'callme:plugin/host@0.1.0';
import { greeting } from './greeting.js';

/** A greeting for `name`. */
export function greet(name) {
  log('info', `greeting ${name}`);
  return greeting(name);
}
