"""Fast generation for LLaMA-family models (llama, mistral, qwen2), packed or float.

Why: at batch 1 a 7B decode step in transformers runs ~40 kernels per block, and once the weights
are packed those small kernels take longer than the linears. The Decoder computes the same
function as the model's forward with ~8 kernels per block: a static KV cache written in place,
one fused q|k|v and one gate|up linear (the modules' weights become views into the fused one, so
nothing is held twice); the residual add + RMSNorm and the SiLU gate each compiled by
torch.compile into one kernel on CUDA, also applying the next linear's activation quantization;
in a one-token step on the GPU, rotary embedding, cache store and attention in one CUDA kernel
(qtool.kernels.attention; prefill: a compiled rotary + store, then SDPA); the one-token step
replayed as a CUDA graph. Linears are called as modules, so PackedLinear kernels and KV
quantization run as in the transformers forward (tests compare logits with it).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.kernels import attention, reference
from qtool.kernels.cuda_runtime import cupy_available
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import fake_quant_clusters
from qtool.runtime.fusion import fused
from qtool.runtime.gathers import NormGather
from qtool.runtime.packed_linear import PackedLinear

FAMILIES = ("llama", "mistral", "qwen2")


def _quantized(x, quant):
    """x through the consumer linear's input quantization (`PackedLinear.input_quantization`)."""
    return x if quant is None else fake_quant_clusters(x, *quant)


@fused
def add_rms_norm(h, residual, weight, eps: float, perm, quant):
    """(RMSNorm(residual + h) [gathered at perm, quantized for its consumer], residual + h), in
    transformers' RMSNorm arithmetic; perm is an RPTQ norm gather or None."""
    s = h if residual is None else residual + h
    return _quantized(reference.rms_norm(s if perm is None else s.index_select(-1, perm), weight, eps), quant), s


