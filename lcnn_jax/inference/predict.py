"""The top-k classes of image files under an exported model.

    python -m lcnn_jax.inference.predict --model model.npz cat.jpg photos/ [--top 5] [--json] [--backends auto]
    python -m lcnn_jax.inference.predict --model model.npz --describe

Images are prepared as the model's evaluation data was (shortest side to ``resize_size``, centre crop to
``image_size``, per-channel mean/std), from the preprocessing stored at export. A directory stands for the image
files under it; a file that cannot be read is reported and skipped, and the exit status is 1 if any was.
``--describe`` prints the input the model expects.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from typing import Iterator, Sequence

import numpy as np
from absl import flags, logging
from PIL import Image

from lcnn_jax import cli, data
from lcnn_jax.data import transforms
from lcnn_jax.inference import allocator
from lcnn_jax.inference.storage import load
from lcnn_jax.inference.model import InferenceModel


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_PIXELS = 50_000_000  # a 50-megapixel photo; larger files are refused unless --max_pixels allows them


def _preprocessing(model: InferenceModel) -> dict:
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
  return prep


def load_image(path: str, model: InferenceModel, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """The image at ``path`` as a float32 (h, w, c) array prepared for ``model``; ValueError if it cannot be."""
  prep = _preprocessing(model)
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the size is checked here, against max_pixels
  try:
    with Image.open(path) as image:
      width, height = image.size
  except Image.UnidentifiedImageError:
    raise ValueError(f"{path}: not a readable image (not a format Pillow decodes).") from None
  except OSError as e:
    raise ValueError(f"{path}: not a readable image ({e.strerror or e}).") from None
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  if width * height > max_pixels:
    raise ValueError(f"{path}: {width}x{height} is {width * height:,} pixels, above the --max_pixels limit of "
                     f"{max_pixels:,}; downscale it, or raise --max_pixels if the file is trusted.")
  transform = transforms.PhotoTransform(prep["image_size"], prep["resize_size"], prep["channels"])
  with open(path, "rb") as f:
    try:
      return transforms.Normalize(prep["mean"], prep["std"])(transform.eval(f.read()))  # (h, w, c)
    except transforms.CorruptImageError as e:
      raise ValueError(f"{path}: not a readable image ({e}).") from e


def load_images(paths: Sequence[str], model: InferenceModel) -> np.ndarray:
  """The images at ``paths`` as one (n, h, w, c) float32 batch, prepared for ``model``."""
  return np.stack([load_image(path, model) for path in paths])  # (n, h, w, c)


def image_files(paths: Sequence[str]) -> Iterator[str]:
  """``paths`` with each directory replaced by the image files under it (sorted, by extension)."""
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        yield from (os.path.join(root, name) for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS))
    else:
      yield path


def load_model(path: str, backends: str | None = None, retune: bool = False) -> InferenceModel:
  """The exported model at ``path`` (tuned for this CPU: see :func:`lcnn_jax.inference.load`; ``retune``
  measures again); a :class:`cli.UsageError` that says so when it is not one."""
  how = "python -m lcnn_jax.inference.exporter writes one from a training run"
  if not os.path.isfile(path):
    raise cli.UsageError(f"--model {path}: no such file; pass a model exported by lcnn_jax ({how}).")
  if not zipfile.is_zipfile(path):
    raise cli.UsageError(f"--model {path} is not a model exported by lcnn_jax (not an .npz archive); {how}.")
  try:
    return load(path, backends=backends, retune=retune)
  except (KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
    reason = ("it holds pickled Python objects, which lcnn_jax never loads" if "pickle" in str(e)
              else "it has no lcnn_jax header" if isinstance(e, KeyError) else str(e))
    raise cli.UsageError(f"--model {path} is not a model exported by lcnn_jax ({reason}); {how}.") from None


def describe(model: InferenceModel) -> str:
  """What input ``model`` expects, in words, from the preprocessing stored at export."""
  height, width, channels = model.input_shape
  prep = model.preprocessing
  lines = [f"input: {height}x{width} pixels, {channels} channel{'s' if channels > 1 else ''} "
           f"({'RGB' if channels == 3 else 'grey'})"]
  if prep is None:
    lines.append("preparation: not stored in the file; images are resized to the input size and scaled to [0, 1]")
  else:
    crop = (f"shortest side resized to {prep['resize_size']}, centre crop of {prep['image_size']}"
            if prep["resize_size"] != prep["image_size"] else f"resized to {prep['image_size']}")
    lines.append(f"preparation: {crop}; pixels scaled to [0, 1], then (x - mean) / std with mean "
                 f"{[round(m, 4) for m in prep['mean']]} and std {[round(s, 4) for s in prep['std']]}")
    dataset = prep.get("dataset")
    if dataset:
      lines.append(f"trained on: {dataset}")
    if channels == 1:  # what the training images look like, from the source of the dataset name stored at export
      source = data.find_source(dataset) if dataset else None
      polarity = source.polarity if source is not None else None
      lines.append("looks like: " + (polarity or "the training images (their polarity is not recorded: "
                                     "bright-on-dark or dark-on-bright as they were)"))
  names = model.class_names
  lines.append(f"classes: {len(names)} ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names
               else "classes: unnamed (printed as their indices)")
  return "\n".join(lines)


def predict(model: InferenceModel, paths: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
  """Per image, its k most likely (class name, probability), most likely first."""
  indices, probabilities = model.top_k(load_images(paths, model), k)
  names = model.class_names or [str(i) for i in range(int(indices.max(initial=0)) + 1)]
  return [[(names[i], float(p)) for i, p in zip(row, row_p)] for row, row_p in zip(indices, probabilities)]


def format_predictions(paths: Sequence[str], predictions: list[list[tuple[str, float]]]) -> str:
  """Per image, its path, then one ``  probability  class`` line per prediction, most likely first."""
  lines = []
  for path, top in zip(paths, predictions):
    lines.append(path)
    lines.extend(f"  {p:7.2%}  {name}" for name, p in top)
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``; importing this module defines none."""
  flags.DEFINE_string("model", None, "An exported model (.npz) written by python -m lcnn_jax.inference.exporter.",
                      flag_values=flag_values)
  flags.DEFINE_integer("top", 5, "How many classes to list per image.", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_string("backends", None, "Unset: as exported (tuned again once on a CPU other than the one it was "
                      "tuned on); 'auto': measure here; or one backend name.", flag_values=flag_values)
  flags.DEFINE_bool("retune", False, "Measure the backends for this CPU again, replacing the choice kept for "
                    "this file and CPU in $LCNN_JAX_CACHE/retuned.json.", flag_values=flag_values)
  flags.DEFINE_bool("json", False, "Print one JSON list: per image file {image, top: [{index, class, "
                    "probability}]}, or {image, error} for a file that could not be read.", flag_values=flag_values)
  flags.DEFINE_bool("describe", False, "Print the input the model expects (size, channels, preparation, "
                    "polarity of grey images) and exit when no image is given.", flag_values=flag_values)
  flags.DEFINE_integer("max_pixels", MAX_PIXELS, "Images with more pixels are refused (decompression bombs).",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("batch", 64, "Images per forward pass.", lower_bound=1, flag_values=flag_values)
  flags.mark_flag_as_required("model", flag_values=flag_values)

def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int | None:
  """The prediction command on its parsed flags (``flag_values``): top classes per image file; exit status 1 if
  any file could not be read."""
  model = load_model(flag_values.model, flag_values.backends, flag_values.retune)
  if flag_values.describe:
    print(describe(model))
    if len(argv) == 1:
      return
  if len(argv) == 1:
    raise cli.UsageError("no image given: pass image files or directories after the flags, e.g. "
                         "python -m lcnn_jax.inference.predict --model model.npz cat.jpg photos/")
  allocator.reuse_freed_memory()
  Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, flag_values.max_pixels)
  paths = list(image_files(argv[1:]))
  results, failed = [], 0
  names = model.class_names
  for start in range(0, len(paths), flag_values.batch):
    images, read = [], []  # read: the entries of the images, in order
    for path in paths[start:start + flag_values.batch]:
      try:
        images.append(load_image(path, model, flag_values.max_pixels))
        read.append({"image": path})
        results.append(read[-1])
      except (ValueError, OSError) as e:
        message = str(e) if isinstance(e, ValueError) else f"{path}: {e.strerror or e}"
        print(f"error: {message}", file=sys.stderr)
        results.append({"image": path, "error": message})
        failed += 1
    if images:
      indices, probabilities = model.top_k(np.stack(images), flag_values.top)  # (n, k) each
      for entry, row, row_p in zip(read, indices, probabilities):
        entry["top"] = [{"index": int(i), "class": names[i] if names else str(int(i)), "probability": float(p)}
                        for i, p in zip(row, row_p)]
  if flag_values.json:
    print(json.dumps(results, indent=1))
  else:
    for result in results:
      if "top" in result:
        print(format_predictions([result["image"]], [[(t["class"], t["probability"]) for t in result["top"]]]))
  if failed:
    print(f"error: {failed} of {len(paths)} image files could not be read (listed above); the others are "
          "predicted.", file=sys.stderr)
    return 1
  if not paths:
    raise cli.UsageError(f"no image files in {argv[1:]}: a directory stands for its {', '.join(IMAGE_EXTENSIONS)} "
                         "files.")
  return None


if __name__ == "__main__":
  define_flags()
  cli.run(main)
