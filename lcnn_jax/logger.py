"""What a run reports: a progress bar, ``metrics.jsonl`` and TensorBoard event files in the workdir.

``metrics.jsonl`` holds one JSON object per logged point, ``{"step": …, "split": "train"|"eval", …}``; eval rows
carry ``top1``, ``top5`` and ``loss`` (fractions in [0, 1]). When a run resumes from step s, rows past s (written
after the checkpoint it resumes from) are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

from absl import logging

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl`` (empty when there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
  """Writes train and eval rows to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self.writer = None
    if not enabled:
      return
    rows = [row for row in read_metrics(workdir) if row["step"] <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
    from tensorboardX import SummaryWriter  # imported only where it writes
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
    logging.info("TensorBoard files go to %s; view them with: tensorboard --logdir %s", self.writer.logdir, workdir)

  def _append(self, row: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def train(self, step: int, row: Mapping[str, float], densities: Mapping[str, float]) -> None:
    """A training point: loss, top-1, learning rate, images/s, mean density, counted speedup over the CNN
    baseline, L1 strength (the steered λ under a target), and per-layer density."""
    if not self.enabled:
      return
    self._append({"step": step, "split": "train", **row, "densities": dict(densities)})
    for name, value in row.items():
      self.writer.add_scalar(f"train/{name}", value, step)
    for layer, value in densities.items():
      self.writer.add_scalar(f"density/{layer}", value, step)

  def eval(self, step: int, metrics: Mapping[str, float], *, multiplications: int, baseline_multiplications: int,
           layer_multiplications: Mapping[str, int]) -> None:
    """An evaluation point: top-1, top-5 and loss, the model's multiplications per image (in all and per layer
    path) and its speedup over the CNN baseline's ``baseline_multiplications``."""
    speedup = baseline_multiplications / multiplications if multiplications else math.inf
    logging.info("step %d eval: top-1 %.4f top-5 %.4f loss %.4f | %s multiplications, %.2fx fewer than the "
                 "baseline's %s", step, metrics["top1"], metrics["top5"], metrics["loss"], f"{multiplications:,}",
                 speedup, f"{baseline_multiplications:,}")
    if not self.enabled:
      return
    self._append({"step": step, "split": "eval", **metrics, "multiplications": multiplications,
                  "baseline_multiplications": baseline_multiplications, "speedup": speedup})
    for name in ("top1", "top5", "loss"):
      self.writer.add_scalar(f"eval/{name}", metrics[name], step)
    self.writer.add_scalar("eval/multiplications", multiplications, step)
    self.writer.add_scalar("eval/speedup", speedup, step)
    for path, value in layer_multiplications.items():
      self.writer.add_scalar(f"multiplications/{path}", value, step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class Progress:
  """A tqdm bar over the steps showing loss, learning rate, images/s, mean density, counted speedup, strength;
  log lines are written above the bar. When stderr is not a terminal (a log file, a scheduler), a plain line
  every 30 s instead."""

  def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
    self.bar = None
    self.total, self.enabled = total, enabled
    self.interactive = sys.stderr.isatty()
    self.last_line = time.monotonic()
    if enabled and self.interactive:
      from tqdm import tqdm
      from tqdm.contrib import DummyTqdmFile
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5, desc="train")
      self.log_handler = logging.get_absl_handler().python_handler  # log lines go above the bar, not into it
      self.log_stream = self.log_handler.stream
      self.log_handler.stream = DummyTqdmFile(self.log_stream)

  def update(self, step: int, row: Mapping[str, float]) -> None:
    values = dict(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2g}",
                  img_s=f"{row['images_per_second']:.0f}", density=f"{row['density']:.3f}",
                  speedup=f"{row['speedup']:.1f}x", strength=f"{row['strength']:.3g}")
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(**values, refresh=False)
    elif self.enabled and (time.monotonic() - self.last_line >= 30 or step == self.total):
      self.last_line = time.monotonic()
      logging.info("train step %d/%d: %s", step, self.total, " ".join(f"{k} {v}" for k, v in values.items()))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.log_handler.stream = self.log_stream
