"""qtool pack: packed checkpoints reproduce their stage exactly on the CPU, load and generate, and
refuse bad input; the weight-only exports are readable by the formats' own loaders."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from export_decoders import DECODE
from qtool import kernels
from qtool.core.checkpoint import open_stage
from qtool.core.errors import QtoolError
from qtool.core.quantizer import dequantize_weight, fake_quant_weight, quantize_weight
from qtool.core.spec import parse_spec
from qtool.kernels import reference
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import apply_spec
from qtool.quant.rptq import cluster_bounds
from qtool.runtime.loader import load, open_source
from qtool.runtime.packed_linear import PackedLinear, choose_layout
from qtool.runtime.packed_model import WEIGHTS, load_packed
from qtool.stages.calibrate import CalibrateParams, calibrate
from qtool.stages.eval import EvalParams, evaluate
from qtool.stages.pack import PackParams, pack
from qtool.stages.reorder import ReorderParams, reorder

# every layout: weight-only 2/3/4/8 bits (3-bit uses a second word plane, also under quantized
# activations), u8 (W<=4 x A<=8), planes (W5-8, or asked for)
SPECS = [
    ("W4A16-g32", "auto"),
    ("W3A16", "auto"),
    ("W2A16-g32", "auto"),
    ("W8A16-g64", "auto"),
    ("W2*A16-g32", "auto"),
    ("W4A4", "auto"),
    ("W3A8-g32", "auto"),
    ("W4A4", "u8"),
    ("W4A8-g32", "u8"),
    ("W2A8", "planes"),
    ("W6A8", "auto"),
    ("W4A4KV4", "auto"),
    ("W4A4KV4", "u8"),
    ("W4A16KV3", "auto"),
]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _fake_quant(path, spec):
    model, _ = load(open_source(str(path)))
    apply_spec(model, adapter_for(model.config), parse_spec(spec))
    return model


@pytest.mark.parametrize("spec,layout", SPECS)
def test_packed_model_equals_fake_quantized_stage_exactly(tiny_dir, tmp_path, spec, layout):
    result = pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec=spec, layout=layout))
    packed = load_packed(tmp_path / "p")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(packed, ids), _logits(_fake_quant(tiny_dir, spec), ids))
    assert result.layout == (layout if layout != "auto" else "planes" if spec.startswith("W6") else "wonly")
    # the packed codes are the stage's codes
    float_model, _ = load(open_source(str(tiny_dir)))
    q = float_model.model.layers[1].mlp.down_proj.weight
    linear = packed.model.layers[1].mlp.down_proj
    assert isinstance(linear, PackedLinear)
    assert torch.equal(linear.codes(), quantize_weight(q, parse_spec(spec))[0].long())


def test_packed_opt_with_biases_is_exact(tmp_path, smollm2_tokenizer):
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "opt")
    smollm2_tokenizer.save_pretrained(tmp_path / "opt")
    pack(PackParams(str(tmp_path / "opt"), str(tmp_path / "p"), spec="W4A8"))
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(load_packed(tmp_path / "p"), ids), _logits(_fake_quant(tmp_path / "opt", "W4A8"), ids))


def test_packed_reorder_stage_keeps_gathers_and_clusters(tiny_dir, tmp_path):
    cal, ro = tmp_path / "cal", tmp_path / "ro"
    calibrate(CalibrateParams(str(tiny_dir), str(cal), samples=2, seqlen=32), device="cpu")
    reorder(ReorderParams(str(cal), str(ro), clusters=4, head_clusters=2))
    spec = "W4A4KV4-cluster-dynamic"
    pack(PackParams(str(ro), str(tmp_path / "p"), spec=spec))
    stage = open_source(str(ro))
    ref, _ = load(stage)
    adapter = adapter_for(ref.config)
    apply_spec(ref, adapter, parse_spec(spec), clusters=cluster_bounds(stage.tensors("reorder"), adapter, ref.config))
    packed = load_packed(tmp_path / "p")
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(packed, ids), _logits(ref, ids))
    assert len(packed.model.layers[0].input_layernorm._forward_pre_hooks) == 1  # the RPTQ gather
    with pytest.raises(QtoolError, match="static activation ranges"):
        pack(PackParams(str(ro), str(tmp_path / "q"), spec="W4A4KV4-cluster"))


def test_eval_of_packed_checkpoint_equals_stage_eval(tiny_dir, tmp_path):
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec="W4A4KV4"))
    common = dict(data="wikitext2-valid", seqlen=64, windows=2)
    stage = evaluate(EvalParams(str(tiny_dir), spec="W4A4KV4", **common), device="cpu")
    packed = evaluate(EvalParams(str(tmp_path / "p"), **common), device="cpu")
    assert packed.ppl == stage.ppl and packed.spec == "W4A4KV4"
    assert packed.packed_bytes["linear_bytes"] > 0
    with pytest.raises(QtoolError, match="drop --spec"):
        evaluate(EvalParams(str(tmp_path / "p"), spec="W4A16", **common), device="cpu")


@pytest.mark.parametrize("spec", ["W2A16-g32", "W4A4KV4"])
def test_fp16_eval_of_packed_checkpoint_equals_stage_eval(tiny_dir, tmp_path, spec):
    """In fp16 too: the stage fake-quantizes its stored fp32 weights and then casts, so its fp16
    weights are the packed layers' dequantization (the CPU reference here, as the kernels' below)."""
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec=spec))
    common = {"data": "wikitext2-valid", "seqlen": 64, "windows": 2, "dtype": "float16"}
    stage = evaluate(EvalParams(str(tiny_dir), spec=spec, **common), device="cpu")
    packed = evaluate(EvalParams(str(tmp_path / "p"), **common), device="cpu")
    assert packed.ppl == stage.ppl


def test_pack_dtype_casts_only_the_float_tensors(tiny_dir, tmp_path):
    """--dtype is the dtype of what stays float: codes and scales come from the stored weights."""
    pack(PackParams(str(tiny_dir), str(tmp_path / "p32"), spec="W4A16-g32"))
    pack(PackParams(str(tiny_dir), str(tmp_path / "p16"), spec="W4A16-g32", dtype="float16"))
    f32, f16 = load_file(tmp_path / "p32" / WEIGHTS), load_file(tmp_path / "p16" / WEIGHTS)
    assert f32.keys() == f16.keys()
    for key, value in f32.items():
        packed = key.rpartition(".")[2] in ("qweight", "scales", "zeros")
        assert torch.equal(f16[key], value if packed else value.half()), key


_GPU = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
)


@pytest.mark.parametrize("device", ["cpu", _GPU])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec", ["W2A16-g64", "W4A16-g128", "W4A16"])
def test_kernel_dequantization_is_the_stage_16_bit_weights(spec, dtype, device):
    """At large M a weight-only layer dequantizes to x's dtype (wonly_dequant) and calls cuBLAS: its
    weights must be the stage's bit for bit, as `qtool eval --dtype` makes them (fake quantization
    in fp32, then a cast). The kernel computes fp16 (q - z), exact, times the fp16 scale in fp16
    (HMUL2) or in fp32 then rounds to bf16: one rounding of the exact product, emulated below."""
    torch.manual_seed(0)
    # rows shifted off 0 give groups on one side of it, hence |q - z| = 3 at W2 (inexact products)
    w = torch.randn(96, 512) * 0.05 + torch.linspace(-0.1, 0.1, 96)[:, None]
    s = parse_spec(spec)
    stage = fake_quant_weight(w, s).to(dtype)
    linear = PackedLinear.from_codes(*quantize_weight(w, s), s, "wonly").to(device).to_kernel_form()
    g = torch.arange(w.shape[1]) // (s.group or w.shape[1])
    codes, zeros, scales = linear.codes().cpu(), linear.zeros.cpu().long(), linear.scales16.cpu()
    emulated = ((codes - zeros[:, g]).float() * scales.float()[:, g]).to(dtype)
    kernel = kernels.dequantize_weights(linear._kernel_weights(), dtype).cpu()
    for got in (emulated, kernel):
        assert torch.equal(got.view(torch.int16), stage.view(torch.int16))


def test_generate_matches_the_stage(tiny_dir, tmp_path):
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec="W4A16-g32"))
    ids = torch.tensor([[1, 2, 3, 4]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    import qtool

    out = qtool.load(tmp_path / "p", device="cpu").generate(ids, **kwargs)
    assert torch.equal(out, _fake_quant(tiny_dir, "W4A16-g32").generate(ids, **kwargs))
    assert out.shape == (1, 12)


def test_pack_reports_true_bits_per_weight(tiny_dir, tmp_path):
    result = pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec="W4A16-g32"))
    # tiny llama: 3 blocks of q,o [64,64], k,v [32,64], gate,up [96,64], down [64,96]
    n_params = 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64)
    assert result.linear_params == n_params
    # stored: 4-bit codes (K padded to the GEMV's 128-code blocks), fp32 scale + u8 zero per 32 weights
    padded = 3 * (2 * 64 * 128 + 2 * 32 * 128 + 2 * 96 * 128 + 64 * 128)
    groups = n_params // 32
    assert result.linear_bytes == padded // 2 + 5 * groups
    # on the GPU: fp16 scale + u8 zero per group
    assert result.bits_per_weight_gpu == pytest.approx(8 * (padded // 2 + 3 * groups) / n_params)
    manifest = open_stage(tmp_path / "p").manifest
    assert manifest["stage"] == "pack" and manifest["spec"] == "W4A16-g32"
    assert not list((tmp_path / "p").glob("qtool-*.safetensors"))  # float weights and stage tensors left behind
    assert json.loads((tiny_dir / "config.json").read_text()).get("quantization_config") is None  # parent untouched


@pytest.mark.parametrize(
    "spec,gpu_bits", [("W2A16-g64", 2.375), ("W4A16-g128", 4.1875), ("W3A16", None), ("W4A4", None)]
)
def test_kernel_form_holds_kernel_nbytes(spec, gpu_bits):
    """to_kernel_form keeps exactly the bytes kernel_nbytes counts (bits_per_weight_gpu), and the
    packed codes read back the same from the kernel form."""
    s = parse_spec(spec)
    codes, scale, zero = quantize_weight(torch.randn(48, 512, generator=torch.Generator().manual_seed(0)), s)
    linear = PackedLinear.from_codes(codes, scale, zero, s, choose_layout(s))
    expected = linear.kernel_nbytes
    linear.to_kernel_form()
    assert linear.nbytes == expected == linear.kernel_nbytes
    assert torch.equal(linear.codes(), codes.long())
    if gpu_bits is not None:  # weight-only, K = 512 a whole number of GEMV k-blocks: bits + 24 / group
        assert 8 * expected / codes.numel() == gpu_bits


def test_bad_inputs(tiny_dir, tmp_path):
    with pytest.raises(QtoolError, match="not quantized"):
        pack(PackParams(str(tiny_dir), str(tmp_path / "a")))
    with pytest.raises(QtoolError, match="float"):
        pack(PackParams(str(tiny_dir), str(tmp_path / "a"), spec="W16A8"))
    with pytest.raises(QtoolError, match="weight-only kernels exist"):
        pack(PackParams(str(tiny_dir), str(tmp_path / "a"), spec="W5A16"))
    with pytest.raises(QtoolError, match="per-tensor"):
        pack(PackParams(str(tiny_dir), str(tmp_path / "a"), spec="W4A8-tensor"))
    for spec, layout, match in [
        ("W4A8", "nibbles", "unknown --layout"),
        ("W4A16", "u8", "needs an activation spec"),
        ("W6A8", "u8", "at most 4 bits"),
        ("W6A8", "wonly", "holds"),
    ]:
        with pytest.raises(QtoolError, match=match):
            pack(PackParams(str(tiny_dir), str(tmp_path / "a"), spec=spec, layout=layout))
    with pytest.raises(QtoolError, match="unknown --format"):
        pack(PackParams(str(tiny_dir), str(tmp_path / "a"), spec="W4A16", format="awq"))
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec="W4A16-g32"))
    with pytest.raises(QtoolError, match="already packed"):
        pack(PackParams(str(tmp_path / "p"), str(tmp_path / "b")))
    weights = tmp_path / "p" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.2.mlp.up_proj.qweight"]
    save_file(tensors, weights)
    with pytest.raises(QtoolError, match="lacks model.layers.2.mlp.up_proj.qweight"):
        load_packed(tmp_path / "p")
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(QtoolError, match="truncated or corrupt"):
        load_packed(tmp_path / "p")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_exports_hold_the_stage_weights(tiny_dir, tmp_path, fmt):
    spec = "W4A16-g32-sym" if fmt == "compressed-tensors" else "W4A16-g32"
    result = pack(PackParams(str(tiny_dir), str(tmp_path / "e"), spec=spec, format=fmt))
    assert result.format == fmt
    config = json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == fmt and (config.get("bits") or 4) == 4
    tensors = load_file(tmp_path / "e" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    # every block linear decodes (independent readers of test_exports) exactly to the stage's weights:
    # the formats store fp16 scales, which the stage's scales already are
    float_model, _ = load(open_source(str(tiny_dir)))
    for name, linear in float_model.model.layers.named_modules():
        if isinstance(linear, torch.nn.Linear):
            prefix = f"model.layers.{name}."
            stored = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            codes, scale, zero = quantize_weight(linear.weight, parse_spec(spec))
            expect = dequantize_weight(codes, scale, zero, 32)
            assert torch.equal(DECODE[fmt](stored, 4, 32, fmt == "compressed-tensors").float(), expect), name
    with pytest.raises(QtoolError, match="weight-only"):
        pack(PackParams(str(tiny_dir), str(tmp_path / "x"), spec="W4A8", format=fmt))
    if fmt == "gptq" and importlib.util.find_spec("optimum") is None:  # no GPTQ loader here: one line, not a traceback
        with pytest.raises(QtoolError, match="cannot load"):
            load(open_source(str(tmp_path / "e")))


def test_compressed_tensors_export_loads_in_transformers(tiny_dir, tmp_path):
    """transformers (through the compressed-tensors library) reads the export back to the stage's
    model, up to the fp16 rounding of the weights (the library dequantizes in the scales' dtype)."""
    pytest.importorskip("compressed_tensors", minversion="0.18")
    from transformers import AutoModelForCausalLM

    pack(PackParams(str(tiny_dir), str(tmp_path / "e"), spec="W4A16-g32-sym", format="compressed-tensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(4))
    a, b = _logits(loaded, ids), _logits(_fake_quant(tiny_dir, "W4A16-g32-sym"), ids)
    assert ((a - b).norm() / b.norm()).item() < 2e-3


@pytest.fixture(scope="module")
def smollm2_float(smollm2_dir, smollm2_tokenizer):
    from qtool.core.data import read_text, token_ids

    ids = token_ids(smollm2_tokenizer, read_text("wikitext2-test"))[:128].unsqueeze(0)
    return load(open_source(str(smollm2_dir)))[0], ids


@pytest.mark.parametrize("spec", ["W4A16-g128", "W2A16-g64", "W4A4", "W4A4KV4"])
def test_smollm2_packed_equals_stage_on_real_text(smollm2_float, spec):
    """The acceptance specs on the real model: packed logits (hence perplexity) equal the stage's."""
    import copy

    from qtool.runtime.packed_model import pack_model

    model, ids = copy.deepcopy(smollm2_float[0]), smollm2_float[1]
    adapter = adapter_for(model.config)
    ref = copy.deepcopy(smollm2_float[0])
    apply_spec(ref, adapter, parse_spec(spec))
    pack_model(model, adapter, parse_spec(spec))
    assert torch.equal(_logits(model, ids), _logits(ref, ids))


@pytest.mark.parametrize("device", ["cpu", _GPU])
@pytest.mark.parametrize("spec", ["W2A8", "W4A16-g128", "W4A4"])
def test_packed_linear_takes_a_norm_and_a_residual(spec, device):
    """forward(x, norm=..., residual=...) = residual + forward(RMSNorm(x)): on the CPU by the same ops
    (exactly), on the GPU inside the weight-only GEMV (per-channel W2A8: on integer codes)."""
    torch.manual_seed(1)
    s = parse_spec(spec)
    w = torch.randn(192, 512) * 0.05
    linear = PackedLinear.from_codes(*quantize_weight(w, s), s, choose_layout(s)).to(device)
    dtype = torch.float16 if device != "cpu" else torch.float32
    x = (torch.randn(3, 512) * 3).to(device, dtype)
    nw, res = (torch.rand(512) + 0.5).to(device, dtype), torch.randn(3, 192).to(device, dtype)
    got = linear(x, norm=(nw, 1e-5), residual=res).double()
    expect = (res + linear(reference.rms_norm(x, nw, 1e-5))).double()
    if device == "cpu":
        assert torch.equal(got, expect)
    else:
        assert ((got - expect).norm() / expect.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize(
    "spec,layout",
    [
        ("W4A16-g32", "auto"),
        ("W2A16-g32", "auto"),
        ("W3A16", "auto"),
        ("W8A16-g64", "auto"),
        ("W4A4", "auto"),
        ("W2A8", "auto"),
        ("W4A4", "u8"),
        ("W4A8-g32", "u8"),
        ("W6A8", "auto"),
        ("W4A4KV4", "auto"),
        ("W4A4KV4", "u8"),
    ],
)
def test_packed_linears_on_the_gpu_kernels_match_the_cpu_reference(tiny_dir, tmp_path, spec, layout):
    """Every layout's kernel path (in kernel form: fp32 scales dropped) against the exact CPU
    reference of the same checkpoint, linear by linear on the same fp16 inputs (so activation codes
    agree and only fp16 output rounding and summation order differ); whole-model logits too for the
    weight-only specs (quantized activations would amplify fp16 rounding through code flips)."""
    from qtool.kernels.cuda_runtime import cupy_available

    if not cupy_available():
        pytest.skip("cupy not installed")
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec=spec, layout=layout))
    cpu = load_packed(tmp_path / "p")
    gpu = load_packed(tmp_path / "p", dtype=torch.float16, device="cuda")
    assert all("scales" not in m._buffers for m in gpu.modules() if isinstance(m, PackedLinear))
    gen = torch.Generator().manual_seed(5)
    for name, ref_linear in cpu.model.layers[0].named_modules():
        if not isinstance(ref_linear, PackedLinear) or ref_linear.kv_bits < 16:
            continue  # K/V outputs are re-quantized from 16-bit values on the GPU: codes may flip
        x = torch.randn(5, ref_linear.in_features, generator=gen).half()
        ref = ref_linear(x.float()).double()
        out = gpu.model.layers[0].get_submodule(name)(x.cuda()).double().cpu()
        assert ((out - ref).norm() / ref.norm()).item() < 5e-3, name
    if "A16" in spec:
        ids = torch.randint(0, 1000, (2, 24), generator=gen)
        ref, out = _logits(cpu, ids).double(), _logits(gpu, ids.cuda()).double().cpu()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("spec", ["W4A4KV4", "W2A16-g64"])
def test_fp32_eval_of_packed_checkpoint_on_the_gpu_equals_the_stage(tiny_dir, tmp_path, spec):
    """In fp32 a packed checkpoint keeps its fp32 scales on the GPU and computes the stage's
    arithmetic, so `qtool eval --dtype float32` gives the stage's perplexity there too."""
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec=spec))
    common = dict(data="wikitext2-valid", seqlen=64, windows=4)
    stage = evaluate(EvalParams(str(tiny_dir), spec=spec, **common), device="cuda")
    packed = evaluate(EvalParams(str(tmp_path / "p"), **common), device="cuda")
    assert packed.ppl == pytest.approx(stage.ppl, rel=1e-6)
