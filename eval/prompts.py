"""Prompt sets of the evaluation: fetch the paper's three files, load any prompt set.

The paper evaluates on three prompt files published in the AIDC-AI/Diffusion-SDPO repository
(``prompts/{papv2,hpsv2,partiprompts}.json``). They are not part of this project: this module
obtains them on the user's machine, either downloaded from that repository or copied from a local
folder, and accepts them only when their sha256 matches the paper's files::

    python -m eval.prompts fetch                      # download all three into prompts/
    python -m eval.prompts fetch --from /data/prompts # copy from a local folder instead
    python -m eval.prompts fetch --sets papv2 --dest prompts/

Generation reads prompts through :func:`load_prompts` / :func:`load_prompt_entries`, which accept
a set name (``papv2``, ``hpsv2``, ``partiprompts``, ``smoke``) or a path to a prompt file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

from sdpo import io as sdpo_io
from sdpo.cli import add_dataclass_arguments, arg, from_namespace

# The repository's own prompts/ folder (holds smoke.json; the paper's files are fetched into it).
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

# sha256 of the paper's files (reference/metrics.md): a fetched file is accepted only on a match.
PAPER_SETS: dict[str, str] = {
    "papv2": "531f3ca923035b5f17dbcbc60a7d7dfa476219e59b0e99617bb3f0afabf5663b",
    "hpsv2": "417a2ce00b3307780402c1d27528a0e41ed26651384687bbf3aa06c4c7e559fd",
    "partiprompts": "b11d46a91c4202461d6d1df69da0b9af5070851403574de6efd6736ccad22291",
}
# Prompt sets that live in the repository itself.
BUILTIN_SETS = ("smoke",)

URL_TEMPLATE = "https://raw.githubusercontent.com/AIDC-AI/Diffusion-SDPO/main/prompts/{name}.json"
DOWNLOAD_TIMEOUT_S = 60


class PromptSetError(RuntimeError):
    """A prompt set cannot be obtained or read (message says what to do)."""


# ----------------------------------------------------------------------------------------------
# Loading


def set_name(name_or_path: str | os.PathLike) -> str:
    """The name used in output file names: the set name, or the file name without extension."""
    s = str(name_or_path)
    if s in PAPER_SETS or s in BUILTIN_SETS:
        return s
    return Path(s).name.split(".")[0]


def resolve_prompt_file(name_or_path: str | os.PathLike, prompts_dir: str | Path | None = None):
    """Path of a prompt set given by name (looked up in ``prompts_dir``) or by path."""
    s = str(name_or_path)
    base = Path(prompts_dir) if prompts_dir is not None else PROMPTS_DIR
    if s in PAPER_SETS or s in BUILTIN_SETS:
        path = base / f"{s}.json"
        if s in BUILTIN_SETS and not path.is_file():
            path = PROMPTS_DIR / f"{s}.json"  # built-in sets ship with the repository
        if not path.is_file():
            if s in PAPER_SETS:
                raise PromptSetError(
                    f"prompt set '{s}' is not in {base}: fetch it first with "
                    f"`python -m eval.prompts fetch --sets {s} --dest {base}` "
                    "(add --from DIR to copy it from a local folder when offline)"
                )
            raise PromptSetError(f"built-in prompt set '{s}' is missing: {path}")
        return path
    path = Path(s)
    if not path.is_file():
        known = ", ".join([*PAPER_SETS, *BUILTIN_SETS])
        raise PromptSetError(f"prompt file not found: {path} (or use a set name: {known})")
    return path


def load_prompt_entries(
    name_or_path: str | os.PathLike, prompts_dir: str | Path | None = None
) -> list[dict]:
    """Entries of a prompt set, each a dict with at least ``prompt`` (str).

    Accepted files: a JSON list of objects with ``prompt`` (the paper's format; other keys such as
    ``raw_image_path`` and ``metadata`` are kept), a JSON list of strings, or a text file with one
    prompt per line (blank lines ignored).
    """
    path = resolve_prompt_file(name_or_path, prompts_dir)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise PromptSetError(
                f"{path}: expected a JSON list of prompts, got {type(data).__name__}"
            )
        entries = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                entries.append({"prompt": item})
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                entries.append(dict(item))
            else:
                raise PromptSetError(
                    f"{path}: entry {i} is neither a string nor an object with a 'prompt' string"
                )
    else:
        entries = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    if not entries:
        raise PromptSetError(f"{path} holds no prompts")
    return entries


def load_prompts(name_or_path: str | os.PathLike, prompts_dir: str | Path | None = None):
    """The prompt strings of a set name or prompt file, in file order (see load_prompt_entries)."""
    return [e["prompt"] for e in load_prompt_entries(name_or_path, prompts_dir)]


# ----------------------------------------------------------------------------------------------
# Fetching


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(name: str) -> bytes:
    url = URL_TEMPLATE.format(name=name)
    try:
        with urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            return resp.read()
    except Exception as e:  # URLError, HTTPError, socket timeouts, DNS failures...
        raise PromptSetError(
            f"could not download {name}.json from {url} ({type(e).__name__}: {e}). "
            "If this machine is offline, copy the files from a machine that has them and run "
            "`python -m eval.prompts fetch --from DIR` (DIR holding papv2.json, hpsv2.json, "
            "partiprompts.json)"
        ) from e


def _write_atomic(path: Path, data: bytes) -> None:
    sdpo_io.write_bytes(path, data)


def fetch(
    sets: list[str] | tuple[str, ...] = tuple(PAPER_SETS),
    *,
    dest: str | Path = PROMPTS_DIR,
    source_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Obtain the paper's prompt files into ``dest``, verified by sha256.

    Files already in ``dest`` with the right hash are kept. The others are downloaded (or read from
    ``source_dir``), ALL are verified, and only then written (atomically): any failure writes
    nothing. Returns ``{name: path}``.
    """
    unknown = [s for s in sets if s not in PAPER_SETS]
    if unknown:
        raise PromptSetError(f"unknown prompt set(s) {unknown}; known: {list(PAPER_SETS)}")
    dest = Path(dest)
    if source_dir is not None and not Path(source_dir).is_dir():
        raise PromptSetError(f"--from folder not found: {source_dir}")

    todo: dict[str, bytes] = {}
    for name in sets:
        target = dest / f"{name}.json"
        if target.is_file() and sha256_bytes(target.read_bytes()) == PAPER_SETS[name]:
            continue
        if source_dir is not None:
            src = Path(source_dir) / f"{name}.json"
            if not src.is_file():
                raise PromptSetError(f"{src} not found (--from {source_dir} must hold {name}.json)")
            data, origin = src.read_bytes(), str(src)
        else:
            data, origin = _download(name), URL_TEMPLATE.format(name=name)
        got = sha256_bytes(data)
        if got != PAPER_SETS[name]:
            raise PromptSetError(
                f"checksum mismatch for {name}.json (from {origin}): expected sha256 "
                f"{PAPER_SETS[name]}, got {got}. The file is not the paper's prompt set; "
                "nothing was written"
            )
        todo[name] = data
    for name, data in todo.items():
        _write_atomic(dest / f"{name}.json", data)
    return {name: dest / f"{name}.json" for name in sets}


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class FetchConfig:
    """``python -m eval.prompts fetch`` options."""

    sets: list[str] = arg(
        help=f"comma-separated subset of {','.join(PAPER_SETS)}",
        default_factory=lambda: list(PAPER_SETS),
        metavar="SETS",
    )
    source_dir: str | None = arg(
        None,
        "copy the files from this local folder instead of downloading (offline machines)",
        flags=["--from"],
        metavar="DIR",
    )
    dest: str = arg(str(PROMPTS_DIR), "output folder (default: the repo's prompts/)")


def parse_args(argv: list[str] | None = None) -> FetchConfig:
    p = argparse.ArgumentParser(
        prog="python -m eval.prompts",
        description="Obtain the paper's evaluation prompt files, verified by sha256.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "fetch",
        help="download (or copy with --from) papv2/hpsv2/partiprompts into --dest",
        description=(
            "Download the paper's prompt files from the AIDC-AI/Diffusion-SDPO GitHub repository "
            "(or copy them from --from DIR), check their sha256 and write them into --dest. "
            "Files already present with the right hash are kept."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(f, FetchConfig)  # the fields' flags, as every entry point
    cfg = from_namespace(FetchConfig, p.parse_args(argv))
    cfg.sets = [s.strip() for s in ",".join(cfg.sets).split(",") if s.strip()]
    return cfg


def main(cfg: FetchConfig) -> dict[str, Path]:
    paths = fetch(cfg.sets, dest=cfg.dest, source_dir=cfg.source_dir)
    for name, path in paths.items():
        n = len(load_prompt_entries(path))
        print(f"{name}: {path} ({n} prompts, sha256 ok)")
    return paths


if __name__ == "__main__":
    try:
        main(parse_args())
    except PromptSetError as e:
        sys.exit(f"error: {e}")
