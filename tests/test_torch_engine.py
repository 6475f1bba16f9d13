"""The PyTorch dense baseline (lcnn_jax.inference.torch_engine): its logits equal the exported model's."""

import numpy as np
import pytest

from lcnn_jax.inference import torch_engine
from helpers import ENGINE_CASES as CASES
from helpers import as_if_trained, assert_close, npz_model

pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
pytest.importorskip("torch", reason="torch is not installed (pip install torch): the PyTorch baseline needs it")


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_logits_equal_the_exported_model(name, tmp_path, rng):
  model, input_shape = CASES[name]()
  loaded = npz_model(as_if_trained(model, rng, density=0.7), input_shape, tmp_path)
  x = rng.standard_normal((3, *input_shape)).astype(np.float32)
  engine = torch_engine.TorchEngine(loaded, batch=3, threads=1)
  assert_close(engine(x), np.asarray(loaded(x)))


def test_untranslated_operators_are_named(rng):
  onnx = pytest.importorskip("onnx")
  node = onnx.helper.make_node("Softmax", ["x"], ["y"], name="soft")
  graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                                 [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])])
  with pytest.raises(ValueError, match="'Softmax'.*'soft'"):
    torch_engine.OnnxOnTorch(onnx.helper.make_model(graph))
