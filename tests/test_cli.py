"""Every command answers a person: user mistakes end in one paragraph with exit code 2 and no traceback, nothing
written is lost, logs are quiet, and Ctrl-C/SIGTERM stop a run where the same command resumes it exactly."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lcnn_jax import bench, cli, devicecheck, logger, main, throughput, train
from lcnn_jax.experiments import common, few_iteration, spectrum
from lcnn_jax.inference import predict
from tests.test_faults import QUICKSTART, REPO, final_state, flags, quickstart, run_main, train_losses

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def assert_one_message(done, *needles):
  """Exit code 2, a single ``error:`` paragraph naming each needle, no traceback."""
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.stderr.count("error:") == 1, done.stderr
  for needle in needles:
    assert needle in done.stderr, done.stderr


@pytest.mark.parametrize("args,needles", [
    (["--config.train.batchsize=3"], ["--config.train.batchsize", "did you mean 'batch_size'"]),
    (["--config.model.nmae=x"], ["'nmae'", "did you mean 'name'"]),
    (["--config.train.batch_size=abc"], ["--config.train.batch_size=abc", "not a value this key takes"]),
    (["--bogus=1", "stray"], ["'bogus'", "--help"]),
    (["--mode=eval"], ["does not exist: --mode eval reads the checkpoints of a training run"]),
])
def test_a_flag_mistake_is_one_paragraph_naming_the_flag_and_the_fix(tmp_path, args, needles):
  workdir = tmp_path / "run"
  assert_one_message(run_main(workdir, *args), *needles)
  assert not workdir.exists()


def run_config(config, *args):
  return subprocess.run([sys.executable, "-m", "lcnn_jax.main", "--config", str(config), *args],
                        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)


def test_a_config_file_that_is_missing_broken_or_without_get_config_is_named(tmp_path):
  assert_one_message(run_config(tmp_path / "nope.py", "--workdir", str(tmp_path / "w")), "nope.py", "no such file")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  assert_one_message(run_config(broken, "--workdir", str(tmp_path / "w")), "broken.py", "SyntaxError")
  without = tmp_path / "without.py"
  without.write_text("X = 1\n")
  assert_one_message(run_config(without, "--workdir", str(tmp_path / "w")), "get_config()")
  assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_or_cannot_be_written_is_refused_and_kept(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  assert_one_message(run_main(a_file), str(a_file), "is a file")
  assert a_file.read_text() == "mine"
  assert_one_message(run_main("/proc/lcnn_jax_run"), "/proc/lcnn_jax_run", "cannot be written")


def test_a_run_failing_before_it_starts_leaves_no_empty_workdir_and_keeps_what_was_there(tmp_path):
  mistake = ["--config.data.name=folder", f"--config.data.dir={tmp_path / 'no_images'}"]
  new = tmp_path / "new" / "run"
  done = run_main(new, *mistake)
  assert_one_message(done, "no_images")
  assert not (tmp_path / "new").exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  assert_one_message(run_main(existing, *mistake), "no_images")
  assert (existing / "notes.txt").read_text() == "mine"


def test_help_and_print_config():
  for flag in ("--help", "-h"):
    done = subprocess.run([sys.executable, "-m", "lcnn_jax.main", flag], capture_output=True, text=True, cwd=REPO,
                          env=ENV, timeout=300)
    assert done.returncode == 0 and "--workdir" in done.stdout and "print_config" in done.stdout
  done = run_config(QUICKSTART, "--print_config", "--config.train.batch_size=7")
  assert done.returncode == 0, done.stderr
  assert "batch_size: 7" in done.stdout and "Traceback" not in done.stderr
  for experiment in ("spectrum", "few_shot", "few_iteration"):  # the other training commands: their base config
    done = subprocess.run([sys.executable, "-m", f"lcnn_jax.experiments.{experiment}", "--print_config",
                           "--config.train.batch_size=7"], capture_output=True, text=True, cwd=REPO, env=ENV,
                          timeout=300)
    assert done.returncode == 0 and "batch_size: 7" in done.stdout, (experiment, done.stderr[-2000:])


ENTRY_POINTS = ["lcnn_jax.flops", "lcnn_jax.inspection", "lcnn_jax.throughput", "lcnn_jax.devicecheck", "lcnn_jax.import_t7",
                "lcnn_jax.bench", "lcnn_jax.inference.exporter", "lcnn_jax.inference.predict",
                "lcnn_jax.experiments.spectrum", "lcnn_jax.experiments.few_shot", "lcnn_jax.experiments.few_iteration"]


def test_every_entry_point_answers_help_and_h_with_its_flags():
  commands = [(module, flag) for module, flag in zip(ENTRY_POINTS, ["-h", "--help"] * len(ENTRY_POINTS))]
  running = [subprocess.Popen([sys.executable, "-m", module, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=ENV) for module, flag in commands]
  for (module, flag), process in zip(commands, running):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in err, (module, flag, err[-2000:])
    assert "flags:" in out and "  --" in out, (module, flag, out)


# Every command module: its flags defined by define_flags(flag_values) and read by main(argv, flag_values).
COMMANDS = ["lcnn_jax.main", "lcnn_jax.bench", "lcnn_jax.throughput", "lcnn_jax.devicecheck", "lcnn_jax.import_t7",
            "lcnn_jax.inspection", "lcnn_jax.inference.exporter", "lcnn_jax.inference.predict",
            "lcnn_jax.experiments.few_shot", "lcnn_jax.experiments.spectrum", "lcnn_jax.experiments.few_iteration"]
NOT_COMMANDS = {"lcnn_jax.flops": "inspection's command under its old name",
                "lcnn_jax.config_reference": "prints the config reference; takes no flags"}

# Imports each module named on the command line in turn, all in one process, and prints per module as JSON: the
# flags its import added that lcnn_jax defined, the flags its define_flags defines on a fresh FlagValues and those
# it adds to absl's global ones, and the parameters of define_flags and main ("=FLAGS": defaulting to absl's).
FLAG_SHAPES = r"""
import importlib, inspect, json, sys
from absl import app, flags, logging  # absl's own flags are defined by these imports
def parameters(function):
  return [name + ("=FLAGS" if p.default is flags.FLAGS else "") for name, p in
          inspect.signature(function).parameters.items()] if function else None
