import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanorlhf.config import load_module  # noqa: E402


def load_script(relpath):
    """Import an algorithm script as a module (its main() does not run: it is behind __main__)."""
    return load_module(os.path.join(ROOT, relpath))


# The GRPO demo, short, with LoRA dropout (so resuming must restore the RNG): 8 steps of 16 prompts x 8 completions,
# a checkpoint every 2 steps. test_grpo_e2e checks its metrics, test_faults compares interrupted runs with it.
GRPO_SHORT = ["--demo", "--total_episodes", "1024", "--prompts_per_step", "16", "--save_every", "2",
              "--lora_dropout", "0.05"]


@pytest.fixture(scope="session")
def grpo_demo_run(tmp_path_factory):
    """(run folder, CompletedProcess) of GRPO_SHORT with wandb on and no credentials (offline, stdin closed)."""
    output_dir = str(tmp_path_factory.mktemp("grpo") / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "GRPO", "grpo.py"), *GRPO_SHORT, "--output_dir",
                             output_dir, "--wandb", "true"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result
