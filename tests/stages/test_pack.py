"""qtool pack: packed checkpoints reproduce their stage exactly on the CPU, load and generate, and
refuse bad input; the weight-only exports are readable by the formats' own loaders."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from export_decoders import DECODE
from qtool.core.checkpoint import open_stage
from qtool.core.errors import QtoolError
from qtool.core.quantizer import dequantize_weight, quantize_weight
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import apply_spec
from qtool.quant.rptq import cluster_bounds
from qtool.runtime.loader import load, open_source
from qtool.runtime.packed_linear import PackedLinear
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