shapes = {}
for name in sys.argv[1:]:
  known = set(flags.FLAGS)
  module = importlib.import_module(name)
  shape = shapes[name] = {"on_import": sorted(f for f in set(flags.FLAGS) - known
                                              if flags.FLAGS.find_module_defining_flag(f).startswith("lcnn_jax"))}
  shape["define_flags"], shape["main"] = parameters(getattr(module, "define_flags", None)), parameters(
      getattr(module, "main", None))
  if shape["define_flags"]:
    known, flag_values = set(flags.FLAGS), flags.FlagValues()
    module.define_flags(flag_values)
    shape["defined"], shape["global"] = sorted(flag_values), sorted(set(flags.FLAGS) - known)
print(json.dumps(shapes))
"""


def test_every_module_with_a_main_block_is_a_command_checked_here():
  package = os.path.join(REPO, "lcnn_jax")
  with_main = {os.path.relpath(os.path.join(root, file), REPO)[:-3].replace(os.sep, ".")
               for root, _, files in os.walk(package) for file in files
               if file.endswith(".py") and 'if __name__ == "__main__":' in open(os.path.join(root, file)).read()}
  assert with_main == {*COMMANDS, *NOT_COMMANDS}


def test_importing_a_command_defines_no_flags_and_define_flags_defines_them_on_the_flag_values_given():
  done = subprocess.run([sys.executable, "-c", FLAG_SHAPES, *COMMANDS, *NOT_COMMANDS], capture_output=True,
                        text=True, cwd=REPO, env=ENV, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  shapes = json.loads(done.stdout)
  for module in [*COMMANDS, *NOT_COMMANDS]:
    assert shapes[module]["on_import"] == [], (module, shapes[module])
  for module in COMMANDS:
    shape = shapes[module]
    assert shape["define_flags"] == ["flag_values=FLAGS"] and shape["main"] == ["argv", "flag_values=FLAGS"], shape
    assert shape["global"] == [] and len(shape["defined"]) >= 5, (module, shape)


@pytest.mark.parametrize("command,argv,needle", [
    (main, ["--config", "quickstart", "--mode", "eval", "--workdir", "/nonexistent/run"],
     "--workdir /nonexistent/run does not exist: --mode eval reads the checkpoints"),
    (main, ["--mode", "eval"], "--config is missing: A config file"),
    (throughput, ["--batch", "2"], "--config is missing: A model config"),
    (predict, ["photo.png"], "--model is missing: An exported model"),
    (few_iteration, [], "--workdir is missing"),
    (spectrum, ["--workdir", "/nonexistent/experiment", "stray"], "unexpected arguments ['stray']"),
])
def test_a_command_runs_in_process_through_cli_call_and_a_mistake_is_one_paragraph(capsys, command, argv, needle):
  user_errors = getattr(command, "USER_ERRORS", common.USER_ERRORS)
  status = cli.call(command.main, command.define_flags, [command.__name__, *argv], user_errors=user_errors)
  err = capsys.readouterr().err
  assert status == 2 and err.count("error:") == 1 and needle in err, err


def test_devicecheck_runs_in_process_and_answers_a_mistake_in_one_line(capsys, tmp_path):
  status = cli.call(devicecheck.main, devicecheck.define_flags,
                    ["devicecheck", "--out", str(tmp_path), "--parts", "tests,benchmarks"])
  err = capsys.readouterr().err
  assert status == 2 and err.count("error:") == 1 and "benchmarks" in err, err


# Runs lcnn_jax.main, sending itself SIGNAL once step STEP is logged: the stop is asked mid-run at a known step.
SIGNAL_AT_STEP = r"""
import os, signal, sys
from lcnn_jax import logger, main
signum, at = int(sys.argv.pop(1)), int(sys.argv.pop(1))
log_train = logger.MetricsLogger.train
def log_then_signal(self, step, row, densities):
  log_train(self, step, row, densities)
  if step == at:
    os.kill(os.getpid(), signum)
