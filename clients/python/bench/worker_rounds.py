"""The worker side of bench/sequential.py's rounds, for the callers it runs
under venvs of their own (seed_callme.py, lean_pika.py).

The worker reads ``N`` lines on stdin, makes N sequential ``add(i, 1)``
calls and answers each line with one JSON object: the calls' durations
(seconds) and the CPU time it spent on them.
"""

import json
import sys
import time


def answer_rounds(add):
    clock = time.perf_counter
    for line in sys.stdin:
        samples = []
        cpu = time.process_time()
        for i in range(int(line)):
            t = clock()
            result = add(i, 1)
            samples.append(clock() - t)
            if result != i + 1:
                raise SystemExit("wrong answer %r" % (result,))
        cpu = time.process_time() - cpu
        print(json.dumps({"samples": samples, "cpu": cpu}), flush=True)
