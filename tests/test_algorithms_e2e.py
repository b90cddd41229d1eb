"""RLOO, ReMax, RAFT and REINFORCE end to end: one short `--demo` run each on the real vLLM engine (CPU),
the bundled tiny model and the synthetic addition task; then the bad-input contract, which stops before
any engine starts."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 steps of 8 prompts x 4 completions: long enough for the logprob canary to see two weight pushes
SHORT = ["--demo", "--prompts_per_step", "8", "--group_size", "4", "--total_episodes", "96", "--save_every", "3",
         "--wandb", "false"]
CONTRACT = {"step", "episodes", "reward_mean", "reward_std", "kl", "loss", "response_length_mean", "time_step",
            "time_generate", "time_train", "time_sync", "engine_builds", "logprob_diff"}
SCRIPTS = {  # script: the metrics it logs on top of the contract
    "RLOO/rloo.py": {"kept_fraction", "clip_fraction"},
    "ReMax/remax.py": {"greedy_reward_mean", "kept_fraction", "clip_fraction"},
    "RAFT/raft.py": {"kept_fraction", "kept_reward_mean", "nll"},
    "Reinforce/reinforce.py": {"reward_penalized_mean", "clip_fraction"},
}
EXTRA = {  # options each run adds, so that these runs also cover them
    # a LoRA on part of vLLM's fused qkv_proj: k_proj must be pushed with q and v (float32: the canary is ~1e-6)
    "RLOO/rloo.py": ["--lora_target_modules", "q_proj,v_proj"],
    # RAFT trains at temperature 1 while sampling at 0.8: the canary still compares like with like
    "RAFT/raft.py": ["--temperature", "0.8"],
}


def run_script(script, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.e2e
@pytest.mark.parametrize("script", SCRIPTS)
def test_demo_run(script, tmp_path):
    output_dir = str(tmp_path / "run")
    result = run_script(script, *SHORT, "--output_dir", output_dir, *EXTRA.get(script, []))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["episodes"] == 96
    for row in rows:
        assert CONTRACT | SCRIPTS[script] <= set(row)
        assert row["engine_builds"] == 1  # built once, updated in place
        assert row["logprob_diff"] < 0.05  # the engine samples with the weights being trained
        assert row["is_ratio_max"] < 1.01  # float32 engine and trainer: nothing to correct
    if script == "RLOO/rloo.py":  # a k_proj left out of the push would give ~0.5 here
        assert all(r["logprob_diff"] < 1e-3 for r in rows)
    if script == "RAFT/raft.py":  # the demo keeps each prompt's best completion only when it is right
        assert all(0 < r["kept_fraction"] <= 1 / 4 and r["kept_reward_mean"] == 1.0 for r in rows)
        assert rows[-1]["kl"] is None  # kl_coef 0: no reference pass
    else:
        assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-3"))


@pytest.mark.parametrize("script, args, words", [
    ("RLOO/rloo.py", ["--group_size", "1"], "--group_size must be at least 2"),
    ("RLOO/rloo.py", ["--sparse", "maybe"], "--sparse takes true or false"),
    ("ReMax/remax.py", ["--loss_type", "mean"], "--loss_type must be sequence or token"),
    ("RAFT/raft.py", ["--group_size", "1"], "--group_size must be at least 2"),
    ("RAFT/raft.py", ["--reward_threshold", "high"], "--reward_threshold takes a float"),
    ("Reinforce/reinforce.py", ["--whiten_advantages", "2"], "--whiten_advantages takes true or false"),
])
def test_bad_input_is_one_clear_sentence(tmp_path, script, args, words):
    output_dir = tmp_path / "out"
    result = run_script(script, *SHORT, "--output_dir", str(output_dir), *args, timeout=120)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not output_dir.exists()
