"""Whole models with packed linears: building them from a quantized model, saving, loading.

A packed checkpoint is a Hugging Face directory whose `model.safetensors` holds the float tensors
that stay float (embeddings, norms, head) beside each block linear's packed buffers (PackedLinear),
the norms' output gathers of an RPTQ reordering (`<norm>.gather`), and whose config.json carries a
`quantization_config` with `quant_method: qtool` describing the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qtool.core.checkpoint import layer_key, load_tensors
from qtool.core.errors import QtoolError
from qtool.core.quantizer import quantize_weight
from qtool.core.spec import QuantSpec, parse_spec
from qtool.kernels.chooser import choose_layout
from qtool.models.adapters import Adapter, adapter_for
from qtool.runtime.gathers import NormGather
from qtool.runtime.packed_linear import PackedLinear

QUANT_METHOD = "qtool"
PACK_FORMAT = 1
WEIGHTS = "model.safetensors"


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantized_linears(model: nn.Module, adapter: Adapter, spec: QuantSpec, qparams=None):
    """(block index, name, linear, codes, scale, zero) of every block linear, quantized exactly as
    the stage's evaluation quantizes it: the learned scales and zeros in `qparams` where given
    (codes recomputed from the weights with them), round-to-nearest ranges otherwise."""
    for index, block in enumerate(adapter.layers(model)):
        for name, linear in adapter.linears(block).items():
            scale = zero = None
            if qparams is not None:
                scale, zero = qparams[layer_key(index, name, "scale")], qparams[layer_key(index, name, "zero")]
            yield (index, name, linear, *quantize_weight(linear.weight.detach().float(), spec, scale, zero))


@torch.no_grad()
def pack_model(
    model: nn.Module, adapter: Adapter, spec: QuantSpec, qparams=None, clusters=None, layout: str = "auto"
) -> str:
    """Replace every block linear of `model` by a PackedLinear for `spec`, in place; returns the layout
    (`choose_layout`). `clusters` (stat prefix -> bounds, from a reorder stage) gives -cluster specs their ranges."""
    layout = choose_layout(spec, layout)
    cluster = spec.a_granularity == "cluster"
    if cluster and clusters is None:
        raise QtoolError(f"{spec.name} needs channel clusters: pack a `qtool reorder` stage")
    _, _, head_dim = adapter.attention_shape(model.config)
    layers = adapter.layers(model)
    for index, name, linear, codes, scale, zero in quantized_linears(model, adapter, spec, qparams):
        kv = spec.quantizes_kv and name in (adapter.k, adapter.v)
        act_bounds = clusters[layer_key(index, name, "input")] if cluster and spec.quantizes_activations else None
        kv_bounds = clusters[layer_key(index, name, "output")] if cluster and kv else None
        bias = None if linear.bias is None else linear.bias.detach().clone()
        packed = PackedLinear.from_codes(codes, scale, zero, spec, layout, bias, act_bounds, kv, kv_bounds, head_dim)
        _set(layers[index], name, packed)
    return layout


def quantization_config(spec: QuantSpec, layout: str) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format": PACK_FORMAT,
        "spec": spec.name,
        "layout": layout,
        "bits": spec.w_storage_bits,
        "group_size": spec.group,
        "activation_bits": spec.a_bits,
        "kv_bits": spec.kv_bits,
    }


def _gather_hooks(model: nn.Module) -> dict[str, NormGather]:
    return {
        name: hook
        for name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, NormGather)
    }


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a packed checkpoint stores: the state dict (a tied head once) and the norm gathers."""
    tensors = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    tensors.update({f"{name}.gather": hook.perm for name, hook in _gather_hooks(model).items()})
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_packed(model: nn.Module, directory: Path, spec: QuantSpec, layout: str) -> int:
    """Write the weights file and config.json of a packed model into `directory`; returns weight bytes."""
    tensors = packed_tensors(model)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})  # one key: files are byte-stable
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(spec, layout)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_quantization_config(path: Path) -> dict | None:
    """The qtool quantization_config of a directory's config.json, None for other models."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") or {}
    return q if q.get("quant_method") == QUANT_METHOD else None


def _linear_from_tensors(
    tensors: dict, prefix: str, qcfg: dict, spec: QuantSpec, kv: bool, head_dim: int, shape: tuple[int, int], path: Path
) -> PackedLinear:
    names = ("qweight", "qweight_hi", "scales", "zeros", "terms", "act_bounds", "kv_bounds", "bias")
    buffers = {n: tensors.pop(f"{prefix}.{n}") for n in names if f"{prefix}.{n}" in tensors}
    needed = ("qweight", "scales", "zeros") + (("terms",) if qcfg["layout"] != "wonly" else ())
    missing = [n for n in needed if n not in buffers]
    if missing:
        raise QtoolError(
            f"{path / WEIGHTS} lacks {prefix}.{missing[0]}: the packed checkpoint is incomplete; pack it again"
        )
    n, k = shape
    if buffers["scales"].shape[0] != n:
        raise QtoolError(
            f"{path / WEIGHTS}: {prefix}.scales has {buffers['scales'].shape[0]} rows, "
            f"the config says {n}; pack it again"
        )
    return PackedLinear(
        qcfg["layout"], qcfg["bits"], k, n, spec.group, buffers, spec.a_bits, spec.kv_bits if kv else 16, head_dim
    )


def load_packed(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A transformers CausalLM whose block linears are PackedLinear modules, from a packed checkpoint.
    Float tensors keep their stored dtype unless `dtype` is given."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qcfg = read_quantization_config(path)
    if qcfg is None:
        raise QtoolError(
            f"{path} is not a qtool packed checkpoint (no quantization_config with quant_method 'qtool'); "
            "run `qtool pack` on a stage"
        )
    if qcfg.get("format") != PACK_FORMAT:
        raise QtoolError(
            f"{path} was packed in format {qcfg.get('format')}, this qtool reads {PACK_FORMAT}: pack the stage again"
        )
    spec = parse_spec(qcfg["spec"])
    tensors = load_tensors(path / WEIGHTS)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours: transformers has no quantizer named qtool
    adapter = adapter_for(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    _, _, head_dim = adapter.attention_shape(config)
    packed = set()
    for index, block in enumerate(adapter.layers(model)):
        for name, linear in adapter.linears(block).items():
            prefix = f"{adapter.layers_path}.{index}.{name}"
            packed.add(prefix)
            kv = spec.quantizes_kv and name in (adapter.k, adapter.v)
            shape = (linear.out_features, linear.in_features)
            _set(block, name, _linear_from_tensors(tensors, prefix, qcfg, spec, kv, head_dim, shape, path))
    gathers = {k[: -len(".gather")]: tensors.pop(k) for k in list(tensors) if k.endswith(".gather")}
    floats = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(floats, strict=False, assign=True)
    missing = [
        k
        for k in result.missing_keys
        if k.rpartition(".")[0] not in packed and not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or result.unexpected_keys:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected tensor {result.unexpected_keys[0]}"
        raise QtoolError(f"{path / WEIGHTS} {what}: it does not match its config.json; pack it again")
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, perm in gathers.items():
        model.get_submodule(name).register_forward_pre_hook(NormGather(perm))
    model.eval()
    model.to(device)
    return to_kernel_form(model) if torch.device(device).type == "cuda" else model


def to_kernel_form(model: nn.Module) -> nn.Module:
    """Every packed linear keeps only what its kernel reads (call after moving to the GPU; without
    CuPy the GPU runs the reference, which needs the fp32 scales, so nothing is dropped)."""
    from qtool.kernels.cuda_runtime import cupy_available

    if not cupy_available():
        return model
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.to_kernel_form()
    return model


def packed_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by packed linears and by everything else (float parameters and buffers)."""
    linear = sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear))
    seen, other = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            other += t.numel() * t.element_size()
    return {"linear_bytes": linear, "other_bytes": other - linear}
