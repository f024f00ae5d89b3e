"""FLOPs of a compiled train step, scanned layers counted as many times as they run.

XLA's cost analysis counts the body of a while loop once, whatever its trip count, so a step whose towers are
scanned (`scan_layers`, every full-size config) reports the FLOPs of one layer per tower. FLOPs are linear in
each tower's depth, so the true count follows from shallow unscanned copies of the model: one with every tower
at its smallest repeat unit, and one per tower with that tower one unit deeper (their difference is what one
more unit costs). A unit is a layer, or a Q-Former group of `cross_attention_freq` layers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from vllama_jax.models.video_llama import VideoLlamaConfig


def compiled_flops(compiled) -> float:
    """FLOPs per device of one compiled program, as XLA's cost analysis reports them."""
    return compiled_costs(compiled)["flops"]


def compiled_costs(compiled) -> dict[str, float]:
    """The additive figures of XLA's cost analysis of one compiled program, per device: `flops`, and where the
    compiler models the step's time (XLA:TPU does, XLA:CPU does not) `optimal_seconds`, its own estimate."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {"flops": float(cost.get("flops", 0.0))}
    if "optimal_seconds" in cost:
        out["optimal_seconds"] = float(cost["optimal_seconds"])
    return out


def lowered_flops(lowered) -> float:
    """FLOPs per device of a lowered, not yet compiled, program (the HLO before XLA's optimisations): a cheap
    estimate where compiling costs too much."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def towers(model_cfg: VideoLlamaConfig) -> dict[str, tuple[int, int]]:
    """{field: (repeat unit in layers, number of units)} of the layer stacks this config builds."""
    skip = set() if model_cfg.equip_audio_branch else {"imagebind_audio", "imagebind_vision", "audio_qformer"}
    out = {}
    for field in dataclasses.fields(model_cfg):
        sub = getattr(model_cfg, field.name)
        if field.name in skip or not dataclasses.is_dataclass(sub) or not hasattr(sub, "num_layers"):
            continue
        unit = getattr(sub, "cross_attention_freq", 1)
        out[field.name] = (unit, sub.num_layers // unit)
    return out


def _shallow(model_cfg: VideoLlamaConfig, units: dict[str, int]) -> VideoLlamaConfig:
    changes = {}
    for name, (unit, _) in towers(model_cfg).items():
        changes[name] = dataclasses.replace(getattr(model_cfg, name), num_layers=unit * units[name], scan_layers=False)
    return dataclasses.replace(model_cfg, **changes)


def scan_aware_flops(model_cfg: VideoLlamaConfig, flops_of: Callable[[VideoLlamaConfig], float],
                     unscanned: float | None = None) -> float:
    """Per-device FLOPs of the step `flops_of` compiles for `model_cfg`, with every layer counted.

    `flops_of(cfg)` compiles the same step for another model config and returns its cost-analysis FLOPs. With
    no scanned tower the answer is `unscanned` (the count of the step already compiled), or one call;
    otherwise 1 + (number of towers) calls on shallow, unscanned models.
    """
    costs = scan_aware_costs(
        model_cfg, lambda m: {"flops": flops_of(m)}, None if unscanned is None else {"flops": unscanned}
    )
    return costs["flops"]


def scan_aware_costs(model_cfg: VideoLlamaConfig, costs_of: Callable[[VideoLlamaConfig], dict[str, float]],
                     unscanned: dict[str, float] | None = None) -> dict[str, float]:
    """`scan_aware_flops` for every additive figure `costs_of(cfg)` returns (FLOPs, the compiler's time estimate),
    each extrapolated over the depth of every tower from the same shallow compiles."""
    stacks = towers(model_cfg)
    if not any(getattr(model_cfg, name).scan_layers for name in stacks):
        return costs_of(model_cfg) if unscanned is None else unscanned
    base_units = {name: 1 for name in stacks}
    base = costs_of(_shallow(model_cfg, base_units))
    total = dict(base)
    for name, (_, count) in stacks.items():
        if count > 1:
            deeper = costs_of(_shallow(model_cfg, {**base_units, name: 2}))
            for key in total:
                total[key] += (count - 1) * (deeper[key] - base[key])
    return total
