"""qtool generate: the Decoder (packed checkpoints) and transformers (other models) continue greedily."""

from __future__ import annotations

import torch

from qtool.runtime.packed_model import load_packed
from qtool.stages.pack import PackParams, pack


def test_qtool_generate_cli_continues_like_transformers_greedy(tiny_dir, tmp_path):
    """`qtool generate` on a packed checkpoint (Decoder) and on an OPT model (no Decoder: transformers)
    gives transformers' greedy tokens for the same loaded model."""
    import json

    from typer.testing import CliRunner

    from qtool.cli import app
    from qtool.models.loading import load_tokenizer
    from qtool.runtime.generate import generate_text

    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec="W4A8-g32"))
    tokenizer = load_tokenizer(tiny_dir)
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = load_packed(tmp_path / "p").generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[
            0, ids.shape[1] :
        ]
    result = CliRunner().invoke(
        app, ["generate", str(tmp_path / "p"), "--prompt", prompt, "--max-new-tokens", "6", "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["runtime"] == "qtool" and row["new_tokens"] == 6
    assert row["text"] == tokenizer.decode(want, skip_special_tokens=True)
    bad = CliRunner().invoke(app, ["generate", str(tmp_path / "p"), "--prompt", ""])
    assert bad.exit_code != 0

    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    ).eval()
    opt.save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    with torch.no_grad():
        want = opt.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    row = generate_text(str(tmp_path / "opt"), prompt, 4, device="cpu")
    assert row["runtime"] == "transformers" and row["text"] == tokenizer.decode(want, skip_special_tokens=True)


def test_prompt_longer_than_the_context_is_refused_before_loading(tiny_dir, monkeypatch):
    """prompt + new tokens > max_position_embeddings: one line, and the model is never loaded."""
    import json

    import pytest

    import qtool.runtime.loader as loader
    from qtool.core.errors import QtoolError
    from qtool.models.loading import load_tokenizer
    from qtool.runtime.generate import generate_text

    context = json.loads((tiny_dir / "config.json").read_text())["max_position_embeddings"]
    prompt = "hello " * (context + 10)
    tokens = len(load_tokenizer(tiny_dir)(prompt).input_ids)
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(QtoolError) as info:
        generate_text(str(tiny_dir), prompt, 4, device="cpu")
    assert str(info.value) == (
        f"prompt is {tokens} tokens + 4 new > the model's context {context}; "
        "shorten the prompt or lower --max-new-tokens"
    )
    short = len(load_tokenizer(tiny_dir)("hello world").input_ids)
    with pytest.raises(
        QtoolError, match=rf"prompt is {short} tokens \+ {context + 1 - short} new > the model's context"
    ):
        generate_text(str(tiny_dir), "hello world", context + 1 - short, device="cpu")
