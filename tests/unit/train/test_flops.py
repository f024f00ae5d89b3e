"""Scan-aware costs: XLA (CPU and TPU alike) counts a scanned loop's body once, so FLOPs and the TPU compiler's
time estimate are extrapolated over each tower's depth from shallow compiles."""
import dataclasses

import pytest

from vllama_jax.config import model_config
from vllama_jax.train.flops import scan_aware_costs, scan_aware_flops, towers


def _layer_count_costs(cfg) -> dict[str, float]:
    """A stand-in compile: FLOPs and seconds linear in each tower's depth, with a fixed part."""
    depth = {name: getattr(cfg, name).num_layers for name in towers(cfg)}
    return {
        "flops": 1000.0 + sum((i + 1) * 10.0 * n for i, n in enumerate(depth.values())),
        "optimal_seconds": 0.5 + sum(0.01 * n for n in depth.values()),
    }


def test_every_additive_cost_is_extrapolated_over_the_depth(tiny_config):
    unrolled = model_config(tiny_config)
    deep = dataclasses.replace(unrolled, llm=dataclasses.replace(unrolled.llm, num_layers=6, scan_layers=True))
    expected = _layer_count_costs(deep)  # what an unrolled compile of the 6-layer model would count
    assert scan_aware_costs(deep, _layer_count_costs) == pytest.approx(expected)
    assert scan_aware_flops(deep, lambda m: _layer_count_costs(m)["flops"]) == pytest.approx(expected["flops"])
    # nothing scanned: the count of the step already compiled is the answer, with no further compile
    assert scan_aware_costs(unrolled, None, unscanned={"flops": 7.0}) == {"flops": 7.0}
