"""GRPO end to end on the real vLLM engine (CPU), the bundled tiny model and the synthetic addition task."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import load_script

from nanorlhf.config import parse_config
from nanorlhf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "GRPO", "grpo.py")
# 8 steps of 16 prompts x 8 completions, checkpoint every 4
SHORT = ["--demo", "--total_episodes", "1024", "--prompts_per_step", "16", "--save_every", "4", "--wandb", "false"]


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference_run(grpo_demo_run):
    output_dir, result = grpo_demo_run  # conftest.GRPO_SHORT, wandb on without credentials
    assert "logging offline" in result.stderr
    assert os.path.isdir(os.path.join(output_dir, "wandb"))
    assert "reward_mean: " in result.stdout and "over the first quarter of the 8 steps -> " in result.stdout
    return output_dir


def test_demo_run_logs_contract_metrics(reference_run):
    rows = metrics(reference_run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    required = {"step", "episodes", "reward_mean", "reward_std", "kl", "loss", "response_length_mean", "time_step",
                "time_generate", "time_train", "time_sync", "engine_builds", "logprob_diff"}
    assert required <= set(rows[0])
    assert all(r["engine_builds"] == 1 for r in rows)  # the engine is built once and updated in place
    # the canary: the engine generates with the weights being trained, step after step
    assert all(r["logprob_diff"] < 0.05 for r in rows[1:])
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert rows[-1]["episodes"] == 1024
    assert os.path.exists(os.path.join(reference_run, "metrics.png"))
    # the demo's greedy evaluation: at step 1, every eval_every (10) steps and at the last step
    assert [r["step"] for r in rows if r.get("eval_reward_mean") is not None] == [1, 8]
    assert rows[0]["eval_reward_mean"] == rows[0]["eval_reward_addition_reward"]  # the accuracy, one reward part
    assert {"checkpoint-4", "checkpoint-8"} <= set(os.listdir(reference_run))


def test_console_shows_a_few_lines_and_the_libraries_go_to_run_log(grpo_demo_run):
    output_dir, result = grpo_demo_run
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "episode/s" not in line]  # the bar
    assert len(lines) <= 10, lines
    assert not [line for line in lines if "warn" in line.lower() or "loading weights" in line.lower()], lines
    log = open(os.path.join(output_dir, "run.log")).read()
    assert "WARNING" in log and "wandb: Run history:" in log  # vLLM's start-up warnings, wandb's own summary
    assert "reward_mean: " in log and "run folder: " in log  # the lines the user saw are in the log too


def test_run_folder_holds_its_config_command_and_samples(reference_run):
    with open(os.path.join(reference_run, "config.json")) as f:
        config = json.load(f)
    assert config["prompts_per_step"] == 16 and config["lora_dropout"] == 0.05 and config["output_dir"] == reference_run
    command = open(os.path.join(reference_run, "command.txt")).read()
    assert "grpo.py --demo --total_episodes 1024" in command and command.count("\n") == 1
    with open(os.path.join(reference_run, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] == [1] * 4  # step 1, then every samples_every (10) steps
    assert {"prompt", "completion", "reward", "reward_addition_reward", "length", "truncated"} <= set(samples[0])
    assert all(s["reward"] == s["reward_addition_reward"] for s in samples)


def test_output_dir_of_another_run_is_refused_and_left_intact(reference_run):
    before = open(os.path.join(reference_run, "metrics.jsonl")).read()
    result = run_script(*SHORT, "--output_dir", reference_run)
    assert result.returncode == 2
    assert "holds another run" in result.stderr and "Traceback" not in result.stderr
    assert open(os.path.join(reference_run, "metrics.jsonl")).read() == before


@pytest.mark.parametrize("args, words", [
    (["--no_such_field", "1"], "unknown option --no_such_field"),
    (["--group_size", "four"], "--group_size takes a int"),
    (["--reward_fn", "missing.py:score"], "file 'missing.py' does not exist"),
    (["--dataset", "missing.jsonl"], "file 'missing.jsonl' does not exist"),
    (["--prompt_field", "question"], "--prompt_field 'question' is not a column"),
    (["--max_prompt_tokens", "2000"], "exceeds the model's context window"),
    (["--temperature", "0"], "--temperature must be > 0 for training"),
    (["--eval_dataset", ""], "with a local --dataset needs --eval_dataset"),
])
def test_bad_input_is_one_clear_sentence(tmp_path, args, words):
    """In this process (each is refused before the engine is built): the UserError that the script's
    exit_on_user_error prints as one line with status 2, as the test above shows end to end."""
    grpo = load_script("GRPO/grpo.py")
    output_dir = tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(words)):
        grpo.main(parse_config(grpo.Config, [*SHORT, "--output_dir", str(output_dir), *args], demo=grpo.DEMO))
    assert not output_dir.exists()  # nothing written


def test_runs_from_inside_its_folder_with_help():
    result = subprocess.run([sys.executable, "grpo.py", "--help"], cwd=os.path.dirname(SCRIPT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--model str (default: 'Qwen/Qwen2.5-1.5B-Instruct')" in result.stdout
    assert "--max_new_tokens int (default: 1500)" in result.stdout
    assert "--lora_r int (default: 64)" in result.stdout
