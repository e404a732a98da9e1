"""The CLI end to end on a tiny random Llama that uses the default model's tokenizer."""

import json

import pytest
import torch

from fasq.cli import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "wikitext-2-raw").mkdir()
    lines = [" = Title = "] + [f" Sentence number {i} is about the history of a small town ." for i in range(60)]
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text("\r\n".join(lines) + "\r\n")
    return d


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_quantize_info_eval_generate(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--out", str(out), "--json"]) == 0
    q = _json(capsys)
    assert q["quantized_layers"] == 14
    assert main(["info", str(out), "--json"]) == 0
    info = _json(capsys)
    assert info["quantization_config"]["layer"]["K"] == 16
    # 4 bits of codes per 2 weights = 2 bits, plus per-row scales and the codebook
    assert 2.0 < info["bits_per_weight"] < 2.6
    assert 0 < info["size_fraction_of_fp16"] < 1 and len(info["layers"]) == 14
    assert main(["info", str(out)]) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    args = ["eval", str(out), "--ppl", "--windows", "2", "--seqlen", "64", "--data-dir", str(data_dir), "--json"]
    assert main(args + ["--compare", str(tiny_dir)]) == 0
    ev = _json(capsys)
    assert ev["windows"] == 2 and ev["tokens"] == 128 and ev["perplexity"] > 1
    assert ev["reference"]["perplexity"] > 1 and ev["ratio_to_reference"] > 0
    assert main(["generate", str(out), "Hello", "--max-new-tokens", "4"]) == 0


def test_rtn_through_the_same_pipeline(tiny_dir, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(out), "--json"]) == 0
    q = _json(capsys)
    # 4 bits + 32 bits of (scale, minimum) per 32 weights, plus the stored 16-level grid
    # (256 bits per matrix, 0.06 bits per weight on these tiny 64-wide matrices)
    assert 5.0 < q["bits_per_weight"] < 5.07


def test_lm_head_option_quantizes_and_unties_the_head(tiny_dir, tmp_path, capsys):
    """--lm-head rtn8: the tied head as RTN 8-bit (its own override), the embeddings kept; the
    checkpoint loads with the head on the int8 CPU path's exact grid. Conflicts are refused."""
    import torch

    from fasq.core.module import PQLinear
    from fasq.io.checkpoint import load_quantized

    out = tmp_path / "h8"
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--lm-head", "rtn8", "--out", str(out),
                 "--json"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["tie_word_embeddings"] is False and "lm_head" in qc["modules"] and qc["skip"] == ["embed_tokens"]
    assert qc["overrides"]["lm_head"] == {"method": "rtn", "bits": 8, "group_size": 64, "transform": "none"}
    model = load_quantized(out)
    head = model.lm_head
    assert isinstance(head, PQLinear) and torch.equal(head.codebooks.float().flatten(), torch.arange(256.0))
    capsys.readouterr()
    for bad, msg in [(["--skip", "lm_head"], "--skip also names it"),
                     (["--tensor-parallel", "2"], "does not serve a quantized head"),
                     (["--target-bits", "4"], "the solver would choose the head's config too")]:
        assert main(["quantize", str(tiny_dir), "--lm-head", "rtn8", *bad, "--out", str(tmp_path / "x")]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_errors_are_clear_and_keep_existing_output(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--out", str(out), "--json"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--out", str(out)]) == 2
    assert "already holds a checkpoint; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["quantize", str(tiny_dir), "-K", "100", "--out", str(tmp_path / "x")]) == 2
    assert "power of two" in capsys.readouterr().err
    assert main(["quantize", str(tiny_dir), "-d", "5", "--out", str(tmp_path / "x")]) == 2
    assert "not divisible by d=5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["eval", str(tmp_path / "missing"), "--ppl"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["info", str(tiny_dir)]) == 2
    assert "not a fasq checkpoint" in capsys.readouterr().err


def test_eval_zero_shot_tasks_from_local_files(tiny_dir, tmp_path, capsys):
    from conftest import require

    require("lm_eval")
    (tmp_path / "arc").mkdir()
    rows = [{"id": f"q{i}", "answerKey": "B",
             "question": {"stem": f"Question {i}?", "choices": [{"text": "red", "label": "A"},
                                                                {"text": "blue", "label": "B"}]}}
            for i in range(5)]
    (tmp_path / "arc" / "ARC-Easy-test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["eval", str(tiny_dir), "--tasks", "arc_easy", "--limit", "3", "--data-dir", str(tmp_path),
                 "--json"]) == 0
    res = _json(capsys)
    assert "perplexity" not in res  # only what was asked
    assert res["tasks"]["arc_easy"]["n"] == 3 and 0 <= res["tasks"]["arc_easy"]["acc"] <= 1
    assert main(["eval", str(tiny_dir), "--tasks", "piqa", "--data-dir", str(tmp_path)]) == 2
    assert "piqa" in capsys.readouterr().err


