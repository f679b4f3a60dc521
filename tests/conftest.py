"""Test-wide settings and prompt-file fixtures. Nothing in the suite may reach the network.

The paper's prompt files (``papv2.json``, ``hpsv2.json``, ``partiprompts.json``, checked against
the sha256 sums in :data:`eval.prompts.PAPER_SETS`) are not in the repository. The few tests that
need the real files take the :func:`paper_prompts` fixture, which finds them:

* in the folder named by the environment variable ``SDPO_PAPER_PROMPTS``, when it is set. Then
  it is the only place looked at: set it to an empty or non-existent folder to run the suite as
  on a machine without the files (``../shared/prompts`` is then ignored);
* otherwise in ``../shared/prompts`` beside the checkout.

Where they are absent, those tests skip with the reason (``-ra`` prints it); every other test
uses :func:`synthetic_prompts`, small files in the same format written to a temporary folder.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAPER_PROMPTS_ENV = "SDPO_PAPER_PROMPTS"
PAPER_FILES = ("papv2.json", "hpsv2.json", "partiprompts.json")


def find_paper_prompts() -> tuple[Path | None, str]:
    """``(folder, "")`` when the paper's three prompt files are found, else ``(None, reason)``."""
    env = os.environ.get(PAPER_PROMPTS_ENV)
    if env == "":
        return None, f"the paper's prompt files are absent: ${PAPER_PROMPTS_ENV} is set but empty"
    if env is not None:
        folder, where = Path(env), f"${PAPER_PROMPTS_ENV}={env}"
    else:
        folder = Path(__file__).resolve().parents[1].parent / "shared" / "prompts"
        where = f"{folder} (or set ${PAPER_PROMPTS_ENV} to their folder)"
    missing = [name for name in PAPER_FILES if not (folder / name).is_file()]
    if missing:
        return None, f"the paper's prompt files are absent: no {', '.join(missing)} in {where}"
    return folder, ""


@pytest.fixture(scope="session")
def paper_prompts() -> Path:
    """The folder of the paper's prompt files (read-only: tests copy, never write there)."""
    folder, reason = find_paper_prompts()
    if folder is None:
        pytest.skip(reason)
    return folder


SYNTHETIC_SIZE = 8  # prompts per synthetic set: enough for tests that edit the sixth entry


@pytest.fixture
def synthetic_prompts(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Stand-ins for the paper's files in their format (a JSON list of objects with ``prompt``,
    ``gen_image_path``, ``raw_image_path`` and ``metadata``), with their sha256 sums by set name:
    tests put the sums in place of ``PAPER_SETS`` to exercise fetching and verification."""
    folder = tmp_path_factory.mktemp("synthetic_prompts")
    sums = {}
    for name in PAPER_FILES:
        stem = name.removesuffix(".json")
        entries = [
            {
                "prompt": f"synthetic {stem} prompt {i}: a small red house",
                "gen_image_path": "",
                "raw_image_path": "",
                "metadata": {},
            }
            for i in range(SYNTHETIC_SIZE)
        ]
        data = json.dumps(entries, indent=2).encode()
        (folder / name).write_bytes(data)
        sums[stem] = hashlib.sha256(data).hexdigest()
    return folder, sums


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster single-threaded on a busy 2-core machine (no OpenMP
    spinning); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    """Tiny random scorer weights (eval/tiny_scorers.py) announced through their environment
    variables for the module's tests, as a user's real weights would be."""
    from eval.tiny_scorers import build_tiny_scorers

    env = build_tiny_scorers(tmp_path_factory.mktemp("scorers"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
