"""ONNX export: ONNX Runtime's logits equal the exported .npz model's for every model kind."""

import importlib.util
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcnn_jax import bench, cli, inference, models
from lcnn_jax.inference import exporter as exporter_lib
from lcnn_jax.inference import onnx_export
from lookup_reference import dense_reference, random_layer
from helpers import (LAYER_CASES, Between, Unfoldable, as_if_trained, assert_close, eval_logits, npz_model,
                     run_config, small_model, write_run)

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")

MODEL_CASES = {
    "digits": dict(input_shape=(8, 8, 1)),
    "digits-lcnn": dict(input_shape=(8, 8, 1), classifier=4),
    "alexnet": dict(input_shape=(67, 67, 3)),
    "alexnet-lcnn": dict(input_shape=(67, 67, 3)),
    "resnet": dict(input_shape=(32, 32, 3)),
    "resnet-lcnn": dict(input_shape=(32, 32, 3)),
}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_onnx_runtime_logits_equal_the_npz_model(name, tmp_path, rng):
  case = dict(MODEL_CASES[name])
  input_shape = case.pop("input_shape")
  model = as_if_trained(small_model(name, input_shape, **case), rng)
  loaded = npz_model(model, input_shape, tmp_path)
  x = rng.standard_normal((3, *input_shape)).astype(np.float32)
  expected = np.asarray(loaded(x))
  forms = ["dense", "factored"] if loaded.lookup_layers else ["dense"]
  for form in forms:
    proto = onnx_export.to_onnx(loaded, form)
    assert proto.opset_import[0].version >= 17
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
        "batch", input_shape[2], *input_shape[:2]]  # NCHW
    assert not {n.op_type for n in proto.graph.node} & {"BatchNormalization", "Transpose"}  # folded; NCHW throughout
    assert_close(onnx_export.run(onnx_export.session(proto), x), expected)


def test_unfolded_batch_norms_flat_lookups_and_strided_1x1_convolutions_export(tmp_path, rng):
  model = as_if_trained(Unfoldable(nnx.Rngs(0)), rng, density=0.7)
  loaded = npz_model(model, (6, 5, 3), tmp_path)
  x = rng.standard_normal((4, 6, 5, 3)).astype(np.float32)
  for form in onnx_export.LOOKUP_FORMS:
    assert_close(onnx_export.run(onnx_export.session(onnx_export.to_onnx(loaded, form)), x), eval_logits(model, x))


def test_operations_between_layers_translate_in_either_layout(tmp_path, rng):
  model = Between(nnx.Rngs(1))
  loaded = npz_model(model, (8, 7, 3), tmp_path)
  x = rng.standard_normal((3, 8, 7, 3)).astype(np.float32)
  proto = onnx_export.to_onnx(loaded)
  assert {"AveragePool", "ReduceMax", "Concat", "Transpose"} <= {n.op_type for n in proto.graph.node}
  assert_close(onnx_export.run(onnx_export.session(proto), x), eval_logits(model, x))


@pytest.mark.parametrize("form", onnx_export.LOOKUP_FORMS)
def test_lookup_forms_equal_the_dense_reference(form, rng):
  layer = random_layer(rng, **LAYER_CASES["map_strided"])
  x = rng.standard_normal((2, *layer.input_size, layer.in_features)).astype(np.float32)
  sess = onnx_export.session(onnx_export._one_layer_model(layer, form))
  got = sess.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: np.transpose(x, (0, 3, 1, 2))})[0]
  assert_close(np.transpose(got, (0, 2, 3, 1)), dense_reference(layer, x))


def test_auto_forms_are_measured_per_layer_and_recorded(tmp_path, rng):
  model = as_if_trained(small_model("digits-lcnn", (8, 8, 1), classifier=4), rng)
  exported = inference.inference_model(model, (8, 8, 1), backends="dense", class_names=list("abcdefghij"))
  forms, timings = onnx_export.choose_lookup_forms(exported, 2)
  assert set(forms) == set(exported.lookup_layers) == set(timings)
  assert all(forms[name] == min(times, key=times.get) for name, times in timings.items())
  saved = onnx_export.save(exported, tmp_path / "m.onnx", lookup_forms=forms)
  assert saved == forms
  props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
  assert '"a"' in props["class_names"] and props["input_layout"] == '"NCHW"'


