"""Few-shot learning on Fashion-MNIST at a scale that fits a shared 2-core machine.

    python -m lcnn_jax.experiments.few_shot --config configs/experiments/few_shot_fashion.py \\
        --workdir runs/few_shot_fashion --ns 1,5,10,50 --novel_steps 100 --novel_batch_size 16 --seeds 0,1,2,3,4

Base runs learn classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat) from the first 2,000 training images
of each (10,000 images, batch 64, 300 steps, one evaluation at the end), the LCNN (``mnist-lcnn``, dictionaries
of 8 atoms) steered to a counted speedup of 10×, the CNN (``mnist``) dense. Novel runs learn classes 5-9 (Sandal,
Shirt, Sneaker, Bag, Ankle boot) from the first n training images of each, 100 steps of batch 16 each: the LCNN
with the base LCNN's dictionaries frozen (indices and coefficients trained from scratch, still steered to 10×),
the CNN fine-tuned from the base CNN (whole net, and last layer only). The base runs train once; the novel runs
once per seed. The experiment sets ``data.classes``, ``data.examples_per_class``, the run lengths and the
transfer keys.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.fashion_mnist_config(lcnn=True)
  c.model.head = "average"  # as measured in docs/experiments.md (the 12-epoch configs read every pixel)
  c.seed = 0  # the base runs' seed; --seeds sets the novel runs'
  c.data.examples_per_class = 2000  # of the base classes: 10,000 training images
  c.train.batch_size = 64
  c.train.num_steps = 300
  c.train.warmup_steps = 30
  c.train.eval_every = 300  # once, at the end
  c.train.checkpoint_every = 300
  c.train.log_every = 50
  c.sparsity.strength = 0.05  # the starting λ, steered to sparsity.target_speedup = 10
  return c
