"""Cross-check qtool's zero-shot evaluation against lm-evaluation-harness itself.

Both sides score the same SmolLM2 model object on the first few documents of each bundled task
file. The harness runs its own task YAMLs (prompts, choices, metrics) with only the dataset
source swapped for local JSONL files in the Hugging Face layout it normally downloads; qtool
reads the bundled files in their original release layout. The test asserts identical request
strings, per-request loglikelihoods within 1e-4, identical greedy flags, and equal metrics.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (pip install lm-eval); harness cross-check skipped"
)

from qtool.metrics.tasks import KNOWN_TASKS, run_task, task_data_path  # noqa: E402
from qtool.models.loading import load_model, load_tokenizer, resolve_model  # noqa: E402

DOCS_PER_TASK = 8
LL_TOLERANCE = 1e-4
HARNESS_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
HARNESS_SPLIT = {"piqa": "validation", "winogrande": "validation", "boolq": "validation"}  # others: test


def _first_lines(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line for _, line in zip(range(n), handle)]


def _hf_records(task: str, n: int) -> list[dict]:
    """The first n documents in the layout of the Hugging Face dataset the harness loads."""
    path = task_data_path(task)
    records = [json.loads(line) for line in _first_lines(path, n)]
    if task == "piqa":
        labels = _first_lines(path.with_name("piqa.val-labels.lst.gz"), n)
        return [{**r, "label": int(label)} for r, label in zip(records, labels)]
    if task.startswith("arc_"):
        return [
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]],
                },
                "answerKey": r["answerKey"],
            }
            for r in records
        ]
    if task == "winogrande":
        return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in records]
    return records


def _harness_config(task: str, data_file: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / HARNESS_YAML[task], resolve_func=True)
    split = HARNESS_SPLIT.get(task, "test")
    config.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data_file)}},
        training_split=None,
        validation_split=split if split == "validation" else None,
        test_split=split if split == "test" else None,
    )
    return config


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model("smollm2-135m")
    return load_model(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def harness_output(smollm2, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("harness_data")
    configs = []
    for task in KNOWN_TASKS:
        data_file = folder / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in _hf_records(task, DOCS_PER_TASK)), encoding="utf-8")
        configs.append(_harness_config(task, data_file))
    harness_lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    return lm_eval.simple_evaluate(model=harness_lm, tasks=configs, limit=DOCS_PER_TASK, log_samples=True)


@pytest.mark.slow
@pytest.mark.parametrize("task", KNOWN_TASKS)
def test_matches_harness(task, smollm2, harness_output):
    model, tokenizer = smollm2
    ours = run_task(model, tokenizer, task, limit=DOCS_PER_TASK, batch_size=3)  # a different batch size on purpose
    samples = sorted(harness_output["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours.examples) == DOCS_PER_TASK

    for sample, example, scores in zip(samples, ours.examples, ours.scores):
        assert [tuple(args) for args in sample["arguments"]] == list(example.requests)
        for (harness_ll, harness_greedy), score in zip(sample["filtered_resps"], scores):
            assert abs(harness_ll - score.loglikelihood) < LL_TOLERANCE
            assert harness_greedy == score.is_greedy

    harness = harness_output["results"][task]
    for metric, value in ours.metrics.items():
        if metric == "n":
            continue
        expected = harness[metric.replace("_stderr", "") + ("_stderr,none" if metric.endswith("_stderr") else ",none")]
        if metric.startswith("perplexity"):  # a smooth function of loglikelihoods that agree to 1e-4
            assert math.isclose(value, expected, rel_tol=1e-3)
        else:  # accuracies and their stderrs follow from identical per-document decisions
            assert value == pytest.approx(expected, abs=1e-12)
