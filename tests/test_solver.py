import copy
import itertools
import random

import pytest
import torch

from fasq.core.config import PQConfig, QuantConfig
from fasq.io.checkpoint import save_quantized, state_for_saving, write_tensors
from fasq.io.manifest import WEIGHTS_NAME, read_safetensors_header
from fasq.stream.memory import quantize_model
from fasq.core.module import PQLinear
from fasq.quant.quantize import quantize_weight
from fasq.core.config import ConfigError
from fasq.quant.knapsack import knapsack, lp_bound
from fasq.quant.solver import BudgetError, achievable_range, candidate_size, parse_candidates, proxy_error
from fasq.stream.solve import measure_model as measure, solve

torch.set_num_threads(1)

# Small, fast candidates that fit the tiny Llama (64/96-wide layers).
CANDS = [PQConfig(d=4, K=16), PQConfig(d=2, K=16), PQConfig(d=2, K=64), PQConfig(d=2, K=256),
         PQConfig(d=1, K=16), PQConfig(d=1, K=64)]


_CACHE = {}


@pytest.fixture
def table(tiny_llama):
    # tiny_llama is seeded, so one measurement serves every test (keeps the file fast)
    if "t" not in _CACHE:
        _CACHE["t"] = measure(tiny_llama, CANDS, progress=False)
    return _CACHE["t"]


@pytest.fixture
def wtable(tiny_llama):
    """Measured with the input-channel importance, as the output proxies need."""
    if "w" not in _CACHE:
        _CACHE["w"] = measure(tiny_llama, CANDS, progress=False, weighted=True)
    return _CACHE["w"]


def _brute(costs, errs, hi, lo):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[l][j] for l, j in enumerate(pick))
        if lo <= c <= hi:
            e = sum(errs[l][j] for l, j in enumerate(pick))
            if best is None or e < best:
                best = e
    return best


