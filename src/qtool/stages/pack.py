"""`qtool pack`: from a quantized stage (or any model with --spec, RTN) to a packed checkpoint.

The weights are quantized exactly as `qtool eval` quantizes them for the same stage (learned
scales and zeros where the stage has them, RTN ranges otherwise; RPTQ clusters from a reorder
stage), then written in the layout of the kernel that runs them. `--format gptq` and
`--format compressed-tensors` write weight-only exports for other runtimes instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from qtool.core.checkpoint import StageParams, StageWriter
from qtool.core.devices import cast_parameters, pick_dtype
from qtool.core.errors import QtoolError
from qtool.core.progress import console
from qtool.core.spec import parse_spec, same_weight_format
from qtool.models.adapters import adapter_for
from qtool.quant.qparams import stage_qparams
from qtool.quant.rptq import cluster_bounds
from qtool.runtime.loader import load, open_source
from qtool.runtime.packed_linear import PackedLinear
from qtool.runtime.packed_model import (
    WEIGHTS,
    pack_model,
    read_quantization_config,
    save_packed,
)
from qtool.stages.base import fingerprint_or_skip

FORMATS = ("qtool", "gptq", "compressed-tensors")


@dataclass(frozen=True)
class PackParams(StageParams):
    spec: str | None = None  # None: the stage's own spec
    format: str = "qtool"
    dtype: str = "float32"  # of the tensors that stay float (embeddings, norms, head)
    layout: str = "auto"  # kernel layout (runtime.packed_linear.choose_layout)


def _prepared(params: PackParams, source):
    """(spec, model with its stage's weights, adapter, qparams, clusters), as eval sees them."""
    if read_quantization_config(source.path) is not None:
        raise QtoolError(f"{source.path} is already packed; pack the stage it came from")
    if not source.spec and not params.spec:
        raise QtoolError(
            f"{source.path} is not quantized: pass --spec (e.g. W4A16-g128) to pack it with RTN, or pack a quantized stage"
        )
    spec = parse_spec(params.spec or source.spec)
    qparams = stage_qparams(source)
    if qparams is not None and source.spec and not same_weight_format(spec, parse_spec(source.spec)):
        raise QtoolError(
            f"{source.path} holds {source.spec} weights; a --spec must keep that weight part (activations and KV may change)"
        )
    model, _ = load(source)  # fp32: block linears are quantized from the stored weights, whatever --dtype says
    adapter = adapter_for(model.config)
    linears = [linear.weight for block in adapter.layers(model) for linear in adapter.linears(block).values()]
    cast_parameters(model, pick_dtype(params.dtype), keep=linears)
    clusters = (
        cluster_bounds(source.tensors("reorder"), adapter, model.config) if source.has_tensors("reorder") else None
    )
    return spec, model, adapter, qparams, clusters


def _writer(params: PackParams, source, spec) -> StageWriter:
    """A stage writer that takes only the parent's config and tokenizer: the packed file replaces
    the float weights and every stage tensor."""
    return StageWriter(
        Path(params.out), "pack", params.fingerprint_params(), source, spec=spec.name, inherit_tensors=False
    )


def _export(params: PackParams, source, spec, model, adapter, qparams, clusters, t0: float) -> dict:
    """Weight-only GPTQ or compressed-tensors checkpoint, loadable by transformers and vLLM."""
    from qtool.runtime.exports import export_tensors

    if clusters is not None:
        raise QtoolError(
            f"{source.path} is RPTQ-reordered; its norm gathers exist only in qtool's format: use --format qtool"
        )
    tensors, qconfig = export_tensors(model, adapter, spec, qparams, params.format)
    with _writer(params, source, spec) as writer:
        save_file(tensors, writer.tmp / WEIGHTS, metadata={"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = qconfig
        (writer.tmp / "config.json").write_text(json.dumps(config, indent=2))
        if params.format == "gptq":
            (writer.tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
        writer.metrics["disk_bytes"] = sum(f.stat().st_size for f in writer.tmp.iterdir() if f.is_file())
        writer.commit()
    console.print(
        f"pack: {spec.name} as {params.format} -> {params.out}: {writer.metrics['disk_bytes'] / 2**20:.1f} MiB on disk"
    )
    return {
        "stage": "pack",
        "out": str(params.out),
        "skipped": False,
        "spec": spec.name,
        "format": params.format,
        "disk_bytes": writer.metrics["disk_bytes"],
        "seconds": round(time.time() - t0, 2),
    }


def pack(params: PackParams, device: str = "auto") -> dict:
    """Write the packed checkpoint (or find it complete) and return its summary. Packing is cheap
    CPU work (rounding and bit shuffles), so `device` is not used."""
    if params.format not in FORMATS:
        raise QtoolError(f"unknown --format {params.format!r}: use one of {', '.join(FORMATS)}")
    pick_dtype(params.dtype)
    source = open_source(params.model)
    fingerprint, skipped = fingerprint_or_skip("pack", params, source)
    if skipped:
        return skipped
    t0 = time.time()
    spec, model, adapter, qparams, clusters = _prepared(params, source)
    if params.format != "qtool":
        return _export(params, source, spec, model, adapter, qparams, clusters, t0)
    layout = pack_model(model, adapter, spec, qparams, clusters, params.layout)
    with _writer(params, source, spec) as writer:
        save_packed(model, writer.tmp, spec, layout)
        summary = pack_summary(model, writer.tmp)
        writer.metrics.update(summary)
        writer.timings["pack_s"] = round(time.time() - t0, 3)
        writer.commit()
    console.print(
        f"pack: {spec.name} ({layout}) -> {params.out}: {summary['disk_bytes'] / 2**20:.1f} MiB on disk, "
        f"{summary['bits_per_weight']:.3f} bits/weight stored, {summary['bits_per_weight_gpu']:.3f} on the GPU"
    )
    return {
        "stage": "pack",
        "out": str(params.out),
        "skipped": False,
        "spec": spec.name,
        "layout": layout,
        **summary,
        "seconds": round(time.time() - t0, 2),
    }


def pack_summary(model, directory: Path) -> dict:
    """Size on disk and true bits per weight of the block linears (scales, zeros and sums included),
    as stored and as held on the GPU (kernel form)."""
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    params = sum(m.in_features * m.out_features for m in linears)
    stored = sum(m.nbytes for m in linears)
    gpu = sum(m.kernel_nbytes for m in linears)
    disk = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return {
        "disk_bytes": disk,
        "linear_params": params,
        "linear_bytes": stored,
        "bits_per_weight": 8 * stored / params,
        "bits_per_weight_gpu": 8 * gpu / params,
    }
