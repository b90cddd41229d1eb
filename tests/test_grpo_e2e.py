"""GRPO end to end on the real vLLM engine (CPU), the bundled tiny model and the synthetic addition task."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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


def progress(checkpoint):
    with open(os.path.join(checkpoint, "progress.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("grpo") / "run")
    # wandb on, without credentials: offline, with a notice and no prompt (stdin is closed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, SCRIPT, *SHORT, "--output_dir", output_dir, "--wandb", "true"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
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
    assert {"checkpoint-4", "checkpoint-8"} <= set(os.listdir(reference_run))


def test_interrupted_run_resumes_at_next_step_with_same_data(reference_run, tmp_path):
    output_dir = str(tmp_path / "run")
    cmd = [sys.executable, SCRIPT, *SHORT, "--output_dir", output_dir]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = os.path.join(output_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # Ctrl-C once a few steps are logged
        if os.path.exists(path) and len(open(path).readlines()) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert proc.returncode == 130, out[-3000:]
    logged = metrics(output_dir)[-1]["step"]
    saved = sorted(int(d.split("-")[1]) for d in os.listdir(output_dir) if d.startswith("checkpoint-"))
    assert saved[-1] == logged  # Ctrl-C saved the last completed step
    resumed = run_script(*SHORT, "--resume", output_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing at step {logged + 1}" in resumed.stdout
    rows = metrics(output_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    # same data position as the uninterrupted run, and (CPU, seeded) the same samples and updates
    final = progress(os.path.join(output_dir, "checkpoint-8"))
    assert final["data"] == progress(os.path.join(reference_run, "checkpoint-8"))["data"]
    reference = metrics(reference_run)
    assert [r["reward_mean"] for r in rows] == pytest.approx([r["reward_mean"] for r in reference])


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
])
def test_bad_input_is_one_clear_sentence(tmp_path, args, words):
    output_dir = tmp_path / "out"
    result = run_script(*SHORT, "--output_dir", str(output_dir), *args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not output_dir.exists()  # nothing written


def test_reward_returning_wrong_count_stops_cleanly(tmp_path):
    reward = tmp_path / "bad.py"
    reward.write_text("def score(prompts, completions, **kw):\n    return [1.0]\n")
    result = run_script(*SHORT, "--output_dir", str(tmp_path / "out"), "--reward_fn", f"{reward}:score")
    assert result.returncode == 2
    assert "reward score returned 1 values for 128 completions" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_from_inside_its_folder_with_help():
    result = subprocess.run([sys.executable, "grpo.py", "--help"], cwd=os.path.dirname(SCRIPT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--model str (default: 'Qwen/Qwen2.5-1.5B-Instruct')" in result.stdout
    assert "--max_new_tokens int (default: 1500)" in result.stdout
    assert "--lora_r int (default: 64)" in result.stdout
