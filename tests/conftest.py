"""Test-wide settings: nothing in the suite may reach the network."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shared_prompts() -> Path:
    """The paper's prompt files beside the checkout (``../shared/prompts``), read-only.

    Tests read them from there and never copy them into the repository. They must exist: a
    missing folder is an error, not a skip.
    """
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo.parent / "shared" / "prompts", Path("/work/shared/prompts")):
        if (candidate / "papv2.json").is_file():
            return candidate
    raise FileNotFoundError(f"../shared/prompts not found beside {repo}")


SHARED_PROMPTS = _shared_prompts()
