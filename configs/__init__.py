"""The presets: run configs by name (``--config alexnet_fast``), shipped with the package as ``lcnn_jax.configs``.

Each file's ``get_config()`` returns the full config of one run; :func:`lcnn_jax.config.presets` lists them.
"""
