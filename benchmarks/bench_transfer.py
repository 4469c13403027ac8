"""Device-to-host copy rate: what bounds the Embedder on a GPU when it returns every layer in float32.

    python benchmarks/bench_transfer.py [--mb 1024 64]

Prints one JSON line per size and route: the best of --repeats copies of a fresh float32 array of that many
MB (each copy waits for the array to be computed first, so only the copy is timed). Routes:
- device_get: ``np.asarray(jax.device_get(x))``, as the Embedder reads its gathers;
- pinned_host: ``jax.device_put`` into the device's pinned host memory first (``memory_kind="pinned_host"``,
  where the device has it), then the same; a DMA into page-locked memory is usually much faster than into
  pageable memory. Not yet measured on a GPU: the next GPU session's device_checks.sh measures it.
On a CPU the "copy" is a view and the rate says nothing; on the H200 of 2026-12-04 device_get was 1.88 GB/s
for 1 GiB and 1.28 GB/s for 64 MB, and the Embedder's all-layer float32 output (12 KB a token at 2x4096_512)
moved at 1.33 GB/s.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def copy_seconds(mb: int, repeats: int, route: str) -> float:
    """Best seconds to copy a (mb MB,) float32 device array into a numpy array by ``route``."""
    x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    pinned = x.sharding.with_memory_kind("pinned_host")
    best = float("inf")
    for i in range(repeats + 1):  # the first copy also compiles the add
        y = (x + i).block_until_ready()
        start = time.perf_counter()
        if route == "pinned_host":
            y = jax.device_put(y, pinned)
        np.asarray(jax.device_get(y))
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[1024, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
    for mb in args.mb:
        for route in ["device_get"] + (["pinned_host"] if "pinned_host" in kinds else []):
            seconds = copy_seconds(mb, args.repeats, route)
            print(json.dumps({"what": "device to host copy", "route": route, "device": jax.devices()[0].device_kind,
                              "mb": mb, "ms": round(1000 * seconds, 2), "gb_per_s": round(mb / 1024 / seconds, 2)}))


if __name__ == "__main__":
    main()
