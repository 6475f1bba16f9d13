"""The OpenVINO dense baseline (lcnn_jax.inference.openvino_engine): its f32 logits equal the exported model's,
its precision is what the compiled model says, and bench times it in each precision, float32 apart."""

import sys

import numpy as np
import pytest
from flax import nnx

from lcnn_jax import bench, inference, models
from lcnn_jax.inference import onnx_export, openvino_engine
from helpers import ENGINE_CASES as CASES
from helpers import as_if_trained, assert_close, npz_model, run_config, small_model, write_run

pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")


@pytest.fixture
def openvino():
  """The ``openvino`` module; the test is skipped, saying how to install it, where it is missing."""
  return pytest.importorskip("openvino", reason="openvino is not installed (pip install -e '.[openvino]'): the "
                             "OpenVINO baseline needs it")


def _loaded(name, tmp_path, rng):
  model, input_shape = CASES[name]()
  return npz_model(as_if_trained(model, rng, density=0.7), input_shape, tmp_path), input_shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_openvino_f32_logits_equal_the_exported_model(name, openvino, tmp_path, rng):
  loaded, input_shape = _loaded(name, tmp_path, rng)
  x = rng.standard_normal((3, *input_shape)).astype(np.float32)
  engine = openvino_engine.OpenVinoEngine(loaded, batch=3, threads=1, precision="f32")
  assert engine.precision == "f32" and engine.dtype == "float32"
  assert_close(engine(x), np.asarray(loaded(x)))


@pytest.mark.parametrize("batch, hint", [(1, "LATENCY"), (4, "THROUGHPUT")])
def test_each_batch_gets_its_performance_hint_and_the_whole_batch_back(batch, hint, openvino, tmp_path, rng):
  loaded, input_shape = _loaded("alexnet", tmp_path, rng)
  x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
  engine = openvino_engine.OpenVinoEngine(loaded, batch=batch, threads=2, precision="f32")
  assert engine.hint == hint and batch % engine.requests == 0  # at 4 the batch is split among the streams
  assert_close(engine(x), np.asarray(loaded(x)))


def test_the_default_precision_is_read_back_from_the_compiled_model(openvino, tmp_path, rng):
  loaded, input_shape = _loaded("alexnet", tmp_path, rng)
  engine = openvino_engine.OpenVinoEngine(loaded, batch=2, threads=2)
  assert engine.precision == openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
  assert engine.dtype == openvino_engine.PRECISIONS[engine.precision]
  x = rng.standard_normal((2, *input_shape)).astype(np.float32)
  expected = np.asarray(loaded(x))
  error = np.abs(engine(x) - expected).max() / np.abs(expected).max()
  assert error <= openvino_engine.tolerance(engine.precision)


@pytest.mark.parametrize("forms", ["factored", "auto"])
def test_an_lcnn_runs_on_openvino_in_its_lookup_forms(forms, openvino, rng):
  input_shape = (8, 8, 1)
  model = as_if_trained(small_model("digits-lcnn", input_shape, classifier=4), rng)
  loaded = inference.inference_model(model, input_shape, backends="dense")
  assert loaded.lookup_layers
  engine = openvino_engine.OpenVinoEngine(loaded, batch=2, threads=1, precision="f32", lookup_forms=forms)
  assert set(engine.lookup_forms) == set(loaded.lookup_layers)
  if forms == "auto":  # each layer timed alone on OpenVINO in both forms; the faster kept
    for name, times in engine.lookup_form_ms.items():
      assert set(times) == set(onnx_export.LOOKUP_FORMS) and all(t > 0 for t in times.values())
      assert engine.lookup_forms[name] == min(times, key=times.get)
  else:
    assert set(engine.lookup_forms.values()) == {"factored"} and engine.lookup_form_ms == {}
  x = rng.standard_normal((2, *input_shape)).astype(np.float32)
  assert_close(engine(x), np.asarray(loaded(x)))


def test_logits_that_differ_from_the_model_are_refused(openvino, tmp_path, rng, monkeypatch):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  loaded, _ = _loaded("digits", tmp_path / "a", rng)
  other, _ = _loaded("digits", tmp_path / "b", rng)  # the same network, other weights
  wrong_graph = onnx_export.to_onnx(other)
  monkeypatch.setattr(onnx_export, "to_onnx", lambda model, forms="dense": wrong_graph)
  with pytest.raises(openvino_engine.LogitsMismatch, match="differ from the exported model's by .* of the largest"):
    openvino_engine.OpenVinoEngine(loaded, batch=2, threads=1, precision="f32")


