"""What several test modules share: layer cases, small models of every kind, trained-looking weights, a run on
disk, logits compared, a run killed at a known step. A test imports these from here, never another test module's
names (tests/test_architecture.py checks that none imports another's private ones)."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcnn_jax import checkpoint, inference, layers, models
from lcnn_jax import config as config_lib
from lcnn_jax.inference import machine


# Layers and models ----------------------------------------------------------------------------------------------

LAYER_CASES = {
    "alexnet_conv1_like": dict(m=3, n=8, k=3, kernel=(11, 11), strides=(4, 4), padding=(2, 2), size=(23, 27),
                               density=0.1),
    "3x3_pad1": dict(m=5, n=7, k=4, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(6, 5), density=0.3),
    "uneven_strides": dict(m=6, n=9, k=5, kernel=(3, 2), strides=(2, 1), padding=(0, 1), size=(9, 8), density=0.5),
    "fc6_like": dict(m=16, n=33, k=20, kernel=(6, 6), strides=(1, 1), padding=(0, 0), size=(6, 6), density=0.05),
    "1x1": dict(m=40, n=12, k=8, kernel=(1, 1), strides=(1, 1), padding=(0, 0), size=(1, 1), density=0.2),
    # Dense layers whose rows of S are indexed by uint8 (200 < 256) and by int32 (2,000 x 36 > 65,535), each output
    # with enough non-zeros for the vector loops of a small batch's sparse dot products.
    "1x1_uint8_rows": dict(m=24, n=9, k=200, kernel=(1, 1), strides=(1, 1), padding=(0, 0), size=(1, 1),
                           density=0.3),
    "fc_int32_rows": dict(m=3, n=5, k=2000, kernel=(6, 6), strides=(1, 1), padding=(0, 0), size=(6, 6),
                          density=0.01),
    "empty": dict(m=4, n=5, k=3, kernel=(2, 2), strides=(1, 1), padding=(0, 0), size=(3, 3), density=0.0),
    # A first layer whose dictionary the kernel applies itself, and a strided map (space-to-depth copy).
    "map_fused_dictionary": dict(m=4, n=6, k=5, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(8, 9),
                                 density=0.3),
    "map_strided": dict(m=16, n=7, k=6, kernel=(5, 5), strides=(2, 2), padding=(2, 2), size=(17, 16), density=0.2),
    # A dictionary stage of an odd number of input channels, too large for the kernel to fuse (13·7 > 64).
    "odd_channels": dict(m=13, n=6, k=7, kernel=(3, 3), strides=(1, 1), padding=(1, 1), size=(7, 6), density=0.3),
}


def small_model(name, input_shape, **overrides):
  """A model of ``name`` for 10 classes at width 8 (depth 8 where it has one), with small dictionaries;
  ``overrides`` sets dictionary sizes (``classifier=4``)."""
  config = config_lib.default_config(name).model
  config.update({key: 8 for key in ("depth", "width") if key in config})  # the keys of those models that have them
  sizes = dict(stage1=6, stage2=8, stage3=8, stage4=8, fc=16, **overrides)
  config.dictionary.update({key: size for key, size in sizes.items() if key in config.dictionary})
  return models.create_model(config, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(0))


def as_if_trained(model, rng, density=0.3):
  """Sparse coefficients and non-trivial BatchNorm statistics, so lookups and folding are both exercised."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      n = module.num_features
      module.mean[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
      module.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
      module.bias[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
    if isinstance(module, layers.LOOKUP_LAYERS):
      p = np.asarray(module.coefficients[...])
      module.coefficients[...] = jnp.asarray(p * (rng.random(p.shape) < density))
  return model


def eval_logits(model, x):
  """The logits of ``model`` in eval mode (running BatchNorm statistics, no dropout), jitted."""
  eval_model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
  return np.asarray(jax.jit(lambda v: eval_model(v))(x))


class Unfoldable(nnx.Module):
  """BatchNorms on the input and on a tensor that a residual also reads cannot fold; the one after conv can."""

  def __init__(self, rngs):
    self.bn_in = nnx.BatchNorm(3, rngs=rngs)
    self.conv = layers.LookupConv(3, 4, 3, dictionary_size=2, padding=1, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (1, 1), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, rngs=rngs)
    self.fc = layers.LookupDense(4, 5, dictionary_size=3, rngs=rngs)

  def __call__(self, x):
    y = self.conv2(nnx.relu(self.bn(self.conv(self.bn_in(x)))))
    return self.fc(jnp.mean(self.bn2(y) + y, axis=(1, 2)))


class Between(nnx.Module):
  """Operations between layers that the project's models do not use: constants, average pooling with
  padding, a maximum over channels, flattening maps larger than 1×1, a concatenation, other element-wise
  functions."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.offset = jnp.asarray(np.linspace(-1, 1, 8 * 7 * 4, dtype=np.float32).reshape(1, 8, 7, 4))
    self.scale = jnp.asarray(np.linspace(0.5, 2, 4, dtype=np.float32))  # per channel, broadcast
    self.fc = nnx.Linear(4 * 4 * 4 + 4 * 4, 5, rngs=rngs)

  def __call__(self, x):
    y = jnp.tanh(self.conv(x) * self.scale - self.offset)  # (b, 8, 7, 4)
    pooled = nnx.avg_pool(y, (2, 2), strides=(2, 2), padding=((0, 0), (1, 0)))  # (b, 4, 4, 4)
    channel_max = jnp.exp(-jnp.max(pooled, axis=3))  # (b, 4, 4)
    return self.fc(jnp.concatenate([pooled.reshape(x.shape[0], -1), channel_max.reshape(x.shape[0], -1)], axis=1))


# Exported models and runs ---------------------------------------------------------------------------------------

def assert_close(got, expected):
  """Logits equal up to float32 rounding: 1e-4 relative, 1e-4 of the largest logit absolute."""
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def npz_model(model, input_shape, tmp_path):
  """``model`` exported with dense backends, saved to ``tmp_path`` and loaded back."""
  exported = inference.inference_model(model, input_shape, backends="dense")
  inference.save(exported, tmp_path / "model.npz")
  return inference.load(tmp_path / "model.npz")


def write_run(workdir, model, dataset):
  """A workdir as the readers of a run see it: config.json and step 7 holding the model's params and statistics
  (written by checkpoint.save_model, the layout of a model without a training state)."""
  workdir.mkdir()
  checkpoint.save_run_info(str(workdir), run_config(), dataset)
  checkpoint.save_model(str(workdir), model, step=7, imported_from="tests/helpers.py")


def run_config():
  """The config of :func:`write_run`'s runs: a width-8 digits LCNN on an image folder."""
  config = config_lib.default_config()
  config.model.name = "digits-lcnn"
  config.model.width = 8
  config.model.dictionary.classifier = 4
  config.data.name = "folder"
  return config


# The machine a report names ------------------------------------------------------------------------------------

MACHINE_KEYS = {"cpu", "kernel_arch", "march", "l1_bytes", "l2_bytes", "l3_bytes", "cores"}
KERNEL_ISAS = ("avx512", "avx2", "sse2", "neon", "scalar")


def assert_describes_a_machine(described: dict) -> str:
  """Checks a command's ``"machine"`` (bench, throughput, devicecheck; from
  :func:`lcnn_jax.inference.machine.describe`): exactly the documented keys, sane values. Returns the line the
  command's table must show above it."""
  assert set(described) == MACHINE_KEYS, described
  assert isinstance(described["cpu"], str) and described["cpu"].strip(), described
  assert described["kernel_arch"] in KERNEL_ISAS or described["kernel_arch"].startswith("unavailable"), described
  assert isinstance(described["march"], str) and described["march"], described
  assert isinstance(described["cores"], int) and described["cores"] >= 1, described
  for key in ("l1_bytes", "l2_bytes", "l3_bytes"):
    assert described[key] is None or (isinstance(described[key], int) and described[key] > 0), described
  return machine.Machine(**described).line()


# Runs interrupted -----------------------------------------------------------------------------------------------

# Runs lcnn_jax.main, but when step STEP is about to be saved it writes a marker file and hangs there.
_HANG_WHEN_SAVING = r"""
import sys, threading
from lcnn_jax import checkpoint, main, train
marker, step = sys.argv.pop(1), int(sys.argv.pop(1))
save = checkpoint.Checkpointer.save
def save_or_hang(self, state, data_iter):
  if int(train.host_local(state.step)) == step:
    open(marker, "w").close()
    threading.Event().wait()
  save(self, state, data_iter)
checkpoint.Checkpointer.save = save_or_hang
main.run()
"""


def kill_9_when_saving(step, marker, main_args, *, cwd):
  """Runs ``python -m lcnn_jax.main *main_args`` until it is about to save ``step`` (computed and logged, not
  yet on disk), then SIGKILLs it: a crash at a known point. ``marker`` is a path for the process to create there;
  the wait is for that state, not for a duration."""
  process = subprocess.Popen([sys.executable, "-c", _HANG_WHEN_SAVING, str(marker), str(step), *main_args],
                             cwd=cwd, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    while not os.path.exists(marker):
      assert process.poll() is None, f"the run ended before reaching step {step}"
      time.sleep(0.1)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert process.returncode == -signal.SIGKILL


ENGINE_CASES = {
    "digits": lambda: (small_model("digits", (8, 8, 1)), (8, 8, 1)),
    "alexnet": lambda: (small_model("alexnet", (67, 67, 3)), (67, 67, 3)),
    "resnet": lambda: (small_model("resnet", (32, 32, 3)), (32, 32, 3)),
    "between": lambda: (Between(nnx.Rngs(1)), (8, 7, 3)),  # padded average pooling, channel max, concat
    "unfoldable": lambda: (Unfoldable(nnx.Rngs(0)), (6, 5, 3)),
}
"""The dense CNNs every baseline engine (PyTorch, OpenVINO) is checked on: name -> () -> (model, input shape)."""
