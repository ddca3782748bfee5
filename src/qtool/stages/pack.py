"""`qtool pack`: from a quantized stage (or any model with --spec, RTN) to a packed checkpoint.

The weights are quantized exactly as `qtool eval` quantizes them for the same stage (learned
scales and zeros where the stage has them, RTN ranges otherwise; RPTQ clusters from a reorder
stage), then written in the layout of the kernel that runs them. `--format gptq` and
`--format compressed-tensors` write weight-only exports for other runtimes instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from qtool.core.devices import DTYPES, cast_parameters, pick_dtype
from qtool.core.errors import QtoolError
from qtool.core.spec import parse_spec
from qtool.kernels.chooser import LAYOUTS
from qtool.quant.qparams import learned_qparams
from qtool.quant.rptq import cluster_bounds
from qtool.runtime.packed_linear import PackedLinear
from qtool.runtime.packed_model import WEIGHTS, pack_model, read_quantization_config, save_packed
from qtool.stages.base import Run, Stage, StageParams, StageResult, param

FORMATS = ("qtool", "gptq", "compressed-tensors")


@dataclass(frozen=True)
class PackParams(StageParams):
    spec: str | None = param(
        None, "Spec to pack (default: the stage's own), e.g. W4A16-g128, W4A4, W4A4KV4.", check=parse_spec
    )
    format: str = param(
        "qtool",
        "qtool (kernels, `qtool.load`), gptq or compressed-tensors (weight-only exports).",
        choices=FORMATS,
    )
    dtype: str = param(
        "float32", "dtype of the tensors that stay float (embeddings, norms, head).", choices=tuple(DTYPES)
    )
    layout: str = param(
        "auto",
        "Kernel layout: auto (the kernel chooser's), wonly, u8 (integer tensor cores), planes (bit-plane GEMM).",
        choices=("auto", *LAYOUTS),
    )


@dataclass(kw_only=True)
class PackResult(StageResult):
    spec: str
    format: str
    layout: str | None  # None for the weight-only exports
    disk_bytes: int
    linear_params: int | None = None
    linear_bytes: int | None = None
    bits_per_weight: float | None = None
    bits_per_weight_gpu: float | None = None

    def summary(self) -> str:
        line = f"pack: {self.spec} as {self.format}"
        line += f" ({self.layout})" if self.layout else ""
        line += f" -> {self.out}: {self.disk_bytes / 2**20:.1f} MiB on disk"
        if self.bits_per_weight is not None:
            line += f", {self.bits_per_weight:.3f} bits/weight stored, {self.bits_per_weight_gpu:.3f} on the GPU"
        return line

    def rows(self) -> dict:
        keys = ("out", "spec", "layout", "format", "disk_bytes", "bits_per_weight", "bits_per_weight_gpu", "seconds")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class Pack(Stage):
    """Packing is cheap CPU work (rounding and bit shuffles): no device."""

    name = "pack"
    params = PackParams
    help = "Pack a quantized stage into the kernels' layout (or export GPTQ / compressed-tensors)."
    model_help = "A quantized stage (train-blockap, tune-e2e, reorder), or any model with --spec (RTN)."

    def check(self, params: PackParams, source) -> None:
        if read_quantization_config(source.path) is not None:
            raise QtoolError(f"{source.path} is already packed; pack the stage it came from")
        if not source.spec and not params.spec:
            raise QtoolError(
                f"{source.path} is not quantized: pass --spec (e.g. W4A16-g128) to pack it with RTN, "
                "or pack a quantized stage"
            )
        if params.format != "qtool" and source.has_tensors("reorder"):
            raise QtoolError(
                f"{source.path} is RPTQ-reordered; its norm gathers exist only in qtool's format: use --format qtool"
            )
        learned_qparams(source, parse_spec(params.spec or source.spec))

    def work(self, run: Run) -> PackResult:
        p, source = run.params, run.source
        spec = parse_spec(p.spec or source.spec)
        qparams = learned_qparams(source, spec)
        model, _, adapter = run.load()  # fp32: block linears are quantized from the stored weights
        linears = [linear.weight for block in adapter.layers(model) for linear in adapter.linears(block).values()]
        cast_parameters(model, pick_dtype(p.dtype), keep=linears)
        clusters = (
            cluster_bounds(source.tensors("reorder"), adapter, model.config) if source.has_tensors("reorder") else None
        )
        # the packed file replaces the float weights and every stage tensor: only config and tokenizer inherited
        with run.writer(spec=spec.name, inherit_tensors=False) as writer:
            if p.format == "qtool":
                layout = pack_model(model, adapter, spec, qparams, clusters, p.layout)
                save_packed(model, writer.tmp, spec, layout)
                summary = pack_summary(model, writer.tmp)
            else:
                layout = None
                summary = {"disk_bytes": _export(p, spec, model, adapter, qparams, writer.tmp)}
            run.commit(writer, **summary)
        return PackResult(
            stage=self.name,
            out=str(run.out),
            spec=spec.name,
            format=p.format,
            layout=layout,
            **summary,
            seconds=run.seconds(),
        )


def _export(params: PackParams, spec, model, adapter, qparams, directory: Path) -> int:
    """Weight-only GPTQ or compressed-tensors checkpoint, loadable by transformers and vLLM; its
    size on disk."""
    from qtool.runtime.exports import export_tensors

    tensors, qconfig = export_tensors(model, adapter, spec, qparams, params.format)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if params.format == "gptq":
        (directory / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


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


pack = Pack()
