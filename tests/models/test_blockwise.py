"""The block-by-block runner computes the whole model's forward."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from qtool.models.adapters import adapter_for
from qtool.models.blockwise import blockwise_logits
from qtool.models.loading import load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_equals_whole_model_float64(family):
    model = tiny_model(family).double()
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    got = blockwise_logits(model, adapter_for(model.config), ids, torch.device("cpu"), batch_size=2)
    assert torch.allclose(got, reference, rtol=0, atol=1e-12)


def test_blockwise_equals_whole_model_smollm2(smollm2_dir):
    model = load_model(smollm2_dir)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
    got = blockwise_logits(model, adapter_for(model.config), ids, torch.device("cpu"))
    assert torch.allclose(got, reference, rtol=0, atol=1e-4)
    assert (got - reference).abs().max() < 1e-4 * reference.abs().max()
