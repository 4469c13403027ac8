# one-off: the gradient of a gather from the char embedding (262, 16), bfloat16 vs float32, on this device
import time, jax, jax.numpy as jnp, numpy as np
ids = jnp.asarray(np.random.default_rng(0).integers(1, 262, (256 * 20 * 2 * 22,)), jnp.int32)  # a batch's positions
for dtype in (jnp.float32, jnp.bfloat16):
    table = jnp.ones((262, 16), dtype)
    g = jax.jit(jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0).astype(jnp.float32) ** 2)))
    g(table).block_until_ready()
    best = 1e9
    for _ in range(5):
        s = time.perf_counter(); g(table).block_until_ready(); best = min(best, time.perf_counter() - s)
    print({"scatter_add_dtype": str(jnp.dtype(dtype)), "updates": int(ids.size), "ms": round(1000 * best, 3)}, flush=True)
