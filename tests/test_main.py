"""The main job, ``python -m lcnn_jax.main``: train, eval and benchmark modes on one run, and a misspelt key."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd):
  return subprocess.run([sys.executable, "-m", "lcnn_jax.main", *args], capture_output=True, text=True, cwd=cwd,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_main_trains_evaluates_benchmarks_and_rejects_misspelt_keys(tmp_path):
  config = os.path.join(REPO, "configs", "quickstart.py")
  small = ["--config.train.num_steps=4", "--config.train.batch_size=32", "--config.model.width=8",
           "--config.train.eval_every=4", "--config.train.checkpoint_every=4"]
  done = run_main("--config", config, "--workdir", str(tmp_path), *small, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "speedup" in done.stdout and "step 4: eval top-1 " in done.stdout
  evaluated = run_main("--config", config, "--workdir", str(tmp_path), "--mode", "eval", *small, cwd=REPO)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  line = evaluated.stdout.strip().splitlines()[-1]
  assert line.startswith("step 4: eval top-1 ") and line.endswith("(360 images)")
  assert line in done.stdout.splitlines()  # the line the end of training printed
  assert "top-1" not in evaluated.stderr  # printed once
  benchmark = run_main("--config", config, "--workdir", str(tmp_path), "--mode", "benchmark", cwd=REPO)
  assert benchmark.returncode == 0 and "conv2" in benchmark.stdout and "speedup" in benchmark.stdout
  typo = run_main("--config", config, "--workdir", str(tmp_path), "--config.train.batchsize=8", cwd=REPO)
  assert typo.returncode == 2 and "did you mean 'batch_size'" in typo.stderr and "Traceback" not in typo.stderr
