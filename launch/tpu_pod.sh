#!/usr/bin/env bash
# A multi-host TPU slice: the same command on every worker at once; with --distributed each worker's
# jax.distributed.initialize() finds the others from the TPU VM's metadata (vllama_jax/train/distributed.py).
# Usage: TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh CONFIG WORKDIR [overrides…]
#   WORKDIR must be shared by all workers (e.g. a gs:// bucket path or a mounted filesystem); the repository
#   must be installed on every worker (`pip install -e .` in ~/vllama-jax).
set -euo pipefail
config="${1:?config}"; workdir="${2:?shared work directory}"; shift 2
# every argument quoted for the workers' shell, so overrides with spaces or quotes arrive as they were given
train=$(printf '%q ' vllama-train --distributed --config "$config" --workdir "$workdir" "$@")
gcloud compute tpus tpu-vm ssh "${TPU_NAME:?}" --zone "${ZONE:?}" --worker=all --command "cd ~/vllama-jax && ${train}"
