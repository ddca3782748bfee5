"""Per-family knowledge: where the blocks are, which linears they hold, and which pairs can fold.

An adapter is chosen by `config.model_type` through an explicit registry (never by substring),
so every method (calibrate, reorder, LET, packing) works on every family the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtool.core.errors import QtoolError


@dataclass(frozen=True)
class FoldPair:
    """A producer whose output channels are exactly the input channels of its consumers.

    A per-channel scale/shift or a permutation applied to the producer's output can be undone on
    the consumers' input columns. `kind` says what the producer is: a normalisation ("norm") or a
    linear ("linear"). `grouped` marks v -> o under grouped-query attention, where one v channel
    feeds several o columns (one per query head of its group).
    """

    name: str
    producer: str
    consumers: tuple[str, ...]
    kind: str
    grouped: bool = False
    through_act: str | None = None  # an elementwise activation sits between producer and consumers


@dataclass(frozen=True)
class Adapter:
    family: str
    layers_path: str  # attribute path from the CausalLM to the ModuleList of blocks
    attn: str  # attention module path inside a block
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # linears reading the second norm's output
    mlp_out: str
    attn_norm: str
    mlp_norm: str
    mlp_act: str  # "swiglu" or "relu"-style single path

    # -- navigation -------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, leaf = self.layers_path.rpartition(".")
        setattr(_get(model, parent), leaf, layers)

    def linear_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: _get(block, name) for name in self.linear_names()}

    def attention_shape(self, config) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, kv, head_dim

    def fold_pairs(self, config) -> list[FoldPair]:
        heads, kv, _ = self.attention_shape(config)
        pairs = [
            FoldPair("attn_in", self.attn_norm, (self.q, self.k, self.v), "norm"),
            FoldPair("v_o", self.v, (self.o,), "linear", grouped=heads != kv),
            FoldPair("mlp_in", self.mlp_norm, self.mlp_in, "norm"),
        ]
        if self.mlp_act == "swiglu":
            # down reads act(gate) * up: a per-channel scale on up's output passes through exactly.
            pairs.append(FoldPair("mlp_mid", self.mlp_in[1], (self.mlp_out,), "linear", through_act="gate"))
        else:
            # relu(s * x) = s * relu(x) only for s > 0: a positive scale folds, a shift does not.
            pairs.append(FoldPair("mlp_mid", self.mlp_in[0], (self.mlp_out,), "linear", through_act="relu"))
        return pairs

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (and projection) and the LM head: block-stack output -> logits."""
        if self.family == "opt":
            dec = model.model.decoder
            if dec.final_layer_norm is not None:
                hidden = dec.final_layer_norm(hidden)
            if dec.project_out is not None:
                hidden = dec.project_out(hidden)
        else:
            hidden = model.model.norm(hidden)
        return model.lm_head(hidden)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


_LLAMA_LIKE = dict(
    layers_path="model.layers",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    mlp_act="swiglu",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(family="llama", **_LLAMA_LIKE),
    "mistral": Adapter(family="mistral", **_LLAMA_LIKE),
    "qwen2": Adapter(family="qwen2", **_LLAMA_LIKE),
    "opt": Adapter(
        family="opt",
        layers_path="model.decoder.layers",
        attn="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        mlp_act="relu",
    ),
}


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise QtoolError(f"architecture '{model_type}' is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise QtoolError("OPT models with post-LayerNorm (opt-350m) are not supported; use another OPT size")
    return ADAPTERS[model_type]
