"""The launchers: local.sh runs a real 2-process job equal to 1 process; slurm.sbatch and tpu_vm.sh build the
right commands and environment (tested with stand-in srun/gcloud, since no cluster or TPU is reachable here)."""

import importlib.util
import os
import stat
import subprocess
import sys

import pytest

from lcnn_jax import logger, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
# Tiny quickstart: 6 steps of 32 images, checkpoints at 3 and 6, an evaluation at 6. Dropout is off because a
# dropout mask is drawn per position in the global batch, and 2 processes order the same 32 images differently.
TINY = {"train.batch_size": 32, "model.width": 8, "train.checkpoint_every": 3, "train.eval_every": 6,
        "train.log_every": 1, "model.dropout": 0.0}


def flags(num_steps, **overrides):
  values = {**TINY, "train.num_steps": num_steps, **overrides}
  return [f"--config.{key}={value}" for key, value in values.items()]


def write_stub(directory, name, body):
  """An executable stand-in for a program (srun, gcloud, python) that records how it was called."""
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n" + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return path


def launch(script, *args, env=None, cwd=REPO):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True, cwd=cwd,
                        env={**os.environ, **(env or {})}, timeout=600)


def train_losses(workdir):
  return [(r["step"], r["loss"]) for r in logger.read_metrics(workdir) if r["split"] == "train"]


# ------------------------------------------------------------------------------------------------ local.sh


@pytest.mark.parametrize("args", [[], ["0", "--workdir", "w"], ["two", "--workdir", "w"], ["2"],
                                  ["2", "--workdir", "w", "--process_id=1"]])
def test_local_launcher_rejects_bad_arguments_with_usage(args):
  done = launch("local.sh", *args)
  assert done.returncode == 2
  assert "usage:" in done.stderr or "error:" in done.stderr


def test_local_launcher_sets_the_environment_and_flags_of_each_process(tmp_path):
  record = tmp_path / "calls"
  stub = write_stub(str(tmp_path), "python", f"""
if [[ $1 == -c ]]; then exec {sys.executable} "$@"; fi
echo "JAX_PLATFORMS=$JAX_PLATFORMS $*" >> {record}
echo "process output"
""")
  done = launch("local.sh", "3", "--config", "c.py", "--workdir", str(tmp_path / "run"), "--config.seed=1",
                env={"PYTHON": stub, "JAX_PLATFORMS": ""})
  assert done.returncode == 0, done.stderr
  calls = sorted(record.read_text().splitlines())
  assert len(calls) == 3
  ports = set()
  for i, call in enumerate(calls):
    assert call.startswith("JAX_PLATFORMS=cpu -m lcnn_jax.main --config c.py --workdir")
    assert "--config.seed=1" in call and "--num_processes=3" in call and f"--process_id={i}" in call
    ports.add(call.split("--coordinator_address=127.0.0.1:")[1].split()[0])
    assert (tmp_path / "run" / "logs" / f"process_{i}.log").read_text() == "process output\n"
  assert len(ports) == 1 and int(ports.pop()) > 0


def test_local_launcher_fails_and_stops_the_others_when_one_process_fails(tmp_path):
  stub = write_stub(str(tmp_path), "python", f"""
if [[ $1 == -c ]]; then exec {sys.executable} "$@"; fi
if [[ " $* " == *" --process_id=1 "* ]]; then echo "process 1 broke" >&2; exit 3; fi
exec sleep 600
""")
  done = launch("local.sh", "2", f"--workdir={tmp_path}", env={"PYTHON": stub})
  assert done.returncode == 3
  assert "process 1 of 2 exited with status 3" in done.stderr and "process 1 broke" in done.stderr


# ------------------------------------------------------------------------------------------------ slurm.sbatch


