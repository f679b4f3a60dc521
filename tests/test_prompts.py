"""eval.prompts: fetching the paper's prompt files (sha256-verified) and loading prompt sets."""

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest

import eval.prompts as P

COUNTS = {"papv2": 487, "hpsv2": 3200, "partiprompts": 1632}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_from_local_folder_writes_verified_files(tmp_path, paper_prompts):
    dest = tmp_path / "prompts"
    cfg = P.parse_args(["fetch", "--from", str(paper_prompts), "--dest", str(dest)])
    assert cfg.sets == ["papv2", "hpsv2", "partiprompts"]
    paths = P.main(cfg)
    assert sorted(p.name for p in dest.iterdir()) == [
        "hpsv2.json",
        "papv2.json",
        "partiprompts.json",
    ]
    for name, path in paths.items():
        assert _sha(path) == P.PAPER_SETS[name]
        assert len(P.load_prompts(name, prompts_dir=dest)) == COUNTS[name]
    # hpsv2 has duplicate prompts: the loader keeps all 3200 in file order, no dedup
    assert len(set(P.load_prompts("hpsv2", prompts_dir=dest))) == 3172

    # A second fetch keeps verified files untouched; a damaged one is replaced by a good copy.
    before = (dest / "papv2.json").stat().st_mtime_ns
    (dest / "hpsv2.json").write_text("[]")
    P.fetch(["papv2", "hpsv2"], dest=dest, source_dir=paper_prompts)
    assert (dest / "papv2.json").stat().st_mtime_ns == before
    assert _sha(dest / "hpsv2.json") == P.PAPER_SETS["hpsv2"]


def test_checksum_mismatch_names_file_and_both_hashes_and_writes_nothing(
    tmp_path, monkeypatch, synthetic_prompts
):
    # Synthetic files with their own sums as the expected ones: the real files are not needed
    # to check that one bad file fails the whole fetch.
    shared, sums = synthetic_prompts
    monkeypatch.setattr(P, "PAPER_SETS", sums)
    src = tmp_path / "src"
    src.mkdir()
    for name in P.PAPER_SETS:
        shutil.copy(shared / f"{name}.json", src / f"{name}.json")
    data = json.loads((src / "hpsv2.json").read_text())
    data[5]["prompt"] += "!"  # one edited prompt
    (src / "hpsv2.json").write_text(json.dumps(data, indent=2))
    dest = tmp_path / "dest"
    with pytest.raises(P.PromptSetError) as e:
        P.fetch(dest=dest, source_dir=src)
    msg = str(e.value)
    assert "hpsv2.json" in msg and "checksum mismatch" in msg
    assert P.PAPER_SETS["hpsv2"] in msg and _sha(src / "hpsv2.json") in msg
    # papv2 (verified, before hpsv2 in the order) is not written either: all or nothing
    assert not dest.exists() or list(dest.iterdir()) == []


def test_download_uses_raw_github_url_and_verifies(tmp_path, monkeypatch, synthetic_prompts):
    shared, sums = synthetic_prompts
    monkeypatch.setattr(P, "PAPER_SETS", sums)  # verified against the synthetic file's sum
    asked = []

    def fake_urlopen(url, timeout=None):
        asked.append(url)
        name = url.rsplit("/", 1)[-1]
        return io.BytesIO((shared / name).read_bytes())

    monkeypatch.setattr(P, "urlopen", fake_urlopen)
    paths = P.fetch(["papv2"], dest=tmp_path)
    assert asked == [
        "https://raw.githubusercontent.com/AIDC-AI/Diffusion-SDPO/main/prompts/papv2.json"
    ]
    assert _sha(paths["papv2"]) == P.PAPER_SETS["papv2"]


def test_offline_download_is_a_clear_error_pointing_to_from(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(P, "urlopen", offline)
    with pytest.raises(P.PromptSetError) as e:
        P.main(P.parse_args(["fetch", "--sets", "papv2,partiprompts", "--dest", str(tmp_path)]))
    msg = str(e.value)
    assert "papv2.json" in msg and "--from" in msg and "offline" in msg
    assert list(tmp_path.iterdir()) == []


def test_cli_error_exit(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "eval.prompts", "fetch", "--from", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error:") and "--from folder not found" in r.stderr


def test_load_prompt_formats(tmp_path):
    objs = tmp_path / "objs.json"
    objs.write_text(
        json.dumps(
            [
                {"prompt": "a cat", "raw_image_path": "r.png", "metadata": {"k": 1}},
                {"prompt": "a dog", "neg_prompt": ""},
            ]
        )
    )
    entries = P.load_prompt_entries(objs)
    assert entries[0] == {"prompt": "a cat", "raw_image_path": "r.png", "metadata": {"k": 1}}
    assert P.load_prompts(objs) == ["a cat", "a dog"]
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["x", "y z"]))
    assert P.load_prompts(strings) == ["x", "y z"]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert P.load_prompts(txt) == ["first prompt", "second prompt"]
    assert P.set_name(txt) == "p" and P.set_name("papv2") == "papv2"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"caption": "no prompt key"}]))
    with pytest.raises(P.PromptSetError, match="entry 0"):
        P.load_prompts(bad)
    with pytest.raises(P.PromptSetError, match="eval.prompts fetch --sets papv2"):
        P.load_prompts("papv2", prompts_dir=tmp_path)  # a paper set not fetched yet
    with pytest.raises(P.PromptSetError, match="not found"):
        P.load_prompts(tmp_path / "missing.json")


def test_builtin_smoke_set():
    prompts = P.load_prompts("smoke")
    assert 12 <= len(prompts) <= 32 and len(set(prompts)) == len(prompts)


def test_smoke_set_is_not_from_the_paper(paper_prompts):
    # the smoke set is our own, not a slice of the paper's files
    prompts = P.load_prompts("smoke")
    paper = set()
    for name in P.PAPER_SETS:
        paper |= set(P.load_prompts(paper_prompts / f"{name}.json"))
    assert not paper & set(prompts)
