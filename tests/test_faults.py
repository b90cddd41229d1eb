"""Faults lose nothing (docs/reliability.md): kill -9, SIGTERM and Ctrl-C then --resume, a reward function that raises,
hangs or returns NaN, a non-finite step, a shape-changing resume, a signal during PPO's value initialisation.

Every run is the real GRPO (or PPO) script on the real vLLM engine and the tiny demo model, in float32 on CPU with
lora_dropout 0.05 (so the dropout RNG must be restored exactly for a resumed run to be the same run).
"""

import json
import os
import random
import signal
import sys
import time

import pytest
import torch
from conftest import GRPO_SHORT, assert_same_metrics, interrupt, start_run
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = os.path.join(ROOT, "GRPO", "grpo.py")
PPO = os.path.join(ROOT, "PPO", "ppo.py")
RUN = [*GRPO_SHORT, "--wandb", "false"]  # 8 steps, a checkpoint every 2, dropout on (tests/conftest.py)
NO_EVAL = [*RUN, "--eval_every", "0"]  # the faulty rewards count their calls: the evaluation's would count too

FAULTY_REWARDS = '''
import math
import time

from nanorlhf.tasks import addition_reward

calls = 0


def count(prompts, completions, **row):
    global calls
    calls += 1
    return addition_reward(prompts, completions, **row)


def parse(text):
    return int(text)  # the user's bug: not every completion is a number


def raises(prompts, completions, **row):
    rewards = count(prompts, completions, **row)
    return [parse(c) for c in completions] if calls == 3 else rewards


def hangs(prompts, completions, **row):
    rewards = count(prompts, completions, **row)
    if calls == 2:
        time.sleep(600)
    return rewards


def nan(prompts, completions, **row):
    rewards = count(prompts, completions, **row)
    return [math.nan] * len(completions) if calls == 2 else rewards


def overflows(prompts, completions, **row):
    """At steps 2, 4, 5 and 6: rewards finite in Python but beyond float32, so the advantages become NaN."""
    rewards = count(prompts, completions, **row)
    return [1e39 * (1 + r) for r in rewards] if calls in (2, 4, 5, 6) else rewards
'''


def start(*args, script=GRPO):
    return start_run([sys.executable, script, *args])


def run(*args, script=GRPO):
    proc = start(*args, script=script)
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


def rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(output_dir):
    return sorted(int(d.split("-")[1]) for d in os.listdir(output_dir) if d.split("-")[-1].isdigit()
                  and d.startswith("checkpoint-"))


def assert_finite_checkpoints(output_dir):
    for step in checkpoint_steps(output_dir):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        assert all(torch.isfinite(t).all() for t in load_file(os.path.join(path, "adapter_model.safetensors")).values())
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        for tensors in state["optimizer"]["state"].values():
            assert all(torch.isfinite(t).all() for t in tensors.values())


def assert_one_sentence(out, *words):
    """The run's last words are the error sentence, and no traceback but the user's own frames is shown."""
    assert "Traceback" not in out, out[-3000:]
    error = out[out.rindex("error: "):]
    for w in words:
        assert w in error, error


@pytest.fixture(scope="module")
def reference_run(grpo_demo_run):
    return grpo_demo_run[0]  # the uninterrupted run


@pytest.fixture(scope="module")
def faulty_rewards(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "faulty.py"
    path.write_text(FAULTY_REWARDS)
    return str(path)


# the kill points are drawn from these seeds; NANORLHF_FAULT_SEEDS=1,2,3 tries others (docs/reliability.md)
@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("NANORLHF_FAULT_SEEDS", "0").split(",")])
def test_killed_and_interrupted_runs_resume_as_the_same_run(reference_run, tmp_path, seed):
    """kill -9 at a random step (seeded), then SIGTERM of the resumed run, each followed by --resume: metrics.jsonl
    holds each step once with the uninterrupted run's values, and wandb continues the same run."""
    output_dir = str(tmp_path / "run")
    rng = random.Random(seed)
    status, out = interrupt([sys.executable, GRPO, *RUN, "--output_dir", output_dir, "--wandb", "true"], output_dir,
                            rng.randint(3, 4), signal.SIGKILL)
    assert status == -signal.SIGKILL
    killed_at = rows(output_dir)[-1]["step"]
    wandb_id = open(os.path.join(output_dir, "wandb", "nanorlhf-run-id")).read()
    resumed_from = max(checkpoint_steps(output_dir))
    status, out = interrupt([sys.executable, GRPO, *RUN, "--resume", output_dir, "--wandb", "true"], output_dir,
                            resumed_from + rng.randint(1, 3), signal.SIGTERM)
    assert f"continuing at step {resumed_from + 1}" in out, out[-3000:]
    if status != 0:  # 0: the run ended before the signal came; else it finishes the step, saves it, exits 128 + 15
        assert status == 143 and "Traceback" not in out, out[-3000:]
        assert checkpoint_steps(output_dir)[-1] == rows(output_dir)[-1]["step"]
    status, out = run(*RUN, "--resume", output_dir, "--wandb", "true", "--reward_timeout", "300")
    assert status == 0, out[-3000:]
    assert "changed since that checkpoint: reward_timeout 600.0 -> 300.0" in out
    assert_same_metrics(rows(output_dir), rows(reference_run))
    assert not [d for d in os.listdir(output_dir) if d.startswith(".tmp-checkpoint") or d.endswith(".old")]
    assert len(checkpoint_steps(output_dir)) == 3 and checkpoint_steps(output_dir)[-1] == 8  # save_total_limit 3
    # every process of the run logged to the same wandb run
    segments = [d for d in os.listdir(os.path.join(output_dir, "wandb")) if d.startswith("offline-run-")]
    assert len(segments) >= 2 and all(d.endswith(wandb_id) for d in segments), segments
    print(f"seed {seed}: kill -9 after step {killed_at} was logged, SIGTERM, resumed each time: same run")


