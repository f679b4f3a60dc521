"""The training loop's guards (sdpo.guard): non-finite steps are skipped on every process and
stop the run after N in a row; the pathology alarm fires on plain Diffusion-DPO toy runs and not
on safeguarded ones; plain progress lines in log files.

NaNs are injected by monkeypatching :func:`sdpo.step.training_step` (in-process) or by a wrapper
script around ``train.py`` (2-process gloo run): there is no production switch for it.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys

import pytest
import torch

import sdpo.step
from sdpo.guard import NonFiniteGuard, PathologyAlarm, _slope_t
from tests.train_fixtures import REPO, build_models, max_abs_diff, train_args

# ---------------------------------------------------------------------------------------------
# The state machines alone
# ---------------------------------------------------------------------------------------------


def test_slope_t_matches_least_squares():
    import numpy as np

    rng = np.random.default_rng(0)
    y = 0.3 * np.arange(20) + rng.normal(size=20)
    slope, t = _slope_t(y.tolist())
    fit, cov = np.polyfit(np.arange(20), y, 1, cov="unscaled")
    resid = y - np.polyval(fit, np.arange(20))
    stderr = math.sqrt(cov[0, 0] * (resid @ resid) / 18)
    assert slope == pytest.approx(fit[0], rel=1e-9)
    assert t == pytest.approx(fit[0] / stderr, rel=1e-9)


def _feed(alarm, winner, loser):
    fired = [alarm.update(i + 1, {"winner_diff": w, "loser_diff": lo}) for i, (w, lo) in
             enumerate(zip(winner, loser))]  # fmt: skip
    return [f for f in fired if f]


def test_alarm_fires_once_when_both_errors_rise():
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randn(40, generator=gen) * 1e-3).tolist()
    rising = [1e-4 * i + n for i, n in enumerate(noise)]
    alarm = PathologyAlarm(window=20)
    fired = _feed(alarm, rising, [r + 2e-3 for r in rising])
    assert len(fired) == 1 and fired[0]["step"] >= 20  # once, and only after a full window
    rec = fired[0]
    assert rec["winner_diff_second_half"] > rec["winner_diff_first_half"]
    assert rec["winner_t"] > 3 and rec["loser_t"] > 3
    msg = PathologyAlarm.message(rec)
    assert f"step {rec['step']}" in msg and "--use_winner_preserving" in msg and "--beta_dpo" in msg
    # The state survives a checkpoint: a restored alarm does not fire again.
    restored = PathologyAlarm(window=20)
    restored.load_state_dict(json.loads(json.dumps(alarm.state_dict())))
    assert not _feed(restored, rising, rising)


@pytest.mark.parametrize(
    "winner, loser",
    [
        ("flat", "rising"),  # loser up alone: the intended effect of a preference loss
        ("falling", "falling"),  # both down: the safeguarded behaviour
        ("rising_below_zero", "rising"),  # winner recovering towards the reference, still below
    ],
)
def test_alarm_silent_otherwise(winner, loser):
    gen = torch.Generator().manual_seed(1)
    noise = (torch.randn(60, generator=gen) * 1e-3).tolist()
    shapes = {
        "flat": [n for n in noise],
        "rising": [1e-4 * i + n for i, n in enumerate(noise)],
        "falling": [-1e-4 * i + n for i, n in enumerate(noise)],
        "rising_below_zero": [1e-4 * i - 0.02 + n for i, n in enumerate(noise)],
    }
    assert not _feed(PathologyAlarm(window=20), shapes[winner], shapes[loser])


def test_guard_counts_and_message():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.record(1, False, 0.5)
    guard.record(2, True, None)
    assert not guard.exhausted
    guard.record(3, False, 0.25)
    guard.record(4, True, None)
    guard.record(5, True, float("nan"))
    assert guard.exhausted and guard.total == 3 and guard.consecutive == 2
    msg = guard.stop_message(5, "out/checkpoint-4")
    assert "step 5" in msg and "0.25 at step 3" in msg and "out/checkpoint-4" in msg


# ---------------------------------------------------------------------------------------------
# Training runs with an injected NaN
# ---------------------------------------------------------------------------------------------


class _NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison(loss, kind):
    if kind == "loss":  # NaN loss, finite gradients: only the loss check can see it
        return loss + torch.tensor(float("nan"))
    return _NanGrad.apply(loss)  # finite loss, NaN gradients: only the grad-norm check can


class Injector:
    """Wraps :func:`sdpo.step.training_step` and poisons some micro-steps: call numbers in
    ``calls`` (1-based), every call from ``from_call`` on, or the micro-steps whose first pair
    is in ``keys`` ((epoch, row): the same micro-step before and after a resume)."""

    def __init__(self, kind, *, calls=(), from_call=None, keys=()):
        self.kind, self.at, self.from_call, self.keys = kind, set(calls), from_call, set(keys)
        self.seen, self.poisoned = [], []
        self.orig = sdpo.step.training_step

    def __call__(self, **kwargs):
        loss, stats = self.orig(**kwargs)
        batch = kwargs["batch"]
        key = (int(batch["epoch"][0]), int(batch["index"][0]))
        self.seen.append(key)
        n = len(self.seen)
        if n in self.at or key in self.keys or (self.from_call and n >= self.from_call):
            self.poisoned.append(key)
            loss = _poison(loss, self.kind)
            stats = {**stats, "loss": loss.detach()}  # as the losses report it
        return loss, stats


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from sdpo.testing.data import write_synthetic_pickapic

    root = tmp_path_factory.mktemp("guard")
    models = build_models(root / "models")
    data = root / "data"
    write_synthetic_pickapic(data, n_pairs=8, ties=0, corrupt_rows=0)
    return {"model": models["sd15"], "data": data}


# 4 pairs, 1 per micro-step, 2 micro-steps per step: 2 steps an epoch. A 10-step warm-up makes
# the lr change every step, so a schedule that advanced on a skipped step shows in the log.
COMMON = ("--train_batch_size", "1", "--gradient_accumulation_steps", "2")
COMMON += ("--max_train_samples", "4", "--checkpointing_steps", "1", "--lr_warmup_steps", "10")


def _args(env, out, *extra):
    return train_args(env["model"], env["data"], out, *COMMON, *extra)


def _train(env, monkeypatch, out, injector, *extra):
    from sdpo.config import parse_args
    from sdpo.training import main

    monkeypatch.setattr(sdpo.step, "training_step", injector)
    return main(parse_args(_args(env, out, *extra)))


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _ckpt(out, step, name):
    return torch.load(out / f"checkpoint-{step}" / name, weights_only=False)


def _same_optimizer(a, b) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(
        torch.equal(a["state"][k][n], b["state"][k][n]) for k in a["state"] for n in a["state"][k]
    )


def _assert_skipped_exactly(out, step, kind):
    rows = _log(out)
    assert [r["nonfinite"] for r in rows] == [r["step"] == step for r in rows]
    assert rows[-1]["nonfinite_skipped"] == 1
    bad = rows[step - 1]
    if kind == "loss":
        assert bad["loss"] is None and math.isfinite(bad["grad_norm"])
    else:
        assert math.isfinite(bad["loss"]) and bad["grad_norm"] is None
    # The skipped step changed nothing: weights, AdamW moments and step count, lr schedule.
    before, after = step - 1, step
    assert max_abs_diff(_ckpt(out, before, "unet.pth"), _ckpt(out, after, "unet.pth")) == 0.0
    assert _same_optimizer(_ckpt(out, before, "optimizer.bin"), _ckpt(out, after, "optimizer.bin"))
    assert _ckpt(out, before, "scheduler.bin") == _ckpt(out, after, "scheduler.bin")
    assert rows[before - 1]["lr"] == bad["lr"] < rows[step]["lr"]
    # ... and the run went on: the next step is finite and moved the weights.
    assert math.isfinite(rows[step]["loss"]) and math.isfinite(rows[step]["grad_norm"])
    assert max_abs_diff(_ckpt(out, step, "unet.pth"), _ckpt(out, step + 1, "unet.pth")) > 0


def test_nan_loss_skips_one_step_and_resumes_exactly(env, tmp_path, monkeypatch):
    """A NaN loss in the 2nd micro-step of step 2 (finite gradients): step 2 is skipped and
    nothing changes; 4 steps straight == 3 steps, stop, resume to 4 (same NaN), bit for bit."""
    straight = tmp_path / "straight"
    inj = Injector("loss", calls=[4])
    result = _train(env, monkeypatch, straight, inj, "--max_train_steps", "4")
    assert result["global_step"] == 4 and len(inj.poisoned) == 1
    assert inj.seen.count(inj.poisoned[0]) == 1  # (epoch, row) names that micro-step alone
    _assert_skipped_exactly(straight, 2, "loss")
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["nonfinite_skipped"] == 1

    split = tmp_path / "split"
    for steps in ("3", "4"):  # the resumed part re-finds the NaN micro-step by its pair
        _train(env, monkeypatch, split, Injector("loss", keys=inj.poisoned), "--max_train_steps",
               steps)  # fmt: skip
    a = torch.load(straight / "unet.pth", weights_only=True)
    b = torch.load(split / "unet.pth", weights_only=True)
    assert max_abs_diff(a, b) == 0.0
    assert _log(straight) == _log(split)


def test_nan_gradient_skips_one_step(env, tmp_path, monkeypatch):
    """A NaN gradient with a finite loss (grad-norm check), gradient clipping off: the norm is
    still measured, step 3 is skipped and its gradients dropped."""
    out = tmp_path / "g"
    inj = Injector("grad", calls=[5])
    _train(env, monkeypatch, out, inj, "--max_train_steps", "4", "--max_grad_norm", "0")
    assert len(inj.poisoned) == 1
    _assert_skipped_exactly(out, 3, "grad")


def test_consecutive_nans_stop_the_run(env, tmp_path, monkeypatch):
    """Every micro-step from step 2 on is NaN, --max_nonfinite_steps 2: the run stops at step 3
    with ONE line naming the step, the last finite loss and the last good checkpoint; no
    checkpoint is written at the stopping step."""
    from sdpo.training import cli

    out = tmp_path / "stop"
    monkeypatch.setattr(sdpo.step, "training_step", Injector("grad", from_call=3))
    stderr = io.StringIO()  # not a terminal: plain progress lines
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit) as exc:
        cli(_args(env, out, "--max_train_steps", "6", "--max_nonfinite_steps", "2"))
    assert exc.value.code == 1
    err = [ln for ln in stderr.getvalue().splitlines() if ln.startswith("train.py:")]
    rows = _log(out)
    assert [r["nonfinite"] for r in rows] == [False, True, True]
    assert len(err) == 1
    assert "stopped at step 3" in err[0]
    assert f"last finite loss {rows[0]['loss']:.6g} at step 1" in err[0]
    assert str(out / "checkpoint-2") in err[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert "stopped at step 3" in json.loads((out / "train_summary.json").read_text())["stopped"]
    # A log file, not a terminal: plain lines, no progress-bar redraws (ours or the libraries').
    assert "\r" not in stderr.getvalue() and "step 1/6 |" not in stderr.getvalue()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HOOK = """
