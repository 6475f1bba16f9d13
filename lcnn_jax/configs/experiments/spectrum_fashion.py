"""The speed/accuracy spectrum on Fashion-MNIST at a scale that fits a shared 2-core machine.

``--config experiments/spectrum_fashion`` (or ``...:reduced``) is that reduced scale, for smoke tests
and time-boxed runs; ``...:full`` is the protocol's full scale (docs/experiments.md):

    python -m lcnn_jax.experiments.spectrum --config experiments/spectrum_fashion:full \\
        --workdir runs/spectrum_fashion_full --points 16:5,8:10,8:20,4:40 --seeds 0,1,2 --nowall_clock

* reduced: ``fashion_mnist:lcnn`` (the ``mnist-lcnn`` net, conv3's global average) cut down to the
  first 1,000 training images of each class (10,000 of the 60,000), batch 64, 300 steps (about two passes), one
  evaluation on all 10,000 test images at the end: 1–2 minutes a point on 2 idle CPU cores;
* full: ``fashion_mnist:lcnn`` itself: all 60,000 training images, 12 epochs of batch 128 (5,616
  steps), the classifier on every pixel, an evaluation per epoch: about 12 minutes a point on 2 idle cores.

The experiment sets per point the dictionary size (``model.dictionary.convs``) and ``sparsity.target_speedup``
(``docs/operating_points.md``): the run steers λ, starting from ``sparsity.strength``, so that its final
checkpoint counts the requested speedup; the CNN, and the CNN pruned to each LCNN point's count, train for the
same steps.
"""

from lcnn_jax import config as config_lib

VARIANTS = {
    "reduced": "the scale that fits a shared 2-core machine, for smoke tests and time-boxed runs",
    "full": "the protocol's full scale (docs/experiments.md)",
}


def get_config(scale: str = "reduced"):
  """The spectrum_fashion run at ``scale`` (:data:`VARIANTS`)."""
  config_lib.check_variant("experiments/spectrum_fashion", scale, VARIANTS, "full")
  c = config_lib.load("fashion_mnist:lcnn")
  if scale == "full":
    return c
  c.model.head = "average"  # as measured in docs/experiments.md (the 12-epoch configs read every pixel)
  c.data.examples_per_class = 1000  # the first 1,000 of each class: 10,000 training images
  c.train.batch_size = 64
  c.train.num_steps = 300
  c.train.warmup_steps = 30
  c.train.eval_every = 300  # once, at the end
  c.train.checkpoint_every = 300
  c.train.log_every = 50
  c.sparsity.strength = 0.05  # the starting λ; the experiment sets sparsity.target_speedup per point
  return c
