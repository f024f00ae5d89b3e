#!/usr/bin/env bash
# Train on every accelerator (or the CPU) of this host. Usage: launch/one_host.sh CONFIG WORKDIR [overrides…]
set -euo pipefail
config="${1:?config, e.g. configs/tiny_shapes.py}"; workdir="${2:?work directory}"; shift 2
exec vllama-train --config "$config" --workdir "$workdir" "$@"
