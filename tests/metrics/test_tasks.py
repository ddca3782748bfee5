"""Unit tests for zero-shot evaluation: prompts, tokenization rules, metrics and bad input."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.metrics.tasks import (
    KNOWN_TASKS,
    evaluate_tasks,
    results_table,
    task_data_path,
)
from qtool.metrics.zeroshot.definitions import TASKS, task_spec
from qtool.metrics.zeroshot.loglikelihood import LoglikelihoodScorer
from qtool.metrics.zeroshot.metrics import (
    choice_predictions,
    mean_stderr,
    perplexity,
    perplexity_stderr,
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- prompts ---------------------------------------------------------------------------------


def test_piqa_prompt_with_labels_file_beside(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}])
    (tmp_path / "p-labels.lst").write_text("0\n")
    [example] = TASKS["piqa"].build(data)
    assert example.requests == (
        ("Question: Open a jar\nAnswer:", " twist the lid"),
        ("Question: Open a jar\nAnswer:", " eat the lid"),
    )
    assert example.gold == 0


def test_piqa_inline_label_in_gzip_file(tmp_path):
    data = tmp_path / "p.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 1}) + "\n")
    assert TASKS["piqa"].build(data)[0].gold == 1


@pytest.mark.parametrize(
    "record",
    [
        {
            "question": {
                "stem": "Which is a gas?",
                "choices": [{"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}],
            },
            "answerKey": "2",
        },
        {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]}, "answerKey": "2"},
    ],
    ids=["ai2-release", "hf-flattened"],
)
def test_arc_prompt(tmp_path, record):
    [example] = TASKS["arc_challenge"].build(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert example.requests == (
        ("Question: Which is a gas?\nAnswer:", " ice"),
        ("Question: Which is a gas?\nAnswer:", " steam"),
    )
    assert example.gold == 1


def test_winogrande_partial_scoring(tmp_path):
    record = {
        "sentence": "The cup beat the jug because _ was fast.",
        "option1": "the cup",
        "option2": "the jug",
        "answer": "1",
    }
    [example] = TASKS["winogrande"].build(write_jsonl(tmp_path / "w.jsonl", [record]))
    assert example.requests == (
        ("The cup beat the jug because the cup", " was fast."),
        ("The cup beat the jug because the jug", " was fast."),
    )
    assert example.gold == 0


def test_boolq_prompt(tmp_path):
    record = {"passage": "Cats -- Cats purr.", "question": "do cats purr", "label": True, "idx": 0}
    [example] = TASKS["boolq"].build(write_jsonl(tmp_path / "b.jsonl", [record]))
    context = "Cats -- Cats purr.\nQuestion: do cats purr?\nAnswer:"
    assert example.requests == ((context, " no"), (context, " yes"))
    assert example.gold == 1


def test_lambada_last_word(tmp_path):
    [example] = TASKS["lambada_openai"].build(write_jsonl(tmp_path / "l.jsonl", [{"text": 'He said "hi" to  his dog'}]))
    assert example.requests == (('He said "hi" to  his', " dog"),)


def test_bundled_files_load_in_full():
    sizes = {name: len(spec.build(task_data_path(name))) for name, spec in TASKS.items()}
    assert sizes == {
        "piqa": 1838,
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "winogrande": 1267,
        "boolq": 3270,
        "lambada_openai": 5153,
    }


# --- metrics ---------------------------------------------------------------------------------


def test_acc_norm_divides_by_character_length_like_the_harness():
    # "éé" is 2 characters but 4 UTF-8 bytes. Per character: -5/2 = -2.5 vs -8/4 = -2.0 -> choice 1.
    # (Per byte it would be -1.25 vs -2.0 -> choice 0; lm-eval keeps that as acc_bytes, not acc_norm.)
    pred, pred_norm = choice_predictions([-5.0, -8.0], ["éé", "abcd"])
    assert (pred, pred_norm) == (0, 1)


def test_mean_stderr_by_hand():
    # mean 0.75; squared deviations 0.0625*3 + 0.5625 = 0.75; /(n-1) = 0.25; sqrt = 0.5; /sqrt(4) = 0.25
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)


def test_perplexity_and_bootstrap_stderr_replay_the_harness_resamples():
    lls = [-1.0, -3.0, -0.5, -7.25, -2.0]
    assert perplexity(lls) == pytest.approx(math.exp(2.75))
    replicates = []
    for chunk in range(3):  # the harness: chunks of 1000 resamples, chunk i drawn from random.Random(i)
        rnd = random.Random(chunk)
        replicates += [perplexity(rnd.choices(lls, k=len(lls))) for _ in range(1000)]
    mu = sum(replicates) / len(replicates)
    expected = math.sqrt(sum((r - mu) ** 2 for r in replicates) / (len(replicates) - 1))
    assert perplexity_stderr(lls, iters=3000) == pytest.approx(expected, rel=1e-9)


# --- tokenization and scoring rules on a tiny random model -----------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from qtool.models.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


def tiny_model(tokenizer, max_positions=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


def test_context_trailing_space_moves_to_continuation(tokenizer):
    scorer = LoglikelihoodScorer(tiny_model(tokenizer), tokenizer, batch_size=1)
    context_ids, continuation_ids = scorer.encode_pair("Answer: ", "yes")
    assert context_ids == tokenizer.encode("Answer:")
    assert continuation_ids == tokenizer.encode("Answer: yes")[len(context_ids) :]
    assert tokenizer.decode(continuation_ids) == " yes"


def test_empty_context_is_the_prefix_token(tokenizer):
    scorer = LoglikelihoodScorer(tiny_model(tokenizer), tokenizer, batch_size=1)
    context_ids, continuation_ids = scorer.encode_pair("", " word")
    assert context_ids == [tokenizer.bos_token_id]
    assert continuation_ids == tokenizer.encode(" word", add_special_tokens=False)


def test_batch_size_does_not_change_scores(tokenizer):
    model = tiny_model(tokenizer)
    requests = [
        ("A short one", " x"),
        ("A somewhat longer context sentence here", " and a longer tail"),
        ("Mid size text", " y z"),
    ]
    one = LoglikelihoodScorer(model, tokenizer, batch_size=1).score(requests)
    three = LoglikelihoodScorer(model, tokenizer, batch_size=3).score(requests)
    for a, b in zip(one, three):
        assert a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-5)
        assert a.is_greedy == b.is_greedy


def test_long_inputs_keep_their_last_max_length_tokens(tokenizer):
    model = tiny_model(tokenizer, max_positions=16)
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=1)
    context, continuation = " ".join(f"word{i}" for i in range(40)), " end"
    context_ids, continuation_ids = scorer.encode_pair(context, continuation)
    window = (context_ids + continuation_ids)[-17:]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].float(), dim=-1)
    expected = sum(
        logprobs[len(window) - 1 - len(continuation_ids) + i, t].item() for i, t in enumerate(continuation_ids)
    )
    [score] = scorer.score([(context, continuation)])
    assert score.loglikelihood == pytest.approx(expected, abs=1e-5)


def test_evaluate_tasks_reports_metrics_and_renders(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    data = {"boolq": write_jsonl(tmp_path / "b.jsonl", [{"passage": "P", "question": "q", "label": False}] * 3)}
    results = evaluate_tasks(model, tokenizer, ["boolq", "lambada_openai"], limit=2, batch_size=2, data_paths=data)
    assert set(results) == {"boolq", "lambada_openai"}
    assert results["boolq"]["n"] == 2 and set(results["boolq"]) == {"acc", "acc_stderr", "n"}
    assert set(results["lambada_openai"]) == {"perplexity", "perplexity_stderr", "acc", "acc_stderr", "n"}
    assert results_table(results).row_count == 3


# --- bad input -------------------------------------------------------------------------------


def test_unknown_task_lists_known_tasks():
    with pytest.raises(QtoolError) as err:
        task_spec("hellaswag")
    assert "unknown task 'hellaswag'" in str(err.value)
    assert all(name in str(err.value) for name in KNOWN_TASKS)


def test_unknown_task_fails_before_scoring(tokenizer):
    with pytest.raises(QtoolError, match="known tasks: piqa"):
        evaluate_tasks(None, tokenizer, ["piqa", "nope"])


def test_missing_field_names_task_file_line_and_field(tmp_path):
    data = write_jsonl(
        tmp_path / "w.jsonl",
        [
            {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"},
            {"sentence": "A _ b.", "option1": "x", "answer": "2"},
        ],
    )
    with pytest.raises(QtoolError) as err:
        TASKS["winogrande"].build(data)
    message = str(err.value)
    assert message.startswith("winogrande:") and str(data) in message and "line 2" in message and "'option2'" in message


def test_piqa_without_labels_says_how_to_fix(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(QtoolError, match=r"piqa: .*line 1 is missing field 'label'.*p-labels.lst"):
        TASKS["piqa"].build(data)


def test_missing_task_file(tmp_path):
    with pytest.raises(QtoolError, match="boolq: task file .* does not exist"):
        TASKS["boolq"].build(tmp_path / "absent.jsonl")
