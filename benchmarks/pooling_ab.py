"""A whole model at batch 1 with its max poolings in the lookup kernel (each channel's plane pooled there, as the
runtime does) against the same model pooling in XLA, side by side in one process.

    python benchmarks/pooling_ab.py [--model alexnet] [--preset fast] [--seconds 40] [--json results.json]

The model is built and tuned as ``python -m lcnn_jax.bench`` builds it, once; both variants run its backends
with a call per layer (the one-call chain pools inside the kernel either way). The XLA variant is traced while
``backends.max_pool_chwn`` declines batch 1, as it did before the kernel pooled one image. Each round calls each
variant once, in turn; the logits are checked equal. Prints a table and, with ``--json``, writes it with the
machine it ran on.
"""
import argparse
import sys

from ab_common import add_model_arguments, bench_model, check_equal_logits, fail, print_changes, write_model_json


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_model_arguments(parser)
  parser.set_defaults(batch=1)
  args = parser.parse_args()
  if args.batch != 1:
    fail(f"--batch {args.batch}: the kernel pools one image's planes; from 2 images to the pooled batch XLA "
         "pools either way, and from there the layers pool as they compute. Use --batch 1.")
  setup, images, described = bench_model(args)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lcnn_jax.inference import backends, tuning  # pylint: disable=import-outside-toplevel

  kernel = setup.lcnn.with_backends(setup.lcnn.backends, chain=False)
  xla = setup.lcnn.with_backends(setup.lcnn.backends, chain=False)
  pool_in_kernel = backends.max_pool_chwn
  backends.max_pool_chwn = lambda x, pooling: None if x.shape[-1] == 1 else pool_in_kernel(x, pooling)
  try:
    logits = {"xla": np.asarray(xla(images))}  # traced now, while the kernel declines batch 1
  finally:
    backends.max_pool_chwn = pool_in_kernel
  logits = {"kernel": np.asarray(kernel(images)), **logits}
  check_equal_logits(logits)
  medians = tuning.interleaved_ms({name: lambda m=m: jax.block_until_ready(m(images))
                                   for name, m in (("xla", xla), ("kernel", kernel))}, min_seconds=args.seconds,
                                  max_rounds=sys.maxsize)
  write_model_json(args.json, described, args, setup, print_changes("pooling in", medians))


if __name__ == "__main__":
  main()
