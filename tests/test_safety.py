"""Nothing lost, nothing silently wrong: outputs never replace their inputs, edited configs
are refused, resumes verify what they trust, one run per output, and bad input gets one
clear line (each case a reproduction of what a user hit)."""

import json
import os
import shutil
import time

import pytest
import torch

from fasq.cli import main
from fasq.core.config import ConfigError, PQConfig, QuantConfig
from fasq.io.manifest import MANIFEST_NAME, WEIGHTS_NAME, CheckpointError, check_checkpoint
from fasq.io.checkpoint import load_quantized
from fasq.io.outdir import OutputBusyError, lock_path, output_lock
from fasq.stream import pipeline

Q16 = ["-d", "2", "-K", "16", "--kmeans-iters", "2"]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ck(tiny_dir, tmp_path_factory):
    """A streamed K=16 checkpoint of the tiny Llama (copied per test before editing)."""
    out = tmp_path_factory.mktemp("ck") / "ck"
    assert main(["quantize", str(tiny_dir), *Q16, "--out", str(out), "--json"]) == 0
    return out


@pytest.fixture
def ck_copy(ck, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(ck, dst)
    return dst


def _edit(folder, fn, manifest_covers=True):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    if not manifest_covers:  # a manifest of an older fasq: the tensor checks alone must catch it
        m = json.loads((folder / MANIFEST_NAME).read_text())
        m.pop("quantization_config", None)
        (folder / MANIFEST_NAME).write_text(json.dumps(m))


# --- outputs never destroy inputs ---------------------------------------------------------------

def test_output_that_is_contains_or_lies_in_the_input_is_refused(tiny_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    before = _snapshot(src)
    link = tmp_path / "link"
    link.symlink_to(src)
    for out in (src, src / "inner", tmp_path, link):
        for cmd in (["quantize", str(src), *Q16], ["export", str(src), "--dtype", "bf16"]):
            assert main([*cmd, "--out", str(out), "--overwrite"]) == 2
            assert "would destroy the model being read" in capsys.readouterr().err
    assert _snapshot(src) == before
    monkeypatch.chdir(tmp_path / "src")
    assert main(["quantize", str(src), *Q16, "--out", ".", "--overwrite"]) == 2
    assert "the output . is the input" in capsys.readouterr().err
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    assert main(["quantize", str(src), *Q16, "--out", ".", "--overwrite"]) == 2
    assert "is the current folder or one above it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*") if "src" not in p.parts) == ["link", "w"]  # no work folder
    assert _snapshot(src) == before


def test_quantizing_a_checkpoint_says_it_is_one(ck, tmp_path, capsys):
    assert main(["quantize", str(ck), *Q16, "--out", str(tmp_path / "x")]) == 2
    assert "already a fasq checkpoint" in capsys.readouterr().err


def test_export_accepts_dtype_aliases_and_makes_a_normal_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", str(tiny_dir), "--out", str(out), "--dtype", "bf16"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


# --- a checkpoint loads only if every fact it holds is verified -----------------------------------

def test_config_edits_differing_from_the_manifest_are_refused(ck_copy, capsys):
    _edit(ck_copy, lambda q: q["layer"].update(scale="none"))
    with pytest.raises(CheckpointError, match=r"differs from the one the checkpoint was written with \(layer, layer.scale"):
        load_quantized(ck_copy)
    assert main(["eval", str(ck_copy), "--windows", "1", "--seqlen", "32"]) == 2
    assert "differs from the one the checkpoint was written with" in capsys.readouterr().err


@pytest.mark.parametrize("edit, match", [
    (lambda q: q["layer"].update(scale="none"), "has scales, but the config"),
    (lambda q: q["modules"].remove("model.layers.1.mlp.down_proj"),
     "quantized tensors of model.layers.1.mlp.down_proj, which the config's modules do not list"),
    (lambda q: q["modules"].append("model.layers.9.mlp.down_proj"),
     "model.layers.9.mlp.down_proj is listed as quantized but its codes or codebooks are missing"),
    (lambda q: q["layer"].update(K=256), r"codebooks is \[\d+, 16, 2\], but the config says K=256"),
    (lambda q: q["layer"].update(K=4096), "does not match its tensors"),
    (lambda q: q["layer"].update(codebook_group=1), "fit no layer width"),
])
def test_tensors_must_match_the_config_even_without_manifest_coverage(ck_copy, edit, match):
    _edit(ck_copy, edit, manifest_covers=False)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(ck_copy)
    with pytest.raises(CheckpointError, match=match):
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(ck_copy)


def test_unknown_config_fields_are_refused_naming_the_file(ck_copy):
    _edit(ck_copy, lambda q: q.update(rotation="hadamard"), manifest_covers=False)
    with pytest.raises(ConfigError, match=r"config.json: unknown quantization_config fields \['rotation'\]"):
        load_quantized(ck_copy)
    _edit(ck_copy, lambda q: (q.pop("rotation"), q["layer"].update(colour="red")), manifest_covers=False)
    with pytest.raises(ConfigError, match=r"config.json: unknown pq settings: \['colour'\]"):
        load_quantized(ck_copy)