def test_reward_that_raises_stops_with_its_frames_after_saving(faulty_rewards, tmp_path):
    output_dir = str(tmp_path / "run")
    status, out = run(*NO_EVAL, "--output_dir", output_dir, "--save_every", "100", "--reward_fn", f"{faulty_rewards}:raises")
    assert status == 2
    assert_one_sentence(out, "reward raises raised ValueError: invalid literal for int()", "checkpoint-2",
                        f"--resume {output_dir}", 'faulty.py", line', "in parse", "return int(text)")
    assert "site-packages" not in out.split("error: ")[-1]  # only the user's frames
    assert checkpoint_steps(output_dir) == [2] and [r["step"] for r in rows(output_dir)] == [1, 2]
    assert_finite_checkpoints(output_dir)


def test_reward_that_hangs_stops_at_reward_timeout(faulty_rewards, tmp_path):
    output_dir = str(tmp_path / "run")
    started = time.time()
    status, out = run(*NO_EVAL, "--output_dir", output_dir, "--reward_fn", f"{faulty_rewards}:hangs", "--reward_timeout", "3")
    assert status == 2 and time.time() - started < 550  # not the 600 s the function sleeps
    assert_one_sentence(out, "reward hangs did not return within reward_timeout 3 s", "checkpoint-1")
    assert checkpoint_steps(output_dir) == [1]


def test_reward_that_returns_nan_stops_after_saving(faulty_rewards, tmp_path):
    output_dir = str(tmp_path / "run")
    status, out = run(*NO_EVAL, "--output_dir", output_dir, "--reward_fn", f"{faulty_rewards}:nan")
    assert status == 2
    assert_one_sentence(out, "reward nan returned NaN or inf", "checkpoint-1")
    assert checkpoint_steps(output_dir) == [1]
    assert_finite_checkpoints(output_dir)


def test_non_finite_steps_are_skipped_then_stop_the_run(faulty_rewards, tmp_path):
    """Step 2's loss is NaN: skipped, the run goes on; steps 4, 5, 6 too: three in a row stop it with status 2."""
    output_dir = str(tmp_path / "run")
    status, out = run(*NO_EVAL, "--output_dir", output_dir, "--reward_fn", f"{faulty_rewards}:overflows")
    assert status == 2, out[-3000:]
    assert_one_sentence(out, "3 steps in a row had a non-finite loss or gradient (the last: step 6)",
                        "checkpoint-6 holds the weights of the last finite step")
    assert out.count("warning: step ") == 4 and "warning: step 2: loss nan" in out
    logged = rows(output_dir)
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1, 2, 3, 4]
    assert [r["grad_norm"] is None for r in logged] == [False, True, False, True, True, True]
    assert "time_sync" not in logged[1] and "time_sync" in logged[2]  # no push of a skipped step
    assert checkpoint_steps(output_dir) == [2, 4, 6]
    assert_finite_checkpoints(output_dir)


def test_resume_refuses_a_shape_change_and_writes_nothing(reference_run):
    before = {f: os.path.getmtime(os.path.join(reference_run, f)) for f in os.listdir(reference_run)}
    status, out = run(*RUN, "--resume", reference_run, "--lora_r", "8")
    assert status == 2
    assert_one_sentence(out, "lora_r is 8 but the checkpoint was trained with 16", "start a new run")
    assert {f: os.path.getmtime(os.path.join(reference_run, f)) for f in os.listdir(reference_run)} == before


