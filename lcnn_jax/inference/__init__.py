"""Fast inference for LCNNs: export a trained model, run each lookup layer on the fastest backend.

    from lcnn_jax import inference
    model = inference.export(workdir, "model.npz", batch_size=32)  # or export(nnx_model, ..., input_shape=...)
    model = inference.load("model.npz")
    logits = model(images)  # (batch, h, w, c) -> (batch, classes)

``python -m lcnn_jax.inference.predict model.npz a.jpg b.jpg`` prints the top-5 classes of image files, and
``python -m lcnn_jax.bench`` measures the dense CNN against the LCNN on every backend.
"""

from lcnn_jax.inference import pallas_lookup  # registers the 'pallas' backend
from lcnn_jax.inference.backends import BACKENDS, LookupLayer, available_backends
from lcnn_jax.inference.exporter import export, inference_model, load, save
from lcnn_jax.inference.graph import UnsupportedModel
from lcnn_jax.inference.model import InferenceModel
from lcnn_jax.inference.tuning import choose_backends

__all__ = ["BACKENDS", "InferenceModel", "LookupLayer", "UnsupportedModel", "available_backends",
           "choose_backends", "export", "inference_model", "load", "save"]
