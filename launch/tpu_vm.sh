#!/usr/bin/env bash
# Runs `python -m lcnn_jax.main ARGS...` on every worker of a Cloud TPU VM (a pod slice or a single host).
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config configs/resnet18_fast.py --workdir /mnt/shared/runs/resnet18
#
# Each worker runs one process over its local TPU chips; lcnn_jax.main sees TPU_WORKER_HOSTNAMES and calls
# jax.distributed.initialize(), which finds the coordinator and this worker's index itself. The repository must
# already be at REMOTE_DIR on every worker (or set SYNC=1 to copy this checkout there first, with pip install),
# and the --workdir must be storage every worker sees (a Filestore/NFS mount or a GCS FUSE mount).
#
# Environment: PROJECT (gcloud --project, optional), REMOTE_DIR (default lcnn_jax, relative to the home
# directory), PYTHON (default python3), SYNC (1: copy and install the checkout first), GCLOUD (default gcloud).
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE --config CONFIG --workdir SHARED_DIR [MORE lcnn_jax.main FLAGS...]" >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
tpu_name=$1
zone=$2
shift 2
[[ $tpu_name != -* && $zone != -* ]] || usage
case " $* " in
  *" --workdir "*|*" --workdir="*) ;;
  *) echo "error: no --workdir given; every worker needs the same shared --workdir." >&2; usage ;;
esac

gcloud=${GCLOUD:-gcloud}
remote_dir=${REMOTE_DIR:-lcnn_jax}
target=(compute tpus tpu-vm)
where=("$tpu_name" --zone="$zone" --worker=all)
[[ -n ${PROJECT:-} ]] && where+=(--project="$PROJECT")

if [[ ${SYNC:-0} == 1 ]]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  "$gcloud" "${target[@]}" ssh "${where[@]}" --command="mkdir -p $(printf '%q' "$remote_dir")"
  "$gcloud" "${target[@]}" scp --recurse "$repo/lcnn_jax" "$repo/configs" "$repo/launch" "$repo/setup.cfg" \
    "$repo/pyproject.toml" "$tpu_name:$remote_dir" --zone="$zone" --worker=all ${PROJECT:+--project="$PROJECT"}
  "$gcloud" "${target[@]}" ssh "${where[@]}" \
    --command="cd $(printf '%q' "$remote_dir") && ${PYTHON:-python3} -m pip install -q -e '.' 'jax[tpu]'"
fi

command="cd $(printf '%q' "$remote_dir") && PYTHONUNBUFFERED=1 ${PYTHON:-python3} -m lcnn_jax.main"
for arg in "$@"; do
  command+=" $(printf '%q' "$arg")"
done
exec "$gcloud" "${target[@]}" ssh "${where[@]}" --command="$command"
