"""Streaming quantization (fasq.stream): same checkpoint as the in-memory path, sharded,
resumable, GGUF, unknown architectures, the streaming solver."""

import json

import pytest
import torch
from safetensors import safe_open

from fasq.core.config import ConfigError, PQConfig, QuantConfig, RTNConfig
from fasq.io.manifest import INDEX_NAME, MANIFEST_NAME, verify_checkpoint
from fasq.io.checkpoint import load_quantized, save_quantized
from fasq.stream.memory import quantize_model
from fasq.stream import make_plan, quantize_streaming
from fasq.stream import pipeline
from fasq.stream.readers import StreamingUnsupported

FAST = dict(kmeans_iters=2, kmeans_sample=2048)  # small k-means: these tests check plumbing


def _qcfg(**kw):
    return QuantConfig(layer=PQConfig(d=2, K=16, codebook_group=8, scale_group=16, **{**FAST, **kw}))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A tiny Llama in bf16 with biases, saved in several safetensors shards."""
    from conftest import save_tiny_llama

    d = save_tiny_llama(tmp_path_factory.mktemp("sharded") / "model", dtype=torch.bfloat16, max_shard_size="3MB",
                        num_hidden_layers=3, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    assert (d / INDEX_NAME).is_file() and len(list(d.glob("*.safetensors"))) >= 3
    return d


def _tensors(folder):
    """name -> (dtype, shape, raw bytes) over every safetensors file of a folder."""
    res = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                res[k] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return res


def _in_memory(source, out, qcfg, dtype=torch.float32):
    from fasq.io.sources import load_model

    model, tok = load_model(str(source), dtype=dtype)
    report = quantize_model(model, qcfg, progress=False)
    save_quantized(model, out, tokenizer=tok, report=report)
    return model


def test_streamed_shards_hold_the_in_memory_checkpoints_tensors(sharded_dir, tmp_path):
    rep = quantize_streaming(str(sharded_dir), tmp_path / "s", _qcfg(), progress=False)
    _in_memory(sharded_dir, tmp_path / "m", _qcfg())
    streamed, ref = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert streamed.keys() == ref.keys()
    assert all(streamed[k] == ref[k] for k in ref)
    # sharded like the input, with an index and a manifest covering every file
    n_in = len(list(sharded_dir.glob("*.safetensors")))
    shards = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(shards) == n_in and shards[0] == f"model-00001-of-{n_in:05d}.safetensors"
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(streamed) and set(index["weight_map"].values()) == set(shards)
    manifest = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == set(shards) | {INDEX_NAME}
    verify_checkpoint(tmp_path / "s")
    # same config (modules in natural order), same size accounting
    cs, cm = (json.loads((tmp_path / x / "config.json").read_text()) for x in ("s", "m"))
    qs, qm = cs.pop("quantization_config"), cm.pop("quantization_config")
    assert cs == cm and sorted(qs.pop("modules")) == sorted(qm.pop("modules")) and qs == qm
    rm = json.loads((tmp_path / "m" / "fasq_report.json").read_text())
    assert rep["size"] == rm["size"]
    assert sorted(r["name"] for r in rep["layers"]) == sorted(r["name"] for r in rm["layers"])
    assert rep["streaming"]["shards"] == n_in and rep["streaming"]["peak_rss_bytes"] > 0


def test_single_file_checkpoint_is_byte_identical(tiny_dir, tmp_path):
    quantize_streaming(str(tiny_dir), tmp_path / "s", _qcfg(), progress=False)
    _in_memory(tiny_dir, tmp_path / "m", _qcfg())
    assert (tmp_path / "s/model.safetensors").read_bytes() == (tmp_path / "m/model.safetensors").read_bytes()
    ms, mm = (json.loads((tmp_path / x / MANIFEST_NAME).read_text()) for x in ("s", "m"))
    assert ms["files"] == mm["files"] == {"model.safetensors": ms["files"]["model.safetensors"]}
    assert set(ms["files"]["model.safetensors"]) == {"bytes", "sha256"}  # records, nothing of the run's state


def test_load_dtype_is_applied_as_the_in_memory_path_does(tiny_dir, tmp_path):
    plan = make_plan(str(tiny_dir), _qcfg(), dtype=torch.bfloat16)  # fp32 weights rounded to bf16 first
    quantize_streaming(str(tiny_dir), tmp_path / "s", _qcfg(), progress=False, plan=plan)
    _in_memory(tiny_dir, tmp_path / "m", _qcfg(), dtype=torch.bfloat16)
    assert (tmp_path / "s/model.safetensors").read_bytes() == (tmp_path / "m/model.safetensors").read_bytes()
    quantize_streaming(str(tiny_dir), tmp_path / "f", _qcfg(), progress=False)
    assert (tmp_path / "f/model.safetensors").read_bytes() != (tmp_path / "m/model.safetensors").read_bytes()


def test_streamed_sharded_checkpoint_loads_and_computes_the_same(sharded_dir, tmp_path):
    quantize_streaming(str(sharded_dir), tmp_path / "s", _qcfg(), progress=False)
    ref = _in_memory(sharded_dir, tmp_path / "m", _qcfg())
    model = load_quantized(tmp_path / "s")
    ids = torch.tensor([[1, 5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_from_the_last_finished_shard(sharded_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    quantize_streaming(str(sharded_dir), full, _qcfg(), progress=False)
    calls, real, stop = [], pipeline.quantize_layer, [True]

    def flaky(plan, module, W, device=None):
        calls.append(module)
        if stop[0] and len(calls) == 6:
            raise _Stop("interrupted")
        return real(plan, module, W, device)

    monkeypatch.setattr(pipeline, "quantize_layer", flaky)
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        quantize_streaming(str(sharded_dir), out, _qcfg(), progress=False)
    assert not out.exists()  # nothing half-written where the checkpoint goes
    work = pipeline.work_dir(out)
    done = json.loads((work / pipeline.STATE_NAME).read_text())["done"]
    assert done  # some shards finished before the stop
    plan = make_plan(str(sharded_dir), _qcfg())
    remaining = [m for s, (_, names) in zip(plan.shard_names(), plan.reader.groups) if s not in done
                 for m in plan.modules if m + ".weight" in names]

    calls.clear()
    stop[0] = False
    logs = []
    rep = quantize_streaming(str(sharded_dir), out, _qcfg(), progress=False, log=logs.append)
    assert sorted(calls) == sorted(remaining)  # finished shards were not redone
    assert rep["streaming"]["resumed_shards"] == len(done) and "resuming" in logs[0]
    assert _tensors(out) == _tensors(full) and not work.exists()


def test_changed_settings_start_over(sharded_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "quantize_layer", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        quantize_streaming(str(sharded_dir), out, _qcfg(), progress=False)
    monkeypatch.undo()
    logs = []
    rep = quantize_streaming(str(sharded_dir), out, _qcfg(seed=1), progress=False, log=logs.append)
    assert rep["streaming"]["resumed_shards"] == 0 and "starting over" in logs[0]


def test_rtn_and_skip_lists_stream_too(sharded_dir, tmp_path):
    qcfg = QuantConfig(layer=RTNConfig(bits=3, group_size=32), skip=("embed_tokens", "lm_head", "down_proj"))
    quantize_streaming(str(sharded_dir), tmp_path / "s", qcfg, progress=False)
    _in_memory(sharded_dir, tmp_path / "m", QuantConfig(layer=RTNConfig(bits=3, group_size=32),
                                                           skip=("embed_tokens", "lm_head", "down_proj")))
    s = _tensors(tmp_path / "s")
    assert s == _tensors(tmp_path / "m")
    assert "model.layers.0.mlp.down_proj.weight" in s and "model.layers.0.mlp.up_proj.codes" in s


def test_bad_layer_config_fails_before_any_work(sharded_dir, tmp_path):
    with pytest.raises(ConfigError, match="not divisible by d=5"):
        quantize_streaming(str(sharded_dir), tmp_path / "s", QuantConfig(layer=PQConfig(d=5)), progress=False)
    assert not pipeline.work_dir(tmp_path / "s").exists()


def test_unknown_architecture_quantizes_from_names(tmp_path):
    """No model class is built: a config transformers does not know still quantizes."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "fasq_unknown_arch", "hidden_size": 32}))
    g = torch.Generator().manual_seed(0)
    save_file({"tok_embeddings.weight": torch.randn(50, 32, generator=g),
               "blocks.0.proj.weight": torch.randn(48, 32, generator=g),
               "blocks.0.proj.bias": torch.randn(48, generator=g),
               "blocks.0.norm.weight": torch.ones(32)}, str(src / "model.safetensors"))
    qcfg = QuantConfig(layer=PQConfig(d=2, K=16, **FAST), skip=())
    rep = quantize_streaming(str(src), tmp_path / "out", qcfg, progress=False)
    assert [r["name"] for r in rep["layers"]] == ["blocks.0.proj"]  # the embedding is recognised
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["model_type"] == "fasq_unknown_arch" and cfg["quantization_config"]["modules"] == ["blocks.0.proj"]
    t = _tensors(tmp_path / "out")
    assert t["blocks.0.proj.bias"][0] == torch.float16 and "blocks.0.proj.codes" in t
    assert rep["size"]["unquantized_params"] == 50 * 32 + 32


