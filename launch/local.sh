#!/usr/bin/env bash
# Starts N cooperating processes of `python -m lcnn_jax.main ARGS...` on this machine and waits for all.
#
#   launch/local.sh N --config configs/quickstart.py --workdir runs/quickstart2 [--config.KEY=VALUE ...]
#
# The processes meet at a free loopback port and, on the CPU, exchange gradients through gloo collectives
# (JAX_PLATFORMS defaults to cpu). Process i writes its output to LOG_DIR/process_<i>.log (LOG_DIR defaults to
# WORKDIR/logs); process 0's output is also shown here. When one process fails the others are stopped, the
# tail of the failed process's log is shown, and the launcher exits with that process's status.
#
# Environment: PYTHON (default python), JAX_PLATFORMS (default cpu), LCNN_PORT (default: a free port),
# LOG_DIR (default WORKDIR/logs).
set -euo pipefail

usage() {
  echo "usage: $0 NUM_PROCESSES --config CONFIG --workdir WORKDIR [MORE lcnn_jax.main FLAGS...]" >&2
  echo "  NUM_PROCESSES: a whole number >= 1, e.g. $0 2 --config configs/quickstart.py --workdir runs/q2" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
num_processes=$1
shift
if ! [[ $num_processes =~ ^[0-9]+$ ]] || (( num_processes < 1 )); then
  echo "error: NUM_PROCESSES must be a whole number >= 1, got '$num_processes'." >&2
  usage
fi
for arg in "$@"; do
  case $arg in
    --coordinator_address*|--num_processes*|--process_id*)
      echo "error: $0 sets $arg itself; leave out --coordinator_address, --num_processes and --process_id." >&2
      exit 2 ;;
  esac
done

workdir=""
previous=""
for arg in "$@"; do
  case $arg in
    --workdir=*) workdir=${arg#--workdir=} ;;
    *) [[ $previous == --workdir ]] && workdir=$arg ;;
  esac
  previous=$arg
done
if [[ -z $workdir ]]; then
  echo "error: no --workdir given; every process needs the same --workdir." >&2
  usage
fi

python=${PYTHON:-python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
port=${LCNN_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$workdir/logs}
mkdir -p "$log_dir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

echo "Starting $num_processes processes (coordinator 127.0.0.1:$port, JAX_PLATFORMS=$JAX_PLATFORMS); logs in $log_dir" >&2
for ((i = 0; i < num_processes; i++)); do
  log=$log_dir/process_$i.log
  command=("$python" -m lcnn_jax.main "$@" --coordinator_address="127.0.0.1:$port"
           --num_processes="$num_processes" --process_id="$i")
  if (( i == 0 )); then
    "${command[@]}" > >(tee "$log") 2>&1 &
  else
    "${command[@]}" >"$log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for every process; on the first failure stop the rest, which would otherwise wait forever for it.
running=("${pids[@]}")
while (( ${#running[@]} > 0 )); do
  status=0
  wait -n -p finished "${running[@]}" || status=$?
  for ((i = 0; i < num_processes; i++)); do
    [[ ${pids[i]} == "$finished" ]] && failed=$i
  done
  still=()
  for pid in "${running[@]}"; do
    [[ $pid == "$finished" ]] || still+=("$pid")
  done
  running=("${still[@]+"${still[@]}"}")
  if (( status != 0 )); then
    stop_all
    wait 2>/dev/null || true
    echo "error: process $failed of $num_processes exited with status $status; the end of $log_dir/process_$failed.log:" >&2
    tail -n 20 "$log_dir/process_$failed.log" >&2
    exit "$status"
  fi
done
echo "All $num_processes processes finished; logs in $log_dir" >&2
