"""The wheel holds every file the package reads at run time (the kernels' sources)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_package_file(tmp_path):
    r = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "src"], cwd=ROOT, capture_output=True,
                       text=True)
    files = r.stdout.split() if r.returncode == 0 else []
    if not files:  # not a git checkout: take the tree as it is
        files = ["pyproject.toml", "README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*")
                                                  if p.is_file() and "__pycache__" not in p.parts)]
    src = tmp_path / "src-tree"
    for f in files:  # a copy: building writes build/ and egg-info beside the sources
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fasq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {f[len("src/"):] for f in files if f.startswith("src/fasq/")}
    missing = sorted(package - names)
    assert not missing, f"files of the package missing from the wheel: {missing}"
    assert any(n.endswith(".cu") for n in names) and any(n.endswith(".cpp") for n in names)
    from fasq.kernels.cpu import library as cpu
    from fasq.kernels.cuda import gemv as cuda_gemv  # the files those loaders read are among them

    for f in [*cpu.SOURCES, *cpu.HEADERS, cuda_gemv.SOURCE]:
        assert Path(f).relative_to(ROOT / "src").as_posix() in names
