"""What a run reports: metrics.jsonl rows and TensorBoard scalars from plain values, cut back on resume."""

import os

from lcnn_jax import logger


class RecordingWriter:
  """Stands in for the TensorBoard writer: records (tag, value, step)."""

  def __init__(self):
    self.scalars = []

  def add_scalar(self, tag, value, step):
    self.scalars.append((tag, value, step))

  def close(self):
    pass


def test_an_eval_point_writes_the_speedup_over_the_baseline_and_each_layers_multiplications(tmp_path):
  log = logger.MetricsLogger(str(tmp_path))
  log.writer.close()
  log.writer = RecordingWriter()
  log.eval(8, {"top1": 0.75, "top5": 0.9, "loss": 0.5, "count": 360}, multiplications=2_000,
           baseline_multiplications=9_000, layer_multiplications={"conv1": 1_500, "head": 500})
  [row] = logger.read_metrics(str(tmp_path))
  assert row == {"step": 8, "split": "eval", "top1": 0.75, "top5": 0.9, "loss": 0.5, "count": 360,
                 "multiplications": 2_000, "baseline_multiplications": 9_000, "speedup": 4.5}
  scalars = {tag: (value, step) for tag, value, step in log.writer.scalars}
  assert scalars["eval/speedup"] == (4.5, 8) and scalars["eval/multiplications"] == (2_000, 8)
  assert scalars["multiplications/conv1"] == (1_500, 8) and scalars["multiplications/head"] == (500, 8)
  assert scalars["eval/top1"] == (0.75, 8)


def test_a_train_point_writes_its_row_and_per_layer_densities(tmp_path):
  log = logger.MetricsLogger(str(tmp_path))
  log.writer.close()
  log.writer = RecordingWriter()
  log.train(2, {"loss": 1.5, "learning_rate": 0.1}, {"conv2": 0.25})
  [row] = logger.read_metrics(str(tmp_path))
  assert row == {"step": 2, "split": "train", "loss": 1.5, "learning_rate": 0.1, "densities": {"conv2": 0.25}}
  assert ("density/conv2", 0.25, 2) in log.writer.scalars and ("train/loss", 1.5, 2) in log.writer.scalars


def test_resuming_drops_the_rows_written_after_the_checkpoint_it_resumes_from(tmp_path):
  log = logger.MetricsLogger(str(tmp_path))
  for step in (2, 4, 6):
    log.train(step, {"loss": float(step)}, {})
  log.close()
  resumed = logger.MetricsLogger(str(tmp_path), resume_step=4)
  resumed.train(6, {"loss": 0.5}, {})
  resumed.close()
  assert [(row["step"], row["loss"]) for row in logger.read_metrics(str(tmp_path))] == [(2, 2.0), (4, 4.0),
                                                                                         (6, 0.5)]


def test_a_disabled_logger_writes_nothing(tmp_path):
  log = logger.MetricsLogger(str(tmp_path), enabled=False)
  log.train(2, {"loss": 1.0}, {})
  log.eval(2, {"top1": 0.5, "top5": 0.5, "loss": 1.0}, multiplications=0, baseline_multiplications=10,
           layer_multiplications={})
  log.close()
  assert os.listdir(tmp_path) == [] and logger.read_metrics(str(tmp_path)) == []