def test_slurm_script_checks_the_shared_workdir_then_runs_main_in_every_task(tmp_path):
  record = tmp_path / "calls"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_stub(str(bin_dir), "srun", f"""
echo "JAX_PLATFORMS=${{JAX_PLATFORMS:-unset}} srun $*" >> {record}
if [[ $1 == --ntasks-per-node=1 ]]; then shift 2; exec "$@"; fi
""")
  workdir = tmp_path / "shared" / "run"
  done = launch("slurm.sbatch", "--config", "configs/alexnet_fast.py", "--workdir", str(workdir),
                "--config.train.batch_size=512",
                env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": REPO, "SLURM_NNODES": "4",
                     "SLURM_NTASKS": "32", "SLURM_JOB_ID": "7", "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr
  check, run = record.read_text().splitlines()
  assert check.startswith("JAX_PLATFORMS=cpu srun --ntasks-per-node=1 --ntasks=4 bash -c")
  assert run == (f"JAX_PLATFORMS=unset srun --kill-on-bad-exit=1 python -m lcnn_jax.main --config "
                 f"configs/alexnet_fast.py --workdir {workdir} --config.train.batch_size=512")
  assert workdir.is_dir() and "4 nodes, 32 processes" in done.stderr


def test_slurm_script_requires_a_workdir_and_reports_one_no_node_sees(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_stub(str(bin_dir), "srun", 'shift 2; exec "$@"\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": REPO}
  missing = launch("slurm.sbatch", "--config", "c.py", env=env)
  assert missing.returncode == 2 and "no --workdir" in missing.stderr
  write_stub(str(bin_dir), "mkdir", "exit 0\n")  # a node-local directory: created here, absent on the nodes
  unseen = launch("slurm.sbatch", "--config", "c.py", f"--workdir={tmp_path}/local", env=env)
  assert unseen.returncode == 1 and "not visible on" in unseen.stderr and "shared storage" in unseen.stderr


# ------------------------------------------------------------------------------------------------ tpu_vm.sh


def test_tpu_script_runs_main_on_every_worker_with_the_arguments_quoted(tmp_path):
  record = tmp_path / "calls"
  gcloud = write_stub(str(tmp_path), "gcloud", f'for a in "$@"; do echo "$a"; done > {record}\n')
  done = launch("tpu_vm.sh", "my-pod", "us-central2-b", "--config", "configs/resnet18_fast.py",
                "--workdir", "/mnt/shared/run one", "--config.train.batch_size=1024",
                env={"GCLOUD": gcloud, "PROJECT": "proj"})
  assert done.returncode == 0, done.stderr
  argv = record.read_text().splitlines()
  assert argv[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-central2-b", "--worker=all",
                      "--project=proj"]
  command = argv[8].removeprefix("--command=")
  assert command.startswith("cd lcnn_jax && PYTHONUNBUFFERED=1 python3 -m lcnn_jax.main ")
  words = subprocess.run(["bash", "-c", "set -- " + command.split("lcnn_jax.main ", 1)[1] +
                          '; for a in "$@"; do echo "$a"; done'], capture_output=True, text=True).stdout
  assert words.splitlines() == ["--config", "configs/resnet18_fast.py", "--workdir", "/mnt/shared/run one",
                                "--config.train.batch_size=1024"]


@pytest.mark.parametrize("args", [[], ["pod", "zone"], ["pod", "zone", "--config", "c.py"],
                                  ["--config", "c.py", "--workdir", "w"]])
def test_tpu_script_rejects_bad_arguments_with_usage(tmp_path, args):
  gcloud = write_stub(str(tmp_path), "gcloud", f"touch {tmp_path}/called\n")
  done = launch("tpu_vm.sh", *args, env={"GCLOUD": gcloud})
  assert done.returncode == 2 and "usage:" in done.stderr
  assert not (tmp_path / "called").exists()


# ------------------------------------------------------------------------------------------------ 2 processes


def test_two_process_quickstart_trains_resumes_and_equals_one_process(tmp_path):
  two = str(tmp_path / "two")
  common = ["--config", QUICKSTART, "--workdir", two]
  first = launch("local.sh", "2", *common, *flags(3))  # trains, checkpoints at 3, evaluates
  assert first.returncode == 0, first.stderr[-3000:]
  second = launch("local.sh", "2", *common, *flags(6))  # the same job made longer: resumes at 3
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from step 3" in (tmp_path / "two" / "logs" / "process_0.log").read_text()
  assert "eval top-1" in second.stdout and "speedup" in second.stdout

  spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  config = quickstart.get_config()
  for key, value in {**TINY, "train.num_steps": 6}.items():
    section, name = key.split(".")
    config[section][name] = value
  one = str(tmp_path / "one")
  one_metrics = train.train_and_evaluate(config, one)

  two_losses, one_losses = train_losses(two), train_losses(one)
  assert [s for s, _ in two_losses] == [s for s, _ in one_losses] == [1, 2, 3, 4, 5, 6]
  assert [l for _, l in two_losses] == pytest.approx([l for _, l in one_losses], rel=1e-5)
  two_eval = [r for r in logger.read_metrics(two) if r["split"] == "eval" and r["step"] == 6][-1]
  assert two_eval["count"] == 360
  assert two_eval["loss"] == pytest.approx(one_metrics["loss"], rel=1e-5)
  assert two_eval["top1"] == pytest.approx(one_metrics["top1"])
