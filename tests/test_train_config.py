"""train.py's configuration: reference flags and defaults, derived defaults, and one clear error
per bad value, raised before any model or data loads."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from sdpo.config import TrainConfig, build_parser, parse_args, validate
from tests.train_fixtures import build_models, train_args


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def data_dir(tmp_path):
    from sdpo.testing.data import write_synthetic_pickapic

    write_synthetic_pickapic(tmp_path / "data", n_pairs=4)
    return tmp_path / "data"


def _error(capsys, argv) -> str:
    """Parse ``argv``; it must exit through argparse (status 2); return the message."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_reference_defaults_and_help(data_dir):
    # defaults.md, value by value (the default fp16 only validates where CUDA exists: checked on
    # the dataclass below)
    cfg = parse_args(
        ["--pretrained_model_name_or_path", "org/model", "--dataset_name", "d/p"]
        + ["--mixed_precision", "no"]
    )
    expected = {
        "beta_dpo": 5000.0,
        "learning_rate": 1e-8,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 500,
        "max_train_steps": 2000,
        "num_train_epochs": 100,
        "proportion_empty_prompts": 0.2,
        "checkpointing_steps": 500,
        "resume_from_checkpoint": "latest",
        "report_to": "tensorboard",
        "train_method": "diffusion-dpo",
        "winner_preserving_mu": 0.0,
        "dmpo_alpha": 0.0,
        "adam_weight_decay": 1e-2,
        "output_dir": "sd-model-finetuned",
        "tracker_project_name": "tuning",
        "split": "train",
        "resolution": 512,
        "use_adafactor": False,
        "gradient_checkpointing": False,
    }
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert TrainConfig.__dataclass_fields__["mixed_precision"].default == "fp16"
    # Every field is a flag with help text.
    flags = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert flags.keys() == fields.keys()
    assert all(f.metadata["help"] for f in fields.values())
    assert set(flags["train_method"].choices) == {"diffusion-dpo", "dspo", "dmpo", "sft"}


def test_sdxl_derived_defaults():
    cfg = parse_args(
        ["--pretrained_model_name_or_path", "org/m", "--dataset_name", "d/p", "--sdxl"]
        + ["--mixed_precision", "bf16"]
    )
    assert cfg.resolution == 1024
    assert cfg.gradient_checkpointing and cfg.use_adafactor
    assert cfg.optimizer_name == "adafactor"
    cfg = parse_args(
        ["--pretrained_model_name_or_path", "org/m", "--dataset_name", "d/p"]
        + ["--mixed_precision", "no"]
    )
    assert cfg.optimizer_name == "adamw"


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--winner_preserving_mu", "1.5"], "--winner_preserving_mu"),
        (["--winner_preserving_mu", "-0.1"], "--winner_preserving_mu"),
        (["--dmpo_alpha", "1.0"], "--dmpo_alpha"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps"),
        (["--resolution", "30"], "--resolution"),
        (["--proportion_empty_prompts", "2"], "--proportion_empty_prompts"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
        (["--beta_dpo", "0"], "--beta_dpo"),
        (["--train_method", "ppo"], "--train_method"),
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "--resume_from_checkpoint"),
        (["--unet_init", "/nonexistent/unet.pth"], "--unet_init"),
        (["--use_8bit_adam"], "--use_8bit_adam"),  # bitsandbytes is not installed here
        (["--report_to", "wandb"], "--report_to"),  # nor is wandb
        (["--lora_rank", "-1"], "--lora_rank"),
        (["--lora_alpha", "0"], "--lora_alpha"),
        (["--precomputed_dir", "/nonexistent/cache"], "--precomputed_dir"),
        (["--use_fused_adam", "--use_adafactor"], "--use_fused_adam"),
    ],
)
def test_bad_values_name_the_flag(capsys, models, data_dir, tmp_path, extra, flag):
    err = _error(capsys, train_args(models["sd15"], data_dir, tmp_path / "o", *extra))
    assert flag in err


def test_fp16_on_cpu_is_a_clear_error(capsys, models, data_dir, tmp_path):
    import torch

    if torch.cuda.is_available():  # on a GPU machine fp16 is legal: check the opposite
        cfg = parse_args(
            train_args(models["sd15"], data_dir, tmp_path, "--mixed_precision", "fp16")
        )
        assert cfg.mixed_precision == "fp16"
        return
    err = _error(
        capsys, train_args(models["sd15"], data_dir, tmp_path, "--mixed_precision", "fp16")
    )
    assert "--mixed_precision" in err and "CUDA" in err


def test_dataset_source_required_exactly_once(capsys, models, data_dir, tmp_path):
    base = ["--pretrained_model_name_or_path", str(models["sd15"]), "--mixed_precision", "no"]
    assert "--dataset_name" in _error(capsys, base)
    both = base + ["--dataset_name", "x/y", "--train_data_dir", str(data_dir)]
    assert "--dataset_name" in _error(capsys, both)
    assert "--train_data_dir" in _error(capsys, base + ["--train_data_dir", str(tmp_path / "no")])


