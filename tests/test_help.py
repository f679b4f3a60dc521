"""`--help` works for every command line of the repository: each module with a ``__main__`` guard
(or a ``__main__.py``) under sdpo/, eval/, bench/, experiments/, ``train.py``, and every shell
script under scripts/. Found by searching the tree, so a new entry point is covered without
editing this file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdpo", "eval", "bench", "experiments")
MAIN_GUARD = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)


def _modules() -> list[str]:
    found = set()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if path.name == "__main__.py":
                found.add(".".join(rel.parts[:-1]))
            elif MAIN_GUARD.search(path.read_text(encoding="utf-8")):
                found.add(".".join(rel.parts))
    return sorted(found)


def _scripts() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").rglob("*.sh"))


def _env() -> dict:
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "NUM_GPUS": "0",
        "NUM_PROCESSES": "1",
    }


def _check(cmd: list[str]) -> str:
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} --help failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    )
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "usage" in r.stdout.lower(), r.stdout[-1500:]
    return r.stdout


def test_the_discovery_finds_the_known_entry_points():
    # a guard against a search that silently finds nothing
    assert {"eval.score", "eval.compare", "eval.generate", "experiments.toy", "sdpo.cache"} <= set(
        _modules()
    )
    assert "scripts/eval/test_sd15.sh" in _scripts() and "scripts/eval/test_vs.sh" in _scripts()


@pytest.mark.parametrize("module", ["train.py", *_modules()])
def test_python_help(module):
    cmd = [sys.executable, module] if module.endswith(".py") else [sys.executable, "-m", module]
    out = _check([*cmd, "--help"])
    if module in ("eval.score", "eval.compare"):
        # the weight flags whose help held a URL's '%2B' (argparse's format character)
        assert "--aesthetics_mlp" in out and "--hpsv2_checkpoint" in out


@pytest.mark.parametrize("script", _scripts())
def test_script_help(script):
    out = _check(["bash", script, "--help"])
    assert "Error" not in out
