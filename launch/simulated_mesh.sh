#!/usr/bin/env bash
# Run the main job on 8 simulated CPU devices with a (data=2, fsdp=2, tensor=2) mesh: the same program a pod
# runs, sharded by the rules table in vllama_jax/sharding.py. Extra arguments are passed through.
set -euo pipefail
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec vllama-demo --config "${CONFIG:-configs/video_llama.py:llm=tiny}" \
  --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2 --config.batch_size=4 "$@"
