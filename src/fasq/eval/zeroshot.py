"""Zero-shot accuracy through lm-evaluation-harness (lm-eval 0.4.x), also offline.

`evaluate_tasks(model, tokenizer, ["arc_easy", "piqa"], data_dir=...)` wraps any
already-loaded causal LM (a plain transformers model, or one of ours whose linear
layers are PQLinear) in lm-eval's `HFLM` and runs lm-eval's own task definitions:
the standard 0-shot log-likelihood protocol, `acc` (sum of log-probabilities of each
choice) and `acc_norm` (the same divided by the choice's length in bytes).

The Hub is unreachable on the project's machines, so six tasks can also be read from
the official release files under `data_dir` (layout in docs/tasks.md). Only the
*data source* is replaced: the rows are converted to the schema of the Hub copy that
lm-eval's YAML expects, and the task is built from a YAML that `include`s lm-eval's
own one and overrides just `dataset_path`/`dataset_kwargs`/splits. Prompt, choices,
target, HellaSwag's preprocessing, WinoGrande's partial scoring and the metrics are
therefore lm-eval's, and the numbers are comparable with published ones.

The module is in two halves: pure conversion of release files into Hub-schema rows
(no lm-eval import, cheap to test), then the lm-eval calls.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # lm-eval is heavy (2 s import) and optional: import it lazily
    from lm_eval.api.task import Task

log = logging.getLogger(__name__)

LAYOUT_DOC = "docs/tasks.md"
DATA_DIR_ENV = "FASQ_DATA_DIR"
Row = dict[str, Any]


class TaskDataError(FileNotFoundError):
    """A task's local files are missing or malformed; the message names file and doc."""


# --------------------------------------------------------------------------- data
# Pure conversion: official release rows -> rows shaped like the Hub dataset that
# lm-eval's task YAML reads. Keep these free of lm-eval so they stay easy to check.


def read_jsonl(path: Path) -> list[Row]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_labels(path: Path) -> list[str]:
    """One label a line (PIQA's valid-labels.lst, WinoGrande's dev-labels.lst)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _check_aligned(rows: Sequence[Row], labels: Sequence[str], path: Path) -> None:
    # The label file is aligned by line; a count mismatch means every label is off.
    if len(rows) != len(labels):
        raise TaskDataError(f"{path}: {len(labels)} labels for {len(rows)} rows; the "
                            f"label file must be aligned line by line (see {LAYOUT_DOC})")


def convert_arc(rows: Iterable[Row]) -> list[Row]:
    """Official ARC jsonl -> allenai/ai2_arc schema (id, question, choices, answerKey).

    Labels stay as released (letters, or digits "1".."5" for some rows), exactly as on
    the Hub: lm-eval's target is `choices.label.index(answerKey)`, so answerKey "1" with
    labels ["1", "2", "3", "4"] is choice 0.
    """
    out = []
    for r in rows:
        q = r["question"]
        labels = [str(c["label"]) for c in q["choices"]]
        key = str(r["answerKey"])
        if key not in labels:
            raise TaskDataError(f"ARC row {r.get('id')}: answerKey {key!r} not among {labels}")
        out.append({
            "id": r.get("id", ""),
            "question": q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": labels},
            "answerKey": key,
        })
    return out


def convert_piqa(rows: Sequence[Row], labels: Sequence[str]) -> list[Row]:
    """PIQA valid.jsonl + valid-labels.lst -> baber/piqa schema (goal, sol1, sol2, label)."""
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(rows, labels, strict=True)]


def convert_hellaswag(rows: Iterable[Row]) -> list[Row]:
    """Official hellaswag_val.jsonl -> Rowan/hellaswag schema.

    Text is left raw: lm-eval's `process_docs` does the bracket clean-up and builds
    `query`/`choices`/`gold`. The Hub stores `label` as a string, so do we.
    """
    keep = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings",
            "source_id", "split", "split_type")
    return [{**{k: r[k] for k in keep if k in r}, "label": str(r["label"])} for r in rows]


def convert_winogrande(rows: Sequence[Row], labels: Sequence[str] | None) -> list[Row]:
    """WinoGrande dev.jsonl (+ dev-labels.lst) -> allenai/winogrande schema.

    `answer` must be the string "1" or "2" (lm-eval maps it with a str-keyed dict).
    The label file wins when given; otherwise the jsonl's own `answer` is used.
    """
    out = []
    for i, r in enumerate(rows):
        answer = str(labels[i] if labels is not None else r.get("answer", "")).strip()
        if answer not in ("1", "2"):
            raise TaskDataError(f"WinoGrande row {i}: answer {answer!r} is not '1' or '2' "
                                f"(give dev-labels.lst, see {LAYOUT_DOC})")
        if "_" not in r["sentence"]:
            raise TaskDataError(f"WinoGrande row {i}: sentence has no '_' blank")
        out.append({"sentence": r["sentence"], "option1": r["option1"],
                    "option2": r["option2"], "answer": answer})
    return out


def convert_lambada(rows: Iterable[Row]) -> list[Row]:
    """OpenAI lambada_test.jsonl -> EleutherAI/lambada_openai schema ({"text"})."""
    return [{"text": r["text"]} for r in rows]


@dataclass(frozen=True)
class LocalTask:
    """Where one lm-eval task's rows live under data_dir and how to convert them."""

    name: str                # lm-eval task name (also the key in the results)
    yaml: str                # lm-eval's own task YAML, relative to lm_eval/tasks
    split: str               # the split lm-eval evaluates for this task
    data_file: str           # relative to data_dir
    labels_file: str | None  # aligned label file, relative to data_dir
    labels_required: bool
    convert: Callable[[list[Row], list[str] | None], list[Row]]
    source: str              # where the files come from, for error messages


