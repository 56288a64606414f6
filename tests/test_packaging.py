"""The installed layout: a wheel built from the source tree holds only ``lmcd`` (with ``lmcd.server``,
``lmcd.connector``, ``lmcd.kernels``, ``lmcd.protocol``) and the two console scripts; it installs into
a fresh virtual environment and runs from outside the repository and from its root; ``pip install -e`` (strict
mode, as the test environment is installed) maps the source folders core/, server/, connector/, kernels/.

Runtime dependencies are not downloaded: the fresh environment gets a ``.pth`` line naming this test
environment's site-packages. A plain path line does not run that directory's own ``.pth`` files, so
the editable ``lmcd`` installed there is not picked up; the tests check ``lmcd`` is the fresh copy.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_PURELIB = sysconfig.get_paths()["purelib"]
# Copied into a scratch directory before building, so the build leaves nothing (build/, egg-info) in
# the repository and a stale build/ there cannot leak old files into the wheel.
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                "tests", "*.pyc")

pytestmark = pytest.mark.timeout(240)


def run(cmd: list[str], *, cwd: Path, timeout: float = 120.0, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    base.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1", **(env or {})})
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=base)
    if check:
        assert result.returncode == 0, (f"{' '.join(cmd)} failed ({result.returncode}):\n"
                                        f"{result.stdout}\n{result.stderr}")
    return result


def make_venv(path: Path) -> Path:
    """A fresh venv without pip (fast); pip runs from the test env with ``--python``."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    assert python.exists()
    return python


def site_packages(python: Path) -> Path:
    out = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=python.parent)
    path = Path(out.stdout.strip())
    assert path.is_dir() and str(path).startswith(str(python.parent.parent))
    return path


