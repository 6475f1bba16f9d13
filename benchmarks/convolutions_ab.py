"""Dense convolutions of AlexNet, AlexNet-LCNN and ResNet compiled as XLA decides (YNNPACK's fusions in this
jaxlib) against XLA's own convolution emitter (``InferenceModel(convolutions="xla")``'s compiler options), side
by side in one process, at batch 1 and 32.

    python benchmarks/convolutions_ab.py [--seconds 3] [--batches 1,32] [--json results.json]

Each convolution (NHWC, ReLU after it, 2 threads as the runtime runs) is compiled both ways and the two are
called in alternating rounds (``tuning.interleaved_ms``); their outputs are checked equal. Prints a table and,
with ``--json``, writes it with the machine it ran on.
"""
import argparse
import json

from ab_common import fail

CONVOLUTIONS = {  # name: (h, w, in, out, kernel, stride, padding)
    "AlexNet-LCNN conv2": (27, 27, 64, 192, 5, 1, 2),
    "AlexNet conv1": (224, 224, 3, 96, 11, 4, 2),
    "AlexNet conv2": (27, 27, 96, 256, 5, 1, 2),
    "AlexNet conv3": (13, 13, 256, 384, 3, 1, 1),
    "ResNet 3x3, 56x56": (56, 56, 64, 64, 3, 1, 1),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seconds", type=float, default=3.0, help="time per convolution and batch, side by side")
  parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
  parser.add_argument("--json", help="write the table here as JSON")
  args = parser.parse_args()
  try:
    batches = [int(b) for b in args.batches.split(",")]
  except ValueError:
    batches = []
  if not batches or min(batches) < 1:
    fail(f"--batches {args.batches}: expected positive integers separated by commas, such as 1,32.")
  if args.seconds <= 0:
    fail(f"--seconds {args.seconds}: expected a positive time.")

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lcnn_jax.inference import machine, tuning  # pylint: disable=import-outside-toplevel
  from lcnn_jax.inference import model as model_lib  # pylint: disable=import-outside-toplevel

  available, reason = model_lib.xla_convolutions_available()
  if not available:
    fail(f"XLA's own convolution emitter cannot be chosen here: {reason}.")
  described = machine.describe()
  print(described.line())
  print(f"{'convolution':<22} {'batch':>5} {'as XLA decides ms':>18} {'XLA emitter ms':>15} {'ratio':>6}", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for name, (h, w, cin, cout, k, stride, pad) in CONVOLUTIONS.items():
    for batch in batches:
      x = jax.numpy.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
      kernel = jax.numpy.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.05)

      def conv(x, kernel, stride=stride, pad=pad):
        return jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")))
      compiled = {way: jax.jit(conv, compiler_options=options).lower(x, kernel).compile()
                  for way, options in (("default", None), ("xla", model_lib.XLA_CONVOLUTION_OPTIONS))}
      out = {way: np.asarray(c(x, kernel)) for way, c in compiled.items()}
      if not np.allclose(out["default"], out["xla"], rtol=1e-4, atol=1e-4 * np.abs(out["default"]).max()):
        fail(f"{name} at batch {batch}: the two ways give different outputs.")
      ms = tuning.interleaved_ms({way: lambda c=c: c(x, kernel).block_until_ready() for way, c in compiled.items()},
                                 min_seconds=args.seconds)
      rows.append({"convolution": name, "batch": batch, "default_ms": ms["default"], "xla_ms": ms["xla"],
                   "ratio": ms["xla"] / ms["default"]})
      print(f"{name:<22} {batch:>5} {ms['default']:>18.3f} {ms['xla']:>15.3f} {ms['xla'] / ms['default']:>6.2f}",
            flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": described.as_dict(), "seconds": args.seconds, "options": model_lib.XLA_CONVOLUTION_OPTIONS,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
