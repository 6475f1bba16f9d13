"""Few-shot learning on Fashion-MNIST at a scale that fits a shared 2-core machine.

``--config experiments/few_shot_fashion`` (or ``...:reduced``) is that reduced scale, for smoke tests
and time-boxed runs; ``...:full`` is the protocol's full scale (docs/experiments.md):

    python -m lcnn_jax.experiments.few_shot --config experiments/few_shot_fashion:full \\
        --workdir runs/few_shot_fashion_full --novel_batch_size 16

* reduced: base runs learn classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat) from the first 2,000
  training images of each (10,000 images, batch 64, 300 steps, one evaluation at the end), the LCNN
  (``mnist-lcnn``, dictionaries of 8 atoms, conv3's global average) steered to a counted speedup of 10×, the CNN
  (``mnist``) dense;
* full: the base runs are ``fashion_mnist:lcnn`` and ``fashion_mnist`` on every training
  image of classes 0-4 (30,000 images, 12 epochs of batch 128: 2,808 steps), the LCNN steered to 10×.

Novel runs learn classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) from n images of each drawn per seed; the
experiment sets ``data.classes``, ``data.examples_per_class``, ``data.examples_seed``, the run lengths and what
each arm starts from and trains (``python -m lcnn_jax.experiments.few_shot --help``).
"""

from lcnn_jax import config as config_lib

VARIANTS = {
    "reduced": "the scale that fits a shared 2-core machine, for smoke tests and time-boxed runs",
    "full": "the protocol's full scale (docs/experiments.md)",
}


def get_config(scale: str = "reduced"):
  """The few_shot_fashion run at ``scale`` (:data:`VARIANTS`)."""
  config_lib.check_variant("experiments/few_shot_fashion", scale, VARIANTS, "full")
  c = config_lib.load("fashion_mnist:lcnn")
  c.seed = 0  # --base_seeds sets the base runs' seeds, --seeds the novel runs'
  if scale == "full":
    return c
  c.model.head = "average"  # as measured in docs/experiments.md (the 12-epoch configs read every pixel)
  c.data.examples_per_class = 2000  # of the base classes: 10,000 training images
  c.train.batch_size = 64
  c.train.num_steps = 300
  c.train.warmup_steps = 30
  c.train.eval_every = 300  # once, at the end
  c.train.checkpoint_every = 300
  c.train.log_every = 50
  c.sparsity.strength = 0.05  # the starting λ, steered to sparsity.target_speedup = 10
  return c