def test_a_tied_lm_head_is_quantized_on_its_own_and_untied(tiny_dir, tmp_path):
    """--skip embed_tokens on a tied model: the head (stored only as the embeddings) is
    quantized, the embeddings kept; streamed and in-memory checkpoints hold the same tensors,
    the config unties the two, and the loaded model computes with the quantized head."""
    from fasq.core.module import PQLinear

    qcfg = lambda: QuantConfig(layer=_qcfg().layer, skip=("embed_tokens",))  # noqa: E731
    plan = make_plan(str(tiny_dir), QuantConfig(layer=PQConfig(d=2, K=16), skip=("embed_tokens",)))
    assert "lm_head" in plan.modules and plan.unties_head
    assert "lm_head" not in make_plan(str(tiny_dir), QuantConfig()).modules  # the default skips it
    rep = quantize_streaming(str(tiny_dir), tmp_path / "s", qcfg(), progress=False)
    assert "lm_head" in [r["name"] for r in rep["layers"]]
    mem = _in_memory(tiny_dir, tmp_path / "m", qcfg())
    streamed, ref = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert streamed == ref
    assert "lm_head.codes" in streamed and "model.embed_tokens.weight" in streamed and "lm_head.weight" not in streamed
    for d in ("s", "m"):
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is False and "lm_head" in cfg["quantization_config"]["modules"]
    loaded = load_quantized(tmp_path / "s")
    assert isinstance(loaded.lm_head, PQLinear) and not isinstance(loaded.model.embed_tokens, PQLinear)
    from fasq.io.sources import load_model

    src = load_model(str(tiny_dir), dtype=torch.float32)[0]
    assert torch.equal(loaded.model.embed_tokens.weight.float(), src.model.embed_tokens.weight.half().float())
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = mem(ids).logits
        got = loaded(ids).logits
        dense = src(ids).logits
    # the in-memory model keeps fp32 norms and embeddings (the checkpoint fp16): close, while
    # the source's dense head gives logits far from both
    assert (got - want).abs().max() < 0.1 * (got - dense).abs().max()


