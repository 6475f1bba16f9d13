"""The PyTorch dense baseline (lcnn_jax.inference.torch_engine): its logits equal the exported model's."""

import numpy as np
import pytest
from flax import nnx

from lcnn_jax.inference import torch_engine
from test_onnx import _Between, _assert_close, _npz_model
from test_inference import _Unfoldable, _as_if_trained, _model

pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
pytest.importorskip("torch", reason="torch is not installed (pip install torch): the PyTorch baseline needs it")

CASES = {
    "digits": lambda: (_model("digits", (8, 8, 1)), (8, 8, 1)),
    "alexnet": lambda: (_model("alexnet", (67, 67, 3)), (67, 67, 3)),
    "resnet": lambda: (_model("resnet", (32, 32, 3)), (32, 32, 3)),
    "between": lambda: (_Between(nnx.Rngs(1)), (8, 7, 3)),  # padded average pooling, channel max, concat
    "unfoldable": lambda: (_Unfoldable(nnx.Rngs(0)), (6, 5, 3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_logits_equal_the_exported_model(name, tmp_path, rng):
  model, input_shape = CASES[name]()
  loaded = _npz_model(_as_if_trained(model, rng, density=0.7), input_shape, tmp_path)
  x = rng.standard_normal((3, *input_shape)).astype(np.float32)
  engine = torch_engine.TorchEngine(loaded, batch=3, threads=1)
  _assert_close(engine(x), np.asarray(loaded(x)))


def test_untranslated_operators_are_named(rng):
  onnx = pytest.importorskip("onnx")
  node = onnx.helper.make_node("Softmax", ["x"], ["y"], name="soft")
  graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                                 [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])])
  with pytest.raises(ValueError, match="'Softmax'.*'soft'"):
    torch_engine.OnnxOnTorch(onnx.helper.make_model(graph))
