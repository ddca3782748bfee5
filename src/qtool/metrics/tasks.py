"""Zero-shot accuracy on piqa, arc_easy, arc_challenge, winogrande, boolq and lambada_openai.

Numbers match lm-evaluation-harness 0.4 (zero-shot, HFLM on the same model object): the same
prompts, tokenization, metrics and standard errors, checked example by example in
tests/test_tasks_harness.py. The model can be any transformers CausalLM already on its device,
including one whose modules qtool has replaced with fake-quantized ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from qtool.core.errors import QtoolError
from qtool.core.paths import bundled_dir
from qtool.metrics.zeroshot.definitions import TASKS, Example, TaskSpec, task_spec
from qtool.metrics.zeroshot.loglikelihood import LoglikelihoodScorer, Score
from qtool.metrics.zeroshot.metrics import (
    choice_predictions,
    mean,
    mean_stderr,
    perplexity,
    perplexity_stderr,
)

KNOWN_TASKS: tuple[str, ...] = tuple(TASKS)


@dataclass(frozen=True)
class TaskRun:
    """Everything one task produced: the requests, their scores, and the aggregated metrics."""

    task: str
    examples: list[Example]
    scores: list[list[Score]]  # per example, one Score per request
    metrics: dict[str, float | int]


def task_data_path(task: str, data_paths: Mapping[str, Path] | None = None) -> Path:
    """The user's file for `task` if given, else the bundled data/tasks file."""
    spec = task_spec(task)
    if data_paths and task in data_paths:
        return Path(data_paths[task]).expanduser()
    return bundled_dir("data") / "tasks" / spec.default_file


def _metrics(spec: TaskSpec, examples: list[Example], scores: list[list[Score]]) -> dict[str, float | int]:
    per_metric: dict[str, list[float]] = {name: [] for name in spec.metrics}
    for example, example_scores in zip(examples, scores):
        lls = [s.loglikelihood for s in example_scores]
        if "perplexity" in per_metric:  # lambada: one request, acc is the greedy check
            per_metric["perplexity"].append(lls[0])
            per_metric["acc"].append(float(example_scores[0].is_greedy))
            continue
        pred, pred_norm = choice_predictions(lls, example.choice_texts)
        per_metric["acc"].append(float(pred == example.gold))
        if "acc_norm" in per_metric:
            per_metric["acc_norm"].append(float(pred_norm == example.gold))
    metrics: dict[str, float | int] = {}
    for name, values in per_metric.items():
        if name == "perplexity":
            metrics[name], metrics[f"{name}_stderr"] = perplexity(values), perplexity_stderr(values)
        else:
            metrics[name], metrics[f"{name}_stderr"] = mean(values), mean_stderr(values)
    metrics["n"] = len(examples)
    return metrics


@contextlib.contextmanager
def _progress_bar(progress: Progress | None):
    if progress is not None:
        yield progress
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as own:
        yield own


def run_task(
    model,
    tokenizer,
    task: str,
    limit: int | None = None,
    batch_size: int = 8,
    data_path: Path | None = None,
    progress: Progress | None = None,
) -> TaskRun:
    """Score the first `limit` documents of one task (all when None), as the harness's --limit does."""
    spec = task_spec(task)
    if limit is not None and limit < 1:
        raise QtoolError(f"limit must be a positive number of documents, got {limit}")
    path = Path(data_path) if data_path is not None else task_data_path(task)
    examples = spec.build(path)[:limit]
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size)
    requests = [request for example in examples for request in example.requests]
    with _progress_bar(progress) as bar:
        bar_id = bar.add_task(f"{task} ({len(examples)} docs)", total=len(requests))
        flat = scorer.score(requests, advance=lambda n: bar.advance(bar_id, n))
    scores, start = [], 0
    for example in examples:
        scores.append(flat[start : start + len(example.requests)])
        start += len(example.requests)
    return TaskRun(task=task, examples=examples, scores=scores, metrics=_metrics(spec, examples, scores))


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    data_paths: Mapping[str, Path] | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, float | int]]:
    """{task: {metric: value, metric_stderr: value, "n": docs}} for each task, in the given order."""
    for task in tasks:
        task_spec(task)  # fail on a bad name before any scoring
    for task in data_paths or {}:
        if task not in tasks:
            raise QtoolError(
                f"task data given for '{task}', which is not among the tasks run ({', '.join(tasks)}); "
                "add it to --tasks or drop its --task-data"
            )
    with _progress_bar(progress) as bar:
        return {
            task: run_task(model, tokenizer, task, limit, batch_size, task_data_path(task, data_paths), bar).metrics
            for task in tasks
        }


def _fmt(value: float) -> str:
    return "N/A" if math.isnan(value) else f"{value:.4f}"


def results_table(results: Mapping[str, Mapping[str, float | int]], title: str = "zero-shot") -> Table:
    """One row per task and metric, laid out like the harness's results table."""
    table = Table(title=title)
    for column, justify in (
        ("Task", "left"),
        ("Metric", "left"),
        ("Value", "right"),
        ("Stderr", "right"),
        ("N", "right"),
    ):
        table.add_column(column, justify=justify)
    for task, metrics in results.items():
        names = [name for name in metrics if name != "n" and not name.endswith("_stderr")]
        for i, name in enumerate(names):
            table.add_row(
                task if i == 0 else "",
                name,
                _fmt(metrics[name]),
                "± " + _fmt(metrics[f"{name}_stderr"]),
                str(metrics["n"]) if i == 0 else "",
            )
    return table
