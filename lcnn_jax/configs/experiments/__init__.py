"""The presets of the experiments (``python -m lcnn_jax.experiments.*``): ``--config experiments/spectrum``."""
