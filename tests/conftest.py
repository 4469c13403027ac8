import jax

# Several CPU devices so the sharding code runs (and is tested) on CPU; set before JAX initialises.
jax.config.update("jax_num_cpu_devices", 4)
