"""GRPO's DAPO recipe end to end (dynamic sampling, soft overlong punishment, clip-higher, token loss) with sparse and
truncated-completion masking on top: 3 steps of the demo on the real vLLM engine (CPU)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dapo_recipe_with_sparse_and_masking_runs_and_logs(tmp_path):
    output_dir = str(tmp_path / "run")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "GRPO", "grpo.py"), "--demo", "--recipe", "dapo",
                             "--sparse", "--mask_truncated_completions", "--total_episodes", "768",
                             "--output_dir", output_dir, "--wandb", "false"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # dynamic sampling: a full step of informative groups, or every refill round spent
        assert r["informative_groups"] == 32 or r["refill_rounds"] == 3
        assert 0 <= r["refill_rounds"] <= 3
        # the overlong buffer of the recipe is the last 8 // 5 = 1 token: every 8-token completion gets -1, the
        # truncated ones among them
        assert -1 <= r["reward_overlong"] <= -r["truncated_fraction"]
        assert abs(r["reward_mean"] - r["reward_addition_reward"] - r["reward_overlong"]) < 1e-6  # a reward part
        assert r["kl"] is None  # DAPO has no KL term: no reference pass
        assert 0 <= r["kept_fraction"] <= 1
        assert r["engine_builds"] == 1
    assert all(r["logprob_diff"] < 0.05 for r in rows[1:])
