"""Evaluation text: WikiText-2 (raw) test split, from a local folder or the Hub.

Data folder: `--data-dir`, else $FASQ_DATA_DIR, else `../shared/data` when it exists.
Local layout: `<data_dir>/wikitext-2-raw/wiki.test.raw` (the raw file; a copy whose blank
lines were dropped works too: the Hub's rows are rebuilt from it, see `hub_rows`).
"""

from __future__ import annotations

import os
from pathlib import Path

WIKITEXT_FILE = Path("wikitext-2-raw") / "wiki.test.raw"


def default_data_dir() -> Path | None:
    env = os.environ.get("FASQ_DATA_DIR")
    if env:
        return Path(env)
    p = Path("..") / "shared" / "data"
    return p if p.is_dir() else None


def _is_heading(line: str) -> bool:
    s = line.strip()
    return len(s) > 2 and s.startswith("= ") and s.endswith(" =")


def hub_rows(raw: str) -> list[str]:
    """Rebuild the Hub's test rows from the raw file.

    The Hub's `wikitext-2-raw-v1` rows are every non-empty line followed by "\\n", with
    each heading line (` = Title = `) between one empty row before and one after. The
    token count of the result is close to, not byte-identical with, the Hub's text.
    """
    rows: list[str] = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        if _is_heading(line):
            rows += ["", line + "\n", ""]
        else:
            rows.append(line + "\n")
    return rows


def wikitext2_test(data_dir: str | os.PathLike | None = None) -> str:
    """The test text joined with "\\n\\n" (the GPTQ / AWQ / lm-eval protocol)."""
    ddir = Path(data_dir) if data_dir else default_data_dir()
    if ddir is not None:
        f = ddir / WIKITEXT_FILE
        if not f.is_file():
            raise FileNotFoundError(f"WikiText-2 not found at {f}; expected layout "
                                    f"<data-dir>/{WIKITEXT_FILE.as_posix()}")
        return "\n\n".join(hub_rows(f.read_text(encoding="utf-8")))
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as e:  # no `datasets`, or no Hub access
        raise FileNotFoundError(
            "no local WikiText-2 (pass --data-dir or set FASQ_DATA_DIR) and the Hub copy could not "
            f"be loaded ({type(e).__name__}: {e})") from e
    return "\n\n".join(rows)