def pip(python: Path, *args: str, cwd: Path, timeout: float = 120.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pip", "--python", str(python), *args], cwd=cwd, timeout=timeout, check=check)


def lend_runtime_deps(python: Path) -> None:
    (site_packages(python) / "zz_lmcd_test_deps.pth").write_text(TEST_PURELIB + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    out = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        cwd=root, timeout=180)
    wheels = list(out.glob("lmcd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_only_the_lmcd_package(wheel: Path) -> None:
    from lmcd import __version__

    assert wheel.name.startswith(f"lmcd-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = f"lmcd-{__version__}.dist-info"
    assert top == {"lmcd", dist_info}, f"unexpected top-level entries: {sorted(top - {'lmcd', dist_info})}"
    for stray in ("core", "server", "connector", "kernels", "tests"):
        assert stray not in top
    for required in ("lmcd/__init__.py", "lmcd/__main__.py", "lmcd/cli.py", "lmcd/protocol.py",
                     "lmcd/server/__init__.py", "lmcd/server/daemon.py", "lmcd/server/config.py",
                     "lmcd/server/main.py", "lmcd/connector/__init__.py", "lmcd/connector/client.py",
                     "lmcd/kernels/__init__.py", "lmcd/copyplan.py", "lmcd/shm.py", "lmcd/py.typed",
                     "lmcd/kernels/staged.py"):
        assert required in names, f"{required} missing from the wheel"
    core = {p.name for p in (REPO / "core").glob("*.py")}  # core/ is the lmcd package itself
    assert core <= {n.removeprefix("lmcd/") for n in names if n.count("/") == 1}, "lmcd is missing core/ modules"
    for package in ("server", "connector", "kernels"):
        sources = {p.relative_to(REPO / package).as_posix() for p in (REPO / package).rglob("*.py")
                   if "__pycache__" not in p.parts}
        packed = {n.removeprefix(f"lmcd/{package}/") for n in names if n.startswith(f"lmcd/{package}/")}
        assert sources <= packed, f"lmcd.{package} is missing {sorted(sources - packed)}"
    cu_files = {p.name for p in (REPO / "kernels").glob("*.cu")}
    assert {f"lmcd/kernels/{n}" for n in cu_files} <= set(names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_wheel_declares_both_console_scripts_and_the_runtime_deps(wheel: Path) -> None:
    from lmcd import __version__

    dist_info = f"lmcd-{__version__}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == {"lmcache": "lmcd.cli:main", "lmcd": "lmcd.cli:main"}
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for dep in ("pyzmq", "msgspec", "numpy", "fastapi", "uvicorn", "prometheus-client", "pyyaml"):
        assert any(r.lower().startswith(dep) and "extra ==" not in r for r in requires), (dep, requires)


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    python = make_venv(tmp_path / "fresh")
    pip(python, "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    fresh_site = site_packages(python)
    assert (fresh_site / "lmcd" / "server" / "daemon.py").is_file()
    assert not (fresh_site / "server").exists() and not (fresh_site / "connector").exists()
    lend_runtime_deps(python)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    probe = run([str(python), "-c", "import lmcd, lmcd.server, lmcd.server.daemon, lmcd.connector.client, "
                 "lmcd.kernels, lmcd.protocol, zmq, yaml; print(lmcd.__file__); print(lmcd.server.__file__); "
                 "print(zmq.__file__)"], cwd=outside)
    lmcd_file, server_file, zmq_file = (Path(line) for line in probe.stdout.split())
    assert lmcd_file.is_relative_to(fresh_site), f"lmcd imported from {lmcd_file}, not the fresh venv"
    assert server_file == fresh_site / "lmcd" / "server" / "__init__.py"
    assert not lmcd_file.is_relative_to(REPO)
    assert zmq_file.is_relative_to(TEST_PURELIB)  # the lent runtime deps are what made this work

    for script in ("lmcache", "lmcd"):
        exe = python.parent / script
        assert exe.is_file(), f"console script {script} not installed"
        helped = run([str(exe), "server", "--help"], cwd=outside, env={"COLUMNS": "100"})
        assert "--l1-size-gb" in helped.stdout and "--config" in helped.stdout
        version = run([str(exe), "--version"], cwd=outside)
        assert version.stdout.startswith("lmcd ")
    module = run([str(python), "-m", "lmcd", "server", "--chunk-size", "0"], cwd=outside, check=False)
    assert module.returncode == 2 and "--chunk-size" in module.stderr


def test_without_the_lent_deps_the_fresh_venv_cannot_run(wheel: Path, tmp_path: Path) -> None:
    """Control for the test above: the fresh venv is isolated, so the .pth line is what supplied the deps."""
    python = make_venv(tmp_path / "bare")
    pip(python, "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    probe = run([str(python), "-c", "import lmcd.server.config"], cwd=tmp_path, check=False)
    assert probe.returncode != 0 and "yaml" in probe.stderr


def test_editable_install_maps_the_source_dirs(tmp_path: Path) -> None:
    """Strict editable mode (how the test env is installed): a link tree under build/__editable__*/
    whose files are symlinks into core/, server/, connector/ and kernels/. It runs on a copy of the
    sources, because the install empties the link tree that this test environment imports from."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    python = make_venv(tmp_path / "editable")
    got = pip(python, "install", "--no-cache-dir", "--timeout", "20", "setuptools>=77", cwd=tmp_path,
              timeout=90, check=False)
    if got.returncode != 0:
        pytest.skip(f"could not install setuptools>=77 from PyPI into the fresh venv: {got.stderr.strip()[-300:]}")
    lend_runtime_deps(python)
    # The backend runs under the fresh venv's python and must find its own setuptools first.
    which = run([str(python), "-c", "import setuptools; print(setuptools.__file__)"], cwd=tmp_path)
    assert Path(which.stdout.strip()).is_relative_to(site_packages(python))
    pip(python, "install", "--no-deps", "--no-build-isolation", "-e", str(src), "--config-settings",
        "editable_mode=strict", cwd=tmp_path, timeout=120)
    trees = list((src / "build").glob("__editable__*"))
    assert len(trees) == 1 and trees[0].is_dir(), trees
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = run([str(python), "-c", "import lmcd, lmcd.server.config, lmcd.connector, lmcd.kernels; "
                 "print(lmcd.__file__); print(lmcd.server.__file__); print(lmcd.connector.__file__); "
                 "print(lmcd.kernels.__file__); print(lmcd.server.config.default_l1_size_gb())"], cwd=outside)
    lines = probe.stdout.split()
    for line, folder in zip(lines[:4], ("core", "server", "connector", "kernels"), strict=True):
        path = Path(line)
        assert path.is_relative_to(trees[0]) and path.is_symlink(), f"{path}: not a link of the link tree"
        assert path.resolve() == src / folder / "__init__.py"
    assert float(lines[4]) > 0
    # strict: a module added after the install is not importable until the package is installed again
    (src / "connector" / "added_later.py").write_text("X = 1\n", encoding="utf-8")
    later = run([str(python), "-c", "import lmcd.connector.added_later"], cwd=outside, check=False)
    assert later.returncode != 0 and "ModuleNotFoundError" in later.stderr
    # A top-level `server` package must not be importable: only lmcd.server is.
    stray = run([str(python), "-c", "import server"], cwd=outside, check=False)
    assert stray.returncode != 0 and "ModuleNotFoundError" in stray.stderr
    helped = run([str(python.parent / "lmcache"), "server", "--help"], cwd=outside)
    assert "--eviction-policy" in helped.stdout


# pytest in-process, then where the lmcd its conftest imported came from (no conftest of ours involved)
PYTEST_THEN_WHERE = (
    "import sys, pytest; rc = pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/connector/test_keys.py']); "
    "print('LMCD_FROM', sys.modules['lmcd'].__file__, sys.modules['lmcd.connector.keys'].__file__); sys.exit(rc)")


def test_a_regular_install_works_from_the_repository_root(wheel: Path, tmp_path: Path) -> None:
    """Issue 12: with ``pip install .`` (not -e), ``python -m lmcd`` and ``python -m pytest`` from the
    clone import the installed package: no folder at the root is named like it and shadows half of it."""
    assert not (REPO / "lmcd").exists(), "a folder named lmcd at the repository root shadows the installed package"
    python = make_venv(tmp_path / "regular")
    pip(python, "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    fresh_site = site_packages(python)
    lend_runtime_deps(python)
    quiet = {"PYTHONDONTWRITEBYTECODE": "1"}

    version = run([str(python), "-m", "lmcd", "--version"], cwd=REPO, env=quiet)
    assert version.stdout.startswith("lmcd ")
    probe = run([str(python), "-c", "import lmcd, lmcd.connector.client, lmcd.server.daemon; print(lmcd.__file__)"],
                cwd=REPO, env=quiet)
    lmcd_file = Path(probe.stdout.strip())
    assert lmcd_file == fresh_site / "lmcd" / "__init__.py", f"lmcd imported from {lmcd_file}"
    assert not lmcd_file.resolve().is_relative_to(REPO)  # neither the sources nor the test env's editable link tree

    tests = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/connector/test_keys.py"],
                cwd=REPO, env=quiet, timeout=180)
    assert " passed" in tests.stdout and "failed" not in tests.stdout, tests.stdout
    where = run([str(python), "-c", PYTEST_THEN_WHERE], cwd=REPO, env=quiet, timeout=180)
    line = next(x for x in where.stdout.splitlines() if x.startswith("LMCD_FROM "))
    imported = [Path(x) for x in line.split()[1:]]
    assert imported == [fresh_site / "lmcd" / "__init__.py", fresh_site / "lmcd" / "connector" / "keys.py"], line
