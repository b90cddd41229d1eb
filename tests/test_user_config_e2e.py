"""The configuration users run, at a realistic shape, on the real vLLM engine (CPU): a Qwen2-architecture model
with head size 64, 4 layers and a 32k vocabulary (random weights, built locally), bfloat16 in the engine and the
trainer, gradient checkpointing, LoRA dropout 0.05, r 64 on every linear layer, temperature 0.9 with top-p 0.95,
and 256-token completions (a random model rarely stops early). Three GRPO steps, once straight through and once
stopped by SIGTERM and resumed; two PPO steps. Every step after the first samples from the weights pushed after the
step before (after a resume: the checkpoint's).

One attention head of size 64 and 2 x 2 completions a step keep it affordable: on a CPU without AVX-512 torch's
bfloat16 matmuls crawl (0.2 GFLOP/s measured on this project's 2-core AMD EPYC), and the 32k-vocabulary LM head
is most of the work."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from conftest import assert_same_metrics, interrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bf16 engine vs bf16 trainer, measured at this shape: 0.001-0.002 per token (different kernels and summation
# orders over 32k logits). A push that missed a layer or a fused shard gives 0.1-1: 0.02 separates the two.
CANARY = 0.02
REWARD = "def score(prompts, completions, **_):\n    return [c.count('a') / 10 for c in completions]\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from nanorlhf.tiny import build_policy_at_shape

    root = tmp_path_factory.mktemp("user_config")
    model = build_policy_at_shape(str(root / "model"), hidden_size=64, num_layers=4, vocab_size=32768)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"Write a story about the number {i}."}) + "\n")
    (root / "reward.py").write_text(REWARD)
    common = ["--model", model, "--dataset", str(root / "prompts.jsonl"), "--prompt_field", "prompt",
              "--reward_model", "none", "--reward_fn", f"{root / 'reward.py'}:score", "--max_new_tokens", "256",
              "--max_prompt_tokens", "64", "--prompts_per_step", "2", "--group_size", "2", "--wandb", "false",
              "--dtype", "bfloat16", "--gradient_checkpointing", "true", "--lora_dropout", "0.05",
              "--learning_rate", "1e-4", "--weight_sync", "lora"]  # the bf16 default on a GPU (auto is merged on a CPU)
    return root, common


def run(script, common, output_dir, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *common, "--output_dir", output_dir, *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check(rows, steps):
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert row["engine_builds"] == 1
        assert row["logprob_diff"] < CANARY, row["logprob_diff"]
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert row["response_length_mean"] > 200  # long completions, as users run them
        assert 0.5 < row["is_ratio_mean"] < 1.5 and row["is_ratio_max"] < 20  # the correction is active and sane


@pytest.mark.e2e
def test_grpo_in_the_user_configuration_and_a_stopped_run_resumes_as_the_same_run(setup):
    """Three steps; then the same run stopped by SIGTERM after step 1 (it finishes step 2 and saves it) and resumed:
    the resumed engine must serve the trained adapter (canary) and the run must give the same numbers (bf16 on CPU
    is deterministic: the same kernels on the same inputs, dropout masks and sampling seeds restored)."""
    root, common = setup
    reference = run("GRPO/grpo.py", common, str(root / "grpo"), "--total_episodes", "12")
    check(reference, 3)
    output_dir = str(root / "grpo-stopped")
    args = ["--total_episodes", "12", "--output_dir", output_dir]
    status, out = interrupt([sys.executable, os.path.join(ROOT, "GRPO", "grpo.py"), *common, *args], output_dir, 1,
                            signal.SIGTERM)
    assert status == 143 and "SIGTERM: saved" in out, out[-3000:]
    rows = run("GRPO/grpo.py", common, output_dir, "--total_episodes", "12", "--resume", output_dir)
    check(rows, 3)
    assert_same_metrics(rows, reference)


@pytest.mark.e2e
def test_ppo_in_the_user_configuration(setup):
    root, common = setup
    # no value initialisation (its rollouts cost as much as a step; tests/test_ppo.py covers it)
    rows = run("PPO/ppo.py", common, str(root / "ppo"), "--total_episodes", "8", "--value_init_steps", "0",
               "--ppo_epochs", "2")
    check(rows, 2)
    assert all(math.isfinite(r["value_loss"]) for r in rows)
