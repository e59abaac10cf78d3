"""Imported first by :mod:`sam_jax`: without JAX and Optax installed, an error that names the extra."""

from sam_core._extras import require

require("sam_jax")