@fused
def rotary_store(q, k, v, cos, sin, k_cache, v_cache, positions):
    """Rotary embedding of q [B, T, H, D] and k [B, T, Hkv, D] (cos, sin [B, T, D]) as transformers
    applies it; k and v written into the caches [B, Hkv, L, D] at `positions`; returns q [B, H, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)

    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    k_cache.index_copy_(2, positions, (k * cos + rot(k) * sin).transpose(1, 2))
    v_cache.index_copy_(2, positions, v.transpose(1, 2))
    return (q * cos + rot(q) * sin).transpose(1, 2)


@fused
def silu_gate(gate_up, quant):
    """SiLU(gate) * up of a fused gate|up output, quantized for the down projection."""
    return _quantized(reference.silu_gate(gate_up), quant)


def _input_quantization(linear: nn.Module):
    return linear.input_quantization() if isinstance(linear, PackedLinear) else None


def _call(linear: nn.Module, x, quant):
    return linear(x, input_quantized=True) if quant is not None else linear(x)


def capture_graph(fn, warmup: int = 3):
    """(CUDA graph, its output) of `fn` captured after `warmup` runs on a side stream (the runs
    torch.compile and cuBLAS need before capture); replay() reruns fn's kernels on its buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _plain(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def fuse_linears(modules: list[nn.Module]) -> nn.Module | None:
    """One linear computing the concatenated outputs of `modules` (same input), or None when they
    cannot fuse (hooks, different kinds or quantization). The parts keep working: their weights
    become views into the fused module's."""
    if not all(_plain(m) for m in modules):
        return None
    if all(type(m) is nn.Linear for m in modules):
        weight = torch.cat([m.weight.detach() for m in modules])
        biases = [m.bias for m in modules]
        fused_linear = nn.Linear(
            weight.shape[1], weight.shape[0], bias=any(b is not None for b in biases), device="meta"
        )
        fused_linear.weight = nn.Parameter(weight, requires_grad=False)
        if fused_linear.bias is not None:
            fused_linear.bias = nn.Parameter(
                torch.cat(
                    [b.detach() if b is not None else weight.new_zeros(m.out_features) for m, b in zip(modules, biases)]
                ),
                requires_grad=False,
            )
        start = 0
        for m in modules:
            end = start + m.out_features
            m.weight = nn.Parameter(fused_linear.weight[start:end], requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(fused_linear.bias[start:end], requires_grad=False)
            start = end
        return fused_linear
    if all(isinstance(m, PackedLinear) for m in modules):
        return PackedLinear.concat(modules)
    return None


class _Norm:
    """A block's norm: fused add + RMSNorm (+ its consumer's input quantization) where it is a plain
    RMSNorm (with an RPTQ gather or not), else residual add then the module itself."""

    def __init__(self, module: nn.Module, consumer: nn.Module | None = None):
        self.module = module
        hooks = list(module._forward_pre_hooks.values())
        self.perm = hooks[0].perm if len(hooks) == 1 and isinstance(hooks[0], NormGather) else None
        self.fast = (
            type(module).__name__.endswith("RMSNorm")
            and not module._forward_hooks
            and (not hooks or self.perm is not None)
            and hasattr(module, "variance_epsilon")
        )
        self.quant = _input_quantization(consumer) if self.fast and consumer is not None else None

    def to(self, device) -> None:
        if self.perm is not None:
            self.perm = self.perm.to(device)

    def weight_eps(self) -> tuple[torch.Tensor, float]:
        """(weight, eps): the norm's operands, for add_rms_norm or a GEMV that applies it (fused_step)."""
        return self.module.weight, float(self.module.variance_epsilon)

    def __call__(self, h, residual):
        if self.fast:
            return add_rms_norm(h, residual, *self.weight_eps(), self.perm, self.quant)
        s = h if residual is None else residual + h
        return self.module(s), s


# The fused decode step up to one x slice of the SIMT GEMV (ops.simt_plan: 4 rows): at batch 8 it
# measured 10% slower on SmolLM2 (and equal on the 7B shape), at batch 1 2% faster on the 7B shape
FUSED_STEP_MAX_BATCH = 4


class _Block:
    def __init__(self, layer: nn.Module, adapter):
        get = layer.get_submodule
        self.q, self.k, self.v, self.o = (get(n) for n in (adapter.q, adapter.k, adapter.v, adapter.o))
        self.gate, self.up = (get(n) for n in adapter.mlp_in)
        self.down = get(adapter.mlp_out)
        self.qkv = fuse_linears([self.q, self.k, self.v])
        self.gate_up = fuse_linears([self.gate, self.up])
        self.attn_norm = _Norm(get(adapter.attn_norm), self.qkv)
        self.mlp_norm = _Norm(get(adapter.mlp_norm), self.gate_up)
        # a per-token down_proj quantizes in its GEMV: cheaper than the compiled quantizer after the gate
        # (four kernels there: benchmarks/results/profile_decode_h100.jsonl)
        per_token = isinstance(self.down, PackedLinear) and self.down.quantizes_per_token()
        self.down_quant = _input_quantization(self.down) if self.gate_up is not None and not per_token else None
        self.scaling = get(adapter.attn).scaling
        # a decode step on GEMVs that keep x as integer codes runs the norms, the quantization and the
        # residual adds inside the four GEMVs (fused_step): 6 kernels a block instead of 8
        self.fusable = all(
            isinstance(m, PackedLinear) and m.quantizes_to_codes() for m in (self.qkv, self.o, self.gate_up, self.down)
        ) and all(n.fast and n.perm is None for n in (self.attn_norm, self.mlp_norm))

    def fused_qkv(self, x):
        """The fused q|k|v projection of x (self.qkv is not None)."""
        return _call(self.qkv, x, self.attn_norm.quant)

    def project(self, x):
        if self.qkv is None:
            return self.q(x), self.k(x), self.v(x)
        return self.fused_qkv(x).split([self.q.out_features, self.k.out_features, self.v.out_features], dim=-1)

    def fused_step(self, h, residual, attend):
        """(stream, None) after this block for one token per sequence, where (h, residual) is the
        residual stream as the unfused blocks leave it; attend: q|k|v [B, ...] -> attention [B, H*D]."""
        s = h if residual is None else residual + h
        a = attend(self.qkv(s, norm=self.attn_norm.weight_eps()))
        s = self.o(a.view(s.shape[0], 1, -1), residual=s)
        return self.down(silu_gate(self.gate_up(s, norm=self.mlp_norm.weight_eps()), None), residual=s), None

    def mlp(self, x):
        if self.gate_up is None:
            return self.down(silu_gate(torch.cat([self.gate(x), self.up(x)], dim=-1), None))
        return _call(
            self.down, silu_gate(_call(self.gate_up, x, self.mlp_norm.quant), self.down_quant), self.down_quant
        )


class Decoder:
    """Generation with a static KV cache of `batch` x `max_len` tokens for a LLaMA-family model.

    `forward(ids, start)` runs T new tokens at positions start.. (prefill or one decode step) and
    returns the last position's logits; `generate` decodes greedily, replaying the one-token step as
    a CUDA graph on the GPU. The model's own forward keeps working (fused weights are shared)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        config = model.config
        adapter = adapter_for(config)
        if adapter.family not in FAMILIES:
            raise QtoolError(
                f"the Decoder runs {', '.join(FAMILIES)} models, not {adapter.family}: use model.generate()"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise QtoolError(
                f"the Decoder implements SiLU-gated MLPs, this model uses {config.hidden_act}: use model.generate()"
            )
        self.model, self.config = model, config
        self.heads, self.kv_heads, self.head_dim = adapter.attention_shape(config)
        self.blocks = [_Block(layer, adapter) for layer in adapter.layers(model)]
        self.final_norm = _Norm(model.model.norm)
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        for norm in [self.final_norm] + [n for b in self.blocks for n in (b.attn_norm, b.mlp_norm)]:
            norm.to(self.device)
        self.resize(batch, max_len)

    def resize(self, batch: int, max_len: int) -> None:
        """A new (empty) cache for `batch` sequences of up to `max_len` tokens; the fused weights stay."""
        window = (
            getattr(self.config, "sliding_window", None) if getattr(self.config, "use_sliding_window", True) else None
        )
        if window is not None and max_len > window:
            raise QtoolError(
                f"max_len {max_len} exceeds the sliding window ({window}) that the Decoder does not implement: "
                "use model.generate() or a shorter max_len"
            )
        self.k_cache = self.v_cache = self._graph = None  # free the old cache first
        shape = (len(self.blocks), batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.batch, self.max_len = batch, max_len
        self._key_pos = torch.arange(max_len, device=self.device)
        # the rotary table of every cache position, looked up per step (transformers computes the same
        # values per call: one product per position and frequency)
        cos, sin = self.model.model.rotary_emb(self.k_cache[0, 0, 0], self._key_pos.unsqueeze(0))
        self._cos, self._sin = cos[0], sin[0]
        self._attention = None
        if (
            self.device.type == "cuda"
            and cupy_available()
            and attention.supported(self.heads, self.kv_heads, self.head_dim, self.dtype)
        ):
            self._attention = attention.workspace(batch, self.heads, self.kv_heads, self.head_dim, max_len, self.device)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, start: torch.Tensor | int) -> torch.Tensor:
        """Logits [B, vocab] of the last of T new tokens `ids` [B, T] written at positions start..;
        `start` may be a 0-d device tensor (then the step can be captured in a CUDA graph)."""
        b, t = ids.shape
        positions = self._key_pos[:t] + start
        h = self.model.model.embed_tokens(ids)
        cos, sin = self._cos.index_select(0, positions), self._sin.index_select(0, positions)
        step = t == 1 and self._attention is not None  # the decode-attention kernel (rotary, cache store inside)
        mask = (
            None if step else self._key_pos.unsqueeze(0) <= positions.unsqueeze(1)
        )  # [T, max_len]: causal over the cache
        residual = None
        for i, blk in enumerate(self.blocks):
            attend = partial(self._decode_attention, i, blk.scaling, cos, sin, positions) if step else None
            if step and blk.fusable and b <= FUSED_STEP_MAX_BATCH:
                h, residual = blk.fused_step(h, residual, attend)
                continue
            x, residual = blk.attn_norm(h, residual)
            if step and blk.qkv is not None:
                a = attend(blk.fused_qkv(x))
            else:
                q, k, v = blk.project(x)
                kv_shape = (b, t, self.kv_heads, self.head_dim)
                q = rotary_store(
                    q.view(b, t, self.heads, self.head_dim),
                    k.view(kv_shape),
                    v.view(kv_shape),
                    cos.expand(b, t, -1),
                    sin.expand(b, t, -1),
                    self.k_cache[i],
                    self.v_cache[i],
                    positions,
                )
                a = nn.functional.scaled_dot_product_attention(
                    q,
                    self.k_cache[i],
                    self.v_cache[i],
                    attn_mask=mask,
                    scale=blk.scaling,
                    enable_gqa=self.heads != self.kv_heads,
                )
                a = a.transpose(1, 2)
            h = blk.o(a.reshape(b, t, self.heads * self.head_dim))
            x, residual = blk.mlp_norm(h, residual)
            h = blk.mlp(x)
        x, _ = self.final_norm(h, residual)  # over all T: a slice would make the compiled norm specialize on its offset
        return self.model.lm_head(x[:, -1])

    def _decode_attention(self, i: int, scaling: float, cos, sin, positions, qkv: torch.Tensor) -> torch.Tensor:
        """Block i's attention for one new token per sequence: q|k|v [B, 1, ...] -> [B, H*D]."""
        return attention.decode_attention(
            qkv.view(qkv.shape[0], -1),
            cos,
            sin,
            self.k_cache[i],
            self.v_cache[i],
            positions,
            self.heads,
            scaling,
            self._attention,
        )

    def step_graph(self):
        """(graph, ids [B, 1], start 0-d tensor, logits) of a captured one-token step: set ids and
        start in place, replay, read logits. Captured once, after warm-up runs that also compile;
        they write the cache's last position, which every real step writes before it reads it."""
        if self._graph is None:
            ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
            start = torch.full((), self.max_len - 1, dtype=torch.long, device=self.device)
            graph, logits = capture_graph(lambda: self.forward(ids, start))
            self._graph = (graph, ids, start, logits)
        return self._graph

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of prompts `ids` [batch, T]: returns [batch, T + new] token ids."""
        ids = ids.to(self.device)
        b, t = ids.shape
        if b != self.batch:
            raise QtoolError(f"the Decoder was built for batch {self.batch}, got {b} prompts: build one with batch={b}")
        if t + max_new_tokens > self.max_len:
            raise QtoolError(
                f"{t} prompt + {max_new_tokens} new tokens exceed max_len {self.max_len}: "
                "build the Decoder with a larger max_len"
            )
        out = [ids]
        token = self.forward(ids, 0).argmax(-1, keepdim=True)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        graph = self.step_graph() if self.device.type == "cuda" else None
        for pos in range(t, t + max_new_tokens):
            out.append(token)
            if eos_token_id is not None:
                done |= token[:, 0] == eos_token_id
                if bool(done.all()):
                    break
            if pos + 1 == t + max_new_tokens:
                break
            if graph is None:
                token = self.forward(token, pos).argmax(-1, keepdim=True)
            else:
                g, g_ids, g_start, logits = graph
                g_ids.copy_(token)
                g_start.fill_(pos)
                g.replay()
                token = logits.argmax(-1, keepdim=True)
        return torch.cat(out, dim=1)
