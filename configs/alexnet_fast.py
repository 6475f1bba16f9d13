"""AlexNet-LCNN "fast" on ImageNet: the paper's 37.6× row (44.3% top-1 / 68.7% top-5).

    python -m lcnn_jax.main --config configs/alexnet_fast.py --config.data.dir /data/imagenet --workdir runs/fast

Dictionary sizes and λ are the TF port's published settings (REFERENCE §4), since the authors never
published theirs: conv1..conv5, fc6, fc7 = 3, 30, 30, 30, 30, 512, 512 with λ = 1.0 (the value in the port's
code; its README says 0.3) and initial sparsity 0.01; fc8 stays dense (``model.dictionary.classifier`` 0), as the
original.

Multiplications per 224×224 image against the CNN's 1,135,256,096 (``lcnn_jax.flops``, every P at density d):
3.6× at d = 1, 14.6× at 0.2, 23.5× at 0.1, 37.6× at d ≈ 0.039, and at most 60.3× (d → 0, dictionaries only).
The paper's 37.6× therefore means about 4% of the coefficients survive training.

**Operating point.** ``sparsity.target_speedup = 37.6``: training steers λ (starting from the value above) so
that the final checkpoint counts the paper's 37.6× (``lcnn_jax.operating_point``: a controller on the counted
multiplications, an exact projection onto the budget at 60% of the steps, then fine-tuning of the kept
non-zeros), instead of hoping that an unpublished λ lands there. The rule is ``threshold``, the original's
(λ·τ·sign(P) through momentum, |P| ≤ τ zeroed in place), so the run reproduces the original's training
dynamics and λ keeps its meaning there. 37.6× lies inside this model's reachable range (below its
60.3× with every P empty); pass ``--config.sparsity.target_speedup=0`` for the plain λ run.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.imagenet_config("alexnet-lcnn", batch_size=128, lr_schedule="alexnet")
  c.model.dictionary.first = 3  # conv1
  c.model.dictionary.convs = (30, 30, 30, 30)  # conv2..conv5
  c.model.dictionary.fc = 512  # fc6, fc7
  c.model.dictionary.classifier = 0  # fc8 stays dense
  c.model.initial_sparsity = 0.01
  c.sparsity.strength = 1.0  # the starting λ of the steering
  c.sparsity.rule = "threshold"
  c.sparsity.target_speedup = 37.6
  return c
