import assert from 'node:assert/strict';
import { test } from 'node:test';

import { greeting } from '../src/greeting.js';

test('greeting names the caller', () => {
  assert.equal(greeting('ann'), 'hello, ann');
});
