"""Public kernel entry points: each runs the CUDA kernel when its tensors are on a GPU and CuPy is
installed, and the torch reference otherwise (same inputs, same outputs).

Which kernel runs on the GPU is the chooser's decision (kernels.chooser.choose_path, asked by
w_only_impl and lowbit_impl) unless the caller forces one (`impl=`); these functions override it only
where the chosen kernel cannot run the call (see w_only_impl, lowbit_impl).
"""

from __future__ import annotations

import functools

import torch

from qtool.core.errors import QtoolError
from qtool.kernels import chooser
from qtool.kernels import cuda_runtime as rt
from qtool.kernels import reference as ref
from qtool.kernels.chooser import GEMV_MAX_M, SIMT_MAX_M  # noqa: F401 (the default rule's thresholds, re-exported)
from qtool.kernels.layouts import LowbitWeights, PackedActivations, WOnlyWeights
from qtool.kernels.segments import Segments

GEMV_ROWS = 16  # the most x rows the mma GEMV (one m16 tile) and the bit-plane GEMV (MT <= 16) take
GEMV_THREADS = 128  # GEMV_WARPS in wonly_gemv.cu (mma GEMV)
SIMT_ROWS = 2  # SIMT_R in wonly_gemv.cu
# warps per SIMT block (W in wonly_gemv.cu) without / with the fused prologue: one block per SM makes
# the prologue's passes over x once per SM instead of twice
SIMT_WARPS = {False: 8, True: 16}
SIMT_PLAIN, SIMT_FUSED, SIMT_CODES = 0, 1, 2  # MODE in wonly_gemv.cu
WG_BK, WG_ROWS, WG_STAGES, WG_THREADS = 128, 128, 4, 256  # the wonly_wgmma enum in wonly_gemv.cu
WG_NT = (16, 32, 64, 128)  # x rows per block (the wgmma's N) instantiated
WONLY_IMPLS = chooser.PATHS["wonly"]


def simt_mode(bits: int, groups: int, a_bits: int | None, prologue: bool) -> int:
    """The SIMT GEMV's MODE: with in-kernel quantization of x to <= 8 bits over per-channel W2-W4
    weights, x stays integer codes (SIMT_CODES: x' = codes * sx exactly, where the fused fake
    quantization rounds x' to x's dtype); else the prologue (ops or residual) or none."""
    if a_bits and bits <= 4 and groups == 1:
        return SIMT_CODES
    return SIMT_FUSED if prologue else SIMT_PLAIN


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device(t: torch.Tensor) -> str | None:
    """The GPU's name for the chooser (tables measured on another GPU do not apply), None off the GPU."""
    if not t.is_cuda:
        return None
    return _device_name(torch.cuda.current_device() if t.device.index is None else t.device.index)


def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != k:
        raise QtoolError(f"x must be [M, K={k}], got {tuple(x.shape)}: flatten leading dims with x.reshape(-1, {k})")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise QtoolError(f"x must be a floating tensor, got {x.dtype}")
    return x.contiguous()


def _as_int32(t: torch.Tensor | list | tuple, device) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.int32, device=device).contiguous()