def _file_tensor_bytes(path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header (what is on disk)."""
    return {n: h["data_offsets"][1] - h["data_offsets"][0] for n, h in read_safetensors_header(path).items()}


def test_candidate_size_is_the_bytes_written(tmp_path):
    torch.manual_seed(0)
    W = torch.randn(48, 96)
    for i, cfg in enumerate([PQConfig(d=2, K=32), PQConfig(d=4, K=16, scale="minmax", scale_group=32),
                             PQConfig(d=2, K=8, codebook_scope="subspace", scale="none"), PQConfig(d=1, K=16)]):
        t = quantize_weight(W, cfg)
        pq = PQLinear(96, 48, cfg, bias=True)
        for k, v in t.items():
            if v is not None:
                getattr(pq, k).copy_(v)
        f = tmp_path / f"layer{i}.safetensors"
        write_tensors(state_for_saving(pq, torch.float16), f)
        assert candidate_size(48, 96, cfg, bias=True).total == sum(_file_tensor_bytes(f).values()), cfg


def test_knapsack_matches_brute_force():
    rng = random.Random(0)
    checked = 0
    for trial in range(150):
        L, n = rng.randint(2, 5), rng.randint(2, 5)
        costs, errs = [], []
        for _ in range(L):
            c = sorted(rng.sample(range(10, 200), n))
            e = sorted((rng.random() * 10 for _ in range(n)), reverse=True)
            if rng.random() < 0.3:  # some non-convex / dominated options
                e = [rng.random() * 10 for _ in range(n)]
            costs.append(c), errs.append(e)
        cmin, cmax = sum(map(min, costs)), sum(map(max, costs))
        hi = rng.randint(cmin, cmax)
        lo = int(hi * 0.9)
        best = _brute(costs, errs, hi, lo)
        if best is None:
            with pytest.raises(BudgetError):
                knapsack(costs, errs, hi, lo)
            continue
        pick = knapsack(costs, errs, hi, lo)
        total = sum(costs[l][j] for l, j in enumerate(pick))
        assert lo <= total <= hi
        assert sum(errs[l][j] for l, j in enumerate(pick)) == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert lp_bound(costs, errs, hi) <= best + 1e-9
        checked += 1
    assert checked > 100


def test_knapsack_without_lower_bound_is_lagrangian_exact_on_convex():
    # Convex, evenly spaced options: the Lagrangian prefix alone is optimal.
    costs = [[10, 20, 30, 40]] * 3
    errs = [[8.0, 4.0, 2.0, 1.0], [16.0, 8.0, 4.0, 2.0], [4.0, 2.0, 1.0, 0.5]]
    pick = knapsack(costs, errs, 80)
    assert sum(costs[l][j] for l, j in enumerate(pick)) <= 80
    assert sum(errs[l][j] for l, j in enumerate(pick)) == _brute(costs, errs, 80, 0)


@pytest.mark.parametrize("kw", [dict(target_bits=3.0), dict(target_bits=4.5), dict(target_bits=6.0),
                                dict(target_size=0.36), dict(target_size=0.42), dict(target_size=0.5)])
def test_budget_hit_with_real_quantization(tiny_llama, table, kw, tmp_path):
    qcfg, rep = solve(tiny_llama, table=table, **kw)
    model = copy.deepcopy(tiny_llama)
    report = quantize_model(model, qcfg, progress=False)
    st = report["size"]
    ck = save_quantized(model, tmp_path / "ck", report=report)
    assert rep.predicted["total_bytes"] == sum(_file_tensor_bytes(ck / WEIGHTS_NAME).values())  # bytes on disk
    assert st["total_bytes"] == rep.predicted["total_bytes"]
    assert st["fp16_bytes"] == rep.predicted["fp16_bytes"]
    assert st["bits_per_weight"] == pytest.approx(rep.predicted["bits_per_weight"], rel=1e-12)
    key, target = (("bits_per_weight", kw["target_bits"]) if "target_bits" in kw
                   else ("size_fraction_of_fp16", kw["target_size"]))
    assert 0.99 * target <= st[key] <= target
    # every quantized module has its own override, and they round-trip through the config dict
    assert set(qcfg.overrides) == set(qcfg.modules)
    assert QuantConfig.from_dict(qcfg.to_dict()).overrides == qcfg.overrides


def test_monotone_in_budget(tiny_llama, table):
    prev = None
    for b in [2.8, 3.0, 3.3, 3.6, 4.0, 4.5, 5.0, 5.5, 6.0]:
        _, rep = solve(tiny_llama, table=table, target_bits=b)
        if prev is not None:
            assert rep.proxy_total <= prev + 1e-12
        prev = rep.proxy_total


def test_impossible_budgets(tiny_llama, table):
    rng = achievable_range(table)
    lo_bits, hi_bits = rng["bits_per_weight"]
    with pytest.raises(BudgetError, match="below the smallest.*achievable range"):
        solve(tiny_llama, table=table, target_bits=lo_bits * 0.9)
    with pytest.raises(BudgetError, match="above the largest.*achievable range"):
        solve(tiny_llama, table=table, target_bits=hi_bits * 1.2)
    with pytest.raises(BudgetError, match="achievable range"):
        solve(tiny_llama, table=table, target_size=0.05)
    with pytest.raises(BudgetError):
        solve(tiny_llama, table=table, target_size=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        solve(tiny_llama, table=table, target_bits=3.0, target_size=0.4)
    with pytest.raises(ValueError, match="exactly one"):
        solve(tiny_llama, table=table)
    # the upper end of the range is reachable (it is within 1 % of itself)
    qcfg, rep = solve(tiny_llama, table=table, target_bits=hi_bits)
    assert 0.99 * hi_bits <= rep.predicted["bits_per_weight"] <= hi_bits


@pytest.mark.parametrize("proxy", ["rel", "output"])
def test_deterministic(tiny_llama, table, wtable, proxy):
    first = wtable if proxy == "output" else table
    t2 = measure(tiny_llama, CANDS, progress=False, weighted=proxy == "output")
    assert [l.sq_error for l in t2.layers] == [l.sq_error for l in first.layers]
    assert [l.out_error for l in t2.layers] == [l.out_error for l in first.layers]
    assert first.importance == ("random-tokens" if proxy == "output" else "none")
    a, ra = solve(tiny_llama, table=first, target_bits=3.7, importance=proxy)
    b, rb = solve(tiny_llama, table=t2, target_bits=3.7, importance=proxy)
    assert a.to_dict() == b.to_dict() and ra.layers == rb.layers


def test_solve_measures_and_skips(tiny_llama):
    qcfg, rep = solve(tiny_llama, target_bits=4.0, candidates=CANDS[1:4], skip=("embed_tokens", "lm_head",
                                                                              "down_proj"), progress=False)
    assert not any("down_proj" in n for n in qcfg.overrides)
    assert len(rep.layers) == 2 * 6 and "bits/weight" in rep.format()
    qr, rr = solve(tiny_llama, target_bits=4.0, candidates=CANDS[1:4], importance="output", progress=False)
    assert rr.importance == "output" and rr.predicted["bits_per_weight"] <= 4.0
    assert rep.importance == "rel" and rep.proxy_importance == "none"  # the default proxy
    assert "proxy             rel: relative weight error" in rep.format()
    assert rr.proxy_importance == "random-tokens"
    assert "proxy             output: relative output error" in rr.format() and "random-tokens" in rr.format()
    with pytest.raises(ValueError, match="proxy"):
        solve(tiny_llama, target_bits=4.0, candidates=CANDS[1:4], importance="weights", progress=False)


def test_output_proxy_ranks_candidates_by_the_important_channel():
    """With all importance on input channel 0, the output proxy is the error on that channel
    of the importance-weighted quantization, and ranks candidates by it; the weight-error
    proxy ranks them otherwise."""
    from fasq.core.ops import dequantize

    torch.manual_seed(0)
    W = torch.randn(256, 16)
    W[:, 0] *= 0.1
    imp = torch.full((16,), 1e-13)
    imp[0] = 1.0
    # no scales: a scale fitted to the one channel would make its error vanish for every candidate
    cands = [PQConfig(d=d, K=K, codebook_scope="matrix", scale="none")
             for d, K in ((1, 16), (2, 64), (4, 64), (1, 4), (4, 256), (2, 256))]
    out = [proxy_error(W, c, sample_rows=None, proxy_iters=None, importance=imp) for c in cands]
    plain = [proxy_error(W, c, sample_rows=None, proxy_iters=None) for c in cands]
    col0 = []
    for c in cands:
        t = quantize_weight(W, c, importance=imp)
        E = (W - dequantize(t["codes"], t["codebooks"], t["scales"], t["offsets"], dtype=torch.float32)).double()
        col0.append(E[:, 0].pow(2).sum().item())
        assert (E.pow(2).sum(0) * imp.double()).sum().item() == pytest.approx(out[len(col0) - 1], rel=1e-6)
    assert out == pytest.approx(col0, rel=1e-3)
    rank = lambda v: sorted(range(len(v)), key=v.__getitem__)  # noqa: E731
    assert rank(out) == rank(col0)
    assert rank(plain) != rank(out)  # the channel's error is not what the weight error sees


def test_measured_tables_use_each_layers_importance(tiny_llama, wtable):
    """The weighted table's errors are those of each layer's own importance (the
    random-token estimate the quantization uses); the unweighted one is the plain proxy."""
    from fasq.quant.importance import estimate

    names = [t.name for t in wtable.layers]
    imp = estimate(tiny_llama, "random-tokens", names)
    plain = measure(tiny_llama, CANDS, progress=False, weighted=False)
    assert plain.importance == "none"
    for i in (0, 6, len(names) - 1):
        t, p = wtable.layers[i], plain.layers[i]
        W = tiny_llama.get_submodule(t.name).weight.detach()
        for k, j in enumerate(t.options[:3]):
            assert t.out_error[k] == pytest.approx(proxy_error(W, CANDS[j], name=t.name, importance=imp[t.name]),
                                                   rel=1e-9)
            assert p.sq_error[k] == pytest.approx(proxy_error(W, CANDS[j], name=t.name), rel=1e-9)
            assert p.out_error[k] == p.sq_error[k]
        assert t.weight_out_norm == pytest.approx(
            (W.double().pow(2).sum(0) * imp[t.name].double()).sum().item(), rel=1e-9)
    # the weighted k-means changes what is measured, and the output proxy orders layers otherwise
    assert [l.sq_error for l in plain.layers] != [l.sq_error for l in wtable.layers]
    assert wtable.errors("output") != wtable.errors("rel")
    flat = lambda errs: [e for row in errs for e in row]  # noqa: E731
    assert flat(plain.errors("output")) == pytest.approx(flat(plain.errors("rel")))  # no importance: the same


def test_solver_keeps_the_base_configs_seed(tiny_llama, table):
    qa, _ = solve(tiny_llama, table=table, target_bits=3.7)
    qb, _ = solve(tiny_llama, table=table, target_bits=3.7, base=QuantConfig(layer=PQConfig(seed=7)))
    assert {c.seed for c in qa.overrides.values()} == {0}
    assert {c.seed for c in qb.overrides.values()} == {7}
    assert {n: c.label() for n, c in qa.overrides.items()} == {n: c.label() for n, c in qb.overrides.items()}
    ma, mb = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    quantize_model(ma, qa, progress=False), quantize_model(mb, qb, progress=False)
    name = next(iter(qa.overrides))
    assert not torch.equal(ma.get_submodule(name).codebooks, mb.get_submodule(name).codebooks)


def test_proxy_error_tracks_real_error():
    torch.manual_seed(1)
    W = torch.randn(256, 64)
    cfg = PQConfig(d=2, K=64)
    t = quantize_weight(W, cfg)
    from fasq.core.ops import dequantize
    real = (W - dequantize(t["codes"], t["codebooks"], t["scales"], t["offsets"], dtype=torch.float32)).pow(2).sum()
    assert proxy_error(W, cfg, sample_rows=None, proxy_iters=None) == pytest.approx(real.item(), rel=1e-5)
    est = proxy_error(W, cfg, sample_rows=128, proxy_iters=6)
    assert est == pytest.approx(real.item(), rel=0.2)


def test_parse_candidates():
    c = parse_candidates("d2K256, d3K512,d4K16")
    assert [(x.d, x.K, x.codebook_scope, x.scale) for x in c] == [(2, 256, "matrix", "absmax"),
                                                                  (3, 512, "matrix", "absmax"),
                                                                  (4, 16, "matrix", "absmax")]
    for bad, msg in (("d2k256", "d<D>K<K>"), ("d2K256,,d3K8", "d<D>K<K>"), ("d2K256,d2K256", "repeats"),
                     ("d0K16", "d")):
        with pytest.raises(ConfigError, match=msg):
            parse_candidates(bad)