def test_conv1d_models_are_refused_for_streaming(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "g")
    with pytest.raises(StreamingUnsupported, match="Conv1D"):
        make_plan(str(tmp_path / "g"), QuantConfig())


def test_gguf_streams_to_the_in_memory_checkpoint(tmp_path):
    """The default model from its GGUF: names mapped and llama.cpp's q/k permutation undone
    exactly as transformers' loader does (same tensors, byte for byte)."""
    from fasq.io.sources import default_model_file

    default_model_file()
    qcfg = lambda: QuantConfig(layer=RTNConfig(bits=4, group_size=64))  # noqa: E731 - fast, deterministic
    quantize_streaming("default", tmp_path / "s", qcfg(), progress=False)
    _in_memory("default", tmp_path / "m", qcfg())
    assert (tmp_path / "s/model.safetensors").read_bytes() == (tmp_path / "m/model.safetensors").read_bytes()
    cs, cm = (json.loads((tmp_path / x / "config.json").read_text()) for x in ("s", "m"))
    qs, qm = cs.pop("quantization_config"), cm.pop("quantization_config")
    assert cs == cm and cs["architectures"] == ["LlamaForCausalLM"]  # GGUF configs have none: named
    assert sorted(qs.pop("modules")) == sorted(qm.pop("modules")) and qs == qm


