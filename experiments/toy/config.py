"""Settings of the toy demo: :class:`ToyConfig` (its fields are the command-line flags), the
per-method β / μ defaults, and :func:`parse_args`."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.toy.task import DEFAULT_LOSER_KINDS, LOSER_KINDS
from sdpo.cli import arg, parse

METHODS = ("diffusion-dpo", "dspo", "dmpo")
# β and μ per method. μ: the paper's SD1.5 recipes. β: see
# DEFAULT_BETA's comment in docs/toy.md and the summary; values measured on this toy task.
DEFAULT_BETA = {"diffusion-dpo": 5000.0, "dspo": 5000.0, "dmpo": 5000.0}
DEFAULT_MU = {"diffusion-dpo": 0.9, "dspo": 0.2, "dmpo": 0.9}
DMPO_ALPHA = 0.01  # the paper's DMPO recipe


def _per_method(values: list[str] | None, defaults: dict[str, float], flag: str) -> dict:
    """``["5000"]`` (all methods) or ``["dspo=0.001", ...]`` -> {method: value}."""
    out = dict(defaults)
    for item in values or []:
        name, _, value = item.rpartition("=")
        targets = [name] if name else list(out)
        if name and name not in out:
            raise ValueError(f"--{flag} {item!r}: unknown method {name!r}; use one of {METHODS}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--{flag} {item!r}: {value!r} is not a number") from None
        for t in targets:
            out[t] = number
    return out


@dataclass
class ToyConfig:
    """Settings of the toy demo; field names are the command-line flags (``--name``)."""

    outdir: str = arg("runs/toy", "Output folder (resumable).")
    seeds: int = arg(3, "Training seeds per method x safeguard.")
    steps: int = arg(100, "Preference-training steps per run.")
    beta: list[str] | None = arg(
        None, "β: one number for all methods, or METHOD=VALUE (repeatable)."
    )
    mu: list[str] | None = arg(None, "Safeguard μ: one number, or METHOD=VALUE (repeatable).")
    lr: float = arg(3e-4, "Learning rate of the preference runs.")
    methods: list[str] = arg(
        default_factory=lambda: list(METHODS), help="Preference objectives to run."
    )
    batch_pairs: int = arg(8, "Pairs per step.")
    eval_every: int = arg(20, "Checkpoint / evaluate every N steps.")
    sft_steps: int = arg(250, "Steps of the SFT phase (the start).")
    sft_lr: float = arg(1e-3, "Learning rate of the SFT phase.")
    train_pairs: int = arg(512, "Training pairs generated.")
    heldout_pairs: int = arg(128, "Held-out pairs generated.")
    eval_draws: int = arg(2, "Fixed (noise, timestep) draws per held-out pair.")
    image_size: int = arg(16, "Image side in pixels (latents: /2).")
    loser_kinds: list[str] = arg(
        default_factory=lambda: list(DEFAULT_LOSER_KINDS),
        help=f"How losers are worse than winners: {LOSER_KINDS}.",
    )
    workers: int = arg(2, "Parallel training processes (1 thread each).")
    keep_checkpoints: bool = arg(False, "Keep checkpoint-N/ folders after evaluating them.")
    quick: bool = arg(False, "Seconds-long smoke version (tests): 1 seed, few steps, less data.")
    flow: bool = arg(
        False,
        "A tiny SD3-style flow-matching transformer (velocity target, logit-normal σ) instead "
        "of the SD1.5-style UNet (use its own --outdir).",
    )

    def __post_init__(self):
        if self.quick:
            self.seeds, self.steps, self.eval_every, self.batch_pairs = 1, 6, 3, 4
            self.sft_steps, self.train_pairs, self.heldout_pairs, self.eval_draws = 12, 32, 8, 2
            self.workers = 1
        self.betas = _per_method(self.beta, DEFAULT_BETA, "beta")
        self.mus = _per_method(self.mu, DEFAULT_MU, "mu")
        self.validate()

    def validate(self) -> None:
        """Raise ONE ValueError naming the bad setting, before anything is built."""
        for name in (
            "seeds",
            "steps",
            "batch_pairs",
            "eval_every",
            "sft_steps",
            "train_pairs",
            "heldout_pairs",
            "eval_draws",
            "workers",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods {self.methods}: choose from {list(METHODS)}")
        if self.image_size % 8:
            raise ValueError(f"--image_size must be a multiple of 8, got {self.image_size}")
        bad_kinds = set(self.loser_kinds) - set(LOSER_KINDS)
        if bad_kinds or not self.loser_kinds:
            raise ValueError(f"--loser_kinds {self.loser_kinds}: choose from {list(LOSER_KINDS)}")
        if self.train_pairs < self.batch_pairs:
            raise ValueError(
                f"--train_pairs {self.train_pairs} is fewer than one batch of {self.batch_pairs}"
            )
        for m, b in self.betas.items():
            if not b > 0:
                raise ValueError(f"--beta for {m} must be > 0, got {b}")
        for m, mu in self.mus.items():
            if not 0.0 <= mu <= 1.0:
                raise ValueError(f"--mu for {m} must be in [0, 1], got {mu}")
        if not (self.lr > 0 and self.sft_lr > 0):
            raise ValueError(f"--lr and --sft_lr must be > 0, got {self.lr}, {self.sft_lr}")


def parse_args(argv: list[str] | None = None) -> ToyConfig:
    """Command line -> :class:`ToyConfig` (bad values exit with argparse's error)."""
    from experiments import toy

    return parse(
        ToyConfig, argv, prog="python -m experiments.toy", description=toy.__doc__.split("\n\n")[0]
    )
