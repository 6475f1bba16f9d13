"""``python -m lcnn_jax.throughput``: the train step and the JPEG pipeline it times run on real batches."""

import math
import os

from lcnn_jax import models, throughput


def test_the_timed_train_step_runs_an_lcnn_and_its_cnn(tiny_config):
  config = tiny_config(data=dict(image_size=8, num_classes=10))
  for model_config in (config.model, models.baseline_config(config.model)):
    rate = throughput.compute_images_per_second(config, model_config, batch_size=8, steps=1)
    assert math.isfinite(rate) and rate > 0


def test_the_jpeg_folder_is_read_by_the_training_pipeline(tmp_path):
  throughput.write_jpeg_folder(str(tmp_path), images=8, classes=2)
  assert sorted(os.listdir(tmp_path / "train")) == ["n00000000", "n00000001"]
  assert len(os.listdir(tmp_path / "train" / "n00000000")) == 4 and len(os.listdir(tmp_path / "val")) == 2
  rate = throughput.pipeline_images_per_second(str(tmp_path), batch_size=4, steps=1, workers=0)
  assert math.isfinite(rate) and rate > 0
