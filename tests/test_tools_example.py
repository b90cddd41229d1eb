"""examples/tools: the calculator task's reward reads the conversation, and two GRPO steps of the example's demo
script on a briefly warm-started tiny model (a real engine) make tool calls that the calculator answers."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples", "tools"))
import task  # noqa: E402
import warm_start  # noqa: E402

CALL = warm_start.call_text(473, 58)
# A short warm start (200 steps, no copy-accuracy target): it calls the calculator in about a third of its episodes,
# in the right format, mostly with wrong numbers. Built once and cached (tens of seconds).
QUICK = dict(max_steps=200, target_copy_accuracy=2.0)


def conversation(*turns):
    roles = ["assistant", "tool"] * len(turns)
    return [{"role": "user", "content": "What is 473 * 58?"}] + [{"role": r, "content": t} for r, t in
                                                                  zip(roles, turns)]


def test_reward_reads_the_final_answer_from_the_messages():
    messages = [conversation(CALL, "27434", "27434"),  # called, then answered right
                conversation("27434"),  # answered right without the tool
                conversation(CALL, "27434", "27435"),  # called, then answered wrong
                conversation(CALL, "27434", CALL),  # still calling when the turns ran out: no answer
                conversation(CALL, "error: tool multiply raised ValueError: x", "It is 27434.")]
    answers = ["27434"] * len(messages)
    completions = [m[-1]["content"] for m in messages]
    assert task.correct([""] * 5, completions, messages=messages, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert task.used_calculator([""] * 5, completions, messages=messages) == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_rows_and_the_tool():
    import calculator

    rows = task.rows(50, seed=0)
    assert all(100 <= r["a"] <= 999 and 10 <= r["b"] <= 99 and r["answer"] == str(r["a"] * r["b"]) for r in rows)
    assert calculator.multiply(a="473", b=58) == 27434


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = warm_start.demo_model(**QUICK)
    out = tmp_path_factory.mktemp("tools") / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tools", "grpo_tools.py"), "--demo",
                             "--model", model, "--total_episodes", "64", "--prompts_per_step", "8", "--group_size", "4",
                             "--eval_every", "0", "--samples_every", "1", "--wandb", "false", "--output_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    return rows, samples


def test_demo_steps_call_the_calculator(run):
    rows, samples = run
    assert [r["step"] for r in rows] == [1, 2] and all(r["engine_builds"] == 1 for r in rows)
    assert all(r["tool_calls_mean"] > 0 and 0 < r["tool_token_fraction"] < 1 for r in rows)
    assert all(r["turns_mean"] > 1 and r["logprob_diff"] < 0.05 for r in rows)
    # reward_used_calculator (weight 0) can only come from the messages: the calculator answered some calls
    assert all(r["reward_used_calculator"] > 0 for r in rows)
    # the rewards logged with each sample are what task.py's functions say of the conversation logged with it
    for sample in samples:
        messages = json.loads(sample["messages"])
        a, b = map(int, sample["prompt"].removeprefix("What is ").removesuffix("?").split(" * "))
        assert sample["reward_correct"] == task.correct([], [], [messages], [str(a * b)])[0]
        assert sample["reward_used_calculator"] == task.used_calculator([], [], [messages])[0]
