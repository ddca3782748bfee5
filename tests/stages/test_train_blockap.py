"""train-blockap: the stage writes its weights, learned parameters and spec, and eval uses them.
The training maths is tested in tests/quant/ (test_let, test_learned_weights, test_blockwise_train)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qtool.core.checkpoint import layer_key
from qtool.core.errors import QtoolError
from qtool.quant.qparams import QPARAMS


def test_stage_writes_weights_qparams_and_spec(tmp_path, tiny_dir):
    from qtool.stages.eval import EvalParams, evaluate
    from qtool.stages.train_blockap import BlockAPParams, train_blockap

    out = tmp_path / "stage"
    params = BlockAPParams(str(tiny_dir), str(out), preset="abq", spec="W2*A8-g32", samples=2, seqlen=16, epochs=1)
    train_blockap(params, device="cpu")
    tensors = load_file(out / f"qtool-{QPARAMS}.safetensors")
    assert layer_key(0, "self_attn.q_proj", "scale") in tensors and layer_key(2, "mlp.down_proj", "zero") in tensors
    codes = tensors[layer_key(0, "self_attn.q_proj", "codes")]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 4  # W2*: 5 levels
    result = evaluate(EvalParams(str(out), seqlen=16, windows=2), device="cpu")
    assert result.spec == "W2*A8-g32" and result.ppl > 0
    with pytest.raises(QtoolError, match="holds W2\\*A8-g32 weights"):
        evaluate(EvalParams(str(out), spec="W4A16-g32", seqlen=16, windows=2), device="cpu")
