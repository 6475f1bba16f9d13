"""Fast inference for LCNNs: export a trained model, run each lookup layer on the fastest backend.

    from lcnn_jax import inference
    model = inference.export(workdir, "model.npz", batch_size=32)  # or export(nnx_model, ..., input_shape=...)
    model = inference.load("model.npz")
    logits = model(images)  # (batch, h, w, c) -> (batch, classes)

``python -m lcnn_jax.inference.predict model.npz a.jpg b.jpg`` prints the top-5 classes of image files, and
``python -m lcnn_jax.bench`` measures the dense CNN against the LCNN on every backend.

Names are imported on first use: ``load`` and the model it returns need the run-time modules alone
(:mod:`~lcnn_jax.inference.storage`, :mod:`~lcnn_jax.inference.model`, :mod:`~lcnn_jax.inference.graph`,
:mod:`~lcnn_jax.inference.backends`: JAX and NumPy, no Flax or trainer), while ``export`` brings in the export
side (:mod:`~lcnn_jax.inference.exporter`: tracing with Flax, the passes, tuning).
"""

import importlib

_HOMES = {
    "BACKENDS": "backends", "available_backends": "backends", "choose_backends": "tuning",
    "InferenceModel": "model", "LookupLayer": "records", "UnsupportedModel": "graph",
    "export": "exporter", "inference_model": "exporter", "load": "storage", "save": "storage",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f"module 'lcnn_jax.inference' has no attribute {name!r}")
  return getattr(importlib.import_module(f"lcnn_jax.inference.{_HOMES[name]}"), name)


def __dir__():
  return sorted([*globals(), *__all__])