def _arc(rows: list[Row], _: list[str] | None) -> list[Row]:
    return convert_arc(rows)


LOCAL_TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("arc_easy", "arc/arc_easy.yaml", "test", "arc/ARC-Easy-test.jsonl", None, False,
              _arc, "allenai ARC-V1-Feb2018 release"),
    LocalTask("arc_challenge", "arc/arc_challenge.yaml", "test", "arc/ARC-Challenge-test.jsonl",
              None, False, _arc, "allenai ARC-V1-Feb2018 release"),
    LocalTask("piqa", "piqa/piqa.yaml", "validation", "piqa/valid.jsonl",
              "piqa/valid-labels.lst", True, convert_piqa, "ybisk/ybisk.github.io piqa/data"),
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation",
              "hellaswag/hellaswag_val.jsonl", None, False,
              lambda rows, _: convert_hellaswag(rows), "rowanz/hellaswag data/"),
    LocalTask("winogrande", "winogrande/default.yaml", "validation", "winogrande/dev.jsonl",
              "winogrande/dev-labels.lst", False, convert_winogrande,
              "allenai/winogrande release (winogrande_1.1.zip)"),
    LocalTask("lambada_openai", "lambada/lambada_openai.yaml", "test",
              "lambada/lambada_test.jsonl", None, False,
              lambda rows, _: convert_lambada(rows), "OpenAI lambada_test.jsonl"),
)}


def _require(path: Path, task: LocalTask) -> Path:
    if not path.is_file():
        raise TaskDataError(
            f"task {task.name!r}: expected file {path} is missing ({task.source}; "
            f"layout of data_dir in {LAYOUT_DOC}). Put it there, point data_dir / "
            f"{DATA_DIR_ENV} elsewhere, or pass data_dir=None to use the Hub.")
    return path


def load_local_docs(task: str | LocalTask, data_dir: str | os.PathLike) -> list[Row]:
    """Read one task's release files under data_dir and return Hub-schema rows."""
    spec = LOCAL_TASKS[task] if isinstance(task, str) else task
    root = Path(data_dir)
    rows = read_jsonl(_require(root / spec.data_file, spec))
    labels = None
    if spec.labels_file is not None:
        lpath = root / spec.labels_file
        if spec.labels_required or lpath.is_file():
            labels = read_labels(_require(lpath, spec))
            _check_aligned(rows, labels, lpath)
    docs = spec.convert(rows, labels)
    if not docs:
        raise TaskDataError(f"task {spec.name!r}: {root / spec.data_file} holds no rows")
    return docs


# --------------------------------------------------------------------------- lm-eval


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("zero-shot evaluation needs lm-eval: pip install 'lm-eval==0.4.13'") from e
    return evaluator, HFLM, TaskManager


def _lm_eval_yaml(spec: LocalTask) -> Path:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / spec.yaml
    if not path.is_file():  # lm-eval moved its task files: the pin in pyproject is off
        raise FileNotFoundError(f"lm-eval task file {path} not found for {spec.name!r}; "
                                "this module targets lm-eval 0.4.13")
    return path


def _write_jsonl(rows: Iterable[Row], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def local_task_config(spec: LocalTask, data_file: Path, cache_dir: Path) -> Row:
    """The override YAML for one task: lm-eval's own YAML with a local data source.

    `include` pulls in every field of lm-eval's definition; we replace only where the
    rows come from (the generic "json" builder on our converted file, cached inside the
    temporary folder so nothing is left behind) and keep just the split lm-eval scores
    (few-shot splits are absent: this is 0-shot only).
    """
    return {
        "include": str(_lm_eval_yaml(spec)),
        "task": spec.name,
        "tag": [],  # lm-eval's tags (e.g. ai2_arc) would point at Hub-backed twins
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(data_file)},
                           "cache_dir": str(cache_dir)},
        "training_split": None,
        "validation_split": spec.split if spec.split == "validation" else None,
        "test_split": spec.split if spec.split == "test" else None,
        "fewshot_split": None,
    }


