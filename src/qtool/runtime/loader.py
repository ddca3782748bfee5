"""Open a model reference (id, directory, stage, packed checkpoint) and load it as a model."""

from __future__ import annotations

import torch

from qtool.core.checkpoint import StageDir, check_model_files, open_stage
from qtool.models.adapters import adapter_for
from qtool.models.loading import check_weight_shapes, load_model, load_tokenizer, resolve_model
from qtool.runtime.gathers import install_gathers
from qtool.runtime.packed_model import load_packed, read_quantization_config


def open_source(ref: str) -> StageDir:
    """Resolve a model reference to a checked model or stage directory: every hostile input (broken or
    unsupported config.json, custom code, pickle files, corrupt weights, a config that disagrees with
    the weights' shapes) is refused here in one line, before any command does work."""
    path = resolve_model(ref)
    stage = open_stage(path)
    check_model_files(path)
    check_weight_shapes(path)
    return stage


def load(stage: StageDir, dtype: torch.dtype = torch.float32):
    """(model on CPU, tokenizer) of a model or stage directory. A reordered stage (RPTQ) gets its
    norms' output gathers back: they are part of the model but not of the transformers weights.
    A packed checkpoint (`qtool pack`) loads with its packed linears."""
    if read_quantization_config(stage.path) is not None:
        return load_packed(stage.path, dtype), load_tokenizer(stage.path)
    model = load_model(stage.path, dtype=dtype, device="cpu")
    if stage.has_tensors("reorder"):
        install_gathers(model, adapter_for(model.config), stage.tensors("reorder"))
    return model, load_tokenizer(stage.path)