def test_bad_forms_and_untranslatable_primitives_are_named(rng):
  model = as_if_trained(small_model("digits-lcnn", (8, 8, 1), classifier=4), rng)
  exported = inference.inference_model(model, (8, 8, 1), backends="dense")
  with pytest.raises(ValueError, match="'sparse'.*dense, factored"):
    onnx_export.to_onnx(exported, "sparse")

  class Sorts(nnx.Module):
    def __init__(self):
      self.fc = nnx.Linear(4, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.fc(jnp.sort(x.reshape(x.shape[0], 4), axis=-1))

  with pytest.raises(inference.UnsupportedModel, match="'sort'"):
    onnx_export.to_onnx(inference.inference_model(Sorts(), (2, 2, 1), backends="dense"))


def export_command(*args):
  """The exit status of ``python -m lcnn_jax.inference.exporter ARGS``, run in this process."""
  return cli.call(exporter_lib.main, exporter_lib.define_flags, ["exporter", *args])


def test_export_command_writes_onnx_by_suffix_and_explains_a_missing_onnx(tmp_path, rng, capsys, monkeypatch):
  model = as_if_trained(models.create_model(run_config().model, num_classes=10, input_shape=(16, 16, 3),
                                            rngs=nnx.Rngs(4)), rng)
  write_run(tmp_path / "run", model, {"name": "folder", "num_classes": 10, "image_shape": [16, 16, 3],
                                      "mean": [0.5] * 3, "std": [0.2] * 3})
  output = tmp_path / "model.onnx"
  assert export_command(f"--workdir={tmp_path / 'run'}", f"--output={output}",
                        "--lookup_form=factored") == 0
  assert "factored" in capsys.readouterr().out
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  assert_close(onnx_export.run(onnx_export.session(output), x), eval_logits(model, x))
  monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
  missing = tmp_path / "other.onnx"
  assert export_command(f"--workdir={tmp_path / 'run'}", f"--output={missing}") == 2
  assert "pip install -e '.[onnx]'" in capsys.readouterr().err and not missing.exists()


# Benchmark baselines -----------------------------------------------------------------------------------------

def test_benchmark_times_the_cnn_on_each_engine_and_skips_the_missing_ones(tmp_path, monkeypatch, rng):
  monkeypatch.setenv("LCNN_JAX_CACHE", str(tmp_path))
  model = as_if_trained(models.create_model(run_config().model, num_classes=10, input_shape=(8, 8, 1),
                                            rngs=nnx.Rngs(3)), rng)
  write_run(tmp_path / "run", model, {"name": "digits", "num_classes": 10, "image_shape": [8, 8, 1],
                                      "class_names": None, "mean": [0.5], "std": [0.25]})
  result = bench.run("alexnet", "fast", 2, checkpoint=str(tmp_path / "run"), seconds=0.05, backend_names=["gather"],
                     baselines=["xla", "onnxruntime", "torch"])
  baselines = result["baselines"]
  assert baselines["xla"]["dense_ms"] > 0 and baselines["onnxruntime"]["dense_ms"] > 0
  engines = ["xla", "onnxruntime"]
  if importlib.util.find_spec("torch"):
    engines.append("torch")
  else:
    assert "torch is not installed" in baselines["torch"]["skipped"]
  assert all(baselines[e]["dense_ms"] > 0 for e in engines)
  fastest = min(engines, key=lambda e: baselines[e]["dense_ms"])
  headline = result["headline"]
  assert headline["fastest_dense_engine"] == fastest
  assert headline["wall_speedup"] == pytest.approx(baselines[fastest]["dense_ms"] / headline["lcnn_ms"])
  for row in result["rows"]:  # the existing keys, against XLA, and the new ones against the fastest engine
    assert row["wall_speedup"] == pytest.approx(row["dense_ms"] / row["lcnn_ms"])
    assert row["dense_ms"] == baselines["xla"]["dense_ms"]
    assert row["wall_speedup_vs_fastest"] == pytest.approx(baselines[fastest]["dense_ms"] / row["lcnn_ms"])
  assert result["lcnn_onnxruntime"]["lcnn_ms"] > 0
  assert set(result["lcnn_onnxruntime"]["lookup_forms"]) == {"conv1", "conv2", "conv3", "classifier"}
  # the LCNN's fastest float32 engine: this runtime's mix or its own ONNX export, whichever ran faster
  lcnn_ms = {"auto": headline["lcnn_ms"], "lcnn:onnxruntime": result["lcnn_onnxruntime"]["lcnn_ms"]}
  best = min(lcnn_ms, key=lcnn_ms.get)
  assert (headline["fastest_lcnn_engine"], headline["fastest_lcnn_ms"]) == (best, lcnn_ms[best])
  assert headline["fastest_lcnn_wall_speedup"] == pytest.approx(baselines[fastest]["dense_ms"] / lcnn_ms[best])
  assert "headline" in bench.format_table(result)
  headline.update(fastest_lcnn_engine="lcnn:onnxruntime", fastest_lcnn_ms=1.5, fastest_lcnn_wall_speedup=2.25)
  assert "the LCNN's fastest float32 engine here is lcnn:onnxruntime, 1.500 ms: 2.25x" in bench.format_table(result)

  monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
  result = bench.run("alexnet", "fast", 2, checkpoint=str(tmp_path / "run"), seconds=0.05, backend_names=["gather"],
                     baselines=["xla", "onnxruntime"])
  assert "pip install" in result["baselines"]["onnxruntime"]["skipped"]
  assert result["headline"]["fastest_dense_engine"] == "xla" and "lcnn_onnxruntime" not in result
  assert result["headline"]["fastest_lcnn_engine"] == "auto"


def bench_command(*args):
  """The exit status of ``python -m lcnn_jax.bench ARGS``, run in this process."""
  return cli.call(bench.main, bench.define_flags, ["bench", *args])


def test_benchmark_rejects_an_unknown_engine(capsys):
  assert bench_command("--baselines=xla,tensorrt") == 2
  assert "tensorrt" in capsys.readouterr().err
