#!/usr/bin/env bash
# A multi-host TPU slice: the same command on every worker at once; JAX finds the other hosts itself.
# Usage: TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh CONFIG WORKDIR [overrides…]
#   WORKDIR must be shared by all workers (e.g. a gs:// bucket path or a mounted filesystem); the repository
#   must be installed on every worker (`pip install -e .` in ~/vllama-jax).
set -euo pipefail
config="${1:?config}"; workdir="${2:?shared work directory}"; shift 2
gcloud compute tpus tpu-vm ssh "${TPU_NAME:?}" --zone "${ZONE:?}" --worker=all --command \
  "cd ~/vllama-jax && vllama-train --config '$config' --workdir '$workdir' $*"