import os, sys, torch
import sdpo.step, sdpo.training
orig, calls = sdpo.step.training_step, []
def hooked(**kwargs):
    loss, stats = orig(**kwargs)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:  # step 2, on process 1 only
        loss = loss + torch.tensor(float("nan"))  # its gradients stay finite
        stats = {**stats, "loss": loss.detach()}
    return loss, stats
sdpo.step.training_step = hooked
sdpo.training.cli(sys.argv[1:])
"""


def test_nan_on_one_of_two_processes_skips_everywhere(env, tmp_path):
    """2 gloo processes; process 1 alone sees a NaN loss (finite gradients, so DDP's gradient
    all-reduce cannot carry it): process 0 skips the same step (the saved weights come from
    process 0), the schedule holds, the run goes on; resuming from the skipped step's
    checkpoint gives the same step 3, bit for bit."""
    from tests.test_train_run import _subprocess

    script = tmp_path / "hooked_train.py"
    script.write_text(HOOK)

    def launch(out, steps):
        args = train_args(env["model"], env["data"], out, "--max_train_steps", steps)
        args += ["--checkpointing_steps", "1", "--lr_warmup_steps", "10"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        # As tests/test_train_run.py launches 2 CPU processes (torchrun + gloo), with the hook.
        _subprocess(
            [*launcher, str(script), *args, "--train_batch_size", "1"],
            {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
        )

    out = tmp_path / "two"
    launch(out, "3")
    rows = _log(out)
    assert [r["nonfinite"] for r in rows] == [False, True, False]
    assert rows[1]["loss"] is None and rows[0]["lr"] == rows[1]["lr"] < rows[2]["lr"]
    assert max_abs_diff(_ckpt(out, 1, "unet.pth"), _ckpt(out, 2, "unet.pth")) == 0.0
    assert _same_optimizer(_ckpt(out, 1, "optimizer.bin"), _ckpt(out, 2, "optimizer.bin"))
    assert max_abs_diff(_ckpt(out, 2, "unet.pth"), _ckpt(out, 3, "unet.pth")) > 0

    # Resume from the checkpoint of the skipped step, in a fresh folder (the resumed part has
    # one micro-step per process: no NaN).
    split = tmp_path / "split"
    split.mkdir()
    shutil.copytree(out / "checkpoint-2", split / "checkpoint-2")
    shutil.copy(out / "train_log.jsonl", split / "train_log.jsonl")
    launch(split, "3")
    assert _log(split) == rows
    a = torch.load(out / "unet.pth", weights_only=True)
    assert max_abs_diff(a, torch.load(split / "unet.pth", weights_only=True)) == 0.0


# ---------------------------------------------------------------------------------------------
# Plain progress lines
# ---------------------------------------------------------------------------------------------


def test_progress_is_plain_lines_in_a_log_file():
    from sdpo.training import Progress

    stream = io.StringIO()  # not a terminal
    prog = Progress(5, 0, enabled=True, every=2, stream=stream)
    for step in range(1, 6):
        prog.update(step, {"loss": 0.5, "lr": 1e-4, "grad_norm": None, "nonfinite_skipped": 1})
    prog.close()
    lines = stream.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert "\r" not in stream.getvalue() and "loss 0.5" in lines[0] and "skipped 1" in lines[0]
    assert "grad_norm nan" in lines[0]


# ---------------------------------------------------------------------------------------------
# Pathology alarm on the toy task
# ---------------------------------------------------------------------------------------------


def test_alarm_on_toy_runs(tmp_path):
    """The CPU toy at small size (experiments/toy: SFT start, then 50 steps of Diffusion-DPO at
    β 5000): plain DPO raises the alarm (both errors rise), the safeguard (μ 0.9) does not."""
    from experiments.toy.config import ToyConfig
    from experiments.toy.runs import prepare, run_train, train_argv

    cfg = ToyConfig(outdir=str(tmp_path), seeds=1, steps=50, sft_steps=60, train_pairs=64,
                    heldout_pairs=8, workers=1)  # fmt: skip
    paths = prepare(cfg)
    summaries = {}
    for mu in (None, 0.9):
        argv = train_argv(model=paths["model"], data=paths["train"], out=tmp_path / str(mu),
                          method="diffusion-dpo", seed=0, steps=cfg.steps, lr=cfg.lr,
                          batch=cfg.batch_pairs, checkpoint_every=cfg.steps, beta=5000.0, mu=mu,
                          unet_init=paths["sft"] / "unet.pth")  # fmt: skip
        out = run_train([*argv, "--pathology_window", "25"])
        summaries[mu] = json.loads((out / "train_summary.json").read_text())
    fired = summaries[None]["pathology_alarm"]
    assert fired is not None and fired["winner_t"] > 3 and fired["loser_t"] > 3
    assert fired["winner_diff_second_half"] > 0
    assert summaries[0.9]["pathology_alarm"] is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


# ---------------------------------------------------------------------------------------------
# Sharded engines on CPU: refused with one line instead of silently running something else
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_vars, world, seen, kind, match",
    [
        ({}, "2", 1, "NO", "the launcher started 2 processes but accelerate sees 1"),
        ({"ACCELERATE_USE_FSDP": "true"}, "2", 2, "MULTI_CPU", "FSDP was asked for"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "1", 1, "NO", "DEEPSPEED was asked for"),
        ({"ACCELERATE_USE_FSDP": "true"}, "2", 2, "FSDP", None),
        ({}, None, 2, "MULTI_CPU", None),  # mpirun: no WORLD_SIZE, accelerate reads its own
    ],
)
def test_engine_check(monkeypatch, env_vars, world, seen, kind, match):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sdpo.training import LaunchError, check_engine

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    for key, value in env_vars.items():
        monkeypatch.setenv(key, value)
    fake = SimpleNamespace(num_processes=seen, distributed_type=DistributedType[kind])
    if match is None:
        check_engine(fake)
    else:
        with pytest.raises(LaunchError, match=match):
            check_engine(fake)


def test_fsdp_on_cpu_is_refused_in_one_line(env, tmp_path):
    """The real launch: 2 torchrun processes asking for FSDP on a CPU machine. accelerate makes
    each process a world of one; train.py stops before loading a model, with one line."""
    import os
    import subprocess

    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "train.py"]
    cmd += train_args(env["model"], env["data"], tmp_path / "o")
    run_env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "OMP_NUM_THREADS": "1"}
    run_env.pop("ACCELERATE_USE_CPU", None)
    if torch.cuda.is_available():
        pytest.skip("a GPU machine can run FSDP")
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py:")]
    assert len(lines) == 1
    assert "the launcher started 2 processes but accelerate sees 1" in lines[0]
    assert "sdpo/training.py" not in proc.stderr  # no traceback of ours (torchrun prints its own)


def test_guard_check_reduces_and_defers_overflow_to_the_loss_scaler():
    """check(): a NaN loss always skips; a non-finite gradient norm with a finite loss skips,
    unless fp16's GradScaler handles it (it skips and lowers its scale itself)."""
    from types import SimpleNamespace

    calls = []

    def reduce(t, reduction):
        calls.append(reduction)
        return t  # one process

    acc = SimpleNamespace(device="cpu", reduce=reduce)
    guard = NonFiniteGuard(3)
    guard.watch(torch.tensor(0.5))
    assert not guard.check(torch.tensor(2.0), acc)
    guard.watch(torch.tensor(float("inf")))
    guard.watch(torch.tensor(0.5))  # a later finite micro-step does not clear it
    assert guard.check(torch.tensor(2.0), acc, scaler_handles_grads=True)
    guard.watch(torch.tensor(0.5))
    assert guard.check(torch.tensor(float("nan")), acc)
    guard.watch(torch.tensor(0.5))
    assert not guard.check(torch.tensor(float("inf")), acc, scaler_handles_grads=True)
    assert not guard.check(None, acc)  # an engine that reports no norm (DeepSpeed before step)
    assert calls == ["sum"] * 5
