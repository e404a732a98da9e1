"""The size-quality frontier on the default model: FASQ configs, the target-size solver, RTN,
HQQ, GPTQ and AWQ, by WikiText-2 perplexity (issue-2 protocol: first 10 windows of 2048
tokens) and, with --zeroshot, average zero-shot accuracy over ARC-Easy, ARC-Challenge, PIQA.

    python benchmarks/frontier.py                       # measure missing rows, table + plot
    python benchmarks/frontier.py --only GPTQ AWQ       # (re)measure rows whose name has GPTQ/AWQ
    python benchmarks/frontier.py --zeroshot 100        # + zero-shot on the first 100 per task
    python benchmarks/frontier.py --zeroshot 0 --only "reference" "GPTQ 4-bit"   # full sets
    python benchmarks/frontier.py --plot-only

Every row is the `fasq` command lines it prints (`fasq quantize` for FASQ/RTN, `fasq baseline`
for HQQ/GPTQ/AWQ, run with --baseline-python: the environment of `make baselines-env`, since
llmcompressor pins its own transformers). Rows of benchmarks/ppl_table.py (same protocol) are
read from its JSON, not re-measured. Results: benchmarks/results/frontier-smollm2.json and
frontier-smollm2.png; checkpoints stay in runs/frontier/ (git-ignored) for later zero-shot runs.

Rows measured over k-means seeds by benchmarks/seed_study.py (SEED_STUDY below: the default
with and without the importance weighting, the uniform rows, the solver rows) are read from
its JSON files, not re-measured here: perplexity is the mean over the seeds, drawn with the
min-max range as an error bar; every run (--plot-only too) writes the merged rows back to
frontier-smollm2.json. FASQ rows measured before the importance weighting (a row
without an `importance` field; `fasq quantize --importance none` gives the same tensors) are
drawn hollow and kept off the frontier until `--only NAME` re-measures them. The seed-study
rows have no checkpoint here, so no zero-shot; the default's (one seed, full sets) is read from
benchmarks/results/zeroshot-default-smollm2.json.

The default model's weights are Q4_1 (4-bit, groups of 32): 4-bit RTN with groups of 32 is
lossless on it by construction, so baselines use groups of 192 (the usual 128 does not divide
576; 192 divides 576 and 1536) and that RTN g32 row is drawn hollow, off the frontier.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppl_table import ROWS as PPL_ROWS, run  # noqa: E402  (the issue-2 rows and the `fasq` runner)

RESULTS = HERE / "results" / "frontier-smollm2.json"
PLOT = HERE / "results" / "frontier-smollm2.png"
PPL_TABLE = HERE / "results" / "ppl-smollm2.json"
CKPTS = Path("runs/frontier")
TASKS = "arc_easy,arc_challenge,piqa"
OFF_FRONTIER = ("lossless",)  # names drawn hollow and kept off the frontier
SEED_DIR = HERE / "results"
ZEROSHOT_DEFAULT = HERE / "results" / "zeroshot-default-smollm2.json"  # the default's zero-shot (full sets)
DEFAULT_ROW = "FASQ d=2, K=256, codebook per 96 subspaces, scale per 96 cols (default)"
UNWEIGHTED = "FASQ d=2, K=256, codebook per 96 subspaces, scale per 96 cols, --importance none (the default before)"
# row name -> (benchmarks/seed_study.py results file, its config name); the row's perplexity is
# the mean over the seeds measured there
SEED_STUDY = {
    DEFAULT_ROW: ("seeds-study-smollm2.json", "default, importance random-tokens"),
    UNWEIGHTED: ("seeds-study-none-smollm2.json", "default, no importance"),
    **{f"FASQ d={d}, K={K}, one codebook, scale per 96 cols": ("seeds-study-smollm2.json", f"d={d} K={K}, one codebook")
       for d, K in ((2, 512), (2, 256), (2, 128), (3, 512), (2, 64))},
    "FASQ solver, --target-bits 3.1, default candidates + d=3 K=256/512/1024": (
        "seeds-study-solver-smollm2.json", "solver 3.1 bits (d3 candidates), proxy rel"),
    "FASQ solver, --target-size 0.4192 (the default's size)": (
        "seeds-study-solver-smollm2.json", "solver at the default's size, proxy rel"),
    "FASQ d=2, K=256, one codebook, per-row scales": ("seeds-study-smollm2.json",
                                                      "d=2 K=256, one codebook, per-row scales"),
    "FASQ solver, --target-size 0.4132 (GPTQ/AWQ 4-bit g192's size)": (
        "seeds-study-solver-smollm2.json", "solver at GPTQ/AWQ 4-bit g192's size, proxy rel"),
    "FASQ solver, per-layer (d, K), --target-size 0.392 (d=2 K=128's size)": (
        "seeds-study-solver-smollm2.json", "solver at d=2 K=128's size, proxy rel"),
    "FASQ solver, --target-size 0.3636 (GPTQ/AWQ 3-bit g192's size)": (
        "seeds-study-solver-smollm2.json", "solver at GPTQ/AWQ 3-bit g192's size, proxy rel"),
}

D3_CANDIDATES = "d4K64,d4K256,d4K1024,d3K256,d3K512,d3K1024,d2K32,d2K64,d2K128,d2K256,d2K512,d1K16,d1K32,d1K64"

# name -> (family, command kind, options); kind "fasq" = `fasq quantize`, "baseline" = `fasq baseline`
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "RTN 4-bit g192": ("RTN", "fasq", ["--method", "rtn", "--bits", "4", "--group-size", "192"]),
    "RTN 3-bit g192": ("RTN", "fasq", ["--method", "rtn", "--bits", "3", "--group-size", "192"]),
    "RTN 4-bit per-row": ("RTN", "fasq", ["--method", "rtn", "--bits", "4", "--group-size", "0"]),
    **{f"{m.upper()} {b}-bit g192": (m.upper(), "baseline", [m, "--bits", str(b), "--group-size", "192"])
       for m in ("hqq", "gptq") for b in (4, 3)},
    # AWQ's grid search runs the block forward 20 times per mapping over the whole calibration
    # cache: with 128 windows it did not finish in 115 min on a 2-core CPU. AWQ is data
    # efficient (its paper: 16 calibration sequences beat GPTQ's 192), so 32 windows of 512.
    **{f"AWQ {b}-bit g192": ("AWQ", "baseline", ["awq", "--bits", str(b), "--group-size", "192",
                                                 "--calib-samples", "32"]) for b in (4, 3)},
    # the solver at the baselines' sizes (GPTQ/AWQ g192 store b-bit zero points: 41.32 % / 36.36 %)
    "FASQ solver, --target-size 0.4132 (GPTQ/AWQ 4-bit g192's size)": ("FASQ solver", "fasq", ["--target-size", "0.4132"]),
    "FASQ solver, --target-size 0.3636 (GPTQ/AWQ 3-bit g192's size)": ("FASQ solver", "fasq", ["--target-size", "0.3636"]),
    # the default candidates have no d=3, the best uniform config at ~3 bits (d=3 K=512)
    "FASQ solver, --target-size 0.3636, default candidates + d=3 K=256/512/1024": (
        "FASQ solver", "fasq", ["--target-size", "0.3636", "--candidates", D3_CANDIDATES]),
    "FASQ solver, --target-size 0.4425 (d=2 K=512's size)": ("FASQ solver", "fasq", ["--target-size", "0.4425"]),
    "FASQ d=4, K=256, one codebook, scale per 96 cols": ("FASQ", "fasq", ["-d", "4", "-K", "256", "--scope", "matrix"]),
    "FASQ solver, --target-size 0.32": ("FASQ solver", "fasq", ["--target-size", "0.32"]),
    # slow on CPU (k-means with 4096 centroids on every matrix)
    "FASQ d=4, K=4096, one codebook, scale per 96 cols": ("FASQ", "fasq", ["-d", "4", "-K", "4096", "--scope", "matrix"]),
}


def family_of(name: str) -> str:
    if name in ROWS:
        return ROWS[name][0]
    for fam in ("FASQ solver", "FASQ", "RTN", "reference"):
        if name.startswith(fam) or fam in name:
            return fam
    return "other"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:80]


def build(name: str, sp: tuple[str, list[str]], ck: Path, baseline_python: str, rebuild: bool) -> dict:
    """Quantize one row into `ck` (a complete earlier `ck` is reused unless `rebuild`)."""
    kind, opts = sp
    if kind == "fasq":
        q = ["quantize", "default", *opts, "--out", str(ck), "--overwrite"]
        if rebuild or not (ck / "fasq_report.json").is_file():
            run(q)
        info = run(["info", str(ck)])
        extra = {"mean_sqnr_db": info["mean_sqnr_db"]}
        # the checkpoint's importance weighting (older checkpoints: none); rows without it predate it
        extra["importance"] = info.get("quantization_config", {}).get("importance", "none")
    else:
        q = ["baseline", opts[0], "default", *opts[1:], "--out", str(ck), "--overwrite"]
        done = ck / "fasq_baseline.json"
        info = run(q, baseline_python) if rebuild or not done.is_file() else json.loads(done.read_text())
        extra = {"library": info["library"], "calibration": info.get("calibration")}
    return {"name": name, "family": family_of(name), "checkpoint": str(ck), "commands": ["fasq " + shlex.join(q)],
            "bits_per_weight": info["bits_per_weight"], "size_fraction_of_fp16": info["size_fraction_of_fp16"],
            "quantize_seconds": info["seconds"], **extra}


def perplexity(row: dict, model: str, windows: int) -> None:
    ev = ["eval", model, "--ppl", "--windows", str(windows)]
    res = run(ev)
    row.update(perplexity=res["perplexity"], windows=res["windows"], tokens=res["tokens"])
    row["commands"].append("fasq " + shlex.join(ev))


def zeroshot(row: dict, model: str, limit: int, batch_size: int) -> None:
    """Adds row['zeroshot'][<'full' | 'first N'>] = {tasks, avg_acc, avg_acc_norm}."""
    ev = ["eval", model, "--tasks", TASKS, "--batch-size", str(batch_size)] + (["--limit", str(limit)] if limit else [])
    tasks = run(ev)["tasks"]
    key = f"first {limit}" if limit else "full"
    row.setdefault("zeroshot", {})[key] = {
        "tasks": tasks, "command": "fasq " + shlex.join(ev),
        "avg_acc": sum(t["acc"] for t in tasks.values()) / len(tasks),
        "avg_acc_norm": sum(t["acc_norm"] for t in tasks.values()) / len(tasks)}


def seed_study_row(name: str, base: dict | None, study: dict, config: str, source: str) -> dict:
    """The frontier row `name` from a seed-study results file: perplexity = the mean over its
    seeds, with min, max, spread and the per-seed values; of `base` (the row as measured
    before, if any) only its single run's perplexity and zero-shot are kept, as
    perplexity_before_importance and zeroshot_before_importance."""
    runs = [r for r in study["rows"] if r["config"] == config]
    s = study["summary"][config]
    row = {"name": name, "family": family_of(name), "source": f"benchmarks/seed_study.py ({source})",
           "commands": [study["cli"][config], "seeds: " + ",".join(map(str, s["seeds"]))],
           "importance": _importance_of(study["cli"][config]),
           "bits_per_weight": statistics.mean(r["bits_per_weight"] for r in runs),
           "size_fraction_of_fp16": statistics.mean(r["size_fraction_of_fp16"] for r in runs),
           "perplexity": s["mean"], "perplexity_min": s["min"], "perplexity_max": s["max"],
           "perplexity_spread": s["spread"], "seeds": s["seeds"],
           "perplexity_per_seed": [r["perplexity"] for r in runs], "windows": runs[0]["windows"]}
    if base and "perplexity_before_importance" in base:
        for k in ("perplexity_before_importance", "zeroshot_before_importance"):
            if k in base:
                row[k] = base[k]
    elif base and "seeds" not in base and "importance" not in base and "perplexity" in base:
        row["perplexity_before_importance"] = base["perplexity"]  # the one run measured before
        if "zeroshot" in base:
            row["zeroshot_before_importance"] = base["zeroshot"]
    return row


def _importance_of(cli: str) -> str:
    opts = cli.split()
    return opts[opts.index("--importance") + 1] if "--importance" in opts else "random-tokens"


def before_importance(row: dict) -> bool:
    """A FASQ row measured before the importance weighting (it records no `importance`), or
    one measured with it off."""
    return row["family"] in ("FASQ", "FASQ solver") and row.get("importance", "none") == "none"


def load_rows(seed_dir: Path | None = None) -> dict[str, dict]:
    seed_dir = SEED_DIR if seed_dir is None else seed_dir
    rows = {}
    if PPL_TABLE.exists():  # issue-2 rows, same protocol; their checkpoints are not kept
        for r in json.loads(PPL_TABLE.read_text())["rows"]:
            rows[r["name"]] = {**r, "family": family_of(r["name"]), "source": "benchmarks/ppl_table.py"}
    if RESULTS.exists():
        for r in json.loads(RESULTS.read_text())["rows"]:
            rows[r["name"]] = {**rows.get(r["name"], {}), **r}
    return with_seed_studies(rows, seed_dir)


def with_seed_studies(rows: dict[str, dict], seed_dir: Path) -> dict[str, dict]:
    """`rows` with every SEED_STUDY row taken from its seed-study file (where that file has
    the config), and the default's zero-shot accuracy from ZEROSHOT_DEFAULT."""
    studies: dict[str, dict] = {}
    for name, (fname, config) in SEED_STUDY.items():
        path = seed_dir / fname
        if fname not in studies:
            studies[fname] = json.loads(path.read_text()) if path.exists() else {"summary": {}}
        if config in studies[fname]["summary"]:
            rows[name] = seed_study_row(name, rows.get(name), studies[fname], config, fname)
    zs = seed_dir / ZEROSHOT_DEFAULT.name
    if DEFAULT_ROW in rows and zs.exists():
        z = json.loads(zs.read_text())
        rows[DEFAULT_ROW]["zeroshot"] = {"full": {
            "tasks": z["tasks"], "command": z["command"], "config": z["config"],
            "avg_acc": z["avg_acc"], "avg_acc_norm": z["avg_acc_norm"]}}
        old = z.get("compare", {}).get("default_without_importance")
        if UNWEIGHTED in rows and old:
            rows[UNWEIGHTED]["zeroshot"] = {"full": {k: old[k] for k in
                                                     ("tasks", "command", "config", "avg_acc", "avg_acc_norm")}}
    return rows


