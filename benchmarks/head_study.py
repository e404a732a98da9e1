"""The output head alone: WikiText-2 perplexity of the default model with only lm_head
quantized (every other layer as it is), for the formats a head could take.

    python benchmarks/head_study.py [--windows 10] [--out benchmarks/results/head-study-smollm2.json]

The default model ties its head to the input embeddings; `--lm-head` unties it (the
embeddings stay unquantized). Each config is quantized in memory with `fasq.quantize_model`
(the tensors `fasq quantize default --lm-head ...` writes for the head) and evaluated on the
first `--windows` windows of 2048 tokens of WikiText-2 test, fp32, exact kernels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "head-study-smollm2.json"


def configs() -> dict:
    from fasq.core.config import PQConfig, RTNConfig

    return {
        "dense (bf16 source values)": None,
        "rtn8 g64 (--lm-head rtn8)": RTNConfig(bits=8, group_size=64),
        "d2K256, the default layer config (--lm-head same)": PQConfig(),
        "d2K256, a codebook per 8 subspaces": PQConfig(codebook_scope="group", codebook_group=8),
        "d1K16, scales per 32 columns": PQConfig(d=1, K=16, scale_group=32),
        "rtn4 g32": RTNConfig(bits=4, group_size=32),
    }


def main(argv=None) -> int:
    from fasq.core.config import QuantConfig
    from fasq.eval.data import wikitext2_test
    from fasq.eval.perplexity import perplexity, tokenize_text
    from fasq.io.sources import load_model
    from fasq.stream.memory import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    rows, ids = [], None
    for name, cfg in configs().items():
        model, tok = load_model("default", dtype=torch.float32)
        ids = tokenize_text(tok, wikitext2_test()) if ids is None else ids
        bits = None
        if cfg is not None:  # only the head: every block's layers skipped
            rep = quantize_model(model, QuantConfig(layer=cfg, skip=("embed_tokens", "layers")), progress=False)
            assert [r["name"] for r in rep["layers"]] == ["lm_head"]
            bits = round(rep["layers"][0]["bits_per_weight"], 4)
        ppl = perplexity(model, ids, windows=a.windows, progress=False)["perplexity"]
        rows.append({"config": name, "head_bits_per_weight": bits, "perplexity": round(ppl, 3)})
        print(f"{name:<52} head bits {bits or '-':>7}  WikiText-2 {ppl:.3f}", flush=True)
    res = {"what": "default model, only lm_head quantized, WikiText-2 perplexity (fp32, exact kernels)",
           "command": "python benchmarks/head_study.py " + " ".join(argv or []), "windows": a.windows,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