def build_local_tasks(names: Sequence[str], data_dir: str | os.PathLike,
                      workdir: str | os.PathLike) -> dict[str, Task]:
    """Instantiate lm-eval Task objects for `names` backed by files under data_dir.

    Converted rows and YAMLs go to `workdir`, which must outlive the evaluation.
    A TaskManager over `workdir` alone avoids indexing lm-eval's ~15k built-in YAMLs
    (8 s), since our YAMLs include lm-eval's by absolute path.
    """
    import yaml

    if not names:
        return {}
    _, _, TaskManager = _import_lm_eval()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = LOCAL_TASKS[name]
        data_file = work / f"{name}.{spec.split}.jsonl"
        _write_jsonl(load_local_docs(spec, data_dir), data_file)
        cfg = local_task_config(spec, data_file, work / "hf_cache")
        (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    tm = TaskManager(include_path=str(work), include_defaults=False)
    return dict(tm.load(list(names))["tasks"])


def build_hub_tasks(names: Sequence[str]) -> dict[str, Task]:
    """lm-eval's tasks as shipped: datasets come from the Hugging Face Hub."""
    if not names:
        return {}
    _, _, TaskManager = _import_lm_eval()
    try:
        return dict(TaskManager().load(list(names))["tasks"])
    except Exception as e:  # offline: datasets raises connection errors of many kinds
        raise RuntimeError(
            f"could not load lm-eval task(s) {list(names)} from the Hub: {e}. Offline, "
            f"pass data_dir (or set {DATA_DIR_ENV}); tasks readable from local files: "
            f"{sorted(LOCAL_TASKS)} (layout in {LAYOUT_DOC})") from e


def split_tasks(tasks: Sequence[str],
                data_dir: str | os.PathLike | None) -> tuple[list[str], list[str]]:
    """(read from data_dir, downloaded by lm-eval). Tasks without a local layout go to
    the Hub even when data_dir is set, so any lm-eval task still runs when online."""
    if data_dir is None:
        return [], list(tasks)
    local = [t for t in tasks if t in LOCAL_TASKS]
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    if hub:
        log.warning("no local layout for %s: lm-eval will download them from the Hub", hub)
    return local, hub


def summarize(results: Row) -> dict[str, Row]:
    """lm-eval's results dict -> {task: {acc, acc_norm, n, ...}} with plain floats.

    acc_norm is None for tasks that do not define it (winogrande, lambada_openai);
    lambada_openai also reports perplexity. Keys lose lm-eval's ",none" filter suffix.
    """
    out: dict[str, Row] = {}
    for task, metrics in results["results"].items():
        row: Row = {"acc": None, "acc_norm": None}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)):
                row[metric] = float(value)
        row["n"] = int(results["n-samples"][task]["effective"])
        out[task] = row
    return out


def evaluate_tasks(model, tokenizer, tasks: Sequence[str],
                   data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int | str = 8,
                   device: str | None = None) -> dict[str, Row]:
    """Zero-shot lm-eval accuracy of a loaded causal LM on `tasks`.

    model: any transformers causal LM (quantized ones included); set to eval mode and,
        if `device` is given, moved there in place.
    tasks: lm-eval task names. arc_easy, arc_challenge, piqa, hellaswag, winogrande and
        lambada_openai are read from data_dir when it is given (docs/tasks.md); any other
        task, or all of them when data_dir is None, is downloaded by lm-eval.
    limit: evaluate only the first `limit` examples of each task (quick runs).
    Returns {task: {"acc", "acc_norm" (None if the task has none), "n", plus the
    stderrs and any other metric lm-eval reports, e.g. lambada's "perplexity"}}.
    """
    evaluator, HFLM, _ = _import_lm_eval()
    if isinstance(tasks, str):  # "arc_easy" means ["arc_easy"], not its letters
        tasks = [tasks]
    if not tasks:
        raise ValueError("no tasks given")
    if device is not None:
        model = model.to(device)
    local, hub = split_tasks(tasks, data_dir)
    # Converted files must outlive the evaluation: the datasets are read lazily.
    with tempfile.TemporaryDirectory(prefix="fasq-tasks-") as work:
        # Tasks first, so a missing file fails before any model work.
        task_objs = {**build_local_tasks(local, data_dir, work), **build_hub_tasks(hub)}
        for task in task_objs.values():
            task.set_config(key="num_fewshot", value=0)  # the protocol is 0-shot
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = evaluator.evaluate(
            lm=lm,
            task_dict={"tasks": task_objs, "groups": {}, "group_map": {}},
            limit=limit,
            # acc's stderr is closed-form; bootstrap only serves lambada's perplexity,
            # where lm-eval's default of 100k resamples costs more than the eval.
            bootstrap_iters=1000,
            log_samples=False,
        )
    return summarize(results)
