"""numpy's BLAS with its default threads against one: the products a retrain computes.

    .venv/bin/python scripts/bench_blas.py

A (M, 1280) @ (1280, 800) float32 product (head inputs against the replay set's rows), for
a few M, timed 5 times in a fresh process with OpenBLAS's default threads and with
OPENBLAS_NUM_THREADS=1, the two processes side by side for each M; min and median in ms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys, time
import numpy as np
m = int(sys.argv[1])
rng = np.random.default_rng(0)
a = rng.random((m, 1280), dtype=np.float32)
b = rng.random((1280, 800), dtype=np.float32)
a @ b
times = []
for _ in range(5):
    started = time.perf_counter()
    a @ b
    times.append((time.perf_counter() - started) * 1000)
times.sort()
print(json.dumps([times[0], times[len(times) // 2]]))
"""


def timed(m: int, threads: str | None) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if threads:
        env["OPENBLAS_NUM_THREADS"] = threads
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(m)], env=env, capture_output=True, text=True, check=True
    )
    return [float(t) for t in json.loads(out.stdout)]


def main() -> None:
    print("| M rows | default threads: min / median ms | 1 thread: min / median ms |")
    print("|---:|---:|---:|")
    for m in (1, 20, 200, 2048):
        default, one = timed(m, None), timed(m, "1")
        print(f"| {m} | {default[0]:.2f} / {default[1]:.2f} | {one[0]:.2f} / {one[1]:.2f} |")


if __name__ == "__main__":
    main()