logger.MetricsLogger.train = log_then_signal
# As in a terminal: a test runner started in the background (`cmd &`) hands its children SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
main.run()
"""


def run_signalled(workdir, signum, at, args):
  return subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, str(signum), str(at), "--config", QUICKSTART,
                         "--workdir", str(workdir), *args], capture_output=True, text=True, cwd=REPO, env=ENV,
                        timeout=600)


def test_ctrl_c_and_sigterm_save_and_the_rerun_equals_the_uninterrupted_run(tmp_path):
  args = flags(7, **{"train.checkpoint_every": 100})  # no periodic save: only the stop's own checkpoint
  stopped = tmp_path / "stopped"
  done = run_signalled(stopped, signal.SIGINT, 2, args)
  assert done.returncode == 130, done.stderr[-3000:]
  assert "interrupted at step 2; rerun the same command to resume" in done.stderr
  assert "Traceback" not in done.stderr
  # Quiet by default: the TensorBoard hint once, no orbax/absl INFO lines.
  assert done.stderr.count("tensorboard --logdir") == 1
  assert "checkpoint_manager.py" not in done.stderr and "Restoring checkpoint" not in done.stderr

  done = run_signalled(stopped, signal.SIGTERM, 5, [*args, "--config.data.dir=/nonexistent"])
  assert done.returncode == 143, done.stderr[-3000:]
  assert "Resumed from step 2" in done.stderr
  assert "warning: data.dir=/nonexistent is ignored: data.name=digits reads no files" in done.stderr
  assert "interrupted at step 5; rerun the same command to resume" in done.stderr and "Traceback" not in done.stderr

  done = run_main(stopped, *args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed from step 5" in done.stderr

  whole = tmp_path / "whole"
  train.train_and_evaluate(quickstart(7, **{"train.checkpoint_every": 100}), str(whole))
  step_a, params_a = final_state(whole)
  step_b, params_b = final_state(stopped)
  assert step_a == step_b == 7
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert train_losses(stopped) == train_losses(whole)
  evals = lambda d: [(r["step"], r["loss"], r["top1"]) for r in logger.read_metrics(str(d)) if r["split"] == "eval"]
  assert evals(stopped) == evals(whole)
  # --mode eval prints the line training prints, with the step.
  line = main.eval_line(train.evaluate_checkpoint(quickstart(7), str(stopped)))
  assert line.startswith("step 7: eval top-1 ") and line.endswith("(360 images)")

  # A damaged latest step reaches eval, the exporter and flops as one message naming the steps saved beside it.
  for name in ("_METADATA", "manifest.ocdbt"):
    (stopped / "checkpoints" / "7" / "params" / name).unlink()
  before = listing(stopped)
  for done in run_all(["lcnn_jax.main", "--config", QUICKSTART, "--workdir", stopped, "--mode", "eval"],
                      ["lcnn_jax.inference.exporter", "--workdir", stopped, "--output", tmp_path / "m.npz"],
                      ["lcnn_jax.flops", "--workdir", stopped]):
    assert_one_message(done, f"{stopped}/checkpoints/7 is incomplete or damaged", "use another saved step (2, 5)")
  assert listing(stopped) == before and not (tmp_path / "m.npz").exists()


def run_all(*commands):
  """Runs each ``[module, *args]`` as ``python -m module args`` side by side; their CompletedProcesses in order."""
  running = [subprocess.Popen([sys.executable, "-m", *map(str, command)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV) for command in commands]
  outputs = [p.communicate(timeout=300) for p in running]
  return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(running, outputs)]


def listing(directory):
  return sorted((str(path.relative_to(directory)), path.read_bytes() if path.is_file() else None)
                for path in directory.rglob("*"))


def test_unwritable_outputs_and_directories_that_are_not_runs_are_named_and_left_as_they_were(tmp_path):
  not_a_run, other = tmp_path / "photos", tmp_path / "other_program"
  (not_a_run / "album").mkdir(parents=True)
  (not_a_run / "notes.txt").write_text("mine")
  other.mkdir()
  (other / "config.json").write_text('{"name": "another program"}')
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  before = listing(tmp_path)
  export = ["lcnn_jax.inference.exporter", "--output", tmp_path / "m.npz"]
  main_eval = ["lcnn_jax.main", "--config", QUICKSTART, "--mode"]
  cases = {  # command: what its one message names
      ("lcnn_jax.inference.exporter", "--workdir", not_a_run, "--output", "/proc/lcnn_jax/m.npz"):
          "--output /proc/lcnn_jax/m.npz",
      ("lcnn_jax.inference.exporter", "--workdir", not_a_run, "--output", a_file.parent):
          f"--output {a_file.parent} is a directory",
      (*export[:1], "--workdir", other, *export[1:]): "is not the config.json of an lcnn_jax run",
      (*export[:1], "--workdir", not_a_run, *export[1:]): f"No config.json in '{not_a_run}'",
      (*main_eval, "eval", "--workdir", not_a_run): f"No checkpoint in '{not_a_run}'",
      (*main_eval, "benchmark", "--workdir", other): f"No checkpoint in '{other}'",
      ("lcnn_jax.flops", "--workdir", not_a_run): f"No checkpoint in '{not_a_run}'",
      ("lcnn_jax.bench", "--checkpoint", not_a_run): f"No config.json in '{not_a_run}'",
      ("lcnn_jax.inspection", "--workdir", other, "--plot", "/proc/lcnn_jax/plot.png"): "--plot /proc/lcnn_jax",
      ("lcnn_jax.experiments.few_shot", "--workdir", a_file): f"--workdir {a_file} is a file",
      ("lcnn_jax.experiments.spectrum", "--workdir", "/proc/lcnn_jax_experiment"): "cannot be written",
      ("lcnn_jax.experiments.few_iteration", "--workdir", tmp_path / "new", "stray"): "unexpected arguments",
      ("lcnn_jax.experiments.few_iteration",): "--workdir is missing",
      ("lcnn_jax.main",): "--config is missing: A config file",
      ("lcnn_jax.inference.predict", tmp_path / "photo.png"): "--model is missing: An exported model",
  }
  for (command, needle), done in zip(cases.items(), run_all(*cases)):
    assert done.returncode == 2 and "Traceback" not in done.stderr, (command, done.stderr[-3000:])
    assert done.stderr.count("error:") == 1 and needle in done.stderr, (command, done.stderr)
  assert listing(tmp_path) == before  # nothing written, nothing removed


def test_an_unexpected_error_keeps_its_traceback():
  done = subprocess.run([sys.executable, "-c", "from lcnn_jax import cli\n"
                         "def main(argv):\n  raise RuntimeError('a bug')\ncli.run(main)"],
                        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
  assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: a bug" in done.stderr


def test_output_piped_into_a_reader_that_stops_ends_quietly():
  # As `python -m lcnn_jax.main --help | head -1`: the reader has gone before the command writes.
  process = subprocess.Popen([sys.executable, "-m", "lcnn_jax.main", "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=REPO, env=ENV)
  process.stdout.close()
  err = process.communicate(timeout=300)[1].decode()
  assert process.returncode == 128 + signal.SIGPIPE and err == "", err


def test_bench_rows_of_a_checkpoint_are_labelled_with_its_model_in_aligned_columns():
  row = {"model": "digits-lcnn", "preset": "trained", "batch": 2, "backend": "auto", "dense_ms": 0.3,
         "lcnn_ms": 0.2, "wall_speedup": 1.5, "count_speedup": 39.7}
  table = bench.format_table({"rows": [row], "device": "cpu", "density": None, "auto_backends": {}})
  header, line = table.splitlines()[1:3]
  assert line.startswith("digits-lcnn trained ") and header.index("preset") == line.index("trained")
