"""Bytes of weights and of the KV cache for a model configuration under a QuantSpec.

Computed from the config alone, so 70B-class configurations need no weights. Quantized weights
count their codes, one fp16 scale per group and, when asymmetric, one zero point per group at the
storage width; everything that is not a block linear (embeddings, head, norms, biases) is 16-bit.
A quantized KV cache stores codes plus an fp16 scale and zero per token and head, except with
static per-cluster ranges (RPTQ's `-cluster`), whose few scales per layer are not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from qtool.core.errors import QtoolError
from qtool.core.spec import FLOAT, QuantSpec, parse_spec
from qtool.models.adapters import Adapter, adapter_for


@dataclass(frozen=True)
class MemoryReport:
    linear_params: int
    other_params: int
    weight_bytes: int
    weight_bits_per_param: float  # over the block linears, scales and zeros included
    kv_bytes: int
    batch: int
    seqlen: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def linear_shapes(config, adapter: Adapter) -> list[tuple[int, int]]:
    """(out_features, in_features) of the linears of one block."""
    heads, kv, head_dim = adapter.attention_shape(config)
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or config.ffn_dim
    attn = [(heads * head_dim, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, heads * head_dim)]
    mlp = [(inter, hidden)] * len(adapter.mlp_in) + [(hidden, inter)]
    return attn + mlp


def _other_params(config, adapter: Adapter) -> int:
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    embed = vocab * getattr(config, "word_embed_proj_dim", hidden)
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    if adapter.family == "opt":
        norms = layers * 4 * hidden + 2 * hidden  # LayerNorm weight and bias
        positions = (config.max_position_embeddings + 2) * hidden
        biases = layers * sum(out for out, _ in linear_shapes(config, adapter))
        return embed + head + norms + positions + biases
    norms = layers * 2 * hidden + hidden
    biases = (
        layers * sum(out for out, _ in linear_shapes(config, adapter)[:3])
        if getattr(config, "attention_bias", adapter.family == "qwen2")
        else 0
    )
    return embed + head + norms + biases


def memory_report(config, adapter: Adapter, spec: QuantSpec, batch: int = 1, seqlen: int = 2048) -> MemoryReport:
    shapes = linear_shapes(config, adapter)
    layers = config.num_hidden_layers
    linear_params = layers * sum(n * k for n, k in shapes)
    if spec.quantizes_weights:
        groups = layers * sum(n * math.ceil(k / (spec.group or k)) for n, k in shapes)
        zero_bits = 0 if spec.w_sym else spec.w_storage_bits
        linear_bits = linear_params * spec.w_storage_bits + groups * (16 + zero_bits)
    else:
        linear_bits = linear_params * FLOAT
    other = _other_params(config, adapter)
    _, kv_heads, head_dim = adapter.attention_shape(config)
    kv_values = 2 * layers * batch * seqlen * kv_heads * head_dim
    kv_bits = kv_values * spec.kv_bits
    if spec.quantizes_kv and not (spec.a_granularity == "cluster" and spec.a_static):
        kv_bits += (kv_values // head_dim) * 2 * 16
    return MemoryReport(
        linear_params=linear_params,
        other_params=other,
        weight_bytes=math.ceil((linear_bits + other * FLOAT) / 8),
        weight_bits_per_param=linear_bits / linear_params,
        kv_bytes=math.ceil(kv_bits / 8),
        batch=batch,
        seqlen=seqlen,
    )


def load_config(ref: str):
    """A transformers config from a config.json file, or from a model id or directory. Both are
    checked first (`models.loading.read_config`): invalid JSON, a missing or unsupported model_type
    and custom code (auto_map) are one-line errors."""
    from transformers import AutoConfig

    from qtool.models.loading import read_config, resolve_model

    path = Path(ref)
    if path.suffix == ".json" and path.is_file():
        fields = read_config(path)
        try:
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (ValueError, TypeError, KeyError) as exc:
            raise QtoolError(
                f"{path} is not a model config ({type(exc).__name__}: {exc}); give a config.json with model_type"
            ) from None
    return AutoConfig.from_pretrained(resolve_model(ref))


def config_memory(ref: str, specs: list[str], batch: int, seqlen: int) -> list[dict]:
    """One memory report per spec for the configuration `ref`."""
    config = load_config(ref)
    adapter = adapter_for(config)
    return [
        {"spec": parse_spec(s).name, **memory_report(config, adapter, parse_spec(s), batch, seqlen).as_dict()}
        for s in specs
    ]
