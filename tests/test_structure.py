"""The repository's structure rules, checked on the source:

* the library (``sdpo/``) never imports upward: not ``train``, ``experiments``, ``bench`` or
  ``tests`` anywhere, and ``eval`` at most lazily inside a function;
* no import circle between the library's modules (module-level imports);
* a model family is recognised only inside ``sdpo/families`` (no second "is it SDXL" rule);
* evaluation imports without the training stack (no accelerate, no ``sdpo.training``);
* the installable distribution holds every package module (``pip install .`` then the toy).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "sdpo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import statement of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(name, id(node) in top) for name in [node.module, *names]]
    return found


LIBRARY_FILES = sorted(LIBRARY.rglob("*.py"))


def test_library_never_imports_upward():
    upward = ("train", "experiments", "bench", "tests")
    bad = []
    for path in LIBRARY_FILES:
        for name, top_level in _imports(path):
            root = name.split(".")[0]
            if root in upward or (root == "eval" and top_level):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, bad


def test_no_import_circle_in_the_library():
    modules = {_module_name(p): p for p in LIBRARY_FILES}
    graph = {
        name: {m for m, top in _imports(path) if top and m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is not a circle with them.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_model_families_are_recognised_only_in_the_registry():
    """The config keys that tell families apart appear only in sdpo/families (and the explicit
    architectures of sdpo/testing, which build them)."""
    markers = ("addition_embed_type", '"text_encoder_2"', "'text_encoder_2'", "._sdxl")
    allowed = (LIBRARY / "families", LIBRARY / "testing")
    offenders = []
    for folder in ("sdpo", "eval", "bench", "experiments"):
        for path in (REPO / folder).rglob("*.py"):
            if any(path.is_relative_to(a) for a in allowed):
                continue
            text = path.read_text()
            offenders += [f"{path.relative_to(REPO)}: {m}" for m in markers if m in text]
    assert not offenders, offenders


def test_evaluation_imports_without_the_training_stack():
    code = (
        "import sys, eval.generate, eval.score, eval.compare, eval.report, eval.prompts;"
        "bad = [m for m in ('accelerate', 'sdpo.training', 'sdpo.step', 'torch') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info into the source folder.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for package in ("sdpo", "eval", "experiments"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300, cwd=out,
    )  # fmt: skip
    (found,) = out.glob("*.whl")
    return found


def test_the_distribution_holds_every_package_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("sdpo", "eval", "experiments"):
        for path in (REPO / package).rglob("*.py"):
            assert path.relative_to(REPO).as_posix() in names, path
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_the_toy_runs_from_an_install_outside_the_checkout(wheel, tmp_path):
    """``pip install`` the wheel into a folder, then run the toy's argument check from elsewhere:
    the packages resolve from the install, not from the checkout."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    code = (
        "import experiments.toy.config as c, sdpo;"
        "cfg = c.parse_args(['--quick', '--outdir', 'x']);"
        "print(sdpo.__file__, cfg.seeds)"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(target)) and result.stdout.split()[-1] == "1"
