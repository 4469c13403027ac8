"""The matmul peak that the benchmarks report their fraction of: one implementation for all of them.

Measured in the same process as the figure it divides, since these machines' peaks vary (120-216 GFLOP/s on
this project's 2-core CPUs between machines, ~10% hour to hour on one).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 10) -> float:
    """Best FLOP/s of a jitted (n, n) @ (n, n) matmul of random values in ``dtype`` on the default device.

    n: 2048 on a CPU; 8192 on an accelerator, which a smaller product leaves far from its peak (an H200 ran
    2048 at 149 TFLOP/s in bfloat16 and 8192 at 673).
    """
    n = n or (2048 if jax.devices()[0].platform == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