def test_ctrl_c_during_ppo_value_initialisation_exits_cleanly(tmp_path):
    output_dir = str(tmp_path / "run")
    proc = start("--demo", "--total_episodes", "512", "--output_dir", output_dir, "--wandb", "false",
                 "--value_init_steps", "50", script=PPO)
    deadline = time.time() + 600
    while time.time() < deadline and not os.path.exists(os.path.join(output_dir, "value_init.jsonl")):
        time.sleep(0.05)
    while time.time() < deadline and not open(os.path.join(output_dir, "value_init.jsonl")).read():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "Ctrl-C: stopped before step 1; nothing new to save" in out and "Traceback" not in out
    assert checkpoint_steps(output_dir) == []


# --- the pieces, without an engine -----------------------------------------------------------------------------


def test_run_folder_left_by_a_killed_save_is_tidied(tmp_path):
    from nanorlhf.checkpoint import find_checkpoint

    for name in ("checkpoint-2", "checkpoint-4.old", "checkpoint-6", "checkpoint-6.old", ".tmp-checkpoint-x1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "progress.json").write_text("{}")
    # killed between the two renames of a re-save of step 4 (only .old left) and after those of step 6
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_checkpoints_rotate_and_resume_sets_later_ones_aside(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nanorlhf.checkpoint import checkpoints, load_checkpoint, save_checkpoint, set_aside_later_checkpoints
    from nanorlhf.update import cosine_schedule
    from nanorlhf.tiny import build_policy_at_shape

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(build_policy_at_shape(str(tmp_path / "m"), hidden_size=64,
                                                                                      num_layers=1, vocab_size=512)),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in range(1, 6):
        save_checkpoint(str(run_dir), step, model, optimizer, cosine_schedule(optimizer, 10), {"step": step},
                        config={"lora_r": 4}, keep=3)
    assert sorted(checkpoints(str(run_dir))) == [3, 4, 5]
    progress, _, rng = load_checkpoint(str(run_dir / "checkpoint-3"), model, optimizer, cosine_schedule(optimizer, 10))
    assert progress == {"step": 3} and set(rng) >= {"python", "numpy", "torch"}
    assert set_aside_later_checkpoints(str(run_dir), 3) == ["checkpoint-4", "checkpoint-5"]
    assert sorted(os.listdir(run_dir)) == ["checkpoint-3", "checkpoint-4.after-3", "checkpoint-5.after-3"]
    assert json.loads((run_dir / "checkpoint-3" / "config.json").read_text()) == {"lora_r": 4}


def test_metrics_after_the_checkpoint_are_moved_aside(tmp_path):
    from nanorlhf.tracking import set_aside_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward_mean": s / 10}) + "\n" for s in (1, 2, 3, 4, 5)))
    assert set_aside_metrics(str(path), 3) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl.after-3").read_text().splitlines()] == [4, 5]
    assert set_aside_metrics(str(path), 3) == 0  # nothing later: the file is left as it is


def test_resume_changes_name_what_changed_and_refuse_shape_fields():
    from nanorlhf.errors import UserError
    from nanorlhf.run_folder import resume_changes

    saved = {"model": "m", "lora_r": 64, "learning_rate": 1e-5, "total_episodes": 100, "output_dir": "a", "resume": ""}
    now = {**saved, "learning_rate": 2e-5, "output_dir": "b", "resume": "a", "save_total_limit": 3}
    assert resume_changes(saved, now) == ["learning_rate 1e-05 -> 2e-05"]
    with pytest.raises(UserError, match="lora_r is 32 but the checkpoint was trained with 64; these shape the model"):
        resume_changes(saved, {**now, "lora_r": 32})
    assert resume_changes({}, now) == []  # a checkpoint older than config.json: nothing to compare


def test_reward_timeout_interrupts_a_sleeping_function_and_restores_the_alarm():
    from nanorlhf.errors import UserError
    from nanorlhf.rewards import Rewards

    def slow(prompts, completions, **_):
        try:
            time.sleep(30)
        except Exception:  # a broad except in the user's code does not swallow the timeout
            pass
        return [1.0] * len(completions)

    previous = signal.getsignal(signal.SIGALRM)
    started = time.time()
    with pytest.raises(UserError, match="reward slow did not return within reward_timeout 0.5 s"):
        Rewards([slow], timeout=0.5)(["p"], ["c"], {})
    assert time.time() - started < 10
    assert signal.getsignal(signal.SIGALRM) == previous and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
