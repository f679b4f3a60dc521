"""The one-command GPU run (bench/gpu_check.py): its CPU dry run walks every job at tiny size, so
the script cannot rot between the rare sessions that have a GPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_train, gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_walks_every_job(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    state = gpu_check.main(gpu_check.parse_args(["--cpu-dry-run", "--out", str(tmp_path)]))
    # Scorer weight locations were set for their job only (torch's compiler may add its cache).
    assert {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")} == environ
    jobs = state["jobs"]
    planned = [j.name for j in gpu_check.plan(dry=True)]
    assert list(jobs) == planned  # every job, in priority order
    # The priority order: SD1.5 training first, its generation, SDXL, ..., compile last.
    assert planned[:7] == [f"sd15_{r}" for r in gpu_check.TRAINING_ROWS["sd15"]]
    assert (
        planned.index("sd15_generation")
        < planned.index("sdxl_a")
        < planned.index("scoring_pickscore")
        < planned.index("smoke_cuda_generators")
    )
    assert planned[-1] == "sd15_c+compile"
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for name, job in jobs.items():
        expected = "skipped" if name == "smoke_adamw8bit" and not have_bnb else "ok"
        assert job["status"] == expected, (name, job.get("error"), job.get("traceback"))

    for family, rows in gpu_check.TRAINING_ROWS.items():
        for row in rows:
            r = jobs[f"{family}_{row}"]["result"]
            assert r["family"] == family and r["ms_micro"] > 0 and 0 < r["mfu"] < 1
    # SDXL rows follow the recipe as train.py resolves it: Adafactor; SD1.5: AdamW.
    assert jobs["sdxl_c"]["result"]["optimizer"] == "adafactor"
    assert jobs["sdxl_c"]["result"]["gradient_checkpointing"] is True
    assert jobs["sd15_c"]["result"]["optimizer"] == "adamw"
    assert (
        jobs["sd15_d"]["result"]["trainable_params"]
        < jobs["sd15_c"]["result"]["trainable_params"] / 10
    )
    for family in ("sd15", "sdxl"):
        gen = jobs[f"{family}_generation"]["result"]
        assert gen["images"] == 2 and gen["max_pixel_diff"] <= 2
    for metric in ("pickscore", "hpsv2", "clip", "aesthetics", "imagereward"):
        r = jobs[f"scoring_{metric}"]["result"]
        assert r["images_per_s"] > 0 and r["scores_finite"]
    smoke = jobs["smoke_fp16_gradscaler_fused_adam"]["result"]
    assert smoke["steps"] == 1 and smoke["weights_moved"]
    assert smoke["mixed_precision"] == "no" and "--use_fused_adam" not in smoke["flags"]
    gens = jobs["smoke_cuda_generators"]["result"]
    assert gens["split_invariance_max_diff"] == 0.0 and gens["equal_to_cpu_within_1e-5"]

    # Everything measured is in ONE results file (the device tool returns at most 8 files).
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dry_run"] is True and list(saved["jobs"]) == planned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU DRY RUN" in summary and "sdxl 16²" in summary and "| imagereward |" in summary
    assert "| sd15_c+compile | ok |" in summary


def test_new_families_join_from_the_registry(monkeypatch):
    """The hook for flow-matching families: a registered family with real-size configs (and a
    tiny builder for the dry run) gets the flow rows without editing gpu_check."""
    import sdpo.families as families
    import sdpo.testing.configs as configs
    import sdpo.testing.tiny as tiny

    # The flow families of the registry are already there (real-size configs and tiny builders).
    assert gpu_check.extra_families(dry=False) == gpu_check.extra_families(dry=True)
    assert gpu_check.extra_families(dry=True) == ["sd3", "flux"]
    monkeypatch.setitem(families.FAMILIES, "newflow", families.FAMILIES["sd15"])
    assert "newflow" not in gpu_check.extra_families(dry=False)  # no real-size configs yet
    monkeypatch.setattr(configs, "FAMILIES", (*configs.FAMILIES, "newflow"))
    assert gpu_check.extra_families(dry=False) == ["sd3", "flux", "newflow"]
    assert "newflow" not in gpu_check.extra_families(dry=True)  # no tiny builder: no dry run
    monkeypatch.setattr(tiny, "build_tiny_newflow", tiny.build_tiny_sd15, raising=False)
    names = [j.name for j in gpu_check.plan(dry=True)]
    assert [n for n in names if n.startswith("newflow_")] == [
        f"newflow_{r}" for r in gpu_check.FLOW_ROWS
    ]
    assert names.index("sdxl_unet") < names.index("newflow_d") < names.index("scoring_pickscore")


def test_jobs_selection_budget_and_list(tmp_path, capsys):
    jobs = gpu_check.plan(dry=True)
    assert [j.name for j in gpu_check.selected(jobs, "smoke_")] == [
        "smoke_fp16_gradscaler_fused_adam",
        "smoke_adamw8bit",
        "smoke_cuda_generators",
    ]
    with pytest.raises(ValueError, match="--jobs"):
        gpu_check.selected(jobs, "nope")
    # Sized to finish in under 8 minutes on one H200: everything but the last two jobs (SDXL
    # generation, torch.compile) fits the default budget, which leaves time for start-up.
    gpu_jobs = gpu_check.plan(dry=False)
    assert sum(j.estimate_s for j in gpu_jobs[:-2]) <= gpu_check.CheckConfig().budget_s <= 450
    # A job that would end past the budget is recorded as skipped, not run.
    state = gpu_check.main(
        gpu_check.parse_args(
            [
                "--cpu-dry-run",
                "--out",
                str(tmp_path),
                "--budget_s",
                "1e-9",
                "--jobs",
                "sd15_a,smoke_",
            ]
        )
    )
    assert {j["status"] for j in state["jobs"].values()} == {"skipped (budget)"}
    gpu_check.main(gpu_check.parse_args(["--list"]))
    assert "sd15_c+compile" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget_s", "0", "--out", str(tmp_path)])


def test_shell_entry_point_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--jobs",
         "sd15_lambda,smoke_cuda_generators"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = json.loads((out / "results.json").read_text())["jobs"]
    assert {k: v["status"] for k, v in jobs.items()} == {
        "sd15_lambda": "ok",
        "smoke_cuda_generators": "ok",
    }
    assert "ETA" in proc.stdout


@pytest.mark.parametrize("module", [bench_train, gpu_check])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "--" in capsys.readouterr().out
