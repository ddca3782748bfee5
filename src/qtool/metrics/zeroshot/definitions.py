"""The six zero-shot tasks, each turning a task file into loglikelihood requests as lm-eval 0.4 does.

Prompts, choices and gold indices follow lm-eval's task YAMLs (piqa, arc_easy, arc_challenge,
winogrande, super_glue/boolq, lambada_openai) with zero few-shot examples and the default
target delimiter " ", so scores are comparable with published harness numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from qtool.core.errors import QtoolError
from qtool.metrics.zeroshot.taskfiles import read_labels, read_records, record_error

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Example:
    """One document as loglikelihood requests: (context, continuation) per choice."""

    requests: tuple[tuple[str, str], ...]
    gold: int  # index of the correct request (lambada has one request, gold 0)
    choice_texts: tuple[str, ...]  # the harness divides by len() of these for acc_norm


@dataclass(frozen=True)
class TaskSpec:
    name: str
    default_file: str  # under data/tasks/
    metrics: tuple[str, ...]  # in the harness's reporting order
    build: Callable[[Path], list[Example]]


def _choice_example(context: str, choices: list[str], gold: int) -> Example:
    requests = tuple((context, TARGET_DELIMITER + choice) for choice in choices)
    return Example(requests=requests, gold=gold, choice_texts=tuple(choices))


def _labels_beside(path: Path) -> Path:
    """piqa.val.jsonl.gz -> piqa.val-labels.lst.gz, the layout of the PIQA release."""
    name = path.name
    compressed = name.endswith(".gz")
    stem = name[: -len(".gz")] if compressed else name
    stem = stem[: -len(".jsonl")] if stem.endswith(".jsonl") else stem
    return path.with_name(stem + "-labels.lst" + (".gz" if compressed else ""))


def _binary_label(task: str, path: Path, record: dict, value) -> int:
    if str(value) not in ("0", "1"):
        raise record_error(task, path, record, f"has label {value!r}; labels must be 0 or 1")
    return int(str(value))


def build_piqa(path: Path) -> list[Example]:
    records = read_records("piqa", path, ("goal", "sol1", "sol2"))
    if all("label" in r for r in records):
        labels = [r["label"] for r in records]
    else:
        labels_path = _labels_beside(path)
        if not labels_path.is_file():
            raise QtoolError(
                f"piqa: {path} line {next(r['_line'] for r in records if 'label' not in r)} is missing field 'label' "
                f"and there is no labels file {labels_path}; "
                'add "label": 0 or 1 to each line or put the labels file beside it'
            )
        labels = read_labels("piqa", labels_path)
        if len(labels) != len(records):
            raise QtoolError(
                f"piqa: {labels_path} has {len(labels)} labels for {len(records)} lines of {path}; "
                "give one label per line"
            )
    return [
        _choice_example(
            f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], _binary_label("piqa", path, r, label)
        )
        for r, label in zip(records, labels)
    ]


def _arc_question_and_choices(task: str, path: Path, record: dict) -> tuple[str, list[str], list[str]]:
    """Accept AI2's release format and Hugging Face's flattened ai2_arc format."""
    question = record["question"]
    if isinstance(question, dict):  # AI2: {"stem", "choices": [{"text", "label"}]}
        if "stem" not in question or "choices" not in question:
            missing = "question.stem" if "stem" not in question else "question.choices"
            raise record_error(task, path, record, f"is missing field '{missing}'")
        return question["stem"], [c["text"] for c in question["choices"]], [c["label"] for c in question["choices"]]
    choices = record.get("choices")  # HF: "question": str, "choices": {"text": [...], "label": [...]}
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise record_error(task, path, record, "is missing field 'choices' (with 'text' and 'label' lists)")
    return question, list(choices["text"]), list(choices["label"])


def _build_arc(task: str) -> Callable[[Path], list[Example]]:
    def build(path: Path) -> list[Example]:
        examples = []
        for record in read_records(task, path, ("question", "answerKey")):
            question, texts, labels = _arc_question_and_choices(task, path, record)
            if record["answerKey"] not in labels:
                raise record_error(
                    task, path, record, f"has answerKey {record['answerKey']!r}, not one of the choice labels {labels}"
                )
            examples.append(_choice_example(f"Question: {question}\nAnswer:", texts, labels.index(record["answerKey"])))
        return examples

    return build


def build_winogrande(path: Path) -> list[Example]:
    """Partial scoring: each option fills the blank in the context; both score the same continuation."""
    examples = []
    for record in read_records("winogrande", path, ("sentence", "option1", "option2", "answer")):
        sentence = record["sentence"]
        if "_" not in sentence:
            raise record_error("winogrande", path, record, "has no '_' blank in 'sentence'")
        if str(record["answer"]) not in ("1", "2"):
            raise record_error("winogrande", path, record, f'has answer {record["answer"]!r}; it must be "1" or "2"')
        blank = sentence.index("_")
        contexts = [sentence[:blank] + record["option1"], sentence[:blank] + record["option2"]]
        continuation = TARGET_DELIMITER + sentence[blank + 1 :].strip()
        examples.append(
            Example(
                requests=tuple((context, continuation) for context in contexts),
                gold=int(str(record["answer"])) - 1,
                choice_texts=tuple(contexts),
            )
        )
    return examples


def build_boolq(path: Path) -> list[Example]:
    examples = []
    for record in read_records("boolq", path, ("passage", "question", "label")):
        label = record["label"]
        gold = int(label) if isinstance(label, bool) else _binary_label("boolq", path, record, label)
        context = f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"
        examples.append(_choice_example(context, ["no", "yes"], gold))
    return examples


def build_lambada(path: Path) -> list[Example]:
    """The target is the last space-separated word; the context is everything before it."""
    examples = []
    for record in read_records("lambada_openai", path, ("text",)):
        words = record["text"].split(" ")
        target = TARGET_DELIMITER + words[-1]
        examples.append(Example(requests=((" ".join(words[:-1]), target),), gold=0, choice_texts=(words[-1],)))
    return examples


CHOICE_METRICS = ("acc", "acc_norm")

TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            TaskSpec("piqa", "piqa.val.jsonl.gz", CHOICE_METRICS, build_piqa),
            TaskSpec("arc_easy", "arc_easy.test.jsonl.gz", CHOICE_METRICS, _build_arc("arc_easy")),
            TaskSpec("arc_challenge", "arc_challenge.test.jsonl.gz", CHOICE_METRICS, _build_arc("arc_challenge")),
            TaskSpec("winogrande", "winogrande.dev.jsonl.gz", ("acc",), build_winogrande),
            TaskSpec("boolq", "boolq.val.jsonl.gz", ("acc",), build_boolq),
            TaskSpec("lambada_openai", "lambada_openai.test.jsonl.gz", ("perplexity", "acc"), build_lambada),
        )
    }
)


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise QtoolError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
