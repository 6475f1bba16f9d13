"""The presets: run configs by name (``--config alexnet:fast``), one file per family of runs with its variants by
argument (``get_config(variant)``, the file's ``VARIANTS`` listing them, the default first).

Each file's ``get_config()`` returns the full config of one run; :func:`lcnn_jax.config.presets` lists them.
"""
