"""bench/bench.py's CPU placement: the server and the benchmark on separate CPUs.

Run in a child interpreter, so pinning never touches the test process. A `sleep` with a child of
its own stands in for a postmaster and a backend it forked.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from bench.bench import pin_apart
parent = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
from native.cluster import _descendants
deadline = time.monotonic() + 10
while not (kids := _descendants(parent.pid)) and time.monotonic() < deadline:
    time.sleep(0.01)  # until it has forked its child
try:
    placement = pin_apart([parent.pid, None])
    print(placement)
    print(sorted(os.sched_getaffinity(0)))
    print(sorted(os.sched_getaffinity(parent.pid)))
    print([sorted(os.sched_getaffinity(k)) for k in kids])
finally:
    parent.kill()
    for k in kids:
        os.kill(k, 9)
"""


def test_pin_apart_splits_the_cpus_between_server_and_client() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        assert out[0] == "not pinned (one CPU)"
        return
    client, server = cpus[:len(cpus) // 2], cpus[len(cpus) // 2:]
    assert out[0] == (f"client on CPU {','.join(map(str, client))}, "
                      f"server on CPU {','.join(map(str, server))}")
    assert out[1] == str(client)
    assert out[2] == str(server)
    kids = ast.literal_eval(out[3])
    assert kids and all(k == server for k in kids)  # a backend forked before the pinning, too
