"""AlexNet-LCNN "accurate" on ImageNet: the paper's 3.2× row (55.1% top-1 / 78.1% top-5).

    python -m lcnn_jax.main --config configs/alexnet_accurate.py --config.data.dir /data/imagenet --workdir runs/acc

Dictionary sizes and λ are the TF port's published settings (REFERENCE §4): conv1..conv5, fc6, fc7 =
3, 500, 500, 500, 30, 1024, 1024 with λ = 0.3 (the value in the port's code; its README says 0.4) and initial
sparsity 0.01; fc8 stays dense.

**conv5 keeps 30 atoms.** The 30 among the 500s looks like a typo, but it is the setting behind the only
published result for this row: the port lists the same vector in its code and three times in its README, and
reports 58.17% top-1 on ImageNet with it. A 500 would be a configuration nobody has trained, and consistency
alone is no evidence. It is also the cheaper choice: with 500 atoms conv5's dictionary stage alone costs
28.8M multiplications (19% of the dense conv5), against 1.7M with 30. To try the other reading, pass
``--config.model.dictionary.convs='(500, 500, 500, 500)'``.

Multiplications per 224×224 image against the CNN's 1,135,256,096 (``lcnn_jax.flops``, every P at density d):
0.4× at d = 1 (the 500-atom dictionaries are overcomplete for conv2–conv4), 1.9× at 0.2, 3.2× at
d ≈ 0.097, and at most 9.8× (d → 0). With conv5 = 500 the paper's 3.2× would need d ≈ 0.080.

**Operating point.** ``sparsity.target_speedup = 3.2``: training steers λ (starting from the value above) so
that the final checkpoint counts the paper's 3.2× (``lcnn_jax.operating_point``: a controller on the counted
multiplications, an exact projection onto the budget at 60% of the steps, then fine-tuning of the kept
non-zeros), instead of hoping that an unpublished λ lands there. The rule is ``threshold``, the original's
(λ·τ·sign(P) through momentum, |P| ≤ τ zeroed in place), so the run reproduces the original's training
dynamics and λ keeps its meaning there. 3.2× lies inside this model's reachable range (below its
9.8× with every P empty); pass ``--config.sparsity.target_speedup=0`` for the plain λ run.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.imagenet_config("alexnet-lcnn", batch_size=128, lr_schedule="alexnet")
  c.model.dictionary.first = 3  # conv1
  c.model.dictionary.convs = (500, 500, 500, 30)  # conv2..conv5
  c.model.dictionary.fc = 1024  # fc6, fc7
  c.model.dictionary.classifier = 0  # fc8 stays dense
  c.model.initial_sparsity = 0.01
  c.sparsity.strength = 0.3  # the starting λ of the steering
  c.sparsity.rule = "threshold"
  c.sparsity.target_speedup = 3.2
  return c
