"""The inference runtime stands alone: loading and running an exported model needs neither Flax nor the trainer."""

import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import inference, layers
from lcnn_jax.inference import graph as graph_lib
from lcnn_jax.inference import passes, storage

EXPORT_ONLY = ("flax", "optax", "orbax", "grain", "ml_collections", "lcnn_jax.train", "lcnn_jax.checkpoint",
               "lcnn_jax.flops", "lcnn_jax.models", "lcnn_jax.layers", "lcnn_jax.inference.exporter",
               "lcnn_jax.inference.tracing")
"""Modules that loading and running an exported model must not import."""
PALLAS = ("jax.experimental.pallas", "lcnn_jax.inference.pallas_lookup")
"""Modules imported only when a backend spec names ``pallas``."""

BACKEND = "lookup" if "lookup" in inference.available_backends() else "gather"


class _Small(nnx.Module):
  """A lookup convolution, its BatchNorm, ReLU and max pooling (fused at export), and a lookup classifier."""

  def __init__(self, rngs):
    self.conv = layers.LookupConv(3, 8, 3, dictionary_size=2, padding=1, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.fc = layers.LookupDense(8 * 6 * 6, 5, dictionary_size=4, rngs=rngs)

  def __call__(self, x):
    y = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), strides=(2, 2))
    return self.fc(y.reshape(y.shape[0], -1))


def _export(path, rng):
  model = _Small(nnx.Rngs(0))
  model.bn.mean[...] = jnp.asarray(rng.normal(0, 0.3, 8), jnp.float32)
  model.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 8), jnp.float32)
  return inference.export(model, path, input_shape=(12, 12, 3), backends=BACKEND)


def _run(code: str) -> str:
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_a_fresh_process_loads_and_runs_an_export_without_flax_or_the_trainer(tmp_path, rng):
  path = tmp_path / "small.npz"
  exported = _export(path, rng)  # this process: Flax, the layers, tracing and the passes
  x = rng.standard_normal((17, 12, 12, 3)).astype(np.float32)  # from 16 images the kernel pools the map
  np.save(tmp_path / "x.npy", x)
  out = _run(f"""
      import json, sys
      import numpy as np
      import lcnn_jax.inference
      model = lcnn_jax.inference.load({str(path)!r})
      np.save({str(tmp_path / "loaded.npy")!r}, np.asarray(model(np.load({str(tmp_path / "x.npy")!r}))))
      print(json.dumps(sorted(m for m in sys.modules if m.startswith({EXPORT_ONLY + PALLAS!r}))))
  """)
  assert json.loads(out.splitlines()[-1]) == []
  np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"), np.asarray(exported(x)))


def test_importing_the_package_loads_neither_jax_nor_flax():
  out = _run("""
      import sys, lcnn_jax.inference
      print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'optax'}))
  """)
  assert out.strip() == "[]"


def test_the_exporter_command_runs_as_a_module_without_a_warning():
  result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "lcnn_jax.inference.exporter",
                           "--help"], capture_output=True, text=True)
  assert result.returncode == 0 and "--workdir" in result.stdout, result.stderr[-2000:]
  assert "RuntimeWarning" not in result.stderr


def test_the_fusion_is_found_at_export_stored_and_not_searched_again(tmp_path, rng, monkeypatch):
  exported = _export(tmp_path / "small.npz", rng)
  fusion = exported.graph.fusion
  assert fusion.relus_into_max_pools and len(fusion.layers_into_max_pools) == 1
  for name in ("fuse", "relus_into_max_pools", "layers_into_max_pools"):
    monkeypatch.setattr(passes, name, lambda *a: pytest.fail("a pass ran after export"))
  loaded = inference.load(tmp_path / "small.npz")
  assert loaded.graph.fusion == fusion
  x = rng.standard_normal((17, 12, 12, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(exported(x)))


def test_a_file_of_format_version_1_gets_its_fusion_when_it_loads(tmp_path, rng):
  exported = _export(tmp_path / "small.npz", rng)
  with np.load(tmp_path / "small.npz", allow_pickle=False) as archive:
    arrays = {key: archive[key] for key in archive.files}
  header = json.loads(arrays["header"].tobytes())
  del header["graph"]["fusion"]
  header["version"] = 1
  arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  np.savez(tmp_path / "old.npz", **arrays)
  loaded = inference.load(tmp_path / "old.npz")
  assert loaded.graph.fusion == exported.graph.fusion
  x = rng.standard_normal((17, 12, 12, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(exported(x)))


def test_a_file_of_a_newer_format_is_refused_with_the_version(tmp_path, rng):
  _export(tmp_path / "small.npz", rng)
  with np.load(tmp_path / "small.npz", allow_pickle=False) as archive:
    arrays = {key: archive[key] for key in archive.files}
  header = json.loads(arrays["header"].tobytes())
  header["version"] = storage.VERSION + 1
  arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  np.savez(tmp_path / "new.npz", **arrays)
  with pytest.raises(ValueError, match=f"version {storage.VERSION + 1}; this lcnn_jax reads up to"):
    inference.load(tmp_path / "new.npz")


def test_graph_without_fusion_runs_each_step_on_its_own(tmp_path, rng):
  exported = _export(tmp_path / "small.npz", rng)
  plain = inference.InferenceModel(graph_lib.Graph(exported.graph.equations, exported.graph.input,
                                                   exported.graph.output, exported.graph.consts),
                                   exported.layers, input_shape=exported.input_shape, backends=exported.backends)
  x = rng.standard_normal((17, 12, 12, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(exported(x)), rtol=1e-5, atol=1e-5)
