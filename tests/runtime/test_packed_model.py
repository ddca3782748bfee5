"""Packed models: the acceptance specs on SmolLM2 equal their stage exactly, and on a GPU every
layout's kernels match the CPU reference of the same checkpoint."""

import pytest
import torch

from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import apply_spec
from qtool.runtime.loader import load, open_source
from qtool.runtime.packed_linear import PackedLinear
from qtool.runtime.packed_model import load_packed
from qtool.stages.pack import PackParams, pack


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


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
