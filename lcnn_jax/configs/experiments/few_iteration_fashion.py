"""Few-iteration learning on Fashion-MNIST at a scale that fits a shared 2-core machine.

``--config experiments/few_iteration_fashion`` (or ``...:reduced``) is that reduced scale, for smoke
tests and time-boxed runs; ``...:full`` is the protocol's full scale (docs/experiments.md):

    python -m lcnn_jax.experiments.few_iteration --config experiments/few_iteration_fashion:full \\
        --workdir runs/few_iteration_fashion_full --shallow_depth 2 --deep_depth 3 --deep_steps 1000 \\
        --eval_every 100 --seeds 0,1,2

* reduced: a shallow ``mnist-lcnn`` (two convolutions per width: conv1 and ``conv1_2`` at 28×28, …) learns
  dictionaries from the first 1,000 training images of each class (10,000 images, batch 64, 200 steps, conv3's
  global average), steered to a counted speedup of 10×;
* full: the shallow LCNN is ``fashion_mnist:lcnn`` at two convolutions per width: all 60,000 training
  images, 12 epochs of batch 128 (5,616 steps), steered to 10×.

A deeper net (three per width) reuses the dictionaries (``conv1_3`` takes ``conv1_2``'s, …) and trains only
indices and coefficients, against the same deeper LCNN and the deeper CNN from scratch, on the same images and
batch for ``--deep_steps``, both LCNNs at the fixed ``--deep_strength`` (no steering). The experiment sets
``model.convs_per_stage``, the run lengths and the transfer keys.
"""

from lcnn_jax import config as config_lib

VARIANTS = {
    "reduced": "the scale that fits a shared 2-core machine, for smoke tests and time-boxed runs",
    "full": "the protocol's full scale (docs/experiments.md)",
}


def get_config(scale: str = "reduced"):
  """The few_iteration_fashion run at ``scale`` (:data:`VARIANTS`)."""
  config_lib.check_variant("experiments/few_iteration_fashion", scale, VARIANTS, "full")
  c = config_lib.load("fashion_mnist:lcnn")
  if scale == "full":
    return c
  c.model.head = "average"  # as measured in docs/experiments.md (the 12-epoch configs read every pixel)
  c.data.examples_per_class = 1000  # 10,000 training images
  c.train.batch_size = 64
  c.train.num_steps = 200  # the shallow run; the deep runs take --deep_steps
  c.train.warmup_steps = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.log_every = 50
  c.sparsity.strength = 0.05  # the starting λ, steered to sparsity.target_speedup = 10
  return c
