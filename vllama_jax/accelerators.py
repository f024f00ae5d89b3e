"""One table of the accelerators the project plans for and reports on: memory per chip and dense bf16 peak.

Read by the planner (`vllama-plan`: which chips a step's per-device peak fits) and by the trainer (model-FLOPs
utilisation). A device is matched by the `device_kind` JAX reports for it (e.g. "TPU v5 lite" for a v5e chip,
"NVIDIA H100 80GB HBM3"). TPU memory as Google documents it (JAX reports it in GiB); GPU memory and peaks from
NVIDIA's datasheets (decimal GB; dense, no sparsity).
"""
from __future__ import annotations

import dataclasses

GIB, GB = 2**30, 10**9


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # what `vllama-plan --max_batch` and `--accelerators` take
    device_kinds: tuple[str, ...]  # prefixes of jax.Device.device_kind that mean this chip
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip or GPU
    source: str


ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("v4", ("TPU v4",), 32 * GIB, 275e12, "TPU v4, 32 GiB HBM2: cloud.google.com/tpu/docs/v4"),
        Accelerator(
            "v5e", ("TPU v5 lite", "TPU v5e"), 16 * GIB, 197e12, "TPU v5e, 16 GB HBM2: cloud.google.com/tpu/docs/v5e"
        ),
        Accelerator(
            "v5p", ("TPU v5p", "TPU v5"), 95 * GIB, 459e12, "TPU v5p, 95 GB HBM2e: cloud.google.com/tpu/docs/v5p"
        ),
        Accelerator(
            "v6e",
            ("TPU v6 lite", "TPU v6e"),
            32 * GIB,
            918e12,
            "TPU v6e (Trillium), 32 GB HBM: cloud.google.com/tpu/docs/v6e",
        ),
        Accelerator(
            "a100-40gb",
            ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
            40 * GB,
            312e12,
            "NVIDIA A100 40GB HBM2: nvidia.com/en-us/data-center/a100",
        ),
        Accelerator(
            "a100-80gb", ("NVIDIA A100",), 80 * GB, 312e12, "NVIDIA A100 80GB HBM2e: nvidia.com/en-us/data-center/a100"
        ),
        Accelerator(
            "h100", ("NVIDIA H100",), 80 * GB, 989e12, "NVIDIA H100 SXM 80GB HBM3: nvidia.com/en-us/data-center/h100"
        ),
        Accelerator(
            "h100-pcie",
            ("NVIDIA H100 PCIe",),
            80 * GB,
            756e12,
            "NVIDIA H100 PCIe 80GB HBM2e (1,513 TFLOPS bf16 with sparsity): nvidia.com/en-us/data-center/h100",
        ),
        Accelerator(
            "h100-nvl",
            ("NVIDIA H100 NVL",),
            94 * GB,
            835e12,
            "NVIDIA H100 NVL 94GB HBM3 (1,671 TFLOPS bf16 with sparsity): nvidia.com/en-us/data-center/h100",
        ),
        Accelerator(
            "h200", ("NVIDIA H200",), 141 * GB, 989e12, "NVIDIA H200 141GB HBM3e: nvidia.com/en-us/data-center/h200"
        ),
        Accelerator(
            "h200-nvl",
            ("NVIDIA H200 NVL",),
            141 * GB,
            835e12,
            "NVIDIA H200 NVL 141GB HBM3e (1,671 TFLOPS bf16 with sparsity): nvidia.com/en-us/data-center/h200",
        ),
    )
}


def by_device_kind(device_kind: str) -> Accelerator | None:
    """The table's row for a JAX device kind (the longest matching prefix wins: "TPU v5 lite" is a v5e, not a
    v5p), or None for a CPU or an unknown chip."""
    matches = [(len(kind), a) for a in ACCELERATORS.values() for kind in a.device_kinds if device_kind.startswith(kind)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def get(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}: known {sorted(ACCELERATORS)}")
    return ACCELERATORS[name]
