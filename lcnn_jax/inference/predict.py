"""The top-k classes of image files under an exported model.

    python -m lcnn_jax.inference.predict --model model.npz cat.jpg dog.png [--top 5] [--backends auto]

Images are prepared as the model's evaluation data was (shortest side to ``resize_size``, centre crop to
``image_size``, per-channel mean/std), from the preprocessing stored at export.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
from absl import flags, logging

from lcnn_jax.data import transforms
from lcnn_jax.inference import allocator
from lcnn_jax.inference.exporter import load
from lcnn_jax.inference.model import InferenceModel


def load_images(paths: Sequence[str], model: InferenceModel) -> np.ndarray:
  """The images at ``paths`` as one (n, h, w, c) float32 batch, prepared for ``model``."""
  height, width, channels = model.input_shape
  prep = model.preprocessing
  if prep is None:
    logging.warning("The model was exported without preprocessing: resizing to %dx%d and scaling to [0, 1] only.",
                    height, width)
    prep = {"image_size": height, "resize_size": height, "channels": channels, "mean": [0.0] * channels,
            "std": [1.0] * channels}
  if height != width or prep["image_size"] != height:
    raise ValueError(f"The model takes {height}x{width} inputs, which a centre crop of size {prep['image_size']} "
                     "cannot give.")
  transform = transforms.PhotoTransform(prep["image_size"], prep["resize_size"], prep["channels"])
  normalize = transforms.Normalize(prep["mean"], prep["std"])
  images = []
  for path in paths:
    with open(path, "rb") as f:
      try:
        images.append(normalize(transform.eval(f.read())))
      except transforms.CorruptImageError as e:
        raise ValueError(f"{path}: not a readable image ({e}).") from e
  return np.stack(images)  # (n, h, w, c)


def predict(model: InferenceModel, paths: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
  """Per image, its k most likely (class name, probability), most likely first."""
  indices, probabilities = model.top_k(load_images(paths, model), k)
  names = model.class_names or [str(i) for i in range(int(indices.max(initial=0)) + 1)]
  return [[(names[i], float(p)) for i, p in zip(row, row_p)] for row, row_p in zip(indices, probabilities)]


def format_predictions(paths: Sequence[str], predictions: list[list[tuple[str, float]]]) -> str:
  lines = []
  for path, top in zip(paths, predictions):
    lines.append(path)
    lines.extend(f"  {p:7.2%}  {name}" for name, p in top)
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  """The prediction command; ``argv`` includes the program name. Returns the exit status."""
  flag_values = flags.FlagValues()  # its own flags, so importing this module never clashes with another CLI's
  flags.DEFINE_string("model", None, "An exported model (.npz) written by lcnn_jax.inference.export.",
                      flag_values=flag_values)
  flags.DEFINE_integer("top", 5, "How many classes to list per image.", flag_values=flag_values)
  flags.DEFINE_string("backends", None, "Unset: as exported; 'auto': measure here; or one backend name.",
                      flag_values=flag_values)
  try:
    paths = flag_values(list(argv))[1:]
    if flag_values.model is None or not paths:
      raise ValueError("usage: python -m lcnn_jax.inference.predict --model model.npz IMAGE [IMAGE ...]")
    allocator.reuse_freed_memory()
    model = load(flag_values.model, backends=flag_values.backends)
    top = predict(model, paths, flag_values.top)
  except (flags.Error, ValueError, OSError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  sys.stdout.write(format_predictions(paths, top) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