def test_a_checkpoint_without_manifest_warns_and_info_says_unverified(ck_copy, capsys):
    assert check_checkpoint(ck_copy).status.startswith("verified")
    (ck_copy / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match="cannot be verified"):
        load_quantized(ck_copy)
    assert main(["info", str(ck_copy), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] is False and info["verification"].startswith("unverified")
    assert main(["info", str(ck_copy)]) == 0
    assert "unverified: no fasq_manifest.json" in capsys.readouterr().out


# --- resuming trusts nothing it has not checked; one run per output ------------------------------

class _Stop(Exception):
    pass


def _interrupt_after(monkeypatch, n, exc=_Stop):
    calls, real = [], pipeline.quantize_layer

    def flaky(plan, module, W, device=None):
        calls.append(module)
        if len(calls) == n:
            raise exc()
        return real(plan, module, W, device)

    monkeypatch.setattr(pipeline, "quantize_layer", flaky)
    return calls


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from conftest import save_tiny_llama

    d = save_tiny_llama(tmp_path_factory.mktemp("sh") / "model", dtype=torch.bfloat16, max_shard_size="3MB",
                        num_hidden_layers=3, tie_word_embeddings=False)
    assert len(list(d.glob("*.safetensors"))) >= 3
    return d


def test_resume_redoes_a_finished_shard_whose_bytes_changed(sharded, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    assert main(["quantize", str(sharded), *Q16, "--out", str(full), "--json"]) == 0
    out = tmp_path / "q"
    _interrupt_after(monkeypatch, 9, KeyboardInterrupt)
    assert main(["quantize", str(sharded), *Q16, "--out", str(out), "--json"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    work = pipeline.work_dir(out)
    done = json.loads((work / pipeline.STATE_NAME).read_text())["done"]
    assert done and not out.exists()
    shard = work / sorted(done)[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    monkeypatch.undo()
    assert main(["quantize", str(sharded), *Q16, "--out", str(out)]) == 0
    msg = capsys.readouterr()
    assert "does not match the checksum recorded when it was written: redoing it" in msg.err
    assert "over this and earlier runs" in msg.out  # quantization time counts the earlier run too
    assert check_checkpoint(out).status.startswith("verified")
    assert {k: v for k, v in _snapshot(out).items() if k.suffix == ".safetensors"} == \
           {k: v for k, v in _snapshot(full).items() if k.suffix == ".safetensors"}


def test_a_second_run_to_the_same_output_is_refused_naming_the_first(sharded, tmp_path, capsys):
    out = tmp_path / "q"
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        assert main(["quantize", str(sharded), *Q16, "--out", str(out)]) == 2
        assert f"another fasq run (pid {os.getpid()}) is writing {out}" in capsys.readouterr().err
        with pytest.raises(OutputBusyError):
            pipeline.quantize_streaming(str(sharded), out, QuantConfig(layer=PQConfig(d=2, K=16)), progress=False)
    assert not out.exists() and not pipeline.work_dir(out).exists() and not lock_path(out).exists()
    assert main(["quantize", str(sharded), *Q16, "--out", str(out), "--json"]) == 0
    assert not lock_path(out).exists()


# --- bad input: one line naming the problem and the fix ---------------------------------------------

@pytest.mark.parametrize("damage, match", [
    (lambda f: f.write_bytes(f.read_bytes()[:-1000]), r"has \d+ bytes but its header describes \d+"),
    (lambda f: f.write_bytes(b"\x00\x01\x02\x03"), "only 4 bytes"),
])
def test_a_damaged_input_shard_is_named_before_any_work(sharded, tmp_path, capsys, damage, match):
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    victim = sorted(src.glob("*.safetensors"))[-1]
    damage(victim)
    out = tmp_path / "q"
    assert main(["quantize", str(src), *Q16, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "truncated or corrupted" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written


def test_a_broken_index_is_named(sharded, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    (src / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    assert main(["quantize", str(src), *Q16, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors.index.json is not a valid safetensors index" in err


@pytest.mark.parametrize("cmd", [["quantize", "MODEL", "--out", "OUT"], ["eval", "MODEL"], ["bench", "MODEL"],
                                 ["generate", "MODEL", "hi"]])
def test_devices_this_torch_cannot_use_are_refused(tiny_dir, tmp_path, capsys, cmd):
    cmd = [str(tiny_dir) if c == "MODEL" else str(tmp_path / "o") if c == "OUT" else c for c in cmd]
    assert main([*cmd, "--device", "gpu"]) == 2
    assert "unknown --device 'gpu': use cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*cmd, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert ("CPU build without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible") in err
    assert not (tmp_path / "o").exists()


def test_empty_prompt_and_bad_counts_are_refused(ck, capsys):
    assert main(["generate", str(ck), ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert main(["eval", str(ck), "--windows", "-1"]) == 2
    assert "--windows must be >= 0" in capsys.readouterr().err
    assert main(["eval", str(ck), "--seqlen", "1"]) == 2
    assert "--seqlen must be >= 2" in capsys.readouterr().err


def test_a_bare_name_that_is_not_local_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(["eval", "no-such-model"]) == 2
    assert time.perf_counter() - t0 < 5  # no Hub retries
    assert "not found: no such file or folder, and not a Hub id (owner/name)" in capsys.readouterr().err


def test_skip_patterns_that_match_nothing_are_reported(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), *Q16, "--skip", "embed_tokens", "lm_heed", "--out", str(out),
                 "--json"]) == 0
    err = capsys.readouterr().err
    assert "--skip 'lm_heed' matches no module of the model" in err and "embed_tokens" not in err


def test_loading_hashes_each_file_once_and_still_refuses_a_corrupted_one(ck_copy, monkeypatch):
    from fasq.io import manifest

    hashed, real = [], manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda f: hashed.append(f.name) or real(f))
    load_quantized(ck_copy)
    assert hashed == [WEIGHTS_NAME]  # load_quantized's check; the quantizer inside reuses it
    with open(ck_copy / WEIGHTS_NAME, "r+b") as f:  # one byte flipped at the end of the data
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(ck_copy)