@functools.lru_cache(maxsize=256)
def _seg_tables(seg: Segments, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Device copies of a layout's segment tables, made once: a per-call host-to-device copy would
    synchronize the host with the stream and cost more than the kernels themselves.
    (clusters, chunk_seg, bounds, padded starts, cluster_of, tile_seg, ptile), int32."""
    return (
        _as_int32(seg.clusters, device),
        seg.chunk_seg().to(device),
        _as_int32(seg.bounds, device),
        _as_int32([t * seg.tile for t in seg.ptile], device),
        _as_int32(seg.cluster_of, device),
        seg.tile_seg().to(device),
        _as_int32(seg.ptile, device),
    )


def quantize_activations(
    x: torch.Tensor, bits: int, segments: Segments, layout: str | None = None
) -> PackedActivations:
    """Per-token (per-cluster) asymmetric `bits`-bit codes of x [M, K], packed in the K order of
    `segments` (take them from the packed weights: `w.segments`) as bit-planes or u8 bytes."""
    x = _check_x(x, segments.k)
    if not 1 <= bits <= 8:
        raise QtoolError(f"activation bits must be in 1..8, got {bits}")
    layout = layout or ("planes" if segments.tile == 256 else "u8")
    if (layout == "planes") != (segments.tile == 256):
        raise QtoolError(
            f"layout {layout!r} does not match segments padded to {segments.tile}: quantize with the weights' layout"
        )
    if not rt.on_gpu(x):
        return ref.quantize_activations_ref(x, bits, segments, layout)
    m, dev = x.shape[0], x.device
    s, c, p = segments.count, len(segments.clusters) - 1, segments.padded
    if layout == "planes":
        data = torch.empty(bits, m, p // 32, dtype=torch.int32, device=dev)
    else:
        data = torch.empty(m, p, dtype=torch.uint8, device=dev)
    scale = torch.empty(m, c, dtype=torch.float32, device=dev)
    zero = torch.empty(m, c, dtype=torch.float32, device=dev)
    seg_sum = torch.empty(m, s, dtype=torch.int32, device=dev)
    tables = _seg_tables(segments, dev)
    fn = rt.kernel(
        "quantize_act.cu", f"quantize_act<{'true' if layout == 'planes' else 'false'}, {rt.type_tag(x.dtype)}>"
    )
    smem = (2 * c + s) * 4
    if smem > 48 * 1024:
        raise QtoolError(
            f"{c} clusters and {s} segments need {smem} B of shared memory (max 48 KiB): "
            "use fewer clusters or larger groups"
        )
    if m:
        rt.launch(
            fn,
            (m,),
            (256,),
            (
                rt.ptr(x),
                rt.i32(m),
                rt.i32(segments.k),
                rt.i32(bits),
                rt.ptr(tables[0]),
                rt.i32(c),
                rt.ptr(tables[1]),
                rt.ptr(tables[2]),
                rt.ptr(tables[3]),
                rt.ptr(tables[4]),
                rt.i32(s),
                rt.i32(p),
                rt.ptr(data),
                rt.ptr(scale),
                rt.ptr(zero),
                rt.ptr(seg_sum),
            ),
            shared_mem=smem,
        )
    return PackedActivations(layout, bits, m, x.dtype, data, scale, zero, seg_sum, segments)


def _check_pair(a: PackedActivations, w: LowbitWeights, layout: str) -> None:
    if w.layout != layout or a.layout != layout:
        raise QtoolError(
            f"this GEMM needs '{layout}' weights and activations, got '{w.layout}' and '{a.layout}': "
            f"pack both with layout='{layout}'"
        )
    if a.segments != w.segments:
        raise QtoolError("activations were quantized with other segments than the weights: pass segments=w.segments")


def _lowbit_config(m: int, acc_sets: int) -> tuple[int, int, int]:
    """(WM, WN, KSPLIT): small M splits K over 8 warps; large M uses bigger warp tiles as registers allow."""
    if m <= 16:
        return 1, 1, 8
    frags = max(1, 24 // acc_sets)
    wm, wn = {1: (1, 1), 2: (1, 2), 3: (1, 2)}.get(frags, (2, 2) if frags < 8 else (2, 4))
    return wm, wn, 4


def _output(m: int, n: int, dtype, device, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise QtoolError(
            f"out must be a contiguous [{m}, {n}] {dtype} tensor on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def _into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return y if out is None else _output(*y.shape, y.dtype, y.device, out).copy_(y)


def _lowbit_launch(
    name: str, a: PackedActivations, w: LowbitWeights, bias, grid, threads: int, out, bounds: bool = False
):
    """Launch a low-bit GEMM/GEMV of lowbit_gemm.cu; they share one argument list (the bit-plane
    GEMV also takes the segments' K bounds, after the padded tile offsets)."""
    seg, dev = w.segments, a.data.device
    y = _output(a.m, w.n, a.dtype, dev, out)
    if bias is not None:
        bias = bias.to(device=dev, dtype=a.dtype).contiguous()
    t = _seg_tables(seg, dev)
    tables = (rt.ptr(t[6]), rt.ptr(t[2])) if bounds else (rt.ptr(t[6]),)
    fn = rt.kernel("lowbit_gemm.cu", name)
    if a.m:
        rt.launch(
            fn,
            grid,
            (threads,),
            (
                rt.ptr(a.data),
                rt.ptr(w.data),
                rt.ptr(t[5]),
                rt.ptr(a.scale),
                rt.ptr(a.zero),
                rt.ptr(a.seg_sum),
                rt.ptr(t[4]),
                rt.ptr(w.terms),
                *tables,
                rt.i32(a.m),
                rt.i32(w.n),
                rt.i32(len(seg.clusters) - 1),
                rt.i32(seg.count),
                rt.ptr(bias),
                rt.ptr(y),
                rt.i32(seg.ntiles),
            ),
        )
    return y


def _tile_grid(a: PackedActivations, w: LowbitWeights, wm: int, wn: int) -> tuple[int, int]:
    return -(-w.n // (8 * wn)), -(-a.m // (16 * wm))


@functools.lru_cache(maxsize=256)
def _segments_group(seg: Segments) -> int:
    """The weight group the segments were cut for: where group 1 starts (every group boundary starts a
    segment), K for per-channel weights."""
    return next((start for start, g in zip(seg.bounds, seg.group_of) if g == 1), seg.k)


def lowbit_impl(m: int, w: LowbitWeights, a_bits: int) -> str:
    """The kernel bitplane_gemm / u8_gemm runs on the GPU for M rows of a_bits activations: the
    chooser's path (chooser.choose_path), except that the bit-plane GEMV, which takes at most GEMV_ROWS
    rows, gives way to the bit-plane GEMM above them."""
    impl = chooser.choose_path(w.layout, w.bits, a_bits, _segments_group(w.segments), m, w.n, w.k, _device(w.data))
    return "bitplane_gemm" if impl == "bitplane_gemv" and m > GEMV_ROWS else impl


def _lowbit_choice(a: PackedActivations, w: LowbitWeights, impl: str | None) -> str:
    if impl is None:
        return lowbit_impl(a.m, w, a.bits)
    if impl not in chooser.PATHS[w.layout]:
        raise QtoolError(f"impl must be one of {chooser.PATHS[w.layout]} or None for {w.layout} weights, got {impl!r}")
    if impl == "bitplane_gemv" and a.m > GEMV_ROWS:
        raise QtoolError(f"the bit-plane GEMV takes M <= {GEMV_ROWS}, got M={a.m}: use impl='bitplane_gemm'")
    return impl


def bitplane_gemm(
    a: PackedActivations,
    w: LowbitWeights,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """y = x_hat @ w_hat^T + bias from bit-planes (AND+POPC tensor cores); output in x's dtype. On the
    GPU, `impl` (default: lowbit_impl) picks 'bitplane_gemv' (CUDA cores, M <= GEMV_ROWS) or 'bitplane_gemm'."""
    _check_pair(a, w, "planes")
    if not rt.on_gpu(a.data, w.data):
        return _into(ref.bitplane_gemm_ref(a, w, bias), out)
    if _lowbit_choice(a, w, impl) == "bitplane_gemv":
        return _bitplane_gemv(a, w, bias, out)
    wm, wn, ks = _lowbit_config(a.m, w.bits + a.bits - 1)
    return _lowbit_launch(
        f"bitplane_gemm<{w.bits}, {a.bits}, {wm}, {wn}, {ks}, {rt.type_tag(a.dtype)}>",
        a,
        w,
        bias,
        _tile_grid(a, w, wm, wn),
        32 * ks,
        out,
    )


def _bitplane_gemv(a: PackedActivations, w: LowbitWeights, bias, out):
    """Decode-sized M: AND+POPC on CUDA cores, a warp per output row (bandwidth-bound on the planes)."""
    mt = 1 if a.m <= 1 else 4 if a.m <= 4 else 16
    name = f"bitplane_gemv<{w.bits}, {a.bits}, {mt}, {rt.type_tag(a.dtype)}>"
    return _lowbit_launch(name, a, w, bias, (-(-w.n // 4),), 128, out, bounds=True)


def u8_gemm(
    a: PackedActivations,
    w: LowbitWeights,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """y = x_hat @ w_hat^T + bias from u8 codes (activations) and nibbles (weights) on IMMA tensor cores.
    On the GPU, `impl` (default: lowbit_impl) picks 'u8_gemm' (warp tiles, K split over 8 warps at
    M <= 16) or 'u8_gemm_tiled' (64x64 CTA tiles through shared memory)."""
    _check_pair(a, w, "u8")
    if not rt.on_gpu(a.data, w.data):
        return _into(ref.u8_gemm_ref(a, w, bias), out)
    if _lowbit_choice(a, w, impl) == "u8_gemm_tiled":  # cp.async pipeline: grid as for 4x8 fragments, 4 warps
        return _lowbit_launch(f"u8_gemm_tiled<{rt.type_tag(a.dtype)}>", a, w, bias, _tile_grid(a, w, 4, 8), 128, out)
    wm, wn, ks = _lowbit_config(a.m, 3)
    return _lowbit_launch(
        f"u8_gemm<{wm}, {wn}, {ks}, {rt.type_tag(a.dtype)}>", a, w, bias, _tile_grid(a, w, wm, wn), 32 * ks, out
    )


def lowbit_linear(
    x: torch.Tensor, w: LowbitWeights, abits: int, bias: torch.Tensor | None = None, impl: str | None = None
) -> torch.Tensor:
    """Quantize x on the fly and run the GEMM matching the weights' layout (`impl`: see its GEMM)."""
    a = quantize_activations(x, abits, w.segments, w.layout)
    return (bitplane_gemm if w.layout == "planes" else u8_gemm)(a, w, bias, impl=impl)


def _gshift(w: WOnlyWeights) -> int:
    """Kernels find the group of code k as min(k >> gshift, G - 1) (per-channel: 31, always group 0)."""
    return 31 if w.group == w.k else w.group.bit_length() - 1


def _wonly_args(w: WOnlyWeights):
    """The packed-weight pointers every weight-only kernel takes first, and the group shift."""
    if w.scales.dtype != torch.float16 or w.zeros.dtype != torch.uint8:
        raise QtoolError(
            f"weight-only kernels take fp16 scales and uint8 zeros, got {w.scales.dtype} and {w.zeros.dtype}: "
            "pack with pack_wonly"
        )
    return (rt.ptr(w.data), rt.ptr(w.hi), rt.ptr(w.scales), rt.ptr(w.zeros)), _gshift(w)


def dequantize_weights(w: WOnlyWeights, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """w_hat [N, K] in dtype (fp16/bf16 on GPU)."""
    if not rt.on_gpu(w.data):
        return ref.dequantize_wonly(w).to(dtype)
    out = torch.empty(w.n, w.k, dtype=dtype, device=w.data.device)
    wptrs, gshift = _wonly_args(w)
    fn = rt.kernel("wonly_gemv.cu", f"wonly_dequant<{w.bits}, {rt.type_tag(dtype)}>")
    total = w.n * w.row_words
    rt.launch(
        fn,
        (-(-total // 256),),
        (256,),
        (*wptrs, rt.ptr(out), rt.i32(w.n), rt.i32(w.k), rt.i32(w.row_words), rt.i32(w.scales.shape[1]), rt.i32(gshift)),
    )
    return out


def simt_plan(bits: int, group: int, row_words: int, m: int) -> tuple[int, int, int, int, int]:
    """(MT x rows per block, slices, U chunks per row and step, NSEG groups per chunk, shared bytes)
    for wonly_gemv_simt. U and the MT cap keep every instantiation within 128 registers without spills
    (W2/W3 hold more codes per word: U = 1 beyond MT = 1; W3, and W2 when a chunk spans two groups
    (group 32: twice the group constants), spill at MT = 4)."""
    nseg = 2 if bits in (2, 3) and group == 32 else 1
    m = max(m, 1)
    slices = -(-m // (3 if nseg == 2 or bits == 3 else 4))
    mt = -(-m // slices)
    u = 2 if bits in (4, 8) or (mt == 1 and (bits == 2 or nseg == 1)) else 1
    codes = 16 if bits == 3 else 32 // bits  # per data word
    steps = -(-(row_words // 4) // (32 * u))  # x is staged zero-padded to whole steps
    return mt, slices, u, nseg, mt * steps * 32 * u * 4 * codes * 2


def _simt_smem(w: WOnlyWeights, m: int, gated: bool = False, norm: bool = False) -> int:
    """Dynamic shared memory of the SIMT GEMV: x rows, + as many `up` rows (gated), + the norm weight."""
    mt, smem = simt_plan(w.bits, w.group, w.row_words, m)[::4]
    return smem * (2 if gated else 1) + (smem // mt if norm else 0)


def _simt_fits(w: WOnlyWeights, m: int, gated: bool = False, norm: bool = False) -> bool:
    optin = rt.device_attribute("cudaDevAttrMaxSharedMemoryPerBlockOptin", w.data.device.index)
    return _simt_smem(w, m, gated, norm) + 1024 <= optin


def w_only_impl(m: int, w: WOnlyWeights, a_bits: int | None = None, gated: bool = False, norm: bool = False) -> str:
    """The weight-only kernel w_only_gemm runs on the GPU at M rows ('simt', 'mma', 'wgmma' or
    'dequant'), x quantized per token to a_bits in it (None: not), with the prologue's operands (gated,
    norm): the chooser's path (chooser.choose_path), except where that kernel cannot run: the SIMT GEMV
    without room in shared memory for them gives way to the mma GEMV, which takes at most GEMV_ROWS
    rows (dequant above); off sm_90 the wgmma GEMM gives way to the default rule without it."""
    impl = chooser.choose_path("wonly", w.bits, a_bits or 16, w.group, m, w.n, w.k, _device(w.data))
    if impl == "wgmma" and not wgmma_runs(w.data.device):
        impl = chooser.default_path("wonly", w.bits, a_bits or 16, m, wgmma=False)
    if impl == "simt" and not _simt_fits(w, m, gated, norm):
        impl = "mma"
    return "dequant" if impl == "mma" and m > GEMV_ROWS else impl


def wgmma_runs(device: torch.device) -> bool:
    """Whether the wgmma GEMM runs on `device`: wgmma is sm_90a (H100, H200) only."""
    return device.type == "cuda" and _capability(
        torch.cuda.current_device() if device.index is None else device.index
    ) == (9, 0)


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # asked once per GPU: the dispatch asks on every call


def _simt_gemv(
    x: torch.Tensor, w: WOnlyWeights, bias, y: torch.Tensor, gated: bool = False, norm=None, a_bits=None, residual=None
) -> None:
    """Persistent-style grid: as many blocks per x slice as stay resident, and the row groups spread
    evenly over their warps (rounds = ceil(row groups / resident warps)), so no partial last wave.
    gated / norm / a_bits / residual: see w_only_gemm (applied in the kernel)."""
    m = x.shape[0]
    mt, slices, u, nseg, _ = simt_plan(w.bits, w.group, w.row_words, m)
    smem = _simt_smem(w, m, gated, norm is not None)
    if not _simt_fits(w, m, gated, norm is not None):
        raise QtoolError(
            f"the SIMT GEMV needs {smem} B of shared memory for M={m}, K={w.k}: too much for this GPU, use impl='mma'"
        )
    mode = simt_mode(w.bits, w.scales.shape[1], a_bits, gated or norm is not None or residual is not None)
    warps = SIMT_WARPS[mode != SIMT_PLAIN]
    fn = rt.kernel(
        "wonly_gemv.cu", f"wonly_gemv_simt<{w.bits}, {mt}, {u}, {nseg}, {rt.type_tag(x.dtype)}, {mode}, {warps}>"
    )
    sms = rt.device_attribute("cudaDevAttrMultiProcessorCount", x.device.index)
    resident = max(1, rt.blocks_per_sm(fn, 32 * warps, smem) * sms // slices)
    groups = -(-w.n // SIMT_ROWS)
    rounds = -(-groups // (resident * warps))
    nblk = -(-groups // (rounds * warps))
    wptrs, gshift = _wonly_args(w)
    rt.launch(
        fn,
        (nblk * slices,),
        (32 * warps,),
        (
            *wptrs,
            rt.ptr(x),
            rt.ptr(bias),
            rt.ptr(y),
            rt.i32(m),
            rt.i32(w.n),
            rt.i32(w.k),
            rt.i32(w.row_words),
            rt.i32(w.scales.shape[1]),
            rt.i32(gshift),
            rt.i32(nblk),
            rt.i32(x.stride(0)),
            rt.i32(int(gated)),
            rt.ptr(None if norm is None else norm[0]),
            rt.f32(0.0 if norm is None else norm[1]),
            rt.i32(a_bits or 0),
            rt.ptr(residual),
        ),
        shared_mem=smem,
    )


def mma_plan(bits: int, m: int) -> tuple[int, bool]:
    """(NT n-tiles per block, M16) for wonly_gemv at M rows. M16: rows gid + 8 in use; W4/W8 let two
    n-tiles share x loads in 128 registers, W2/W3 would spill."""
    return (1, False) if m <= 8 else ((2, True) if bits in (4, 8) else (1, True))


def _mma_gemv(x: torch.Tensor, w: WOnlyWeights, bias, y: torch.Tensor) -> None:
    m = x.shape[0]
    nt, m16 = mma_plan(w.bits, m)
    wptrs, gshift = _wonly_args(w)
    fn = rt.kernel("wonly_gemv.cu", f"wonly_gemv<{w.bits}, {nt}, {str(m16).lower()}, {rt.type_tag(x.dtype)}>")
    rt.launch(
        fn,
        (-(-w.n // (8 * nt)),),
        (GEMV_THREADS,),
        (
            *wptrs,
            rt.ptr(x),
            rt.ptr(bias),
            rt.ptr(y),
            rt.i32(m),
            rt.i32(w.n),
            rt.i32(w.k),
            rt.i32(w.row_words),
            rt.i32(w.scales.shape[1]),
            rt.i32(gshift),
        ),
    )


def wgmma_plan(bits: int, m: int) -> tuple[int, int]:
    """(NT x rows per block, dynamic shared bytes) of wonly_wgmma at M rows: the smallest instantiated
    NT holding M, else the largest (blocks then tile M)."""
    nt = next((t for t in WG_NT if t >= m), WG_NT[-1])
    row = WG_BK * (2 if bits == 3 else bits) // 8 + 16
    stage = nt * WG_BK * 2 + WG_ROWS * row + (WG_ROWS * WG_BK // 8 if bits == 3 else 0)
    return nt, -(-stage // 128) * 128 * WG_STAGES


def _wgmma_gemm(x: torch.Tensor, w: WOnlyWeights, bias, y: torch.Tensor) -> None:
    """Blocks of 128 weight rows x NT x rows; K split so that the blocks fill the resident slots of
    every SM once (at least 8 k-tiles per split), partials summed by wonly_splitk_reduce."""
    m = x.shape[0]
    nt, smem = wgmma_plan(w.bits, m)
    tag = rt.type_tag(x.dtype)
    fn = rt.kernel("wonly_gemv.cu", f"wonly_wgmma<{w.bits}, {nt}, {tag}>")
    blocks = max(1, rt.blocks_per_sm(fn, WG_THREADS, smem))
    slots = blocks * rt.device_attribute("cudaDevAttrMultiProcessorCount", x.device.index)
    tiles = -(-w.n // WG_ROWS) * -(-m // nt)
    ktiles = -(-w.k // WG_BK)
    splits = max(1, min(slots // tiles, ktiles // 8))
    per = -(-ktiles // splits)
    splits = -(-ktiles // per)
    partial = torch.empty(splits, m, w.n, dtype=torch.float32, device=x.device) if splits > 1 else None
    wptrs, gshift = _wonly_args(w)
    rt.launch(
        fn,
        (-(-w.n // WG_ROWS), -(-m // nt), splits),
        (WG_THREADS,),
        (
            *wptrs,
            rt.ptr(x),
            rt.ptr(bias),
            rt.ptr(y),
            rt.ptr(partial),
            rt.i32(m),
            rt.i32(w.n),
            rt.i32(w.k),
            rt.i32(w.row_words),
            rt.i32(w.scales.shape[1]),
            rt.i32(gshift),
            rt.i32(x.stride(0)),
            rt.i32(per),
        ),
        shared_mem=smem,
    )
    if partial is not None:
        red = rt.kernel("wonly_gemv.cu", f"wonly_splitk_reduce<{tag}>")
        total = m * w.n
        rt.launch(
            red,
            (-(-total // 256),),
            (256,),
            (rt.ptr(partial), rt.ptr(bias), rt.ptr(y), rt.i32(m), rt.i32(w.n), rt.i32(splits)),
        )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its data is 16-byte aligned (the kernels' vector loads), else an aligned copy."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def w_only_gemm(
    x: torch.Tensor,
    w: WOnlyWeights,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    impl: str | None = None,
    *,
    gated: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,
    a_bits: int | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x' @ w_hat^T + bias (+ residual) for fp16/bf16 x [M, K]. On the GPU, `impl` (default:
    w_only_impl) picks the SIMT GEMV ('simt', small M), the tensor-core GEMV ('mma', M <= GEMV_ROWS),
    or one dequantization to x's dtype followed by torch (cuBLAS) matmul ('dequant').

    x' is x after the ops a decoder runs in front of a linear (reference.wonly_prologue_ref): `gated`
    (x is [M, 2K] gate|up, x' = SiLU(gate) * up), `norm` = (weight, eps) (RMSNorm), `a_bits`
    (per-token fake quantization); `residual` [M, N] is added to y as torch adds it. The SIMT GEMV
    applies them to the x it stages and to y as it stores it (one launch instead of up to six); the
    other paths run the reference ops around the product. Over per-channel W2-W4 weights the SIMT
    GEMV keeps x' as codes times the scale (simt_mode), without rounding x' to x's dtype first."""
    x = _check_x(x, 2 * w.k if gated else w.k)
    if impl is not None and impl not in WONLY_IMPLS:
        raise QtoolError(f"impl must be one of {WONLY_IMPLS} or None, got {impl!r}")
    if residual is not None and (residual.shape != (x.shape[0], w.n) or residual.dtype != x.dtype):
        raise QtoolError(
            f"residual must be [{x.shape[0]}, {w.n}] {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
        )
    prologue = gated or norm is not None or bool(a_bits)
    if not rt.on_gpu(x, w.data):
        y = ref.w_only_gemm_ref(ref.wonly_prologue_ref(x, gated, norm, a_bits), w, bias)
        return _into(y if residual is None else residual + y, out)
    rt.type_tag(x.dtype)  # fp16/bf16 only
    m = x.shape[0]
    if impl is None:
        impl = w_only_impl(m, w, a_bits, gated, norm is not None)
    if impl == "mma" and m > GEMV_ROWS:
        raise QtoolError(f"the mma GEMV takes M <= {GEMV_ROWS}, got M={m}: use impl='simt' or 'dequant'")
    if impl == "wgmma" and not wgmma_runs(x.device):
        raise QtoolError("the wgmma GEMM runs on sm_90 (H100, H200) only: use impl='mma' or 'dequant'")
    if bias is not None:
        bias = bias.to(device=x.device, dtype=x.dtype).contiguous()
    if impl != "simt":
        if prologue:
            x = ref.wonly_prologue_ref(x, gated, norm, a_bits)
        y = _output(m, w.n, x.dtype, x.device, None if residual is not None else out)
        if impl == "dequant":
            torch.matmul(x, dequantize_weights(w, x.dtype).T, out=y)
            if bias is not None:
                y.add_(bias)
        elif m:
            (_wgmma_gemm if impl == "wgmma" else _mma_gemv)(_aligned(x), w, bias, y)
        return y if residual is None else _into(residual + y, out)
    y = _output(m, w.n, x.dtype, x.device, out)
    if norm is not None:
        norm = (_aligned(norm[0].to(device=x.device, dtype=x.dtype).contiguous()), float(norm[1]))
    if residual is not None:
        residual = residual.contiguous()
    if m:
        _simt_gemv(_aligned(x), w, bias, y, gated, norm, a_bits, residual)
    return y
