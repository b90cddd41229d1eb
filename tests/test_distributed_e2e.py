"""torchrun on CPU (gloo, 2 processes, the tiny demo model): N ranks compute what one process computes on the whole
batch (issue 11, docs/scaling.md). The equivalence runs are short (3 steps of 4 prompts x 8 completions) and shared by
the tests; GRPO's 2-rank run is stopped by SIGTERM after its first step and resumed, so that it also shows a resumed
2-rank run to be the same run. The whole GRPO demo (60 steps) runs once on 2 ranks, to learn.

Tolerances: the 2-rank run samples exactly the same completions (the seed of completion j of prompt p depends on p's
place in the global batch, not on the rank), so the rewards are identical. Its losses and gradients are the same sums
taken in another order (two ranks' partial sums, then an all-reduce), so they agree to float32 rounding: within 1e-5.
The adapters after 3 Adam steps agree within 1e-4: Adam divides each gradient element by its running RMS, so an
element whose gradient is nearly zero turns a rounding difference into a visible fraction of the learning rate
(2e-3); measured 6e-6 (GRPO) and 1.5e-5 (PPO), with adapter weights up to 0.09.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import interrupt
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--demo", "--total_episodes", "96", "--prompts_per_step", "4", "--save_every", "2", "--eval_every", "0",
         "--samples_every", "0", "--wandb", "false", "--export_model", "false"]
PPO_SHORT = [*SHORT, "--value_init_steps", "1"]
DEMO = ["--demo", "--wandb", "false", "--export_model", "false"]


def command(script, args, output_dir, ranks=1):
    """An algorithm script's command line: one process, or torchrun with `ranks` processes on this machine."""
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return [*launcher, os.path.join(ROOT, script), *args, "--output_dir", str(output_dir)]


def launch(script, args, output_dir, ranks=1):
    return subprocess.run(command(script, args, output_dir, ranks), cwd=ROOT, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)