def save_row(row: dict, windows: int, replace_all: list[dict] | None = None) -> None:
    """Merge one row into the results file (re-read first: several sweeps may run at once);
    `replace_all`: write these rows instead."""
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    rows = replace_all if replace_all is not None else [r for r in rows if r["name"] != row["name"]] + [row]
    payload = {"model": "SmolLM2-135M-Instruct (default, Q4_1 origin)",
               "protocol": f"WikiText-2 test, first {windows} windows of 2048 tokens; zero-shot: lm-eval "
                           f"0.4.13 log-likelihood, acc, {TASKS}", "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, RESULTS)


def spec(name: str) -> tuple[str, list[str]] | None:
    """(command kind, options) of a row, from this file or ppl_table.py; None: the reference."""
    if name in ROWS:
        return ROWS[name][1:]
    opts = PPL_ROWS.get(name)
    return None if opts is None else ("fasq", opts)


def measure(name: str, rows: dict, a) -> None:
    row = rows.get(name) or {"name": name, "family": family_of(name)}
    sp = spec(name)
    ck = row.get("checkpoint")
    have_ck = sp is None or bool(ck and Path(ck).exists())
    fresh = False
    if sp is not None and (a.rebuild or "perplexity" not in row or (a.zeroshot is not None and not have_ck)):
        keep = {} if a.rebuild else {k: row[k] for k in ("zeroshot", "perplexity", "windows", "tokens") if k in row}
        row = {**build(name, sp, CKPTS / slug(name), a.baseline_python, a.rebuild), **keep}
        fresh = "perplexity" not in keep
    model = "default" if sp is None else row["checkpoint"]
    if "perplexity" not in row or fresh:
        perplexity(row, model, a.windows)
    if a.zeroshot is not None:
        zeroshot(row, model, a.zeroshot, a.batch_size)
    rows[name] = row


def selected(name: str, patterns: list[str], names: list[str]) -> bool:
    """--only: a pattern that is a whole row name picks that row alone, any other is a substring."""
    return any(name == p if p in names else p in name for p in patterns)


def frontier(points: list[tuple[float, float, str]]) -> list[str]:
    """Names on the lower-left Pareto frontier of (size, error): nothing smaller is as good."""
    best, names = float("inf"), []
    for x, y, name in sorted(points):
        if y < best:
            best, names = y, names + [name]
    return names


def zs_avg(row: dict, key: str | None) -> float | None:
    z = row.get("zeroshot", {})
    return z[key]["avg_acc"] if key in z else None


def plot(rows: list[dict], out: Path, zs_key: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("perplexity", "WikiText-2 perplexity (log)", False)]
    if zs_key and any(zs_avg(r, zs_key) is not None for r in rows):
        metrics.append(("zeroshot", f"avg zero-shot acc (ARC-E, ARC-C, PIQA; {zs_key})", True))
    axes_x = [("bits_per_weight", "bits per quantized weight (all overhead)"),
              ("size_fraction_of_fp16", "model size, % of FP16")]
    fig, axs = plt.subplots(len(metrics), 2, figsize=(13, 5 * len(metrics)), squeeze=False)
    styles = {"FASQ": "o", "FASQ solver": "*", "RTN": "s", "HQQ": "^", "GPTQ": "D", "AWQ": "v"}
    colors = {fam: f"C{k}" for k, fam in enumerate(styles)}  # the same colour per family in every panel
    for i, (metric, ylabel, higher) in enumerate(metrics):
        val = (lambda r: r.get("perplexity")) if metric == "perplexity" else (lambda r: zs_avg(r, zs_key))
        ref = next((val(r) for r in rows if r["family"] == "reference"), None)
        pts = [r for r in rows if r["family"] != "reference" and val(r) is not None]
        for j, (xkey, xlabel) in enumerate(axes_x):
            ax = axs[i][j]
            scale = 100 if xkey == "size_fraction_of_fp16" else 1
            for fam, mk in styles.items():
                fr = [r for r in pts if r["family"] == fam and not before_importance(r)]
                for hollow in (False, True):
                    sel = [r for r in fr if any(s in r["name"] for s in OFF_FRONTIER) == hollow]
                    if sel:
                        ax.scatter([scale * r[xkey] for r in sel], [val(r) for r in sel], marker=mk, s=60,
                                   label=fam + (" (lossless on Q4_1 origin)" if hollow else ""),
                                   facecolors="none" if hollow else colors[fam],
                                   edgecolors="k" if hollow else colors[fam])
            old = [r for r in pts if before_importance(r)]
            if old:
                ax.scatter([scale * r[xkey] for r in old], [val(r) for r in old], marker="o", s=60,
                           facecolors="none", edgecolors="gray",
                           label="FASQ / solver without importance weighting (off the frontier)")
            bars = [r for r in pts if metric == "perplexity" and "perplexity_min" in r and not before_importance(r)]
            if bars:
                ax.errorbar([scale * r[xkey] for r in bars], [val(r) for r in bars],
                            yerr=[[val(r) - r["perplexity_min"] for r in bars],
                                  [r["perplexity_max"] - val(r) for r in bars]],
                            fmt="none", ecolor="k", elinewidth=1, capsize=3)
            on = [r for r in pts if not any(s in r["name"] for s in OFF_FRONTIER) and not before_importance(r)]
            names = set(frontier([(r[xkey], -val(r) if higher else val(r), r["name"]) for r in on]))
            fr = sorted((r for r in on if r["name"] in names), key=lambda r: r[xkey])
            ax.step([scale * r[xkey] for r in fr], [val(r) for r in fr], where="post", color="k", lw=1,
                    alpha=0.6, label="frontier")
            if ref is not None:
                ax.axhline(ref, ls="--", color="gray", label=f"reference ({ref:.3g})")
            if metric == "perplexity":
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: size vs quality (baselines: groups of 192; FASQ: mean over "
                 "k-means seeds, bars min-max; see README)")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def ppl_cell(r: dict) -> str:
    """Perplexity as the table shows it: the mean over seeds with min-max, or the one run."""
    if "perplexity_min" in r:
        return (f"{r['perplexity']:.2f} ({r['perplexity_min']:.2f}-{r['perplexity_max']:.2f}, "
                f"{len(r['seeds'])} seeds)")
    return f"{r.get('perplexity', float('nan')):.2f}" + (" (seed 0)" if r["family"] in ("FASQ", "FASQ solver") else "")


def table(rows: list[dict], zs_key: str | None) -> str:
    on = [r for r in rows if r["family"] != "reference" and not any(s in r["name"] for s in OFF_FRONTIER)
          and not before_importance(r)]
    names = set(frontier([(r["bits_per_weight"], r["perplexity"], r["name"]) for r in on if "perplexity" in r]))
    head = "| method | config | bits/weight | % of FP16 | WikiText-2 ppl |" + (f" avg acc ({zs_key}) |" if zs_key else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: -r["bits_per_weight"]):
        z = zs_avg(r, zs_key) if zs_key else None
        mark = " **(frontier)**" if r["name"] in names else ""
        if before_importance(r) and r["name"] != UNWEIGHTED:
            mark = " *(before the importance weighting, not re-measured)*"
        lines.append(f"| {r['family']} | {r['name']}{mark} | {r['bits_per_weight']:.3f} | "
                     f"{100 * r['size_fraction_of_fp16']:.1f} | {ppl_cell(r)} |"
                     + ((f" {100 * z:.1f} |" if z is not None else " |") if zs_key else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="rows to measure: whole row names, or substrings of them")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--zeroshot", type=int, default=None, metavar="LIMIT",
                    help="also run zero-shot on the first LIMIT examples per task (0 = full sets)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rebuild", action="store_true", help="re-quantize and re-measure the selected rows")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--plot-zeroshot", default=None, help="zero-shot key to plot, e.g. 'first 100' or 'full' "
                    "(default: the one most rows have)")
    ap.add_argument("--baseline-python", default=str(Path(".venv-baselines/bin/python")),
                    help="python of the environment with hqq and llmcompressor (make baselines-env)")
    a = ap.parse_args()
    rows = load_rows()
    if not a.plot_only:
        names = list(dict.fromkeys([*rows, *ROWS]))
        for name in names:
            if name in SEED_STUDY and name in rows and rows[name].get("seeds"):
                continue  # measured over seeds by benchmarks/seed_study.py
            if (a.only and selected(name, a.only, names)) or (not a.only and "perplexity" not in rows.get(name, {})):
                measure(name, rows, a)
                save_row(rows[name], a.windows)
                print(json.dumps({k: v for k, v in rows[name].items() if k != "commands"}), flush=True)
    rows = load_rows()  # with rows other sweeps may have added meanwhile
    keys = [k for r in rows.values() for k in r.get("zeroshot", {})]
    zs_key = a.plot_zeroshot or (max(set(keys), key=keys.count) if keys else None)
    done = [r for r in rows.values() if "perplexity" in r]
    save_row({}, a.windows, replace_all=done)  # the seed-study rows, merged
    plot(done, PLOT, zs_key)
    print(table(done, zs_key))
    print(f"\nwrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
