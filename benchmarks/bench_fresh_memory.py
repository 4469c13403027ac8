"""What memory touched for the first time costs on this machine, by how long ago other memory was freed.

    python benchmarks/bench_fresh_memory.py --mb 1024 --waits 0 5 20 --rounds 2

Each measurement is a fresh process that fills MB of new numpy memory once (page faults and zeroing included), started
WAIT seconds after the previous one ended and freed the same amount. On a plain Linux host the figure hardly depends on
the wait; in this project's sandbox (a Firecracker microVM that reports free memory to its host) a page that the host
has taken back costs ~15x more than one freed just before, which is why a whole-process run started minutes after the
peers' (``bench_embed.py --whole-process``) pays more for its ~1.3 GB than the same command run in a loop. numpy puts
an array this large on transparent huge pages, so this measures those: on small pages the same 1 GB took 0.54-0.71 ms
a MB whatever the wait (docs/performance.md, session 26). Prints one JSON line: ms a MB for each wait.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = """
import sys, time
import numpy as np
n = int(sys.argv[1]) << 20
start = time.perf_counter()
a = np.ones(n, np.uint8)
print((time.perf_counter() - start) * 1e3 / (n >> 20))
"""


def touch(mb: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(mb)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--waits", type=float, nargs="+", default=[0.0, 5.0, 20.0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ms_per_mb: dict[str, list[float]] = {str(w): [] for w in args.waits}
    touch(args.mb)  # the first run frees memory for the first wait
    for _ in range(args.rounds):
        for wait in args.waits:
            time.sleep(wait)
            ms_per_mb[str(wait)].append(round(touch(args.mb), 3))
    print(json.dumps({"what": "first touch of fresh memory, ms a MB, by seconds since the last free",
                      "mb": args.mb, "ms_per_mb": ms_per_mb}))


if __name__ == "__main__":
    main()