def finished(script, args, output_dir, ranks=1):
    result = launch(script, args, output_dir, ranks)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return str(output_dir)


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(output_dir, step):
    return load_file(os.path.join(output_dir, f"checkpoint-{step}", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    """One process; and 2 ranks stopped by SIGTERM once step 1 is logged (they finish the step they are in and save
    it), then resumed to step 3. Returns (one, two, (the step saved when stopped, the resumed run's output))."""
    tmp = tmp_path_factory.mktemp("grpo-ranks")
    one, two = finished("GRPO/grpo.py", SHORT, tmp / "one"), str(tmp / "two")
    status, stopped = interrupt(command("GRPO/grpo.py", SHORT, two, ranks=2), two, 1, signal.SIGTERM)
    # the ranks finish the step and save it; torchrun itself then exits 1 with its own SignalException traceback.
    # The step is usually 2; it is 1 when the signal lands between step 1's metrics line and its end-of-step check.
    saved = re.search(rf"SIGTERM: saved {re.escape(two)}/checkpoint-([12]); continue with --resume", stopped)
    assert status == 1 and saved, stopped[-3000:]
    assert not re.search(r'(grpo|nanorlhf/\w+)\.py", line', stopped), stopped[-3000:]  # no frame of the run's own
    resumed = launch("GRPO/grpo.py", [*SHORT, "--resume", two], two, ranks=2)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    return one, two, (int(saved.group(1)), resumed.stdout + resumed.stderr)


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo-ranks")
    return finished("PPO/ppo.py", PPO_SHORT, tmp / "one"), finished("PPO/ppo.py", PPO_SHORT, tmp / "two", ranks=2)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The GRPO demo as a user runs it (60 steps of 32 prompts x 8 completions, greedy evaluation every 10 steps) on
    2 ranks."""
    return finished("GRPO/grpo.py", DEMO, tmp_path_factory.mktemp("demo-ranks") / "whole", ranks=2)


def assert_same_run(one, two):
    rows_one, rows_two = metrics(one), metrics(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2, 3]
    assert rows_one[0]["reward_mean"] == rows_two[0]["reward_mean"]  # the same completions, the same rewards
    for a, b in zip(rows_one, rows_two):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length_mean"] == b["response_length_mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
        assert a["grad_norm"] > 1e-3  # a real update, not two zeros
    weights_one, weights_two = adapter(one, 3), adapter(two, 3)
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-4)


def test_grpo_two_ranks_compute_what_one_process_computes(grpo_runs):
    one, two, _ = grpo_runs
    assert_same_run(one, two)  # two: stopped after step 1 or 2 and resumed (see test_a_two_rank_run_stopped_and_resumed...)
    # rank 0 alone writes the run folder; rank 1 keeps its own log
    assert {"metrics.jsonl", "config.json", "checkpoint-2", "checkpoint-3", "run.log", "run.rank1.log"} <= \
        set(os.listdir(two))
    assert open(os.path.join(two, "command.txt")).read().startswith("torchrun --nproc_per_node 2 ")
    with open(os.path.join(two, "checkpoint-3", "progress.json")) as f:
        assert json.load(f)["world_size"] == 2


def test_ppo_two_ranks_compute_what_one_process_computes(ppo_runs):
    one, two = ppo_runs
    assert_same_run(one, two)
    for a, b in zip(metrics(one), metrics(two)):  # the critic is data parallel the same way
        assert a["value_loss"] == pytest.approx(b["value_loss"], abs=1e-5)
        assert a["value_grad_norm"] == pytest.approx(b["value_grad_norm"], abs=1e-5)
    heads = [torch.load(os.path.join(run, "checkpoint-3", "trainer_state.pt"), weights_only=False)["modules"]
             ["value_head"] for run in (one, two)]
    for name in heads[0]:
        torch.testing.assert_close(heads[1][name], heads[0][name], rtol=0, atol=1e-4)


def test_the_demo_learns_on_two_ranks(demo_run):
    rows = metrics(demo_run)
    assert [r["step"] for r in rows] == list(range(1, 61)) and all(r["engine_builds"] == 1 for r in rows)
    rewards = [r["reward_mean"] for r in rows]
    first, last = sum(rewards[:15]) / 15, sum(rewards[-15:]) / 15
    assert last > first + 0.1, (first, last)  # measured 0.192 -> 0.353, as one process learns (0.208 -> 0.389)
    accuracy = [r["eval_reward_mean"] for r in rows if "eval_reward_mean" in r]  # greedy, at step 1 and every 10
    assert len(accuracy) == 7 and accuracy[-1] > accuracy[0] + 0.2, accuracy  # measured 0.41 -> 0.85


def test_a_two_rank_run_stopped_and_resumed_is_the_same_run(grpo_runs):
    """SIGTERM reaches torchrun, which passes it to both ranks: they finish the step, rank 0 saves it, both exit;
    --resume continues the same run: each step logged once, with the numbers of the run in one process (above)."""
    _, two, (saved, restarted) = grpo_runs
    assert f"continuing at step {saved + 1}" in restarted, restarted[-3000:]
    assert [r["step"] for r in metrics(two)] == [1, 2, 3]


RANK_1_RAISES = """
import os

from nanorlhf.tasks import addition_reward

calls = 0


def score(prompts, completions, **row):
    global calls
    calls += 1
    if calls == 3 and os.environ["RANK"] == "1":
        raise ValueError("rank 1 cannot score")
    return addition_reward(prompts, completions, **row)
"""


def test_a_reward_that_raises_on_one_rank_stops_every_rank_after_saving(tmp_path):
    """As in one process (tests/test_faults.py): the last completed step is saved and the run stops with one sentence;
    the other ranks stop at the same point instead of waiting for the failed one."""
    (tmp_path / "faulty.py").write_text(RANK_1_RAISES)
    output_dir = tmp_path / "run"
    result = launch("GRPO/grpo.py", [*SHORT, "--save_every", "100", "--reward_fn", f"{tmp_path / 'faulty.py'}:score"],
                    output_dir, ranks=2)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    saved = f"Saved the last completed step in {output_dir / 'checkpoint-2'}; continue with --resume {output_dir}"
    assert f"rank 1: error: reward score raised ValueError: rank 1 cannot score. {saved}" in out, out[-3000:]
    assert f"error: another rank's reward failed (its message names it). {saved}" in out, out[-3000:]
    assert [r["step"] for r in metrics(output_dir)] == [1, 2]
    with open(output_dir / "checkpoint-2" / "progress.json") as f:
        assert json.load(f)["world_size"] == 2


def test_resume_with_another_number_of_processes_is_refused(grpo_runs, tmp_path):
    _, two, _ = grpo_runs
    result = launch("GRPO/grpo.py", [*SHORT, "--resume", two], tmp_path / "one")
    assert result.returncode == 2
    assert "was trained on 2 process(es) but this run has 1; resume it with the same number" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompts_per_step", "3"], "--prompts_per_step 3 does not split into whole prompt groups over 2 processes: "
     "make prompts_per_step a multiple of the number of processes (torchrun's --nproc_per_node x --nnodes)"),
    (["--vllm_tensor_parallel_size", "4"], "--vllm_tensor_parallel_size 4 must divide the number of processes, 2: "
     "start torchrun with a multiple of it (one process per GPU)"),
])
def test_a_world_size_that_does_not_fit_the_batch_or_the_engine_is_refused(monkeypatch, args, message):
    """Checked before the process group is joined, so one process that believes it is one of 2 says it (under
    torchrun rank 0 alone prints it, verified by hand; this saves the suite a 30 s launch)."""
    from conftest import load_script

    from nanorlhf.config import parse_config
    from nanorlhf.errors import UserError
    from nanorlhf.run import Run

    grpo = load_script("GRPO/grpo.py")
    cfg = parse_config(grpo.Config, [*SHORT, *args], demo=grpo.DEMO)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as refused:
        Run(cfg, "grpo")
    assert str(refused.value) == message
