"""The `fasq` command line: quantize, eval, info, baseline, bench, export, generate.

    parser.py    the argument parser
    quantize.py  fasq quantize
    commands.py  eval, info, baseline, bench, export, generate
    common.py    dtypes, device and source checks
"""

from __future__ import annotations

import sys

from ..core.config import ConfigError
from ..eval.baselines import BaselineError
from ..io.manifest import CheckpointError
from ..io.sources import ModelSourceError
from .commands import cmd_baseline, cmd_bench, cmd_eval, cmd_export, cmd_generate, cmd_info
from .common import Interrupted
from .parser import build_parser
from .quantize import cmd_quantize


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "generate": cmd_generate,
                "baseline": cmd_baseline, "bench": cmd_bench,
                "export": cmd_export}[a.cmd](a)
    except (BaselineError, ConfigError, CheckpointError, ModelSourceError, FileExistsError, FileNotFoundError,
            ValueError) as e:
        # TaskDataError (missing zero-shot files) is a FileNotFoundError
        print(f"fasq {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        # outputs are written to temporary folders renamed at the end: nothing half-written is left
        writes = a.cmd in ("quantize", "export", "baseline")
        print(f"fasq {a.cmd}: {e or ('interrupted; nothing was written' if writes else 'interrupted')}",
              file=sys.stderr)
        return 130
