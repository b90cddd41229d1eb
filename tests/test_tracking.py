"""metrics.jsonl reading and the end-of-run reward line (pure functions: no engine)."""

import json

from nanorlhf.tracking import read_metrics, reward_summary


def test_reward_summary_compares_first_and_last_quarter():
    rows = [{"step": s, "reward_mean": r} for s, r in enumerate([0.1, 0.3, 0.2, 0.2, 0.5, 0.4, 0.6, 0.8], 1)]
    # quarters of 8 steps are 2 steps: (0.1 + 0.3) / 2 = 0.2 and (0.6 + 0.8) / 2 = 0.7
    assert reward_summary(rows) == "reward_mean: 0.200 over the first quarter of the 8 steps -> 0.700 over the last quarter"
    assert reward_summary(rows[:3]) is None  # too short to have quarters
    # steps whose reward was not finite (logged as null) are left out
    assert reward_summary(rows[:4] + [{"step": 9, "reward_mean": None}]) == reward_summary(rows[:4])


def test_read_metrics_keeps_the_last_line_of_a_step_logged_twice(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "reward_mean": 0.1}, {"step": 2, "reward_mean": 0.2}, {"step": 2, "reward_mean": 0.25},
             {"step": 3, "reward_mean": 0.3}]  # a run stopped after step 2 and resumed from its step-1 checkpoint
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    assert [(r["step"], r["reward_mean"]) for r in read_metrics(path)] == [(1, 0.1), (2, 0.25), (3, 0.3)]
    assert read_metrics(tmp_path / "missing.jsonl") == []
