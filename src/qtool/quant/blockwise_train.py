"""Block-wise training of a quantized model: OmniQuant, EfficientQAT Block-AP and ABQ-LLM.

Two chains of hidden states run through the model one block at a time: the float chain (inputs
of the float model) and the quantized chain (inputs as the already-quantized blocks produce them).
Each block's quantized copy is trained so that, fed the quantized-chain inputs, it reproduces the
float block applied to the float-chain inputs (OmniQuant's choice: later blocks learn to repair
earlier blocks' errors). Its learned state is then folded into plain float weights plus per-group
scale/zero, journaled (a killed run resumes from the next block and gives the same result), and
the quantized chain advances through the folded, quantized block.

What a preset trains is spelled out in `BlockState` from the preset's fields; parameter groups are
explicit dictionaries, never found by name matching.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from qtool.core import distributed
from qtool.core.checkpoint import layer_key
from qtool.core.errors import QtoolError
from qtool.core.quantizer import fake_quant_weight
from qtool.core.spec import QuantSpec
from qtool.models.adapters import Adapter
from qtool.models.blockwise import capture_block_inputs, iterate_blocks, run_block
from qtool.quant.block_losses import LOSSES
from qtool.quant.fakequant import activation_hooks
from qtool.quant.learned_weights import QUANTIZERS, fake_quant_grouped
from qtool.quant.let import apply_let, init_let, let_plan
from qtool.quant.stats import block_stats


@dataclass(frozen=True)
class Preset:
    name: str
    quantizer: str  # "lwc" (learned clipping) or "step" (learned scale and zero)
    train_weights: bool  # the linear weights themselves are trained (Block-AP)
    let_weight_only: tuple[str, ...]  # LET pairs when only weights are quantized
    let_with_activations: tuple[str, ...]  # LET pairs when activations are quantized too
    compensation: bool  # ABQ's rank-1 correction on the down projection of the first and last block
    loss: str
    lr: dict  # default learning rate of each parameter group
    cosine: bool

    def let_pairs(self, spec: QuantSpec) -> tuple[str, ...]:
        pairs = self.let_with_activations if spec.quantizes_activations else self.let_weight_only
        return pairs + ("qk",) if pairs and spec.quantizes_kv else pairs


_LET = ("attn_in", "mlp_in", "v_o")
PRESETS = {
    "omniquant": Preset("omniquant", "lwc", False, (), _LET, False, "mse", {"let": 5e-3, "lwc": 1e-2}, False),
    "efficientqat": Preset("efficientqat", "step", True, (), (), False, "mse", {"weight": 2e-5, "qparams": 1e-4}, True),
    "abq": Preset(
        "abq",
        "lwc",
        False,
        _LET + ("mlp_mid",),
        _LET + ("mlp_mid",),
        True,
        "abq",
        {"let": 5e-3, "lwc": 1e-2, "comp": 1e-2},
        False,
    ),
}


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch: int
    seed: int
    lr: dict  # learning rate of each parameter group
    cosine: bool
    alpha: float = 0.5  # LET migration strength
    diverge: float = 100.0  # a loss this many times its first value stops the run


def _master(t: torch.Tensor) -> torch.Tensor:
    """A trainable copy in at least fp32 (fp64 stays fp64, for exactness tests)."""
    return t.detach().clone() if t.dtype == torch.float64 else t.detach().float().clone()


def _params(tensors: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    return {k: nn.Parameter(_master(v)) for k, v in tensors.items()}


class BlockState:
    """The trainable parameters of one block and the single map from them to block weights."""

    def __init__(
        self,
        block: nn.Module,
        adapter: Adapter,
        config,
        spec: QuantSpec,
        preset: Preset,
        stats: dict,
        index: int,
        n_blocks: int,
        alpha: float,
    ):
        self.spec = spec
        self.linears = adapter.linear_names()
        self.base = {n: _master(p) for n, p in block.named_parameters()}
        self.plan = let_plan(adapter, config, self.base, preset.let_pairs(spec), shift=spec.quantizes_activations)
        self.groups: dict[str, dict[str, nn.Parameter]] = {}
        if self.plan.pairs:
            self.groups["let"] = _params(init_let(self.plan, self.base, stats, index, alpha))
        if preset.train_weights:
            self.groups["weight"] = _params({f"{lin}.weight": self.base[f"{lin}.weight"] for lin in self.linears})
        if preset.compensation and index in (0, n_blocks - 1):
            w = self.base[f"{adapter.mlp_out}.weight"]
            self.groups["comp"] = _params(
                {
                    f"{adapter.mlp_out}.left": w.new_zeros(w.shape[0], 1),
                    f"{adapter.mlp_out}.right": w.new_ones(1, w.shape[1]),
                }
            )
        init_q, self._qparams = QUANTIZERS[preset.quantizer]
        self.qgroup = "lwc" if preset.quantizer == "lwc" else "qparams"
        if spec.quantizes_weights:
            with torch.no_grad():
                start = self.transformed()
            self.groups[self.qgroup] = _params(
                {
                    f"{lin}.{k}": v.to(start[f"{lin}.weight"])
                    for lin in self.linears
                    for k, v in init_q(start[f"{lin}.weight"], spec).items()
                }
            )

    def transformed(self) -> dict[str, torch.Tensor]:
        """Float block parameters: trained weights, then LET, then the compensation term."""
        params = {**self.base, **self.groups.get("weight", {})}
        if "let" in self.groups:
            params = apply_let(params, self.groups["let"], self.plan)
        for key in self.groups.get("comp", {}):
            linear, _, side = key.rpartition(".")
            if side == "left":
                comp = self.groups["comp"]
                params[f"{linear}.weight"] = (
                    params[f"{linear}.weight"] + comp[f"{linear}.left"] @ comp[f"{linear}.right"]
                )
        return params

    def qparams(self, linear: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.groups[self.qgroup]
        mine = {k.rpartition(".")[2]: v for k, v in group.items() if k.rpartition(".")[0] == linear}
        return self._qparams(w, mine, self.spec)

    def quantized(self) -> dict[str, torch.Tensor]:
        """Parameters of the training forward: transformed, weights fake-quantized straight-through."""
        params = self.transformed()
        if self.spec.quantizes_weights:
            for lin in self.linears:
                w = params[f"{lin}.weight"]
                params[f"{lin}.weight"] = fake_quant_grouped(w, *self.qparams(lin, w), self.spec)
        return params

    @torch.no_grad()
    def fold(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """(float weights to save, {linear: (scale, zero)} with zero rounded into the code range)."""
        params = self.transformed()
        qp = {}
        if self.spec.quantizes_weights:
            for lin in self.linears:
                scale, zero = self.qparams(lin, params[f"{lin}.weight"])
                qp[lin] = (scale.float(), zero.round().clamp(0, self.spec.w_levels - 1).float())
        return params, qp

    def learned(self) -> dict[str, torch.Tensor]:
        """Every learned tensor but the trained weights, which the folded parameters already are."""
        return {
            f"{group}.{k}": v.detach()
            for group, params in self.groups.items()
            if group != "weight"
            for k, v in params.items()
        }


@contextmanager
def _attention_maps(block: nn.Module, adapter: Adapter, sink: list | None):
    """Collect the attention probabilities the block computes (needs eager attention)."""
    if sink is None:
        yield
        return
    attn = block.get_submodule(adapter.attn)
    handle = attn.register_forward_hook(lambda m, a, out: sink.append(out[1]) and None)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _hooked(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def fit_block(
    block: nn.Module,
    adapter: Adapter,
    state: BlockState,
    loss_fn,
    q_in: torch.Tensor,
    fp_in: torch.Tensor,
    targets: dict,
    kwargs: dict,
    settings: TrainSettings,
    index: int,
    head_dim: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `state` so the quantized block maps q_in to the targets; returns the epoch losses.

    On several ranks q_in, fp_in and the targets hold this rank's share of the windows: each step
    draws the global batch one process would draw, every rank trains on its 1/N slice of it (rows
    fetched from the ranks that hold them) and the gradients are averaged over the ranks."""
    device = next(block.parameters()).device
    n = q_in.shape[0] * distributed.world_size()
    steps = max(n // settings.batch, 1)
    groups = [
        {"params": list(p.values()), "lr": settings.lr[name], "name": name} for name, p in state.groups.items() if p
    ]
    if not groups:
        return []
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.epochs * steps) if settings.cosine else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    gen = torch.Generator().manual_seed(settings.seed * 100003 + index)
    first, history = None, []
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for step in range(steps):
            idx = order[step * settings.batch : (step + 1) * settings.batch]
            batch = {k: distributed.take_rows(v, idx, device) for k, v in targets.items()}
            if loss_fn.needs_attention:
                float_maps: list = []
                with torch.no_grad(), amp, _attention_maps(block, adapter, float_maps):
                    block(distributed.take_rows(fp_in, idx, device), **kwargs)
                batch["attn_fp"] = float_maps[0]
            quant_maps: list = []
            hooks = activation_hooks(block, adapter, state.spec, head_dim, ste=True)
            with amp, _hooked(hooks), _attention_maps(block, adapter, quant_maps if loss_fn.needs_attention else None):
                rows = distributed.take_rows(q_in, idx, device)
                out = _first(functional_call(block, state.quantized(), (rows,), kwargs))
                if quant_maps:
                    batch["attn_q"] = quant_maps[0]
                loss = loss_fn(out, batch)
            value = distributed.mean_value(loss.item())  # the global batch's loss, alike on every rank
            if not math.isfinite(value):
                raise QtoolError(
                    f"block {index}: training loss became {value} (epoch {epoch + 1}, step {step + 1}); "
                    "lower the learning rates (--lr-*) or check the calibration data"
                )
            first = value if first is None else first
            if first > 0 and value > settings.diverge * first:
                raise QtoolError(
                    f"block {index}: training loss diverged to {value:.4g}, {settings.diverge:g}x its first "
                    f"value {first:.4g} (epoch {epoch + 1}); lower the learning rates (--lr-*)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_grads(p for group in groups for p in group["params"])
            opt.step()
            if sched is not None:
                sched.step()
            total += value
        history.append(total / steps)
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history


@torch.no_grad()
def run_quantized(
    block: nn.Module,
    adapter: Adapter,
    spec: QuantSpec,
    qparams: dict,
    hidden: torch.Tensor,
    kwargs: dict,
    head_dim: int,
    batch_size: int,
) -> torch.Tensor:
    """The folded block with its learned weight quantization and the spec's activation quantization."""
    linears = adapter.linears(block)
    saved = {lin: m.weight.detach().clone() for lin, m in linears.items()}
    try:
        for lin, (scale, zero) in qparams.items():
            w = linears[lin].weight
            w.copy_(fake_quant_weight(w, spec, scale.to(w.device), zero.to(w.device)))
        with _hooked(activation_hooks(block, adapter, spec, head_dim)):
            return run_block(block, hidden, kwargs, batch_size)
    finally:
        for lin, w in saved.items():
            linears[lin].weight.copy_(w)


def _cache_device(device: torch.device, windows: torch.Tensor, hidden_size: int, copies: int) -> torch.device:
    """Keep the chains on the compute device when they take under 40% of its free memory."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = windows.numel() * hidden_size * 4 * copies
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.4 * free else torch.device("cpu")


def train_blocks(
    model: nn.Module,
    adapter: Adapter,
    spec: QuantSpec,
    preset: Preset,
    settings: TrainSettings,
    windows: torch.Tensor,
    device: torch.device,
    journal,
    batch_size: int = 1,
    on_block: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> tuple[dict, dict]:
    """Train every block in order; returns ({qparam key: tensor}, {"block{i}.loss": final epoch loss})."""
    loss_fn = LOSSES[preset.loss]()
    if loss_fn.needs_attention:
        model.set_attn_implementation("eager")  # attention probabilities are part of the loss
    windows = distributed.shard(windows)  # on several ranks each carries its share of both chains
    store = _cache_device(device, windows, model.config.hidden_size, 4)
    fp_in, kwargs = capture_block_inputs(model, adapter, windows, device, store)
    q_in = fp_in.clone()
    head_dim = adapter.attention_shape(model.config)[2]
    n_blocks = len(adapter.layers(model))
    qparams, losses = {}, {}
    for index, block in iterate_blocks(model, adapter, device):
        if on_block is not None:
            on_block(index, n_blocks)
        with torch.no_grad():
            stats, target = block_stats(block, adapter, index, fp_in, kwargs, batch_size)
        done = journal.load(index)
        if done is None:
            targets = {"fp": target}
            if loss_fn.needs_qin_target:
                with torch.no_grad():
                    targets["fp_qin"] = run_block(block, q_in, kwargs, batch_size)
            stats = {k: v.to(device) for k, v in stats.items()}
            state = BlockState(block, adapter, model.config, spec, preset, stats, index, n_blocks, alpha=settings.alpha)
            history = fit_block(
                block,
                adapter,
                state,
                loss_fn,
                q_in,
                fp_in,
                targets,
                kwargs,
                settings,
                index,
                head_dim,
                (lambda e, v, i=index: on_epoch(i, e, v)) if on_epoch else None,
            )
            folded, block_qp = state.fold()
            done = {f"param.{k}": v for k, v in folded.items()}
            done.update({f"learned.{k}": v for k, v in state.learned().items()})
            for lin, (scale, zero) in block_qp.items():
                done[layer_key(index, lin, "scale")], done[layer_key(index, lin, "zero")] = scale, zero
            done["loss"] = torch.tensor(history or [0.0])
            journal.save(index, done)
            done = {k: v.detach().cpu() for k, v in done.items()}
        with torch.no_grad():
            params = dict(block.named_parameters())
            for key, value in done.items():
                if key.startswith("param."):
                    params[key[len("param.") :]].copy_(value)
        block_qp = {
            lin: (done[layer_key(index, lin, "scale")], done[layer_key(index, lin, "zero")])
            for lin in adapter.linear_names()
            if layer_key(index, lin, "scale") in done
        }
        qparams.update(
            {layer_key(index, lin, w): t for lin, st in block_qp.items() for w, t in zip(("scale", "zero"), st)}
        )
        losses[f"block{index}.loss"] = float(done["loss"][-1])
        q_in = run_quantized(block, adapter, spec, block_qp, q_in, kwargs, head_dim, batch_size)
        fp_in = target
    return qparams, losses