def test_quantize_to_a_target_size(tiny_dir, tmp_path, capsys):
    out = tmp_path / "solved"
    assert main(["quantize", str(tiny_dir), "--target-bits", "3.5", "--out", str(out), "--json"]) == 0
    q = _json(capsys)
    assert 0.99 * 3.5 <= q["bits_per_weight"] <= 3.5
    assert main(["quantize", str(tiny_dir), "--target-bits", "3", "--method", "rtn", "--out", str(tmp_path / "x")]) == 2
    assert "at most one of --target-bits" in capsys.readouterr().err
    # the solver picks only among the candidates given
    out2 = tmp_path / "solved2"
    assert main(["quantize", str(tiny_dir), "--target-bits", "3.5", "--candidates", "d2K16,d2K64,d1K16",
                 "--out", str(out2), "--json"]) == 0
    _json(capsys)
    solver = json.loads((out2 / "fasq_report.json").read_text())["solver"]
    layers = solver["layers"]
    assert {r["label"] for r in layers} <= {"d2K16", "d2K64", "d1K16"}
    assert (solver["importance"], solver["proxy_importance"]) == ("rel", "none")  # the default proxy
    out3 = tmp_path / "solved3"
    assert main(["quantize", str(tiny_dir), "--target-bits", "3.5", "--candidates", "d2K16,d2K64,d1K16",
                 "--proxy", "output", "--seed", "3", "--out", str(out3), "--json"]) == 0
    _json(capsys)
    rep3 = json.loads((out3 / "fasq_report.json").read_text())
    assert (rep3["solver"]["importance"], rep3["solver"]["proxy_importance"]) == ("output", "random-tokens")
    assert {c["seed"] for c in json.loads((out3 / "config.json").read_text())["quantization_config"]
            ["overrides"].values()} == {3}
    for bad, msg in ((["--target-bits", "3.5", "--candidates", "d2x16"], "d<D>K<K>"),
                     (["--candidates", "d2K16"], "only applies with --target-bits"),
                     (["--proxy", "rel"], "only applies with --target-bits")):
        assert main(["quantize", str(tiny_dir), *bad, "--out", str(tmp_path / "y")]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "y").exists()


def test_bench_times_a_checkpoint_against_its_source(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    args = ["bench", str(out), "--prompt-len", "5", "--new-tokens", "3", "--compile", "off"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    fasq_row, src_row = res["rows"]
    assert src_row["model"] == str(tiny_dir) and src_row["decode_speedup"] == 1.0
    assert fasq_row["new_tokens"] == 3 and fasq_row["prompt_len"] == 5 and fasq_row["decode_tok_s"] > 0
    assert fasq_row["weight_bytes"] < src_row["weight_bytes"]
    assert main(args + ["--compare", "none", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "batch 2" in text and str(out) in text and str(tiny_dir) not in text.split("\n", 2)[2]
    assert main(args + ["--new-tokens", "0"]) == 2
    assert "--new-tokens must be >= 1" in capsys.readouterr().err


def test_quantize_streams_with_a_progress_bar_and_resumes(tiny_dir, tmp_path, capsys):
    from fasq.stream import pipeline

    out = tmp_path / "q"
    pipeline.work_dir(out).mkdir()  # a stale work folder of some other run: started over
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "quantizing: 100%" in cap.err and ("B/s" in cap.err or "s/B" in cap.err)  # bytes, rate, ETA
    assert "saved" in cap.out and not pipeline.work_dir(out).exists()
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--out", str(tmp_path / "m"), "--in-memory",
                 "--json"]) == 0
    assert _json(capsys)["quantized_layers"] == 14
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()


def test_quantize_falls_back_to_in_memory_for_conv1d_models(tmp_path, capsys):
    """GPT-2 keeps W transposed in Conv1D modules: names alone cannot tell, so the CLI loads
    the model instead and does what --in-memory does (which quantizes nn.Linear only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "g")
    args = ["quantize", str(tmp_path / "g"), "-d", "2", "-K", "16", "--json"]
    code = main(args + ["--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert "Conv1D" in err and "loading the whole model instead" in err
    assert code == main(args + ["--out", str(tmp_path / "q2"), "--in-memory"]) == 2
    assert "no linear layers to quantize" in err and "no linear layers to quantize" in capsys.readouterr().err


def test_tensor_parallel_picks_groups_that_split_every_layer(tiny_dir, tmp_path, capsys):
    from fasq.core.config import QuantConfig
    from fasq.quant.tensor_parallel import splits

    out = tmp_path / "tp"
    # codebooks of >= 13 subspaces: 16 in the 64-wide layers, 16 in the 96-wide down_proj,
    # whose 2 shards of 24 subspaces would cut one in two; 12 splits both
    args = ["quantize", str(tiny_dir), "-K", "16", "--codebook-group", "13", "--kmeans-iters", "2"]
    assert main([*args, "--tensor-parallel", "2", "--out", str(out)]) == 0
    assert "--tensor-parallel 2: using --codebook-group 12 --scale-group" in capsys.readouterr().err
    qcfg = QuantConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert qcfg.layer.codebook_group == 12
    assert all(splits(qcfg.layer, w, 2) for w in (64, 96))
    assert main([*args, "--tensor-parallel", "3", "--out", str(tmp_path / "tp3")]) == 2
    assert "cannot be split into 3 shards" in capsys.readouterr().err


def test_importance_option_is_recorded_and_used(tiny_dir, tmp_path, capsys):
    """--importance reaches the quantization (other codes than none) and the saved config,
    through the plain path, the in-memory path and the solver."""
    from safetensors import safe_open

    def codes(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys() if k.endswith(".codes")}

    runs = {"none": [], "random-tokens": [], "norm": ["--in-memory"]}
    for imp, extra in runs.items():
        out = tmp_path / imp
        assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--importance", imp, *extra,
                     "--out", str(out), "--json"]) == 0
        assert _json(capsys)["importance_seconds"] >= 0
        assert json.loads((out / "config.json").read_text())["quantization_config"]["importance"] == imp
    base = codes(tmp_path / "none")
    assert any(not torch.equal(base[k], codes(tmp_path / "random-tokens")[k]) for k in base)
    assert main(["quantize", str(tiny_dir), "--target-bits", "3.5", "--importance", "norm", "--out",
                 str(tmp_path / "solved"), "--json"]) == 0
    _json(capsys)
    assert json.loads((tmp_path / "solved/config.json").read_text())["quantization_config"]["importance"] == "norm"
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_dir), "--importance", "wikitext", "--out", str(tmp_path / "x")])
    assert "invalid choice" in capsys.readouterr().err