def test_validate_rejects_a_hand_built_config(models, data_dir):
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(models["sd15"]),
        train_data_dir=str(data_dir),
        mixed_precision="no",
        winner_preserving_mu=2.0,
        resolution=32,
    )
    with pytest.raises(ValueError, match="--winner_preserving_mu"):
        validate(cfg)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_family_mismatch_is_caught_before_weights_load(
    models, data_dir, tmp_path, monkeypatch, family
):
    """--sdxl on an SD1.5 folder (and no --sdxl on an SDXL one): a ValueError from the configs
    alone; main() fails before loading any model or image."""
    import train
    from sdpo import data
    from sdpo.families import base

    def forbidden(*_, **__):
        raise AssertionError("loaded data or weights before the family check")

    monkeypatch.setattr(base.ModelFamily, "load_parts", forbidden)
    monkeypatch.setattr(data, "build_dataloader", forbidden)
    cfg = parse_args(train_args(models[family], data_dir, tmp_path / "o", sdxl=family == "sd15"))
    with pytest.raises(ValueError, match="--sdxl" if family == "sd15" else "pass --sdxl"):
        train.main(cfg)
    assert not (tmp_path / "o").exists()


def test_untrainable_prediction_type_is_rejected(models, data_dir, tmp_path):
    """ε and v (SD 2.x) train; a 'sample'-prediction scheduler is refused from the configs."""
    from sdpo.families import ModelSource, check_family

    model = tmp_path / "xpred"
    shutil.copytree(models["sd15"], model)
    sched = model / "scheduler" / "scheduler_config.json"
    config = json.loads(sched.read_text())
    sched.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    assert check_family(ModelSource(str(model))).name == "sd15"
    sched.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="epsilon"):
        check_family(ModelSource(str(model)))


# The six reference recipes of defaults.md: (method, β, μ, lr, α, sdxl).
RECIPES = {
    "sd15_diffusion_dpo": ("diffusion-dpo", 5000, 0.9, 1e-8, 0.0, False),
    "sd15_dspo": ("dspo", 0.001, 0.2, 1e-8, 0.0, False),
    "sd15_dmpo": ("dmpo", 2000, 0.9, 1e-8, 0.01, False),
    "sdxl_diffusion_dpo": ("diffusion-dpo", 5000, 0.6, 1e-9, 0.0, True),
    "sdxl_dspo": ("dspo", 5000, 0.6, 1e-9, 0.0, True),
    "sdxl_dmpo": ("dmpo", 6000, 0.6, 1e-9, 0.01, True),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_launch_recipes(name, models, data_dir, tmp_path):
    """Each script's command (DRY_RUN=1) parses with train.py's parser into the reference recipe;
    env overrides and pass-through arguments are honoured; the GPU count goes to accelerate."""
    import os
    import shlex
    import subprocess
    import sys

    from tests.train_fixtures import REPO

    method, beta, mu, lr, alpha, sdxl = RECIPES[name]
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "NUM_GPUS": "4",
        "PYTHON": sys.executable,
        "MODEL_NAME": str(models["sdxl" if sdxl else "sd15"]),
        "DATASET_NAME": str(data_dir),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "train" / f"{name}.sh"), "--max_train_steps", "7"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    argv = shlex.split(proc.stdout)
    split = argv.index(str(REPO / "train.py"))
    launcher, train_argv = argv[:split], argv[split + 1 :]
    assert "--num_processes" in launcher and launcher[launcher.index("--num_processes") + 1] == "4"
    cfg = parse_args(train_argv)
    assert (cfg.train_method, cfg.beta_dpo, cfg.winner_preserving_mu) == (method, beta, mu)
    assert (cfg.learning_rate, cfg.dmpo_alpha, cfg.sdxl) == (lr, alpha, sdxl)
    assert cfg.use_winner_preserving and cfg.scale_lr and cfg.allow_tf32
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (8, 32)
    assert (cfg.lr_warmup_steps, cfg.checkpointing_steps, cfg.mixed_precision) == (500, 500, "bf16")
    assert cfg.max_train_steps == 7  # "$@" comes last and wins
    assert cfg.train_data_dir == str(data_dir) and cfg.output_dir == str(tmp_path / "out")
    vae = "madebyollin/sdxl-vae-fp16-fix" if sdxl else None
    assert cfg.pretrained_vae_model_name_or_path == vae


def test_accelerate_configs_parse():
    """The shipped accelerate configs load with accelerate's own parser; ZeRO-2 leaves the
    accumulation steps to train.py and the recipes hand a config file through unchanged."""
    import os
    import shlex
    import subprocess
    import sys

    from accelerate.commands.config.config_args import ClusterConfig

    from tests.train_fixtures import REPO

    kinds = {}
    for name in ("single_gpu", "multi_gpu", "multi_node", "deepspeed_zero2"):
        cfg = ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
        kinds[name] = (str(cfg.distributed_type).split(".")[-1], cfg.num_machines)
        if name == "deepspeed_zero2":
            assert cfg.deepspeed_config["zero_stage"] == 2
            assert "gradient_accumulation_steps" not in cfg.deepspeed_config
    assert kinds == {
        "single_gpu": ("NO", 1),
        "multi_gpu": ("MULTI_GPU", 1),
        "multi_node": ("MULTI_GPU", 2),
        "deepspeed_zero2": ("DEEPSPEED", 1),
    }
    ds = str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml")
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "ACCELERATE_CONFIG": ds}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "train" / "sdxl_dspo.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    argv = shlex.split(out)
    launcher = argv[: argv.index(str(REPO / "train.py"))]
    assert launcher[-2:] == ["--config_file", ds]
