"""LoRA (Hu et al. 2021) on the LLM's linear layers, as a parameter transform: the adapters live in their own
top-level subtree `lora`, mirroring the paths of the kernels they adapt, and `merge` folds them in,
W' = W + (alpha / rank) · A B, before the model runs. So no model file changes, a train step differentiates only the
adapters (the LLM's weights stay frozen, outside the optimizer), and export writes merged weights.

A (…, in dims, rank) starts as PyTorch's `kaiming_uniform_(a=√5)` (peft's), B (…, rank, out dims) at zero, so an
untrained adapter leaves the model unchanged. Scanned layers keep their leading `layers` axis on A and B.
The cost of merging: each adapted kernel is materialised once per step beside the frozen one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The LLaMA projections peft's LLaVA recipe adapts (every nn.Linear of the LLM but lm_head), with the number of
# input dimensions of our kernel (o_proj reads (heads, head_dim)).
INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0 = no LoRA
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(INPUT_DIMS)
    subtree: str = ""  # the top-level parameter subtree holding the LLM ("": the family's, `config.lora_config`)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown lora config keys {sorted(unknown)}")
        out = cls(**{k: tuple(v) if k == "targets" else v for k, v in d.items()})
        bad = set(out.targets) - set(INPUT_DIMS)
        if bad:
            raise ValueError(f"lora.targets {sorted(bad)}: LoRA adapts {sorted(INPUT_DIMS)}")
        return out


def _targets(params: dict, cfg: LoraConfig) -> dict[tuple[str, ...], Any]:
    """{path of an adapted kernel under cfg.subtree: the (boxed or not) kernel}."""
    out = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict) or hasattr(value, "items"):
                walk(value, (*path, key))
            elif key == "kernel" and path and path[-1] in cfg.targets:
                out[path] = value
    walk(params[cfg.subtree], (cfg.subtree,))
    return out


def init(params: dict, cfg: LoraConfig, rng) -> dict:
    """Boxed adapters for the kernels of `params` (boxed, as `init_params` gives them; abstract is fine) that
    `cfg.targets` names: {"lora": {path…: {"a", "b"}}}, each carrying the kernel's logical axes."""
    adapters: dict = {}
    for i, (path, kernel) in enumerate(sorted(_targets(params, cfg).items())):
        boxed = isinstance(kernel, nn.LogicallyPartitioned)
        value = kernel.value if boxed else kernel
        shape, dtype = value.shape, value.dtype
        names = kernel.names if boxed else (None,) * len(shape)
        lead = 1 if names and names[0] == "layers" else 0
        num_in = INPUT_DIMS[path[-1]]
        in_dims, out_dims = shape[lead:lead + num_in], shape[lead + num_in:]
        fan_in = math.prod(in_dims)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5): gain √(2/6), bound gain·√(3/fan_in) = 1/√fan_in
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*shape[:lead], *in_dims, cfg.rank), dtype, -bound, bound)
        b = jnp.zeros((*shape[:lead], cfg.rank, *out_dims), dtype)
        node = adapters
        for key in path:
            node = node.setdefault(key, {})
        node["a"] = nn.LogicallyPartitioned(a, (*names[:lead + num_in], None))
        node["b"] = nn.LogicallyPartitioned(b, (*names[:lead], None, *names[lead + num_in:]))
    return {"lora": adapters}


def merge(params: dict, cfg: LoraConfig) -> dict:
    """`params` without its `lora` subtree, every adapted kernel replaced by W + scale · A B (in W's dtype)."""
    if "lora" not in params:
        return params
    if cfg.subtree not in params:
        raise ValueError(f"LoRA adapters need the weights they adapt: no {cfg.subtree!r} among {sorted(params)}")
    merged = {k: v for k, v in params.items() if k != "lora"}
    out = jax.tree_util.tree_map(lambda x: x, merged[cfg.subtree])  # a copy of the containers
    merged[cfg.subtree] = out
    for path in _adapter_paths(params["lora"]):
        adapter = params["lora"]
        for key in path:
            adapter = adapter[key]
        node = out
        for key in path[1:]:
            node = node[key]
        kernel = node["kernel"]
        a, b = adapter["a"], adapter["b"]
        lead = a.ndim - INPUT_DIMS[path[-1]] - 1
        batch = "".join(chr(ord("l") + i) for i in range(lead))
        ins = "".join(chr(ord("a") + i) for i in range(a.ndim - lead - 1))
        outs = "".join(chr(ord("s") + i) for i in range(b.ndim - lead - 1))
        delta = jnp.einsum(f"{batch}{ins}r,{batch}r{outs}->{batch}{ins}{outs}", a, b)
        node["kernel"] = (kernel + cfg.scale * delta).astype(kernel.dtype)
    return merged


def _adapter_paths(tree: dict, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if "a" in tree and "b" in tree and not isinstance(tree["a"], dict):
        return [path]
    return [p for key, value in tree.items() for p in _adapter_paths(value, (*path, key))]
