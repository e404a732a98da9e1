"""Baselines (HQQ, GPTQ, AWQ through their libraries) and the frontier helpers.

The libraries live in the environment of `make baselines-env` (llmcompressor pins its own
transformers), so the end-to-end tests run `fasq baseline` there on a tiny Llama and check
the saved model here: a grid of at most 2**bits levels per group, the size accounting, and
outputs close to the original's.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fasq.eval.baselines import BaselineError, INFO_NAME, calibration_batches, calibration_texts, group_quant_size
from fasq.cli import main
from fasq.core.config import DEFAULT_SKIP, QuantConfig, RTNConfig
from fasq.core.convert import quantizable_linears
from fasq.core.convert import model_bytes

ROOT = Path(__file__).resolve().parents[1]
BASELINE_PY = ROOT / ".venv-baselines" / "bin" / "python"


def test_group_size_accounting_matches_rtn(tiny_llama):
    layers = quantizable_linears(tiny_llama, QuantConfig(skip=DEFAULT_SKIP))
    for bits, g in [(4, 32), (3, 16), (4, 0)]:
        ours = group_quant_size(tiny_llama, layers, bits, g, zero_bits=16)
        rtn = model_bytes(tiny_llama, layers, [RTNConfig(bits=bits, group_size=g)] * len(layers))
        # fasq's RTN also stores a 2**bits-entry grid codebook per layer: the only difference
        grid = len(layers) * (2 ** bits) * 2
        assert rtn["total_bytes"] - ours["total_bytes"] == grid
        assert ours["fp16_bytes"] == rtn["fp16_bytes"]
    packed = group_quant_size(tiny_llama, layers, 4, 32, zero_bits=None)
    assert packed["bits_per_weight"] == pytest.approx(4 + (16 + 4) / 32)


def test_group_size_must_divide(tiny_llama):
    layers = quantizable_linears(tiny_llama, QuantConfig(skip=DEFAULT_SKIP))
    with pytest.raises(BaselineError, match="does not divide"):
        group_quant_size(tiny_llama, layers, 4, 48, zero_bits=16)  # 64 % 48 != 0


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "piqa").mkdir()
    rows = [{"goal": f"How do I fix item {i}?", "sol1": "Use glue and wait an hour.",
             "sol2": "Use water and wait a minute."} for i in range(200)]
    (d / "piqa" / "tests.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_calibration_text_and_windows(calib_dir, tmp_path):
    texts = calibration_texts(calib_dir)
    assert len(texts) == 200 and texts[0] == "How do I fix item 0?\nUse glue and wait an hour.\nUse water and wait a minute."

    class Tok:  # one token per character, EOS = 0
        eos_token_id = 0

        def __call__(self, t, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in t]}

    ids = calibration_batches(Tok(), texts, samples=4, seqlen=50)
    assert ids.shape == (4, 50)
    assert ids[0, :20].tolist() == [ord(c) for c in texts[0][:20]]
    assert ids.flatten()[len(texts[0])] == 0  # texts are joined by EOS
    with pytest.raises(BaselineError, match="fewer than"):
        calibration_batches(Tok(), texts[:2], samples=4, seqlen=50)
    with pytest.raises(BaselineError, match="tests.jsonl"):
        calibration_texts(tmp_path)


def test_missing_library_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_llmc(name, *a, **k):
        if name.startswith("llmcompressor"):
            raise ImportError("No module named 'llmcompressor'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_llmc)
    from fasq.eval.baselines import _require

    with pytest.raises(BaselineError, match=r"pip install 'fasq\[baselines\]'"):
        _require("llmcompressor", "gptq")


def test_baseline_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    assert main(["baseline", "hqq", "default", "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def _levels_per_group(W: torch.Tensor, g: int) -> int:
    groups = W.reshape(W.shape[0], -1, g)
    return max(torch.unique(groups[r, j]).numel() for r in range(W.shape[0]) for j in range(groups.shape[1]))


@pytest.mark.parametrize("method,bits", [("hqq", 4), ("gptq", 4), ("awq", 3)])
def test_baseline_end_to_end(method, bits, tiny_dir, calib_dir, tmp_path):
    if not BASELINE_PY.exists():
        pytest.fail("the baselines environment is missing: run `make baselines-env`")
    out = tmp_path / method
    cmd = [str(BASELINE_PY), "-m", "fasq.cli", "baseline", method, str(tiny_dir), "--bits", str(bits),
           "--group-size", "32", "--out", str(out), "--data-dir", str(calib_dir),
           "--calib-samples", "8", "--calib-seqlen", "64", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((out / INFO_NAME).read_text())
    assert (info["method"], info["bits"], info["group_size"]) == (method, bits, 32)
    assert not (out / "config.json").read_text().count("quantization_config")

    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    q = AutoModelForCausalLM.from_pretrained(out).eval()
    layers = quantizable_linears(q, QuantConfig(skip=DEFAULT_SKIP))
    assert info["bits_per_weight"] == group_quant_size(q, layers, bits, 32, 16 if method == "hqq" else None)[
        "bits_per_weight"]
    changed = 0
    for name, lin in layers:
        assert _levels_per_group(lin.weight.data, 32) <= 2 ** bits, name
        changed += not torch.equal(lin.weight, ref.get_submodule(name).weight)
    assert changed == len(layers)
    x = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ref(x).logits, q(x).logits
    assert ((a - b).norm() / a.norm()).item() < 0.25


def _frontier_module():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import frontier

    return frontier


def test_frontier_marks_pareto_points():
    pts = [(4.0, 30.0, "a"), (4.2, 25.0, "b"), (4.1, 31.0, "dominated"), (3.0, 80.0, "small"),
           (5.0, 25.0, "same error, larger")]
    assert _frontier_module().frontier(pts) == ["small", "a", "b"]


def test_frontier_only_selects_whole_names_exactly():
    selected = _frontier_module().selected
    names = ["AWQ 4-bit g192", "FASQ solver (AWQ 4-bit g192's size)", "GPTQ 4-bit g192"]
    assert [n for n in names if selected(n, ["AWQ 4-bit g192"], names)] == ["AWQ 4-bit g192"]
    assert [n for n in names if selected(n, ["4-bit"], names)] == names
    assert [n for n in names if selected(n, ["GPTQ", "solver"], names)] == names[1:]


def _study(configs: dict[str, list[float]], cli: dict[str, str]) -> dict:
    rows = [{"config": c, "seed": s, "perplexity": p, "bits_per_weight": 4.0, "size_fraction_of_fp16": 0.4,
             "windows": 10} for c, ps in configs.items() for s, p in enumerate(ps)]
    summary = {c: {"seeds": list(range(len(ps))), "mean": sum(ps) / len(ps), "spread": max(ps) - min(ps),
                   "max": max(ps), "min": min(ps), "bits_per_weight": [4.0]} for c, ps in configs.items()}
    return {"rows": rows, "summary": summary, "cli": cli}


def test_frontier_takes_seed_study_rows_as_means(tmp_path):
    fr = _frontier_module()
    name, (fname, config) = next((n, v) for n, v in fr.SEED_STUDY.items() if "K=512, one codebook" in n)
    (tmp_path / fname).write_text(json.dumps(_study({config: [3.0, 5.0, 4.0]},
                                                    {config: "fasq quantize default -d 2 --seed S"})))
    rows = {name: {"name": name, "family": "FASQ", "perplexity": 9.0, "bits_per_weight": 4.1,
                   "size_fraction_of_fp16": 0.41},
            "FASQ solver, --target-size 0.5": {"name": "FASQ solver, --target-size 0.5", "family": "FASQ solver",
                                               "perplexity": 2.0, "bits_per_weight": 5.0,
                                               "size_fraction_of_fp16": 0.5},
            "RTN 4-bit g192": {"name": "RTN 4-bit g192", "family": "RTN", "perplexity": 6.0,
                               "bits_per_weight": 4.2, "size_fraction_of_fp16": 0.42}}
    out = fr.with_seed_studies(rows, tmp_path)
    r = out[name]
    assert (r["perplexity"], r["perplexity_min"], r["perplexity_max"], r["seeds"]) == (4.0, 3.0, 5.0, [0, 1, 2])
    assert r["perplexity_before_importance"] == 9.0 and r["importance"] == "random-tokens"
    assert r["bits_per_weight"] == 4.0 and not fr.before_importance(r)
    # read again from what was written: the old single run is kept, not replaced by the mean
    again = fr.with_seed_studies({name: dict(r)}, tmp_path)[name]
    assert again["perplexity_before_importance"] == 9.0
    # a FASQ row without `importance` predates the weighting: marked, and off the frontier
    old = out["FASQ solver, --target-size 0.5"]
    assert fr.before_importance(old) and not fr.before_importance(out["RTN 4-bit g192"])
    text = fr.table(list(out.values()), None)
    line = next(t for t in text.splitlines() if "target-size 0.5" in t)
    assert "before the importance weighting" in line and "(frontier)" not in line
    assert "4.00 (3.00-5.00, 3 seeds)" in next(t for t in text.splitlines() if name in t)


def test_frontier_seed_study_missing_file_keeps_rows(tmp_path):
    fr = _frontier_module()
    rows = {"x": {"name": "x", "family": "RTN", "perplexity": 6.0, "bits_per_weight": 4.2,
                  "size_fraction_of_fp16": 0.42}}
    assert fr.with_seed_studies(dict(rows), tmp_path) == rows


def test_frontier_attaches_the_defaults_zeroshot(tmp_path):
    fr = _frontier_module()
    for name in (fr.DEFAULT_ROW, fr.UNWEIGHTED):
        fname, config = fr.SEED_STUDY[name]
        path = tmp_path / fname
        old = json.loads(path.read_text()) if path.exists() else {"rows": [], "summary": {}, "cli": {}}
        opts = "--importance none " if name == fr.UNWEIGHTED else ""
        new = _study({config: [1.0, 2.0]}, {config: f"fasq quantize default {opts}--seed S"})
        path.write_text(json.dumps({k: (old[k] + new[k]) if k == "rows" else {**old[k], **new[k]}
                                    for k in ("rows", "summary", "cli")}))
    zs = {"command": "c", "config": "x", "tasks": {}, "avg_acc": 0.5, "avg_acc_norm": 0.4,
          "compare": {"default_without_importance": {"command": "d", "config": "y", "tasks": {},
                                                     "avg_acc": 0.3, "avg_acc_norm": 0.2}}}
    (tmp_path / fr.ZEROSHOT_DEFAULT.name).write_text(json.dumps(zs))
    out = fr.with_seed_studies({}, tmp_path)
    assert out[fr.DEFAULT_ROW]["zeroshot"]["full"]["avg_acc"] == 0.5
    assert out[fr.UNWEIGHTED]["zeroshot"]["full"]["avg_acc"] == 0.3
    assert fr.before_importance(out[fr.UNWEIGHTED]) and not fr.before_importance(out[fr.DEFAULT_ROW])
