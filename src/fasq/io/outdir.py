"""Output folders that never cost the user data: path checks, atomic replacement, a lock.

Every command that writes a folder (`fasq quantize`, `export`, `baseline`) goes through
here:
- `check_output_dir` refuses, before any work, an output that is a file, a folder holding
  files (unless `overwrite`), the folder the user is in (or one above it), or a path that
  is, contains or lies inside one of the command's inputs (resolved, symlinks followed),
  whatever `overwrite` says;
- `atomic_output_dir` fills a temporary sibling folder and renames it into place, so an
  interrupted run never leaves a half-written output and an existing one is kept until
  the new one is complete;
- `output_lock` makes concurrent runs to the same output fail at once, naming the run
  that holds it, instead of sharing a work folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

from .manifest import is_checkpoint


class OutputBusyError(FileExistsError):
    """Another run is writing the same output folder."""


def _overlap(out: Path, inp: Path) -> str | None:
    """How the resolved output `out` collides with the resolved input `inp`, if it does."""
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """Refuse an output path that would lose data, before the slow part (see the module doc).

    `inputs`: the local files or folders the command reads (its model source)."""
    out = Path(out_dir).expanduser()
    real = out.resolve()
    for inp in inputs:
        how = _overlap(real, Path(inp).expanduser().resolve())
        if how:
            raise FileExistsError(f"the output {out} {how} the input {inp}; writing there would destroy the "
                                  "model being read (--overwrite does not change this): choose another --out")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise FileExistsError(f"the output {out} is the current folder or one above it; choose a new folder "
                              "for --out (e.g. --out ./quantized)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a checkpoint" if is_checkpoint(out) else "files"
        raise FileExistsError(f"{out} already holds {what}; pass --overwrite to replace it, "
                              "or choose another --out")
    return out


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike):
    """Hold an exclusive lock on writing `out_dir` (a `.NAME.lock` file beside it, holding
    the pid; removed on exit). A second holder gets `OutputBusyError` at once."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, as before
        yield
        return
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputBusyError(f"another fasq run ({_holder(path)}) is writing {out}; wait for it to "
                                  f"finish, or choose another --out") from None
        # the file may have been removed by the previous holder between our open and lock
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder created with the usual permissions (umask applies;
    `tempfile.mkdtemp` would make it 0700 and the renamed output would keep that)."""
    while True:
        tmp = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool, inputs=()):
    """Yield a temporary sibling folder to fill; on success it replaces `out_dir`, on any
    error it is removed and `out_dir` is left as it was. Holds `output_lock` throughout."""
    out = check_output_dir(out_dir, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
        try:
            yield tmp
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def replace_dir(new: Path, out: Path) -> None:
    """Move `new` to `out`; an existing `out` is kept until the new one is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