def test_without_openvino_the_benchmark_skips_it_with_the_pip_command(tmp_path, rng, monkeypatch):
  monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
  loaded, _ = _loaded("digits", tmp_path, rng)
  setup = bench.Setup(dense=loaded, lcnn=None, lcnn_module=None, count_speedup=1.0, density=None)
  engines, skipped = bench.dense_engines(setup, ["xla", "openvino"], batch=1)
  assert list(engines) == ["xla"]
  assert "openvino is not installed" in skipped["openvino"] and "pip install" in skipped["openvino"]


def test_benchmark_times_openvino_in_each_precision_and_quotes_float32_against_float32(openvino, tmp_path,
                                                                                        monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  model = as_if_trained(models.create_model(run_config().model, num_classes=10, input_shape=(8, 8, 1),
                                            rngs=nnx.Rngs(3)), rng)
  write_run(tmp_path / "run", model, {"name": "digits", "num_classes": 10, "image_shape": [8, 8, 1],
                                      "class_names": None, "mean": [0.5], "std": [0.25]})
  time_models = bench.time_models

  def low_precision_fastest(variants, images, seconds):  # as on a CPU where bf16 wins by far
    times = time_models(variants, images, seconds)
    for name in times:
      if name.startswith("cnn:openvino (") and "f32" not in name:
        times[name] = 1e-6
    return times

  monkeypatch.setattr(bench, "time_models", low_precision_fastest)
  result = bench.run("alexnet", "fast", 2, checkpoint=str(tmp_path / "run"), seconds=0.05, backend_names=["gather"],
                     baselines=["xla", "openvino"])
  baselines, headline = result["baselines"], result["headline"]
  rows = sorted(e for e in baselines if e.startswith("openvino"))
  default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
  if default == "f32":
    assert rows == ["openvino (f32, default)"]
  else:
    assert rows == [f"openvino ({default})", "openvino (f32)"]
  for engine in rows:
    assert baselines[engine]["dense_ms"] > 0
    assert baselines[engine]["precision"] == ("float32" if "f32" in engine else openvino_engine.PRECISIONS[default])
  float32 = [e for e, b in baselines.items() if b["precision"] == "float32"]
  fastest = min(float32, key=lambda e: baselines[e]["dense_ms"])
  assert headline["fastest_dense_engine"] == fastest
  assert headline["wall_speedup"] == pytest.approx(baselines[fastest]["dense_ms"] / headline["lcnn_ms"])
  fastest_any = min(baselines, key=lambda e: baselines[e]["dense_ms"])
  assert headline["fastest_dense_any_precision"] == fastest_any
  assert headline["wall_speedup_vs_fastest_any_precision"] == pytest.approx(
      baselines[fastest_any]["dense_ms"] / headline["lcnn_ms"])
  assert all(row["fastest_dense_engine"] == fastest for row in result["rows"])
  lcnn_rows = {f"lcnn:{e}" for e in rows}  # the LCNN's export on OpenVINO in each precision
  assert lcnn_rows <= set(result["lcnn_engines"]) and set(result["lcnn_openvino"]) == set(rows)
  for engine in rows:
    assert result["lcnn_engines"][f"lcnn:{engine}"]["precision"] == baselines[engine]["precision"]
  float32_lcnn = {e: v["lcnn_ms"] for e, v in result["lcnn_engines"].items() if v["precision"] == "float32"}
  assert headline["fastest_lcnn_engine"] == min(float32_lcnn, key=float32_lcnn.get)
  any_lcnn = {e: v["lcnn_ms"] for e, v in result["lcnn_engines"].items()}
  assert headline["fastest_lcnn_any_precision"] == min(any_lcnn, key=any_lcnn.get)
  assert headline["fastest_lcnn_vs_fastest_dense_any_precision"] == pytest.approx(
      baselines[fastest_any]["dense_ms"] / min(any_lcnn.values()))
  table = bench.format_table(result)
  assert all(engine in table for engine in rows) and "fastest float32 dense engine" in table
  if default != "f32":
    assert fastest_any == f"openvino ({default})" != fastest and "in any precision" in table
