"""fiddlediff: Fiddle-configured diffusion and flow-matching training in JAX / Flax NNX."""
