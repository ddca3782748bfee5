"""qtool's perplexity against a plain transformers loop, and fake quantization against explicit math."""

import math

import torch

from qtool.core.data import eval_windows, read_text, token_ids
from qtool.core.paths import bundled_dir
from qtool.models.loading import load_model, load_tokenizer
from qtool.stages.eval import EvalParams, evaluate


def test_perplexity_matches_plain_transformers_loop(smollm2_dir):
    result = evaluate(EvalParams(str(smollm2_dir), seqlen=128, windows=3), device="cpu", batch_size=2)
    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    raw = (bundled_dir("data") / "wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    text = "\n\n".join("" if line.strip() == "" else line for line in raw.splitlines(keepends=True))
    ids = tok(text, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    for w in range(3):
        window = ids[w * 128 : (w + 1) * 128][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits.double(), -1)
        total -= logp[0, :-1].gather(1, window[0, 1:, None]).sum().item()
        count += 127
    assert result.windows == 3 and result.seqlen == 128 and result.spec == "W16A16"
    assert math.isclose(result.ppl, math.exp(total / count), rel_tol=1e-5)


def test_rtn_eval_equals_manual_fake_quantization(tiny_dir):
    """W4A16-g32 through qtool equals quantizing every block linear by hand with float64 math."""
    from qtool.metrics.perplexity import perplexity, window_nlls

    result = evaluate(EvalParams(str(tiny_dir), spec="W4A16-g32", seqlen=32, windows=2), device="cpu")
    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, torch.nn.Linear) and ".layers." in name:
                w = lin.weight.double().reshape(lin.weight.shape[0], -1, 32)
                lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
                s = (hi - lo) / 15
                z = torch.round(-lo / s).clamp(0, 15)
                s = s.half().double()  # codes with the scale rounded to fp16, as packed checkpoints hold it
                q = (torch.round(w / s) + z).clamp(0, 15)
                lin.weight.copy_(((q - z) * s).reshape_as(lin.weight).float())
    windows = eval_windows(token_ids(tok, read_text("wikitext2-test")), 32, 2)
    expected = perplexity(window_nlls(model, windows, torch.device("cpu")))
    assert math.isclose(result.ppl, expected, rel_tol=1e-5)
    assert result.memory["weight_bits_per_param"] > 4
