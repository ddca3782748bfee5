"""Learnable equivalent transformation (LET): per-channel scales and shifts moved between a
producer and the linears that read it, so the quantized activations are flatter.

The activation x between a producer and its consumers is replaced by (x - shift) / scale; the
producer is rescaled to emit that, the consumers' input columns are multiplied by the scale and
their biases absorb W @ shift. `apply_let` is the only implementation: the training forward and
the final fold both call it, so what was trained is exactly what is saved.

Choices, made once here:
* Scales are learned in log space (always positive, so a scale also passes through ReLU exactly).
* Shifts only where the producer has a bias to absorb them: OPT's LayerNorm. RMSNorm has no bias
  and we do not add biases to q/k/v, so llama-like blocks get scales only (as OmniQuant does).
* q/k: queries times s, keys divided by s, s shared by channel i and i + head_dim/2 (RoPE rotates
  those together) and, under GQA, one s per KV-head channel used by every query head of its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.core.checkpoint import layer_key
from qtool.models.adapters import Adapter

MIN_SCALE = 1e-5


@dataclass(frozen=True)
class LetPair:
    name: str  # attn_in, mlp_in, v_o, mlp_mid, qk
    producer: str  # module path inside the block
    consumers: tuple[str, ...]
    producer_is_norm: bool
    shift: bool


@dataclass(frozen=True)
class LetPlan:
    pairs: tuple[LetPair, ...]
    kv_heads: int
    groups: int  # query heads per KV head
    head_dim: int


def let_plan(adapter: Adapter, config, block_params: dict, names: tuple[str, ...], shift: bool) -> LetPlan:
    """Which pairs are transformed; `names` picks among attn_in, mlp_in, v_o, mlp_mid, qk."""
    heads, kv, head_dim = adapter.attention_shape(config)
    pairs = []
    for pair in adapter.fold_pairs(config):
        if pair.name not in names:
            continue
        is_norm = pair.kind == "norm"
        has_bias = f"{pair.producer}.bias" in block_params and all(f"{c}.bias" in block_params for c in pair.consumers)
        pairs.append(LetPair(pair.name, pair.producer, pair.consumers, is_norm, shift and is_norm and has_bias))
    if "qk" in names:
        pairs.append(LetPair("qk", adapter.q, (adapter.k,), False, False))
    return LetPlan(tuple(pairs), kv, heads // kv, head_dim)


def _kv_to_heads(s: torch.Tensor, plan: LetPlan) -> torch.Tensor:
    """A per-KV-channel vector [kv*hd] repeated for every query head of its group [heads*hd]."""
    return s.view(plan.kv_heads, plan.head_dim).repeat_interleave(plan.groups, 0).reshape(-1)


def _qk_full(s_half: torch.Tensor, plan: LetPlan) -> torch.Tensor:
    """[kv*hd/2] -> [kv*hd], channel i and i + hd/2 of each head sharing one value."""
    half = s_half.view(plan.kv_heads, plan.head_dim // 2)
    return torch.cat([half, half], dim=1).reshape(-1)


def apply_let(params: dict[str, torch.Tensor], let: dict[str, torch.Tensor], plan: LetPlan) -> dict[str, torch.Tensor]:
    """The block's parameters after the transformation (a new dict; inputs are not modified)."""
    out = dict(params)
    for pair in plan.pairs:
        s = let[f"{pair.name}.log_scale"].exp().clamp(min=MIN_SCALE)
        if pair.name == "qk":
            s_k = _qk_full(s, plan)
            s_q = _kv_to_heads(s_k, plan)
            _scale_rows(out, pair.producer, s_q)
            _scale_rows(out, pair.consumers[0], 1 / s_k)
            continue
        shift = let[f"{pair.name}.shift"] if pair.shift else None
        pw, pb = f"{pair.producer}.weight", f"{pair.producer}.bias"
        if pair.producer_is_norm:
            out[pw] = out[pw] / s
        else:
            out[pw] = out[pw] / s[:, None]
        if pb in out:
            out[pb] = (out[pb] - shift) / s if shift is not None else out[pb] / s
        s_cols = _kv_to_heads(s, plan) if pair.name == "v_o" and plan.groups > 1 else s
        for consumer in pair.consumers:
            cw, cb = f"{consumer}.weight", f"{consumer}.bias"
            if shift is not None:
                out[cb] = out[cb] + out[cw] @ shift
            out[cw] = out[cw] * s_cols[None, :]
    return out


def _scale_rows(out: dict, linear: str, s: torch.Tensor) -> None:
    out[f"{linear}.weight"] = out[f"{linear}.weight"] * s[:, None]
    if f"{linear}.bias" in out:
        out[f"{linear}.bias"] = out[f"{linear}.bias"] * s


@torch.no_grad()
def init_let(plan: LetPlan, params: dict, stats: dict, index: int, alpha: float) -> dict[str, torch.Tensor]:
    """SmoothQuant-style start: scale = max|x|^alpha / max|w|^(1-alpha) per channel, where x is
    the (shifted) activation from calibration statistics; shift = the channel's mid-range;
    q/k scales start at 1."""
    let = {}
    for pair in plan.pairs:
        if pair.name == "qk":
            let["qk.log_scale"] = params[f"{pair.producer}.weight"].new_zeros(plan.kv_heads * plan.head_dim // 2)
            continue
        consumer = pair.consumers[0]
        weight = params[f"{consumer}.weight"]
        lo, hi = (stats[layer_key(index, consumer, "input", w)].to(weight) for w in ("min", "max"))
        shift = (hi + lo) / 2 if pair.shift else torch.zeros_like(hi)
        act = torch.maximum(hi - shift, shift - lo)
        wmax = torch.stack([params[f"{c}.weight"].abs().amax(0) for c in pair.consumers]).amax(0)
        if pair.name == "v_o" and plan.groups > 1:
            act, wmax = (t.view(plan.kv_heads, plan.groups, plan.head_dim).amax(1).reshape(-1) for t in (act, wmax))
        scale = (act.clamp(min=MIN_SCALE).pow(alpha) / wmax.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)
        let[f"{pair.name}.log_scale"] = scale.log()
        if pair.shift:
            let[f"{pair.name}.shift"] = shift
    return let
