"""The on-policy pair builder (eval.pairs) end to end on a tiny SD1.5 model with the tiny scorers:
winners score higher, the combined score by hand, resume after a kill, train.py on the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import eval.generate as G
import eval.pairs as P
from sdpo.data.layouts import rank_pairs

K, N_PROMPTS = 3, 4
PROMPTS = ["a red cube", "a blue sphere on grass", "two cats", "a lighthouse at night"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from eval.tiny_scorers import build_tiny_scorers
    from sdpo.testing.tiny import build_tiny_sd15

    root = tmp_path_factory.mktemp("pairs")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {
        "model": build_tiny_sd15(root / "sd15"),
        "env": build_tiny_scorers(root / "scorers"),
        "prompts": prompts,
    }


@pytest.fixture
def scorer_env(setup, monkeypatch):
    for key, value in setup["env"].items():
        monkeypatch.setenv(key, value)


def _args(setup, out, *extra):
    return [
        "--outdir", str(out), "--prompts", str(setup["prompts"]),
        "--pretrained_model_name_or_path", str(setup["model"]),
        "--num_images", str(K), "--size", "32", "--steps", "2", "--dtype", "fp32",
        "--device", "cpu", "--score_device", "cpu",
        "--metrics", "pickscore,aesthetics", "--metric_weights", "1,0.5", "--pair_mode", "all",
        *extra,
    ]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    shards = sorted((out / "data").glob("train-*.parquet"))
    rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
    return rows


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    """One uninterrupted run, shared by the tests below."""
    out = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in setup["env"].items():
            mp.setenv(key, value)
        summary = P.main(P.parse_args(_args(setup, out)))
    return out, summary


def test_combined_score_by_hand():
    """z-scores over all K·N images, then the weighted sum; one metric: its raw value."""
    records = [
        [{"a": 1.0, "b": 10.0}, {"a": 2.0, "b": 30.0}],
        [{"a": 3.0, "b": 20.0}, {"a": 6.0, "b": 20.0}],
    ]
    a = np.array([[1, 2], [3, 6]], float)
    b = np.array([[10, 30], [20, 20]], float)
    za = (a - 3.0) / np.sqrt(((a - 3.0) ** 2).mean())
    zb = (b - 20.0) / np.sqrt(((b - 20.0) ** 2).mean())
    got = P.combined_scores(records, {"a": 1.0, "b": 0.5})
    assert np.allclose(got, za + 0.5 * zb)
    assert np.allclose(P.combined_scores(records, {"a": 2.0, "b": 0.0}), a)
    assert P.metric_label({"a": 1.0, "b": 0.5}) == "1*z(a) + 0.5*z(b)"


def test_pairs_end_to_end(built, setup):
    from eval.score import read_scores, scores_path

    out, summary = built
    rows = _rows(out)
    assert rows and all(r["score_0"] > r["score_1"] for r in rows)
    assert all(r["label_0"] == 1.0 for r in rows)
    # The pairs are exactly the "all" pairs of the combined scores of the stored score files.
    manifests = sorted((out / "work" / "images").glob("*.json"), key=lambda p: p.name)
    manifests = [m for m in manifests if not m.name.endswith(".summary.json")]
    assert len(manifests) == K
    by_seed = {json.loads(m.read_text())[0]["metadata"]["seed"]: m for m in manifests}
    records = [read_scores(scores_path(by_seed[s])) for s in range(K)]
    scores = P.combined_scores(records, {"pickscore": 1.0, "aesthetics": 0.5})
    expected = {
        (i, w, lo)
        for i in range(N_PROMPTS)
        for w, lo in rank_pairs(scores[:, i], higher_is_better=True, mode="all")
    }
    got = [(r["prompt_index"], r["seed_0"], r["seed_1"]) for r in rows]
    assert len(got) == len(set(got)) and set(got) == expected
    for r in rows:
        assert r["caption"] == PROMPTS[r["prompt_index"]]
        assert r["score_0"] == pytest.approx(scores[r["seed_0"], r["prompt_index"]])
        assert r["jpg_0"] == (out / r["image_0"]).read_bytes()
        assert r["pickscore_0"] == records[r["seed_0"]][r["prompt_index"]]["pickscore"]
    # The data card: counts, the histogram, the command.
    card = (out / "README.md").read_text()
    assert f"| pairs | {len(rows)} " in card and "python -m eval.pairs --outdir" in card
    assert "--num_images 3" in card
    assert summary["pairs"] == len(rows) and summary["images"] == K * N_PROMPTS
    from PIL import Image

    assert Image.open(out / "gap_histogram.png").size[0] > 100


def test_train_on_pairs_without_extra_flags(built, setup, tmp_path):
    import train
    from sdpo.config import parse_args
    from tests.train_fixtures import train_args

    out, summary = built
    args = train_args(setup["model"], out, tmp_path / "o", "--max_train_steps", "1")
    result = train.main(parse_args(args))
    assert result["global_step"] == 1
    assert result["data"]["layout"] == "pickapic" and result["data"]["pairs"] == summary["pairs"]


def test_killed_run_resumes_without_duplicates_or_gaps(
    built, setup, tmp_path, scorer_env, monkeypatch
):
    real_save = G._save_png
    saved = []

    def dying_save(image, path, prompt):
        if len(saved) == 5:  # killed while writing the 6th of 12 images
            raise KeyboardInterrupt
        saved.append(path)
        real_save(image, path, prompt)

    monkeypatch.setattr(G, "_save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        P.main(P.parse_args(_args(setup, tmp_path)))
    assert not (tmp_path / "data").exists()
    saved.clear()
    monkeypatch.setattr(G, "_save_png", lambda im, p, pr: (saved.append(p), real_save(im, p, pr)))
    P.main(P.parse_args(_args(setup, tmp_path)))
    assert len(saved) == K * N_PROMPTS - 5  # only the missing images
    reference = {(r["prompt_index"], r["seed_0"], r["seed_1"]): r for r in _rows(built[0])}
    resumed = _rows(tmp_path)
    keys = [(r["prompt_index"], r["seed_0"], r["seed_1"]) for r in resumed]
    assert len(keys) == len(set(keys)) and set(keys) == set(reference)
    for r in resumed:
        ref = reference[(r["prompt_index"], r["seed_0"], r["seed_1"])]
        assert r["jpg_0"] == ref["jpg_0"] and r["score_0"] == pytest.approx(ref["score_0"])


def test_fewer_shards_on_rerun_replace_old_ones(built, setup, tmp_path, scorer_env):
    """A rerun with another shard size leaves exactly the new shards."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    n = len(_rows(out))
    P.main(P.parse_args(_args(setup, out, "--shard_size", "2")))
    names = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert len(names) == -(-n // 2) and names[0].endswith(f"-of-{len(names):05d}.parquet")
    assert len(_rows(out)) == n


@pytest.mark.parametrize(
    "bad",
    [
        ["--num_images", "1"],
        ["--metric_weights", "1"],
        ["--metrics", "pickscore,nope"],
        ["--min_gap", "-1"],
    ],
)
def test_bad_inputs_are_usage_errors(setup, tmp_path, bad):
    with pytest.raises(SystemExit) as err:
        P.parse_args(_args(setup, tmp_path, *bad))
    assert err.value.code == 2


def test_make_pairs_script(setup, tmp_path):
    """scripts/data/make_pairs.sh drives eval.pairs (environment -> flags) in one process."""
    import os
    import subprocess
    import sys

    from tests.train_fixtures import REPO

    env = {
        **os.environ,
        **setup["env"],
        "PYTHON": sys.executable,
        "NUM_PROCESSES": "1",
        "MODEL_NAME": str(setup["model"]),
        "K": "2",
        "METRICS": "aesthetics",
        "SIZE": "32",
        "STEP": "2",
        "DTYPE": "fp32",
        "SCORE_DEVICE": "cpu",
        "MAX_PROMPTS": "2",
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "out"
    cmd = ["bash", "scripts/data/make_pairs.sh", str(setup["prompts"]), str(out), "base"]
    proc = subprocess.run(
        cmd + ["--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "pairs_summary.json").read_text())
    assert summary["prompts"] == 2 and summary["metric"] == "aesthetics"
    assert summary["pairs"] == len(_rows(out)) <= 2
    assert "--num_images 2" in summary["command"] and "--device cpu" in summary["command"]


def test_two_rounds_end_to_end(setup, tmp_path, scorer_env, monkeypatch):
    """Round 1 generates with and trains from round 0's unet.pth; a rerun redoes nothing."""
    import eval.rounds as RD
    from sdpo import training

    real_main, seen = training.main, []
    monkeypatch.setattr(training, "main", lambda cfg: (seen.append(cfg), real_main(cfg))[1])
    pairs_args = (
        "--num_images 2 --size 32 --steps 2 --dtype fp32 --device cpu --score_device cpu "
        "--metrics aesthetics --max_prompts 3"
    )
    train_args = (
        "--resolution 32 --train_batch_size 1 --max_train_steps 1 --mixed_precision no "
        "--report_to none --seed 0 --learning_rate 1e-3 --lr_warmup_steps 0"
    )
    argv = [
        "--outdir", str(tmp_path), "--rounds", "2", "--prompts", str(setup["prompts"]),
        "--pretrained_model_name_or_path", str(setup["model"]),
        "--pairs_args", pairs_args, "--train_args", train_args,
    ]  # fmt: skip
    rows = RD.main(RD.parse_args(argv))
    unet0 = tmp_path / "round_0" / "train" / "unet.pth"
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["model_in"] == str(unet0)
    assert [c.unet_init for c in seen] == ["", str(unet0)]
    configs = list(
        (tmp_path / "round_1" / "pairs" / "work" / "images").glob("*/generation_config.json")
    )
    assert len(configs) == 2
    assert {json.loads(c.read_text())["unet_path"] for c in configs} == {str(unet0.resolve())}
    # Fresh seeds per round: round 1 uses seeds 2, 3.
    assert json.loads((tmp_path / "round_1" / "pairs" / "pairs_summary.json").read_text())[
        "seeds"
    ] == [2, 3]
    for r, row in enumerate(rows):
        pairs = json.loads((tmp_path / f"round_{r}" / "pairs" / "pairs_summary.json").read_text())
        assert row["pairs"] == pairs["pairs"] and row["train_steps"] == 1
        assert set(row["reward"]) == {"aesthetics"}
    table = (tmp_path / "rounds_summary.md").read_text()
    assert table.count("\n") == 4 and "aesthetics (mean)" in table
    # Rerun: nothing is generated or trained again.
    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("generated again"))
    assert RD.main(RD.parse_args(argv)) == rows and len(seen) == 2
    # --reference base: round 1 starts from round 0's UNet but keeps the base as reference.
    base_ref = RD._train_argv(
        RD.parse_args([*argv, "--reference", "base"]), str(unet0), tmp_path, tmp_path
    )
    assert base_ref[-4:] == ["--unet_init", str(unet0), "--ref_unet_init", "base"]
    assert "--ref_unet_init" not in RD._train_argv(
        RD.parse_args(argv), str(unet0), tmp_path, tmp_path
    )


def test_missing_scorer_weights_fail_before_generation(setup, tmp_path, monkeypatch):
    from eval.scorers import WeightsNotFoundError

    for key, value in setup["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SDPO_AESTHETICS_MLP", str(tmp_path / "absent.pth"))
    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("generated first"))
    with pytest.raises(WeightsNotFoundError, match="aesthetics"):
        P.main(P.parse_args(_args(setup, tmp_path)))


def test_two_processes_share_generation(built, setup, tmp_path, scorer_env, monkeypatch):
    """Two ranks (threads with a barrier, as tests/test_generate.py) split the images; the pairs
    equal the one-process run's."""
    import threading

    barrier = threading.Barrier(2)
    # Model loading is not thread-safe (a process-wide meta-device context): one at a time.
    lock, real_load = threading.Lock(), G.load_pipeline

    def load_one_at_a_time(*args, **kwargs):
        with lock:
            return real_load(*args, **kwargs)

    monkeypatch.setattr(G, "load_pipeline", load_one_at_a_time)
    errors = []

    class State:
        def __init__(self, rank):
            self.process_index, self.num_processes = rank, 2
            self.is_main_process = rank == 0
            self.device = "cpu"

        def wait_for_everyone(self):
            barrier.wait(timeout=300)

    def work(rank):
        try:
            P.run(P.parse_args(_args(setup, tmp_path)), State(rank))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    key = ("prompt_index", "seed_0", "seed_1")
    ref = {tuple(r[k] for k in key): r for r in _rows(built[0])}
    got = {tuple(r[k] for k in key): r for r in _rows(tmp_path)}
    assert got.keys() == ref.keys()
    assert all(got[k]["jpg_0"] == ref[k]["jpg_0"] for k in got)


def test_prompts_from_a_data_set_column(tmp_path):
    """--prompt_data + --prompt_column: the distinct prompts of any local set, in order."""
    from sdpo.testing.data import write_synthetic_chosen_rejected

    write_synthetic_chosen_rejected(tmp_path / "d", n_pairs=3)
    base = ["--outdir", str(tmp_path / "o"), "--prompt_data", str(tmp_path / "d")]
    path = P.prompt_source(P.parse_args([*base, "--prompt_column", "prompt"]))
    assert json.loads(Path(path).read_text()) == [f"chosen picture {i}" for i in range(3)]
    with pytest.raises(P.PairsError, match=r"--prompt_column 'caption'.*'prompt'"):
        P.prompt_source(P.parse_args(base))


@pytest.mark.parametrize("module", ["eval.pairs", "eval.relabel", "eval.rounds"])
def test_help_prints(module, capsys):
    """--help works (the weight flags' URLs hold '%', which argparse must not format)."""
    import importlib

    with pytest.raises(SystemExit) as err:
        importlib.import_module(module).parse_args(["--help"])
    assert err.value.code == 0 and "--outdir" in capsys.readouterr().out
