"""ResNet-18-LCNN "accurate" on ImageNet: the paper's 5.0× row (62.2% top-1 / 84.6% top-5).

    python -m lcnn_jax.main --config configs/resnet18_accurate.py --config.data.dir /data/imagenet --workdir runs/r18a

No ResNet dictionary sizes were ever published; these were chosen as follows.

* The 7×7 stem keeps the original's default dictionary of 3 atoms (``model.dictionary.first``); projection
  shortcuts and the fc stay dense.
* Each stage's dictionary is the same fraction of its input width, k = 11m/16: 44, 88, 176, 352 atoms for
  m = 64, 128, 256, 512 (equal dictionary cost per stage, as in ``resnet18_fast.py``). Unlike AlexNet-accurate's
  500 atoms they stay below m: with k = m the dictionary stages alone cap the speedup at 5.6×.
* λ = 0.3 and initial sparsity 0.01, as AlexNet-accurate, so P should end about as dense as there: the
  AlexNet-accurate sizes reach the paper's 3.2× at density d ≈ 0.097.

Multiplications per 224×224 image against the CNN's 1,814,073,344 (``lcnn_jax.flops``, every P at density d):
4.99× at d = 0.097 (AlexNet-accurate's density), the paper's 5.0× at d ≈ 0.096, and at most 7.9× (d → 0).
Neighbours at d = 0.097: 40, 80, 160, 320 atoms give 5.4×; 48, 96, 192, 384 give 4.6×; 64, 128, 256, 512 give
3.5×.

**Operating point.** ``sparsity.target_speedup = 5.0``: training steers λ (starting from the value above) so
that the final checkpoint counts the paper's 5.0× (``lcnn_jax.operating_point``: a controller on the counted
multiplications, an exact projection onto the budget at 60% of the steps, then fine-tuning of the kept
non-zeros), instead of hoping that an unpublished λ lands there. The rule is ``threshold``, the original's
(λ·τ·sign(P) through momentum, |P| ≤ τ zeroed in place), so the run reproduces the original's training
dynamics and λ keeps its meaning there. 5.0× lies inside this model's reachable range (below its
7.9× with every P empty); pass ``--config.sparsity.target_speedup=0`` for the plain λ run.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.imagenet_config("resnet-lcnn", batch_size=256, lr_schedule="resnet")
  c.model.depth = 18
  c.model.dictionary.first = 3  # the 7×7 stem
  c.model.dictionary.stage1 = 44
  c.model.dictionary.stage2 = 88
  c.model.dictionary.stage3 = 176
  c.model.dictionary.stage4 = 352
  c.model.initial_sparsity = 0.01
  c.sparsity.strength = 0.3  # the starting λ of the steering
  c.sparsity.rule = "threshold"
  c.sparsity.target_speedup = 5.0
  return c
