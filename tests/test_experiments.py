"""The experiments: data subsets, deeper digits nets, weight and dictionary transfer, and each command's core
function on tiny runs (rows, resumability, what each arm starts from)."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from lcnn_jax import checkpoint, config as config_lib, data, models, train
from lcnn_jax.data import sources
from lcnn_jax.experiments import common, few_iteration, few_shot, spectrum
from conftest import make_tiny_config


def tiny_config():
  """The shared tiny run (conftest), narrower and shorter: 2 steps of 16 images at width 4."""
  return make_tiny_config(model=dict(width=4, dictionary=dict(convs=2)),
                          train=dict(batch_size=16, num_steps=2, steps_per_epoch=10_000, checkpoint_every=2,
                                     log_every=1, eval_every=2, eval_batch_size=400),
                          sparsity=dict(strength=10.0))


def no_training(*args, **kwargs):
  raise AssertionError("a finished point was trained again")


def lookup_array(model, path, name):
  module = model
  for part in path.split("/"):
    module = getattr(module, part)
  return np.asarray(getattr(module, name)[...])


# ------------------------------------------------------------------------------------------------ data subsets


def test_select_keeps_classes_relabelled_and_the_first_examples_of_each():
  splits = sources.open_digits()
  chosen = sources.select(splits, [7, 2], 3)
  assert chosen.num_classes == 2 and chosen.class_names == ["7", "2"]
  train_labels = np.asarray(splits.train.labels)
  expected = np.sort(np.concatenate([np.flatnonzero(train_labels == 7)[:3], np.flatnonzero(train_labels == 2)[:3]]))
  np.testing.assert_array_equal(chosen.train.indices, expected)
  for i in range(len(chosen.train)):
    image, label = chosen.train[i]
    original_image, original_label = splits.train[int(expected[i])]
    np.testing.assert_array_equal(image, original_image)
    assert label == {7: 0, 2: 1}[original_label] == chosen.train.labels[i]
  eval_labels = np.asarray(splits.eval.labels)
  assert len(chosen.eval) == np.sum((eval_labels == 7) | (eval_labels == 2))


def test_select_with_defaults_returns_the_splits_unchanged():
  splits = sources.open_digits()
  assert sources.select(splits, None, 0) is splits


@pytest.mark.parametrize("classes, per_class, message", [((3, 3), 0, "distinct"), ((10,), 0, r"\[0, 10\)"),
                                                         ((0,), 10_000, "has only")])
def test_select_rejects_bad_subsets_with_the_key(classes, per_class, message):
  with pytest.raises(ValueError, match=message):
    sources.select(sources.open_digits(), classes, per_class)


def test_dataset_info_and_iterators_see_the_subset():
  c = tiny_config()
  full = data.dataset_info(c.data)
  c.data.classes, c.data.examples_per_class = (5, 6, 7, 8, 9), 2
  c.data.mean, c.data.std = full.mean, full.std
  info = data.dataset_info(c.data)
  assert (info.num_classes, info.num_train) == (5, 10)
  batch = next(data.make_train_iterator(c.data, info, global_batch_size=16, seed=0))
  assert set(batch["label"].tolist()) <= set(range(5))


# ------------------------------------------------------------------------------------------------ deeper digits nets


def test_convs_per_stage_one_is_the_original_net_and_more_adds_layers_of_the_same_width():
  c = config_lib.default_config().model
  c.name, c.width, c.dictionary.convs = "digits-lcnn", 4, 2
  shallow = models.create_model(c, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  names = {path[0] for path, _ in nnx.iter_modules(shallow) if path}
  assert names == {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "dropout", "classifier"}
  c.convs_per_stage = 3
  deep = models.create_model(c, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  assert lookup_array(deep, "conv1_3", "dictionary").shape == (4, 2)  # (input width w, k)
  assert lookup_array(deep, "conv3_2", "dictionary").shape == (16, 2)  # (input width 4w, k)
  assert deep(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ transfer


def test_map_dictionaries_prefers_the_same_path_then_the_repeated_layer():
  c = config_lib.default_config().model
  c.name, c.width, c.convs_per_stage = "digits-lcnn", 4, 2
  shallow = models.create_model(c, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  c.convs_per_stage = 4
  deep = models.create_model(c, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(1))
  mapping = common.map_dictionaries(shallow, deep)
  assert mapping["conv2"] == "conv2" and mapping["conv1_2"] == "conv1_2"
  assert mapping["conv1_4"] == "conv1_2" and mapping["conv3_3"] == "conv3_2"
  c.convs_per_stage = 1
  with pytest.raises(common.ExperimentError, match="conv3_2"):
    common.map_dictionaries(models.create_model(c, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0)), deep)


# ------------------------------------------------------------------------------------------------ commands


def test_spectrum_trains_each_point_once_and_skips_finished_ones(tmp_path, monkeypatch):
  rows = spectrum.run_spectrum(tiny_config(), str(tmp_path), sizes=[2], strengths=[30.0])
  assert [row["point"] for row in rows] == ["cnn", "k2_s30"]
  assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 1.0
  assert json.load(open(tmp_path / "k2_s30" / "config.json"))["config"]["model"]["dictionary"]["convs"] == 2
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert spectrum.run_spectrum(tiny_config(), str(tmp_path), sizes=[2], strengths=[30.0]) == rows
  measured = spectrum.measure_wall_clock(str(tmp_path / "k2_s30"), 1, 0.05)
  assert measured["wall_speedup"] > 0 and set(measured["backends"]) == {"conv1", "conv2", "conv3"}
  assert spectrum.measure_wall_clock(str(tmp_path / "k2_s30"), 1, 0.05) == measured  # cached per batch size
  spectrum.plot_spectrum(rows, str(tmp_path / "spectrum.png"), "tiny")
  assert os.path.getsize(tmp_path / "spectrum.png") > 0
  other = tiny_config()
  other.train.learning_rate = 0.01
  with pytest.raises(common.ExperimentError, match="another config"):
    spectrum.run_spectrum(other, str(tmp_path), sizes=[2], strengths=[30.0])


def test_spectrum_figure_reads_in_percent_and_times_and_no_tick_labels_collide(tmp_path):
  # The strength grid of docs/experiments.md: the wall-clock panel spans under a decade, where log axes label
  # minor ticks (2×10⁰, 3×10⁰, …) that ran into each other.
  table = [("cnn", "-", "-", 99.17, 1.0, 1.0), ("k16_s3", 16, 3.0, 98.61, 3.0, 2.0), ("k8_s3", 8, 3.0, 98.61, 5.9, 3.0),
           ("k4_s3", 4, 3.0, 95.83, 11.4, 4.1), ("k2_s3", 2, 3.0, 86.94, 21.3, 6.0),
           ("k16_s30", 16, 30.0, 98.61, 15.2, 4.0), ("k8_s30", 8, 30.0, 95.56, 28.5, 5.2),
           ("k4_s30", 4, 30.0, 91.67, 54.7, 5.9), ("k2_s30", 2, 30.0, 77.5, 107.6, 6.4)]
  rows = [{"point": point, "dictionary_size": k, "strength": strength, "target": "-", "top1": top1 / 100,
           "speedup": speedup, "wall_speedup": wall} for point, k, strength, top1, speedup, wall in table]
  fig, axes = spectrum.spectrum_figure(rows, bench_batch=256)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  for ax in axes:
    x_labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()
                and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert len(x_labels) >= 3 and all(t.get_text().endswith("×") for t in x_labels)
    boxes = sorted((t.get_window_extent(renderer) for t in x_labels), key=lambda box: box.x0)
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), [t.get_text() for t in x_labels]
    y_labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert y_labels and all(text.endswith("%") for text in y_labels), y_labels
  common.pyplot().close(fig)
  spectrum.plot_spectrum(rows, str(tmp_path / "spectrum.png"), "strength grid", bench_batch=256)
  assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_few_shot_transfers_dictionaries_to_the_lcnn_and_all_but_the_classifier_to_the_cnn(tmp_path, monkeypatch):
  config = tiny_config()
  rows, bases = few_shot.run_few_shot(config, str(tmp_path), ns=[1], base_classes=[0, 1], novel_classes=[2, 3, 4],
                                      novel_steps=2, last_layer="classifier")
  assert [row["n"] for row in rows] == [1] and set(bases) == {"lcnn", "cnn"} and "cnn_last_top1" in rows[0]
  base_lcnn, _, _ = checkpoint.restore_model(str(tmp_path / "base_lcnn"))
  novel_lcnn, novel_config, _ = checkpoint.restore_model(str(tmp_path / "lcnn_n1"))
  assert novel_config.train.freeze_dictionaries and novel_config.data.examples_per_class == 1
  for layer in ("conv2", "conv3"):  # frozen at the base run's values
    np.testing.assert_array_equal(lookup_array(novel_lcnn, layer, "dictionary"),
                                  lookup_array(base_lcnn, layer, "dictionary"))
  assert novel_lcnn.classifier.kernel.shape[-1] == 3
  assert json.load(open(tmp_path / "lcnn_n1" / "config.json"))["dataset"]["num_train"] == 3
  # The CNN's step-0 checkpoint is the base CNN but its classifier; training then changes every layer.
  base_cnn, _, _ = checkpoint.restore_model(str(tmp_path / "base_cnn"))
  start, _, _ = checkpoint.restore_model(str(tmp_path / "cnn_n1"), step=0)
  np.testing.assert_array_equal(start.conv2.kernel[...], base_cnn.conv2.kernel[...])
  np.testing.assert_array_equal(start.bn2.mean[...], base_cnn.bn2.mean[...])
  final, _, _ = checkpoint.restore_model(str(tmp_path / "cnn_n1"))
  assert not np.array_equal(final.conv2.kernel[...], base_cnn.conv2.kernel[...])
  # Last layer only: the same start; training changes the classifier and no other weight.
  last, _, _ = checkpoint.restore_model(str(tmp_path / "cnn_last_n1"))
  for layer in ("conv1", "conv2", "conv3"):
    np.testing.assert_array_equal(getattr(last, layer).kernel[...], getattr(base_cnn, layer).kernel[...])
  start, _, _ = checkpoint.restore_model(str(tmp_path / "cnn_last_n1"), step=0)
  assert not np.array_equal(last.classifier.kernel[...], start.classifier.kernel[...])
  # --lcnn_init=all: its own points, starting from every base LCNN weight but the classifier.
  all_rows, _ = few_shot.run_few_shot(config, str(tmp_path), ns=[1], base_classes=[0, 1], novel_classes=[2, 3, 4],
                                      novel_steps=2, lcnn_init="all")
  assert len(all_rows) == 1
  start, _, _ = checkpoint.restore_model(str(tmp_path / "lcnn_all_n1"), step=0)
  np.testing.assert_array_equal(lookup_array(start, "conv3", "coefficients"),
                                lookup_array(base_lcnn, "conv3", "coefficients"))
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert few_shot.run_few_shot(config, str(tmp_path), ns=[1], base_classes=[0, 1], novel_classes=[2, 3, 4],
                               novel_steps=2, last_layer="classifier") == (rows, bases)
  few_shot.plot_few_shot(rows, str(tmp_path / "few_shot.png"), "tiny")
  with pytest.raises(ValueError, match="overlap"):
    few_shot.run_few_shot(config, str(tmp_path), ns=[1], base_classes=[0, 1], novel_classes=[1, 2], novel_steps=2)


def test_few_iteration_starts_the_deep_lcnn_from_the_shallow_dictionaries(tmp_path, monkeypatch):
  config = tiny_config()
  kwargs = dict(depth_key="model.convs_per_stage", shallow_depth=2, deep_depth=3, deep_steps=2, eval_every=1,
                lcnn_scratch=False)
  rows, summary = few_iteration.run_few_iteration(config, str(tmp_path), **kwargs)
  assert [row["step"] for row in rows] == [1, 2]
  assert set(rows[0]) == {"step", "deep_lcnn_transfer_top1", "deep_cnn_top1"}
  assert set(summary) == {"shallow_lcnn", "deep_lcnn_transfer", "deep_cnn"}
  shallow, _, _ = checkpoint.restore_model(str(tmp_path / "shallow_lcnn"))
  deep, deep_config, _ = checkpoint.restore_model(str(tmp_path / "deep_lcnn_transfer"))
  assert deep_config.model.convs_per_stage == 3 and deep_config.train.freeze_dictionaries
  for target, source in (("conv2", "conv2"), ("conv2_3", "conv2_2"), ("conv3_3", "conv3_2")):
    np.testing.assert_array_equal(lookup_array(deep, target, "dictionary"), lookup_array(shallow, source, "dictionary"))
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert few_iteration.run_few_iteration(config, str(tmp_path), **kwargs) == (rows, summary)
  few_iteration.plot_few_iteration(rows, summary, str(tmp_path / "few_iteration.png"), "tiny")


# ------------------------------------------------------------------------------------------------ seeds


def test_parse_seeds_and_points_name_a_bad_value():
  assert common.parse_seeds(["0", "1", "2"]) == [0, 1, 2]
  with pytest.raises(ValueError, match="integers"):
    common.parse_seeds(["0", "x"])
  with pytest.raises(ValueError, match="repeated"):
    common.parse_seeds(["1", "1"])
  assert spectrum.parse_points(["16:2.5", "4:40"]) == [(16, 2.5), (4, 40.0)]
  with pytest.raises(ValueError, match="SIZE:TARGET"):
    spectrum.parse_points(["16-2.5"])


def test_aggregate_gives_mean_and_sample_std_per_key_and_keeps_text(rng):
  values = rng.uniform(0.5, 1.0, size=(3, 2))
  rows_by_seed = {seed: [{"point": "cnn", "top1": float(values[i, 0]), "density": "-"},
                         {"point": "k8_t10", "top1": float(values[i, 1]), "density": 0.1 * (i + 1)}]
                  for i, seed in enumerate((4, 7, 9))}
  rows_by_seed[9] = rows_by_seed[9][:1]  # a point seed 9 skipped
  cnn, lcnn = common.aggregate(rows_by_seed, "point", ("top1", "density"))
  assert cnn["seeds"] == [4, 7, 9] and lcnn["seeds"] == [4, 7]
  np.testing.assert_allclose([cnn["top1"], cnn["top1_std"]], [values[:, 0].mean(), values[:, 0].std(ddof=1)])
  np.testing.assert_allclose([lcnn["top1"], lcnn["top1_std"]], [values[:2, 1].mean(), values[:2, 1].std(ddof=1)])
  np.testing.assert_allclose(lcnn["density_seeds"], [0.1, 0.2])
  assert cnn["density"] == "-" and "density_std" not in cnn
  cells = common.mean_std_rows([cnn, lcnn], ("top1", "density"), percent=("top1",))
  assert cells[0]["top1"] == f"{100 * cnn['top1']:.2f} ± {100 * cnn['top1_std']:.2f}" and cells[0]["seeds"] == 3
  assert cells[1]["density"] == f"{lcnn['density']:.3g} ± {lcnn['density_std']:.2g}"
  one = common.aggregate({0: rows_by_seed[4]}, "point", ("top1",))
  assert one[0]["top1_std"] == 0.0
  assert common.mean_std_rows(one, ("top1",), percent=("top1",))[0]["top1"] == f"{100 * one[0]['top1']:.2f}"


def fake_point(calls):
  """A stand-in for common.run_point that records each run's config and directory and returns a result that
  depends on the seed, the model and the step."""
  def run_point(config, workdir, *, prepare=None):
    calls.append((config, workdir, prepare))
    top1 = 0.5 + 0.01 * config.seed + (0.1 if "lcnn" in config.model.name else 0.0)
    steps = config.train.num_steps
    every = config.train.eval_every or steps
    return {"top1": top1, "top5": 1.0, "loss": 1.0, "density": 0.5, "multiplications": 10,
            "baseline_multiplications": 100, "speedup": 10.0, "steps": steps,
            "curve": [{"step": s, "top1": top1 * s / steps, "top5": 1.0, "loss": 1.0}
                      for s in range(every, steps + 1, every)], "config": config.to_dict()}
  return run_point


def test_spectrum_seeds_run_every_point_per_seed_in_its_own_directory(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(common, "run_point", fake_point(calls))
  rows, per_seed = spectrum.run_spectrum_seeds(tiny_config(), str(tmp_path), [3, 5], sizes=[2], strengths=[30.0])
  assert [(c.seed, os.path.relpath(w, tmp_path)) for c, w, _ in calls] == [
      (3, "seed3/cnn"), (3, "seed3/k2_s30"), (5, "seed5/cnn"), (5, "seed5/k2_s30")]
  assert [row["point"] for row in rows] == ["cnn", "k2_s30"] and set(per_seed) == {3, 5}
  np.testing.assert_allclose([rows[1]["top1"], rows[1]["top1_std"]], [0.64, np.std([0.63, 0.65], ddof=1)])
  fig, axes = spectrum.spectrum_figure(rows)  # error bars and the CNN's band
  assert axes[0].containers and any(p.get_label().startswith("CNN, ±") for p in axes[0].patches)
  common.pyplot().close(fig)
  spectrum.plot_spectrum(rows, str(tmp_path / "spectrum.png"), "seeds")
  assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_few_shot_seeds_train_the_bases_once_and_the_three_arms_per_seed(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(common, "run_point", fake_point(calls))
  config = tiny_config()
  config.data.mean, config.data.std = (0.5,), (0.25,)  # no statistics to compute
  rows, bases, per_seed = few_shot.run_few_shot_seeds(config, str(tmp_path), [1, 2], ns=[1, 4], base_classes=[0, 1],
                                                      novel_classes=[2, 3], novel_steps=3, last_layer="classifier")
  runs = {os.path.relpath(w, tmp_path): c for c, w, _ in calls}
  assert [c.seed for name, c in runs.items() if name.startswith("base")] == [config.seed] * 2  # trained once
  assert set(runs) == {"base_lcnn", "base_cnn"} | {f"seed{s}/{arm}_n{n}" for s in (1, 2) for n in (1, 4)
                                                   for arm in ("lcnn", "cnn", "cnn_last")}
  for seed in (1, 2):
    last, whole = runs[f"seed{seed}/cnn_last_n4"], runs[f"seed{seed}/cnn_n4"]
    assert last.seed == whole.seed == seed and last.train.train_only == "classifier" and not whole.train.train_only
    assert last.model.name == whole.model.name == "digits" and last.sparsity.target_speedup == 0
    assert runs[f"seed{seed}/lcnn_n1"].train.freeze_dictionaries and last.train.num_steps == 3
  assert [row["n"] for row in rows] == [1, 4] and set(bases) == {"lcnn", "cnn"} and set(per_seed) == {1, 2}
  np.testing.assert_allclose([rows[0]["cnn_last_top1"], rows[0]["cnn_last_top1_std"]],
                             [0.515, np.std([0.51, 0.52], ddof=1)])
  few_shot.plot_few_shot(rows, str(tmp_path / "few_shot.png"), "seeds")
  assert (tmp_path / "few_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_few_iteration_seeds_repeat_every_run_per_seed(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(common, "run_point", fake_point(calls))
  rows, summary, per_seed = few_iteration.run_few_iteration_seeds(
      tiny_config(), str(tmp_path), [0, 1, 2], depth_key="model.convs_per_stage", shallow_depth=2, deep_depth=3,
      deep_steps=4, eval_every=2)
  assert len(calls) == 12 and {os.path.relpath(w, tmp_path).split("/")[0] for _, w, _ in calls} == {
      "seed0", "seed1", "seed2"}
  assert [row["step"] for row in rows] == [2, 4] and rows[1]["seeds"] == [0, 1, 2]
  np.testing.assert_allclose([rows[1]["deep_cnn_top1"], rows[1]["deep_cnn_top1_std"]], [0.51, 0.01])
  assert set(summary) == {"shallow_lcnn", "deep_lcnn_transfer", "deep_cnn", "deep_lcnn_scratch"}
  np.testing.assert_allclose(summary["deep_lcnn_scratch"]["top1_seeds"], [0.6, 0.61, 0.62])
  deep_cnn = next(c for c, w, _ in calls if w.endswith("seed0/deep_cnn"))
  assert deep_cnn.sparsity.target_speedup == 0 and deep_cnn.sparsity.strength == 0
  few_iteration.plot_few_iteration(rows, summary, str(tmp_path / "few_iteration.png"), "seeds")
  assert (tmp_path / "few_iteration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_only_freezes_every_parameter_outside_the_prefixes(rng):
  from lcnn_jax import optimizer as optimizer_lib
  import jax
  c = tiny_config()
  c.model.name = "digits"
  c.sparsity.strength = 0.0
  c.train.train_only = "classifier"
  model = models.create_model(c.model, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  tx, _, _ = optimizer_lib.make_optimizer(c, model, 10, 10)
  params = nnx.state(model, nnx.Param)
  grads = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {common.sparsity.path_string(kp) for kp, u in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(updates))[0] if np.any(np.asarray(u) != 0)}
  assert moved == {"classifier/kernel", "classifier/bias"}
  c.train.train_only = "classifer"
  with pytest.raises(ValueError, match="train.train_only='classifer'"):
    optimizer_lib.make_optimizer(c, model, 10, 10)


def test_finished_only_reads_finished_points_and_leaves_the_others_out(tmp_path, monkeypatch):
  with common.finished_only(), pytest.raises(common.NotFinished, match="no finished run"):
    common.run_point(tiny_config(), str(tmp_path / "nothing"))
  calls = []
  run_point = fake_point(calls)

  def some_finished(config, workdir, *, prepare=None):  # seed 5's LCNN point and seed 6 entirely unfinished
    if workdir.endswith("seed5/k2_s30") or "seed6" in workdir:
      raise common.NotFinished(workdir)
    return run_point(config, workdir, prepare=prepare)

  monkeypatch.setattr(common, "run_point", some_finished)
  rows, per_seed = spectrum.run_spectrum_seeds(tiny_config(), str(tmp_path), [3, 5, 6], sizes=[2], strengths=[30.0])
  assert set(per_seed) == {3, 5} and [row["seeds"] for row in rows] == [[3, 5], [3]]
  with pytest.raises(ValueError, match="no seed"):
    few_iteration.run_few_iteration_seeds(tiny_config(), str(tmp_path), [6], depth_key="model.convs_per_stage",
                                          shallow_depth=2, deep_depth=3, deep_steps=2, eval_every=1)
