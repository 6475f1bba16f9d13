"""The experiments: data subsets, deeper digits nets, weight and dictionary transfer, and each command's core
function on tiny runs (rows, resumability, what each arm starts from)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcnn_jax import checkpoint, config as config_lib, counting, data, models, train
from lcnn_jax.data import sources
from lcnn_jax.experiments import common, few_iteration, few_shot, pruning, spectrum
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
  assert [(row["arm"], row["point"]) for row in rows] == [("cnn", "cnn"), ("lcnn", "k2_s30"),
                                                          ("pruning", "prune_k2_s30")]
  assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 1.0
  # The pruned CNN counts what the LCNN counts, by the same counter (a pruned weight costs nothing).
  assert rows[2]["multiplications"] == pytest.approx(rows[1]["multiplications"], rel=0.02)
  assert rows[2]["multiplications"] <= rows[1]["multiplications"] + sum(
      pruning.kernel_costs(checkpoint.restore_model(str(tmp_path / "cnn"))[0], (8, 8, 1)).values())
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


def test_a_point_starts_in_init_run_from_its_prepared_weights_and_is_read_back_once_finished(tmp_path,
                                                                                              monkeypatch):
  starts = []
  init_run = train.init_run

  def recording(config, workdir, prepare=None, **kwargs):
    starts.append(prepare)
    return init_run(config, workdir, prepare, **kwargs)

  def prepare(model):
    model.classifier.bias[...] = jnp.full(model.classifier.bias.shape, 3.0)

  monkeypatch.setattr(train, "init_run", recording)
  result = common.run_point(tiny_config(), str(tmp_path), prepare=prepare)
  assert starts == [prepare]  # the point's run starts in init_run, with the experiment's hook
  np.testing.assert_array_equal(checkpoint.restore_model(str(tmp_path), step=0)[0].classifier.bias[...], 3.0)
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert common.run_point(tiny_config(), str(tmp_path), prepare=prepare) == result and starts == [prepare]


def test_a_point_finished_before_each_model_had_its_own_keys_is_read_back_not_retrained(tmp_path, monkeypatch):
  config = tiny_config()
  saved = json.loads(json.dumps(config.to_dict(), default=list))
  saved["model"]["depth"] = 18  # every model's keys, as results saved then hold them
  done = {"top1": 0.5, "config": saved, "setup": None}
  (tmp_path / common.RESULT_FILE).write_text(json.dumps(done))
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert common.run_point(config, str(tmp_path)) == done
  config.train.learning_rate = 0.01
  with pytest.raises(common.ExperimentError, match="another config"):
    common.run_point(config, str(tmp_path))


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


def params_of(model):
  """Path -> value of every parameter and BatchNorm statistic of ``model``."""
  state = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  return {common.sparsity.path_string(kp): np.asarray(leaf)
          for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_few_shot_arms_start_from_the_base_runs_and_train_what_each_arm_says(tmp_path, monkeypatch):
  config = tiny_config()
  config.sparsity.target_speedup = 5.0  # the base LCNN's operating point: P projected after step 1 of 2
  protocol = few_shot.Protocol(ns=(2,), base_classes=(0, 1), novel_classes=(2, 3, 4), seeds=(0,), base_seeds=(0,),
                               learning_rates=(0.05,), steps=(2,), tune_seeds=(0,))
  result = few_shot.run_few_shot(config, str(tmp_path), protocol)
  base_dir = tmp_path / "base0"
  base = {model: params_of(checkpoint.restore_model(str(base_dir / f"base_{model}"))[0]) for model in ("lcnn", "cnn")}
  coefficients = [path for path in base["lcnn"] if path.endswith("/coefficients")]
  dictionaries = [path for path in base["lcnn"] if path.endswith("/dictionary")]
  assert coefficients and dictionaries and not any(np.all(base["lcnn"][p] != 0) for p in coefficients)  # zeros
  for arm in few_shot.ARMS:
    run_dir = str(base_dir / "seed0" / f"{arm}_n2")
    start, run_config, _ = checkpoint.restore_model(run_dir, step=0)
    final = params_of(checkpoint.restore_model(run_dir)[0])
    start = params_of(start)
    source = base["cnn" if arm.startswith("cnn") else "lcnn"]
    # Copied: every parameter and statistic of the base run but the classifier, which is new (3 novel classes).
    shared = {p for p in start if not p.startswith("classifier/")}
    assert shared == {p for p in source if not p.startswith("classifier/")}
    for path in shared:
      np.testing.assert_array_equal(start[path], source[path], err_msg=f"{arm}: {path} not copied")
    assert start["classifier/kernel"].shape[-1] == 3 and not np.array_equal(final["classifier/kernel"],
                                                                           start["classifier/kernel"])
    assert run_config.data.examples_per_class == 2 and run_config.data.examples_seed == 0
    assert run_config.sparsity.target_speedup == 0 and run_config.train.lr_schedule == "constant"
    trained = {p for p in final if "/mean" not in p and "/var" not in p and not np.array_equal(final[p], start[p])}
    if arm == "lcnn-coefficients":  # dictionaries frozen; P and the classifier trained
      assert not trained & set(dictionaries) and set(coefficients) & trained
    elif arm == "lcnn-all":
      assert set(dictionaries) & trained and set(coefficients) & trained
    elif arm == "cnn-whole":
      assert {"conv1/kernel", "conv2/kernel", "conv3/kernel"} <= trained
    else:  # cnn-last: the classifier alone
      assert {p.split("/")[0] for p in trained} == {"classifier"}
    if arm.startswith("lcnn"):  # the base run's operating point: a zero of P stays zero, no new steering
      assert run_config.sparsity.rule == "threshold" and run_config.sparsity.strength == 0
      for path in coefficients:
        assert np.all(final[path][source[path] == 0] == 0), f"{arm}: {path} grew a pruned coefficient"
  row = result["rows"][0]
  assert row["lcnn-coefficients_speedup"] > 1 and row["lcnn-all_speedup"] > 1  # the count each arm keeps, reported
  assert row["lcnn-all_minus_cnn-last"] == pytest.approx(row["lcnn-all_top1"] - row["cnn-last_top1"])
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert few_shot.run_few_shot(config, str(tmp_path), protocol)["rows"] == result["rows"]


def test_few_shot_draws_other_images_for_every_seed():
  splits = sources.open_digits()
  draws = {seed: sources.select(splits, [5, 6], 5, seed=seed).train.indices for seed in (0, 1)}
  assert not np.array_equal(draws[0], draws[1])
  np.testing.assert_array_equal(sources.select(splits, [5, 6], 5, seed=0).train.indices, draws[0])  # reproducible
  assert set(sources.select(splits, [5, 6], 2, seed=0).train.indices) < set(draws[0])  # n = 2 among n = 5
  first = sources.select(splits, [5, 6], 5).train.indices
  assert not np.array_equal(first, draws[0]) and len(draws[0]) == len(first) == 10
  c = tiny_config()
  protocol = few_shot.Protocol(learning_rates=(0.1,), steps=(5,))
  configs = [few_shot.novel_config(c, (5, 6), 5, arm=arm, seed=seed, learning_rate=0.1, steps=5, eval_every=5,
                                   protocol=protocol) for seed in (0, 1) for arm in few_shot.ARMS]
  assert [cfg.data.examples_seed for cfg in configs] == [0] * 4 + [1] * 4  # one draw per seed, for every arm
  assert [cfg.seed for cfg in configs] == [0] * 4 + [1] * 4


def test_few_iteration_transfers_the_shallow_dictionaries_frozen_at_one_fixed_operating_point(tmp_path,
                                                                                               monkeypatch):
  config = tiny_config()
  config.sparsity.target_speedup = 5.0  # the shallow run's own; the deep runs are not steered
  kwargs = dict(depth_key="model.convs_per_stage", shallow_depth=2, deep_depth=3, deep_steps=2, eval_every=1,
                deep_strength=3.0)
  rows, summary = few_iteration.run_few_iteration(config, str(tmp_path), **kwargs)
  assert [row["step"] for row in rows] == [1, 2]
  assert set(rows[0]) == {"step", "deep_lcnn_transfer_top1", "deep_lcnn_scratch_top1", "deep_cnn_top1",
                          few_iteration.DIFFERENCE}
  assert set(summary) == {"shallow_lcnn", "deep_lcnn_transfer", "deep_lcnn_scratch", "deep_cnn"}
  shallow, _, _ = checkpoint.restore_model(str(tmp_path / "shallow_lcnn"))
  start, _, _ = checkpoint.restore_model(str(tmp_path / "deep_lcnn_transfer"), step=0)
  deep, deep_config, _ = checkpoint.restore_model(str(tmp_path / "deep_lcnn_transfer"))
  scratch, scratch_config, _ = checkpoint.restore_model(str(tmp_path / "deep_lcnn_scratch"))
  for run_config in (deep_config, scratch_config):  # one fixed operating point, no steering
    assert run_config.model.convs_per_stage == 3 and run_config.sparsity.target_speedup == 0
    assert run_config.sparsity.strength == 3.0
  assert deep_config.train.freeze_dictionaries and not scratch_config.train.freeze_dictionaries
  mapped = (("conv2", "conv2"), ("conv1_3", "conv1_2"), ("conv2_3", "conv2_2"), ("conv3_3", "conv3_2"))
  for target, source in mapped:  # copied from the shallow net and frozen
    learned = lookup_array(shallow, source, "dictionary")
    np.testing.assert_array_equal(lookup_array(start, target, "dictionary"), learned)
    np.testing.assert_array_equal(lookup_array(deep, target, "dictionary"), learned)
    assert not np.array_equal(lookup_array(scratch, target, "dictionary"), learned)
  # Only the dictionaries were copied: the transfer arm's P starts where the scratch arm's does (same seed), and trains.
  info = data.dataset_info(scratch_config.data)
  scratch_start = train.create_model(scratch_config, info)
  for layer in ("conv2", "conv3_3"):
    np.testing.assert_array_equal(lookup_array(start, layer, "coefficients"),
                                  lookup_array(scratch_start, layer, "coefficients"))
    assert not np.array_equal(lookup_array(deep, layer, "coefficients"), lookup_array(start, layer, "coefficients"))
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert few_iteration.run_few_iteration(config, str(tmp_path), **kwargs) == (rows, summary)
  few_iteration.plot_few_iteration(rows, summary, str(tmp_path / "few_iteration.png"), "tiny")


# ------------------------------------------------------------------------------------------------ pruning


def test_magnitude_pruning_follows_the_schedule_and_holds_pruned_weights_at_zero(rng):
  params = {"conv/kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
            "dense/kernel": rng.standard_normal((8, 5)).astype(np.float32), "dense/bias": np.ones(5, np.float32)}
  sizes = {"conv/kernel": 72, "dense/kernel": 40}
  keep = pruning.final_keep({"conv/kernel": 16, "dense/kernel": 1}, sizes, budget=0.25 * (16 * 72 + 40))
  assert keep == {"conv/kernel": 18, "dense/kernel": 10}
  tx = pruning.magnitude_pruning(optax.sgd(0.1, momentum=0.9), keep, sizes, end=6, every=2)
  state = tx.init(params)
  zeros = {path: np.zeros(value.shape, bool) for path, value in params.items()}
  kept_counts = []
  for _ in range(10):
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for path in sizes:  # a pruned weight never comes back
      assert np.all(np.asarray(params[path])[zeros[path]] == 0)
      zeros[path] = np.asarray(params[path]) == 0
    kept_counts.append(int(np.count_nonzero(params["conv/kernel"])))
  # Pruned at steps 2, 4 and 6 to 18 + ⌊54 · (1 − t/6)³⌋, then held: fine-tuning the kept weights.
  assert kept_counts == [72, 34, 34, 20, 20, 18, 18, 18, 18, 18]
  assert int(np.count_nonzero(params["dense/kernel"])) == keep["dense/kernel"]
  assert np.all(np.asarray(params["dense/bias"]) != 1)  # other parameters train as before
  with pytest.raises(ValueError, match="out of reach"):
    pruning.final_keep({"conv/kernel": 16, "dense/kernel": 1}, sizes, budget=10)


def test_a_pruned_cnn_run_ends_at_the_requested_count_with_pruned_weights_zero(tmp_path):
  config = common.derive(tiny_config(), **{"model.name": "digits", "sparsity.strength": 0.0, "train.num_steps": 4,
                                           "train.checkpoint_every": 1, "train.eval_every": 4,
                                           "sparsity.project_at": 0.5})
  baseline = counting.count_multiplications(counting.baseline_model(config.model, 10, (8, 8, 1)), (8, 8, 1)).total
  budget = baseline / 6
  result = common.run_point(config, str(tmp_path), wrap_optimizer=pruning.to_budget(budget, 0.5),
                            setup=pruning.setup(budget, 0.5))
  assert result["multiplications"] == pytest.approx(budget, rel=0.02) and result["multiplications"] <= budget
  assert result["speedup"] == pytest.approx(6, rel=0.02) and result["setup"]["budget_multiplications"] == budget
  at_end, _, _ = checkpoint.restore_model(str(tmp_path), step=2)  # pruning ends at half the steps
  final, _, _ = checkpoint.restore_model(str(tmp_path))
  assert counting.count_multiplications(final, (8, 8, 1)).total == result["multiplications"]
  for layer in ("conv1", "conv2", "conv3", "classifier"):
    pruned = np.asarray(getattr(at_end, layer).kernel[...]) == 0
    kernel = np.asarray(getattr(final, layer).kernel[...])
    assert pruned.any() and np.all(kernel[pruned] == 0) and np.all(kernel[~pruned] != 0)
  with pytest.raises(common.ExperimentError, match="another config"):  # the budget is part of the point
    common.run_point(config, str(tmp_path), wrap_optimizer=pruning.to_budget(budget / 2, 0.5),
                     setup=pruning.setup(budget / 2, 0.5))


# ------------------------------------------------------------------------------------------------ seeds


def test_parse_seeds_and_points_name_a_bad_value():
  assert common.parse_seeds(["0", "1", "2"]) == [0, 1, 2]
  with pytest.raises(ValueError, match="integers"):
    common.parse_seeds(["0", "x"])
  with pytest.raises(ValueError, match="repeated"):
    common.parse_seeds(["1", "1"])
  with pytest.raises(ValueError, match="--base_seeds is empty"):
    common.parse_seeds([], "--base_seeds")
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


def fake_point(calls, top1_of=None):
  """A stand-in for common.run_point that records each run's config and directory and returns a result that
  depends on the seed, the model and the step (or on ``top1_of(config, workdir, step)``)."""
  def run_point(config, workdir, *, prepare=None, **kwargs):
    calls.append((config, workdir, prepare))
    top1 = 0.5 + 0.01 * config.seed + (0.1 if "lcnn" in config.model.name else 0.0)
    steps = config.train.num_steps or 10 * config.train.epochs
    every = config.train.eval_every or steps
    curve = [{"step": s, "top1": top1_of(config, workdir, s) if top1_of else top1 * s / steps, "top5": 1.0,
              "loss": 1.0} for s in range(every, steps + 1, every)]
    return {"top1": curve[-1]["top1"], "top5": 1.0, "loss": 1.0, "density": 0.5, "multiplications": 10,
            "baseline_multiplications": 100, "speedup": 10.0, "steps": steps, "curve": curve,
            "config": config.to_dict()}
  return run_point


def test_spectrum_seeds_run_every_point_per_seed_in_its_own_directory(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(common, "run_point", fake_point(calls))
  rows, per_seed = spectrum.run_spectrum_seeds(tiny_config(), str(tmp_path), [3, 5], sizes=[2], strengths=[30.0])
  assert [(c.seed, os.path.relpath(w, tmp_path)) for c, w, _ in calls] == [
      (3, "seed3/cnn"), (3, "seed3/k2_s30"), (3, "seed3/prune_k2_s30"),
      (5, "seed5/cnn"), (5, "seed5/k2_s30"), (5, "seed5/prune_k2_s30")]
  assert [row["point"] for row in rows] == ["cnn", "k2_s30", "prune_k2_s30"] and set(per_seed) == {3, 5}
  assert calls[2][0].model.name == "digits" and calls[2][0].train.num_steps == calls[1][0].train.num_steps
  np.testing.assert_allclose([rows[1]["top1"], rows[1]["top1_std"]], [0.64, np.std([0.63, 0.65], ddof=1)])
  comparison = spectrum.pruning_comparison(per_seed)  # LCNN − pruning, paired per seed
  assert [row["point"] for row in comparison] == ["k2_s30"]
  np.testing.assert_allclose(comparison[0]["top1_difference_seeds"], [0.1, 0.1])
  fig, axes = spectrum.spectrum_figure(rows)  # error bars and the CNN's band
  assert axes[0].containers and any(p.get_label().startswith("CNN, ±") for p in axes[0].patches)
  assert any(c.get_label() == "CNN, gradual magnitude pruning" for c in axes[0].containers)
  common.pyplot().close(fig)
  spectrum.plot_spectrum(rows, str(tmp_path / "spectrum.png"), "seeds")
  assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_few_shot_top1(config, workdir, step):
  """A novel run's top-1: the LCNN arms are best at learning rate 0.1 and 2 steps, the CNN arms at 0.01 and 4;
  the LCNN arms gain 0.01 per seed (so that the paired differences vary)."""
  lcnn = "lcnn" in config.model.name
  best = (0.1, 2) if lcnn else (0.01, 4)
  return (0.5 + 0.1 * (config.train.learning_rate == best[0]) + 0.05 * (step == best[1])
          + (0.01 * config.seed if lcnn else 0.0))


def test_few_shot_chooses_the_learning_rate_and_steps_on_held_out_base_classes_and_pairs_the_seeds(tmp_path,
                                                                                                   monkeypatch):
  calls = []
  monkeypatch.setattr(common, "run_point", fake_point(calls, fake_few_shot_top1))
  config = tiny_config()
  config.data.mean, config.data.std = (0.5,), (0.25,)  # no statistics to compute
  protocol = few_shot.Protocol(ns=(1, 4), base_classes=(0, 1, 2, 3), novel_classes=(5, 6), seeds=(1, 2),
                               base_seeds=(7, 8), learning_rates=(0.01, 0.1), steps=(2, 4), tune_seeds=(0, 3))
  markdown, result = few_shot.few_shot_report(config, str(tmp_path), protocol)
  runs = {os.path.relpath(w, tmp_path): c for c, w, _ in calls}
  tuning = {name: c for name, c in runs.items() if name.startswith("tune/")}
  final = {name: c for name, c in runs.items() if not name.startswith("tune/") and "/seed" in name}
  # Bases: once per base seed on the base classes; the tuning's pseudo-base runs on their first half.
  for seed in (7, 8):
    for model in ("lcnn", "cnn"):
      assert runs[f"base{seed}/base_{model}"].seed == seed
      assert tuple(runs[f"base{seed}/base_{model}"].data.classes) == (0, 1, 2, 3)
  assert tuple(runs["tune/base_lcnn"].data.classes) == (0, 1) and runs["tune/base_lcnn"].seed == 7
  # Tuning: the pseudo-novel base classes only, every arm, learning rate and tuning seed, the longest step count.
  novel_tuning = {name: c for name, c in tuning.items() if "/seed" in name}
  assert len(novel_tuning) == 2 * 4 * 2 * 2  # n × arms × learning rates × tuning seeds
  assert all(tuple(c.data.classes) == (2, 3) and c.train.num_steps == 4 and c.train.eval_every == 2
             for c in novel_tuning.values())
  # The same rule chose each arm's best, and the final runs use it, on the novel classes.
  for n in (1, 4):
    for arm in few_shot.ARMS:
      best = (0.1, 2) if arm.startswith("lcnn") else (0.01, 4)
      assert (result["chosen"][n][arm]["learning_rate"], result["chosen"][n][arm]["steps"]) == best
  assert len(final) == 2 * 2 * 2 * 4  # base seeds × seeds × n × arms
  for name, c in final.items():
    arm = name.split("/")[-1].rsplit("_n", 1)[0]
    assert tuple(c.data.classes) == (5, 6) and c.data.examples_seed == c.seed
    assert (c.train.learning_rate, c.train.num_steps) == ((0.1, 2) if arm.startswith("lcnn") else (0.01, 4))
  # Mean ± std over the 4 (base seed, seed) pairs, and the paired differences LCNN − CNN.
  row = result["rows"][0]
  assert row["seeds"] == ["base7/seed1", "base7/seed2", "base8/seed1", "base8/seed2"]
  np.testing.assert_allclose(row["lcnn-all_minus_cnn-whole_seeds"], [0.01, 0.02, 0.01, 0.02])
  np.testing.assert_allclose(row["lcnn-all_minus_cnn-whole_std"], np.std([0.01, 0.02, 0.01, 0.02], ddof=1))
  assert "Base runs (classes [0, 1, 2, 3]): reduced scale" in markdown and "2 novel × 2 base (4 pairs" in markdown
  assert "lcnn-coefficients − cnn-last" in markdown and "0.1 / 2" in markdown
  assert (tmp_path / "few_shot.md").read_text() == markdown
  few_shot.plot_few_shot(result["rows"], str(tmp_path / "few_shot.png"), "seeds")
  assert (tmp_path / "few_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="overlap"):
    few_shot.run_few_shot(config, str(tmp_path), dataclasses.replace(protocol, novel_classes=(3, 5)))


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
  np.testing.assert_allclose(rows[1][f"{few_iteration.DIFFERENCE}_seeds"], [0.0, 0.0, 0.0])
  assert set(summary) == {"shallow_lcnn", "deep_lcnn_transfer", "deep_cnn", "deep_lcnn_scratch"}
  np.testing.assert_allclose(summary["deep_lcnn_scratch"]["top1_seeds"], [0.6, 0.61, 0.62])
  deep_cnn = next(c for c, w, _ in calls if w.endswith("seed0/deep_cnn"))
  assert deep_cnn.sparsity.target_speedup == 0 and deep_cnn.sparsity.strength == 0
  few_iteration.plot_few_iteration(rows, summary, str(tmp_path / "few_iteration.png"), "seeds")
  assert (tmp_path / "few_iteration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_few_iteration_seeds_of_an_earlier_report_join_without_running_again(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(common, "run_point", fake_point(calls))
  kwargs = dict(depth_key="model.convs_per_stage", shallow_depth=2, deep_depth=3, deep_steps=4, eval_every=2)
  config = tiny_config()
  few_iteration.few_iteration_report(config, str(tmp_path / "first"), [0, 2], **kwargs)  # e.g. one session
  earlier = str(tmp_path / "first" / "few_iteration.json")
  calls.clear()
  markdown, rows, summary = few_iteration.few_iteration_report(config, str(tmp_path / "second"), [1, 2],
                                                               earlier_reports=[earlier], **kwargs)
  assert {os.path.relpath(w, tmp_path / "second").split("/")[0] for _, w, _ in calls} == {"seed1"}  # 2 is read
  assert "Seeds: 3 (0, 1, 2)" in markdown and rows[1]["seeds"] == [0, 1, 2]
  alone = few_iteration.few_iteration_report(config, str(tmp_path / "all"), [0, 1, 2], **kwargs)
  assert (rows, summary) == alone[1:]  # as if all three had run here
  with pytest.raises(ValueError, match="deep_steps differ"):
    few_iteration.few_iteration_report(config, str(tmp_path / "third"), [1], earlier_reports=[earlier],
                                       **{**kwargs, "deep_steps": 6})
  with pytest.raises(ValueError, match="seed 0 appears in more than one report"):
    few_iteration.few_iteration_report(config, str(tmp_path / "third"), [1], earlier_reports=[earlier, earlier],
                                       **kwargs)
  with pytest.raises(ValueError, match="cannot read"):
    few_iteration.few_iteration_report(config, str(tmp_path / "third"), [1], earlier_reports=[str(tmp_path)],
                                       **kwargs)
  other = tiny_config()
  other.train.batch_size += 1
  with pytest.raises(ValueError, match=r"\(config.train.batch_size differ\)"):
    few_iteration.few_iteration_report(other, str(tmp_path / "third"), [1], earlier_reports=[earlier], **kwargs)


def test_spectrum_seeds_of_an_earlier_report_join_without_running_again(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(common, "run_point", fake_point(calls))
  config, kwargs = tiny_config(), dict(sizes=[2], strengths=[30.0])
  spectrum.spectrum_report(config, str(tmp_path / "first"), [0], **kwargs)
  earlier = str(tmp_path / "first" / "spectrum.json")
  calls.clear()
  markdown, rows = spectrum.spectrum_report(config, str(tmp_path / "second"), [0, 1], earlier_reports=[earlier],
                                            **kwargs)
  assert calls and {os.path.relpath(w, tmp_path / "second").split("/")[0] for _, w, _ in calls} == {"seed1"}
  assert "seeds 0, 1." in markdown.splitlines()[0]
  assert rows == spectrum.spectrum_report(config, str(tmp_path / "all"), [0, 1], **kwargs)[1]
  with pytest.raises(ValueError, match="strengths differ"):
    spectrum.spectrum_report(config, str(tmp_path / "third"), [1], earlier_reports=[earlier], sizes=[2],
                             strengths=[3.0])
  with pytest.raises(ValueError, match="--nowall_clock"):
    spectrum.spectrum_report(config, str(tmp_path / "third"), [1], earlier_reports=[earlier], wall_clock=True,
                             **kwargs)
  with pytest.raises(ValueError, match="give --seeds"):
    spectrum.spectrum_report(config, str(tmp_path / "third"), None, earlier_reports=[earlier], **kwargs)


@pytest.mark.parametrize("scale", ["reduced", "full"])
def test_every_report_states_its_scale(tmp_path, monkeypatch, scale):
  monkeypatch.setattr(common, "run_point", fake_point([]))
  config = tiny_config()
  if scale == "full":  # every training image, the schedule in epochs
    config.train.num_steps, config.train.epochs, config.train.steps_per_epoch = 0, 1, 0
  markdown, _ = spectrum.spectrum_report(config, str(tmp_path / "spectrum"), [0], sizes=[2], strengths=[30.0])
  assert markdown.startswith(f"Every point (the CNN, each LCNN, each pruned CNN): {scale} scale, 1,437 training "
                             "images") and "seeds 0." in markdown.splitlines()[0]
  assert "LCNN − pruning" in markdown
  markdown, _, _ = few_iteration.few_iteration_report(
      config, str(tmp_path / "few_iteration"), [0, 1, 2], depth_key="model.convs_per_stage", shallow_depth=2,
      deep_depth=3, deep_steps=4, eval_every=2)
  assert markdown.startswith(f"Shallow LCNN (model.convs_per_stage = 2): {scale} scale") and "Seeds: 3" in markdown
  config.data.mean, config.data.std = (0.5,), (0.25,)
  protocol = few_shot.Protocol(ns=(1,), base_classes=(0, 1), novel_classes=(2, 3), seeds=(0,), base_seeds=(0,),
                               learning_rates=(0.1,), steps=(2,))
  markdown, _ = few_shot.few_shot_report(config, str(tmp_path / "few_shot"), protocol)
  assert markdown.startswith(f"Base runs (classes [0, 1]): {scale} scale")
  assert "no tuning" in markdown and "rule threshold, strength 0, no target speedup" in markdown
  for name in ("spectrum/spectrum", "few_iteration/few_iteration", "few_shot/few_shot"):
    assert json.load(open(tmp_path / f"{name}.json"))["scale"]


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

  def some_finished(config, workdir, *, prepare=None, **kwargs):  # seed 5's LCNN point and seed 6 unfinished
    if workdir.endswith("seed5/k2_s30") or "seed6" in workdir:
      raise common.NotFinished(workdir)
    return run_point(config, workdir, prepare=prepare, **kwargs)

  monkeypatch.setattr(common, "run_point", some_finished)
  rows, per_seed = spectrum.run_spectrum_seeds(tiny_config(), str(tmp_path), [3, 5, 6], sizes=[2], strengths=[30.0])
  assert set(per_seed) == {3, 5} and [row["seeds"] for row in rows] == [[3, 5], [3], [3]]  # no LCNN, no pruning
  with pytest.raises(ValueError, match="no seed"):
    few_iteration.run_few_iteration_seeds(tiny_config(), str(tmp_path), [6], depth_key="model.convs_per_stage",
                                          shallow_depth=2, deep_depth=3, deep_steps=2, eval_every=1)
