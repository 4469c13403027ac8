# one-off: device-to-host copy rate on this machine, one large array and 64 MB pieces
import time, jax, jax.numpy as jnp, numpy as np
for mb in (1024, 64):
    x = jnp.ones((mb * 2**20 // 4,), jnp.float32); x.block_until_ready()
    np.asarray(jax.device_get(x))
    best = 1e9
    for _ in range(5):
        y = x + 1; y.block_until_ready()
        s = time.perf_counter(); h = np.asarray(jax.device_get(y)); best = min(best, time.perf_counter() - s)
    print({"device_to_host_mb": mb, "ms": round(1000 * best, 2), "gb_per_s": round(mb / 1024 / best, 2)}, flush=True)
