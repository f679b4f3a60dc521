"""Guards of the training loop: the non-finite step guard and the pathology alarm.

Both are plain state machines fed once per optimizer step by :mod:`sdpo.training`; they hold no
model and import torch only where a tensor is touched, so they are tested on their own.

* :class:`NonFiniteGuard`: at the recipes' β (2000–6000) a preference loss or its gradient can
  overflow. One NaN/Inf in an optimizer step would poison AdamW's moments and every later
  weight, so the step is skipped on every process (the decision is reduced over processes, so
  the replicas never diverge), its gradients are dropped, the learning-rate schedule does not
  advance, and after ``max_consecutive`` skips in a row the run stops with one message.
* :class:`PathologyAlarm`: the paper's pathology (SDPO, arXiv 2511.03317, Sec. 2: the margin
  grows while the winner's denoising error rises with the loser's). Over a rolling window of
  optimizer steps it fits a line to the policy-minus-reference winner and loser errors
  (``winner_diff``, ``loser_diff`` of the step's log row) and warns once when both rise
  significantly and the winner's error is above the reference's.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


class NonFiniteStop(RuntimeError):
    """The run stopped: too many consecutive non-finite steps, or non-finite weights."""


def any_process(flags, accelerator):
    """Element-wise "true on any process" of a small tensor of 0/1 flags (one all-reduce)."""
    return accelerator.reduce(flags.float(), reduction="sum") > 0


def weights_finite(params, accelerator) -> bool:
    """True when every parameter on every process is finite (max-abs norm: no overflow)."""
    import torch
    from torch.nn.utils import get_total_norm

    # Under FSDP2 a parameter is a DTensor: each process checks its own shard, the flag is
    # reduced; FSDP1 leaves empty views on the processes that do not hold a shard.
    tensors = [p.detach() for p in params]
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    tensors = [t for t in tensors if t.numel()]
    local = get_total_norm(tensors, norm_type=math.inf) if tensors else torch.zeros(())
    bad = (~torch.isfinite(local)).reshape(1).to(accelerator.device)
    return not bool(any_process(bad, accelerator).item())


@dataclass
class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradient norm is NaN/Inf on any process.

    Per micro-step :meth:`watch` records whether the loss was finite (on the device, no host
    sync); at the optimizer step :meth:`check` combines it with the gradient norm, reduces both
    flags over processes and says whether to skip. :meth:`record` counts; :attr:`exhausted`
    says when ``max_consecutive`` skips happened in a row.
    """

    max_consecutive: int
    total: int = 0
    consecutive: int = 0
    last_finite_loss: float | None = None
    last_finite_step: int | None = None
    _loss_bad: object = field(default=None, repr=False)

    def watch(self, loss) -> None:
        import torch

        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def check(self, grad_norm, accelerator, *, scaler_handles_grads: bool = False) -> bool:
        """True when this optimizer step must be skipped on every process.

        ``grad_norm``: the step's total gradient norm (a tensor, a float or None when the engine
        does not report it). ``scaler_handles_grads``: fp16 with a GradScaler, whose dynamic
        loss scale is *meant* to overflow now and then; it skips such a step itself and lowers
        the scale, so a non-finite gradient with a finite loss is left to it (skipping here
        would keep the scale and overflow again forever).
        """
        import torch

        device = accelerator.device
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=bool)
        if grad_norm is None:
            grad_bad = torch.zeros((), dtype=torch.bool)
        else:
            grad_bad = ~torch.isfinite(torch.as_tensor(grad_norm).detach().float())
        flags = torch.stack([loss_bad.to(device).reshape(()), grad_bad.to(device).reshape(())])
        loss_any, grad_any = (bool(v) for v in any_process(flags, accelerator).tolist())
        self._loss_bad = None
        return loss_any or (grad_any and not scaler_handles_grads)

    def record(self, step: int, skipped: bool, loss: float | None) -> None:
        if skipped:
            self.total += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
            if loss is not None and math.isfinite(loss):
                self.last_finite_loss, self.last_finite_step = loss, step

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_message(self, step: int, last_checkpoint) -> str:
        last = (
            f"{self.last_finite_loss:.6g} at step {self.last_finite_step}"
            if self.last_finite_loss is not None
            else "none (no step was finite)"
        )
        ckpt = str(last_checkpoint) if last_checkpoint else "none written yet"
        return (
            f"stopped at step {step}: {self.consecutive} consecutive optimizer steps had a "
            f"non-finite loss or gradient norm (--max_nonfinite_steps {self.max_consecutive}); "
            f"last finite loss {last}; last good checkpoint: {ckpt}. Resume from it with a "
            "smaller --learning_rate or --beta_dpo, or with --use_winner_preserving."
        )

    def state_dict(self) -> dict:
        return {
            "total": self.total,
            "consecutive": self.consecutive,
            "last_finite_loss": self.last_finite_loss,
            "last_finite_step": self.last_finite_step,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("total", "consecutive", "last_finite_loss", "last_finite_step"):
            if key in state:
                setattr(self, key, state[key])


def _slope_t(values: list[float]) -> tuple[float, float]:
    """Least-squares slope of ``values`` against 0..n-1 and its t statistic (slope / std. err.)."""
    n = len(values)
    xm, ym = (n - 1) / 2, sum(values) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    slope = sum((i - xm) * (v - ym) for i, v in enumerate(values)) / sxx
    resid = sum((v - ym - slope * (i - xm)) ** 2 for i, v in enumerate(values))
    stderr = math.sqrt(resid / (n - 2) / sxx) if n > 2 else math.inf
    if stderr == 0:
        return slope, math.copysign(math.inf, slope) if slope else 0.0
    return slope, slope / stderr


@dataclass
class PathologyAlarm:
    """Warn once when the winner's error relative to the reference keeps rising with the loser's.

    Over the last ``window`` optimizer steps (finite ones only), both ``winner_diff`` and
    ``loser_diff`` (policy minus reference ε-MSE) must have a least-squares slope with a t
    statistic above ``t_min`` (both rising, beyond the step-to-step noise of a mini-batch
    estimate), and the winner's error over the newest half of the window must be above the
    reference's on average (it got worse than where it started, not merely recovered).
    """

    window: int = 50
    t_min: float = 3.0
    fired: dict | None = None
    _w: deque = field(default_factory=deque, repr=False)
    _l: deque = field(default_factory=deque, repr=False)

    def update(self, step: int, row: dict) -> dict | None:
        """Feed one optimizer step's log row; returns the alarm record the first time it fires."""
        w, ll = row.get("winner_diff"), row.get("loser_diff")
        if self.fired or self.window <= 0 or w is None or ll is None:
            return None
        if not (math.isfinite(w) and math.isfinite(ll)):
            return None
        self._w.append(w)
        self._l.append(ll)
        while len(self._w) > self.window:
            self._w.popleft()
            self._l.popleft()
        if len(self._w) < self.window:
            return None
        ws, ls = list(self._w), list(self._l)
        sw, tw = _slope_t(ws)
        sl, tl = _slope_t(ls)
        half = self.window // 2
        recent_w = sum(ws[half:]) / (self.window - half)
        if tw > self.t_min and tl > self.t_min and recent_w > 0:
            early_w, early_l = sum(ws[:half]) / half, sum(ls[:half]) / half
            self.fired = {
                "step": step,
                "window": self.window,
                "winner_diff_first_half": early_w,
                "winner_diff_second_half": recent_w,
                "loser_diff_first_half": early_l,
                "loser_diff_second_half": sum(ls[half:]) / (self.window - half),
                "winner_slope_per_step": sw,
                "loser_slope_per_step": sl,
                "winner_t": tw,
                "loser_t": tl,
            }
            return self.fired
        return None

    @staticmethod
    def message(rec: dict) -> str:
        return (
            f"pathology alarm at step {rec['step']}: over the last {rec['window']} steps the "
            "winner's error relative to the reference rose "
            f"({rec['winner_diff_first_half']:+.3e} -> {rec['winner_diff_second_half']:+.3e}, "
            f"slope {rec['winner_slope_per_step']:+.2e}/step, t {rec['winner_t']:.1f}) together "
            f"with the loser's ({rec['loser_diff_first_half']:+.3e} -> "
            f"{rec['loser_diff_second_half']:+.3e}, t {rec['loser_t']:.1f}): the margin grows by "
            "making both images worse (SDPO, arXiv 2511.03317). Consider "
            "--use_winner_preserving (or a larger --winner_preserving_mu), a smaller "
            "--beta_dpo or a smaller --learning_rate."
        )

    def state_dict(self) -> dict:
        return {"fired": self.fired, "winner": list(self._w), "loser": list(self._l)}

    def load_state_dict(self, state: dict) -> None:
        self.fired = state.get("fired")
        self._w = deque(state.get("winner", []))
        self._l = deque(state.get("loser", []))