# --- the solver on a streamed model ---------------------------------------------------------

@pytest.mark.parametrize("proxy", ["output", "rel"])
def test_streaming_solver_matches_the_in_memory_solver(sharded_dir, proxy):
    from fasq.io.sources import load_model
    from fasq.stream.solve import solve, solve_streaming

    cands = [PQConfig(d=d, K=K, codebook_scope="matrix") for d, K in ((2, 16), (2, 64), (1, 16))]
    plan = make_plan(str(sharded_dir), QuantConfig())
    q_s, r_s = solve_streaming(plan, target_bits=4.0, candidates=cands, progress=False, importance=proxy)
    model, _ = load_model(str(sharded_dir))
    q_m, r_m = solve(model, target_bits=4.0, candidates=cands, progress=False, importance=proxy)
    assert q_s.overrides == q_m.overrides
    assert r_s.predicted == r_m.predicted
    assert r_s.importance == r_m.importance == proxy
    # the block-by-block importance estimate equals the whole model's: so do the proxy errors
    by_name = {r["name"]: r["proxy"] for r in r_m.layers}  # (the two list the layers in other orders)
    assert {r["name"]: r["proxy"] for r in r_s.layers} == pytest.approx(by_name, rel=1e-6)
    if proxy == "output":
        assert r_s.proxy_importance == r_m.proxy_importance == "random-tokens"
        assert set(plan.importance) == set(plan.modules)  # filled for the quantization to reuse
    else:
        assert r_s.proxy_importance == "none" and not plan.importance


def test_budget_outside_the_range_is_refused_before_reading_weights(sharded_dir, monkeypatch):
    from fasq.quant import solver
    from fasq.stream import solve as ssolve

    def boom(*a, **k):
        raise AssertionError("weights were measured")

    monkeypatch.setattr(ssolve, "measure_layer", boom)
    monkeypatch.setattr(solver, "measure_layer", boom)
    plan = make_plan(str(sharded_dir), QuantConfig())
    with pytest.raises(solver.BudgetError, match="achievable range"):
        ssolve.solve_streaming(plan, target_size=0.05, progress=False)
    from fasq.io.sources import load_model

    with pytest.raises(solver.BudgetError, match="achievable range"):
        ssolve.solve(load_model(str(sharded_dir))[0], target_size=0.05, progress=False)


@pytest.mark.parametrize("importance", ["random-tokens", "norm", "none"])
def test_importance_streams_to_the_in_memory_checkpoint(sharded_dir, tmp_path, importance):
    """The importance estimate is the same in both paths, so are the tensors."""
    qcfg = lambda: QuantConfig(layer=_qcfg().layer, importance=importance)  # noqa: E731
    quantize_streaming(str(sharded_dir), tmp_path / "s", qcfg(), progress=False)
    _in_memory(sharded_dir, tmp_path / "m", qcfg())
    streamed, ref = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert streamed.keys() == ref.keys() and all(streamed[k] == ref[k] for k in ref)
    quantize_streaming(str(sharded_dir), tmp_path / "n", QuantConfig(layer=_qcfg().layer, importance="none"),
                       progress=False)
    plain = _tensors(tmp_path / "n")
    if importance != "none":
        assert any(plain[k] != ref[k] for k in ref if k.endswith(".codes"))  # the weighting did something
    cs = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cs["quantization_config"]["importance"] == importance


def test_unbuildable_model_falls_back_to_the_norm_estimate(tmp_path):
    """The random-token estimate runs the model; where transformers cannot build it the
    weights-only norm estimate is used, and the saved config says so."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "fasq_unknown_arch", "hidden_size": 32}))
    g = torch.Generator().manual_seed(0)
    save_file({"blocks.0.mlp.up_proj.weight": torch.randn(48, 32, generator=g),
               "blocks.0.post_attention_layernorm.weight": torch.linspace(0.1, 3, 32)}, str(src / "model.safetensors"))
    logged = []
    qcfg = QuantConfig(layer=PQConfig(d=2, K=16, **FAST), skip=(), importance="random-tokens")
    quantize_streaming(str(src), tmp_path / "out", qcfg, progress=False, log=logged.append)
    assert any("norm-weight estimate" in m for m in logged)
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["quantization_config"]["importance"] == "norm"
