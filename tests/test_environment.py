"""--environment file.py:Class (nanorlhf/multiturn.py, nanorlhf/tools.py, nanorlhf/rewards.py): one instance per
episode, reset(**row) and its message, the methods as tools, reward() added to the rewards, the failures; and the real
REINFORCE script with --tools and --environment, killed with -9 inside a tool call and resumed as the same run."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_same_metrics
from test_tools import ScriptedEngine, add, call, tool_calling_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from nanorlhf import tools
from nanorlhf.errors import UserError
from nanorlhf.multiturn import MultiTurn, Template
from nanorlhf.rewards import build_rewards
from nanorlhf.rollout import Rollout, make_batch


class Counter:
    """An environment: the row's answer and a running count, per episode."""

    made = []  # every instance, to check that episodes never share one

    def __init__(self):
        self.bumps = []
        Counter.made.append(self)

    def reset(self, answer, **row):
        self.answer = answer
        return f"The answer has {len(answer)} digits."

    def bump(self, by: int) -> str:
        """Add to this episode's count.

        Args:
            by: how much to add
        """
        self.bumps.append(by)
        return f"{self.answer}:{sum(self.bumps)}"

    def reward(self):
        return float(sum(self.bumps))

    def _helper(self):  # not a tool: private
        return None


def prompts_with_rows(tokenizer, answers):
    from nanorlhf.data import PromptStream

    schemas = tools.schemas({"add": add, **tools.environment_tools(Counter)})
    rows = []
    for answer in answers:
        messages = PromptStream.with_tools(type("Stream", (), {"tools": schemas, "tools_in_template": False})(),
                                           [{"role": "user", "content": "What is the answer?"}])
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rows.append({"text": "What is the answer?", "token_ids": tokenizer(text, add_special_tokens=False).input_ids,
                     "messages": messages, "fields": {"answer": answer, "prompt": "What is the answer?"}})
    return rows


def rollout(tokenizer, script, environment=Counter, max_turns=4, **kwargs):
    box = tools.Toolbox({"add": add}, timeout=5, tokenizer=tokenizer, max_tokens=0)
    return MultiTurn(ScriptedEngine(tokenizer, script), Template(tokenizer, "demo", {}), box, {"add": add}, max_turns,
                     1000, environment, **kwargs)


def test_each_episode_has_its_own_environment(tokenizer):
    """Episodes never share an instance: each one's state sees its own calls only, in the order it wrote them; reset
    gets the row and its message follows the prompt (in the ids the model reads and in the Batch); reward() is added
    to the rewards, as a reward named `environment` (weight 1, or the last of --reward_weights)."""
    assert list(tools.environment_tools(Counter)) == ["bump"]
    Counter.made.clear()
    prompts = prompts_with_rows(tokenizer, ["579", "12"])
    script = [call("bump", by=1) + call("bump", by=2) + call("add", a=1, b=2), call("bump", by=10), "done"]
    episodes = rollout(tokenizer, script).episodes(prompts, 3, seed=1)
    assert len(Counter.made) == 6 and len({id(e.environment) for e in episodes}) == 6
    assert [e.environment.bumps for e in episodes] == [[1, 2, 10]] * 6
    for e in episodes:
        answer = prompts[e.prompt_index]["fields"]["answer"]
        first = len(prompts[e.prompt_index]["messages"])
        assert e.messages[first] == {"role": "user", "content": f"The answer has {len(answer)} digits."}
        assert [m["content"] for m in e.messages if m["role"] == "tool"] == [f"{answer}:1", f"{answer}:3", "3",
                                                                            f"{answer}:13"]
        template = Template(tokenizer, "demo", {})
        assert e.prompt_ids == template.ids(e.messages[: first + 1], generation_prompt=True)
        before = template.ids(e.messages[:first])  # the prompt's messages, then reset's, then the assistant header
        assert e.prompt_ids[: len(before)] == before and len(e.prompt_ids) > len(prompts[e.prompt_index]["token_ids"])
    assert make_batch(prompts, episodes).prompt_ids == [e.prompt_ids for e in episodes]
    for weights, expected in (("", 13.0), ("2,0.5", 2 * 0 + 0.5 * 13.0)):
        rewards = build_rewards("", "nanorlhf.tasks:addition_reward" if weights else "", weights, environment=Counter)
        score = Rollout(None, None, None, rewards, None, {}, None, rollout(tokenizer, [])).score
        total, parts = score(prompts, episodes)
        assert total.tolist() == [expected] * 6 and parts["environment"].tolist() == [13.0] * 6


def test_load_environment_and_its_errors(tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text("class Game:\n    def reset(self, **row):\n        pass\n\n    def move(self, to: str) -> str:\n"
                    '        """Move.\n\n        Args:\n            to: where\n        """\n        return to\n\n'
                    "class Untyped:\n    def move(self, to):\n        return to\n\ndef not_a_class():\n    pass\n")
    game = tools.load_environment(f"{path}:Game")
    assert tools.schemas(tools.environment_tools(game))[0]["function"]["name"] == "move"
    for spec, words in ((f"{path}:Untyped", "--environment: move needs type hints"),
                        (f"{path}:not_a_class", "--environment: .* has no class 'not_a_class'"),
                        (f"{tmp_path}/nope.py:Game", "--environment: file .* does not exist"),
                        ("Game", "--environment 'Game' must look like path/to/file.py:Class")):
        with pytest.raises(UserError, match=words):
            tools.load_environment(spec)


def test_a_failing_reset_stops_the_run_naming_it(tokenizer):
    """A reset that raises (or a constructor), or whose message makes the prompt too long, stops the run with one
    sentence naming the class, the run's save-and-say after it, and the frames of the user's file."""
    class Broken(Counter):
        def reset(self, answer, **row):
            return {}["missing"]

    class Long(Counter):
        def reset(self, answer, **row):
            return "word " * 100

    prompts = prompts_with_rows(tokenizer, ["1"])
    saved = "Saved the last completed step in run/checkpoint-1; continue with --resume run"
    with pytest.raises(UserError, match=r"--environment Broken: reset\(\*\*row\) raised KeyError: 'missing' \(the "
                       r"row's columns: answer, prompt\)\. Saved the last completed step") as error:
        rollout(tokenizer, [], Broken, failed=lambda together: saved).episodes(prompts, 2, seed=1)
    assert re.search(r"test_environment.py\", line \d+, in reset", str(error.value))
    with pytest.raises(UserError, match=r"--environment Long: reset\(\)'s message makes the prompt \d+ tokens, over "
                       "--max_prompt_tokens 100"):
        rollout(tokenizer, [], Long, max_prompt_tokens=100).episodes(prompts, 1, seed=1)


def test_a_failing_reward_is_a_failing_reward_function():
    class Raises:
        def reward(self):
            return 1 / 0

    class Text:
        def reward(self):
            return "high"

    for environment, words in ((Raises, "reward environment raised ZeroDivisionError: division by zero\n.*"
                                        r"test_environment.py\", line \d+, in reward"),
                               (Text, "reward environment returned a non-number")):
        rewards = build_rewards("", "", "", environment=environment)
        with pytest.raises(UserError, match=words):
            rewards(["p"], ["c"], {"environments": [environment()]})


# --- the real REINFORCE script with --tools and --environment, killed inside a tool call and resumed -------------

ENVIRONMENT_FILE = """
import os
import signal


class Lookup:
    \"\"\"Each episode's own: reset keeps the row's answer, f tells it and counts, reward() is the count.\"\"\"

    def reset(self, prompt, answer, **_):
        self.answer, self.calls = answer, 0
        return f"Hint: {len(answer)}."

    def f(self) -> str:
        \"\"\"Look the answer up.\"\"\"
        self.calls += 1
        logged = os.environ.get("KILL_ONCE_LOGGED")  # once step 1 is logged, the first call of step 2 dies (kill -9)
        if logged and os.path.exists(logged) and os.path.getsize(logged):
            os.kill(os.getpid(), signal.SIGKILL)
        return f"{self.answer}:{self.calls}"

    def reward(self):
        return float(self.calls)


def g(x: int) -> int:
    \"\"\"Double a number.

    Args:
        x: the number
    \"\"\"
    return 2 * x


def digit(prompts, completions, messages, **_):
    return [int(m[-1]["content"]) / 9 if m[-1]["content"].isdigit() else 0.0 for m in messages]
"""


@pytest.fixture(scope="module")
def environment_run(tmp_path_factory):
    """A command for REINFORCE, 2 steps of 2 prompts x 2 episodes on the tool-calling model (tests/test_tools.py),
    with --tools g and --environment Lookup (whose f the model calls), a checkpoint every step; and the folder of
    its uninterrupted run."""
    folder = tmp_path_factory.mktemp("environment")
    (folder / "lookup.py").write_text(ENVIRONMENT_FILE)
    command = [sys.executable, os.path.join(ROOT, "Reinforce", "reinforce.py"), "--demo", "--model",
               tool_calling_model(), "--total_episodes", "8", "--prompts_per_step", "2", "--group_size", "2",
               "--tools", f"{folder}/lookup.py:g", "--environment", f"{folder}/lookup.py:Lookup", "--reward_fn",
               f"{folder}/lookup.py:digit", "--max_turns", "2", "--max_new_tokens", "24", "--max_prompt_tokens", "64",
               "--eval_every", "0", "--save_every", "1", "--wandb", "false", "--export_model", "false"]
    result = subprocess.run(command + ["--output_dir", str(folder / "reference")], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return command, folder


def rows(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]


@pytest.mark.e2e
def test_reinforce_with_tools_and_an_environment(environment_run):
    """Each episode's instance counted its own calls (reward_environment is the calls per episode), reward() is added
    to the reward function's, reset's message follows the prompt, and f answers from the row that reset got."""
    _, folder = environment_run
    steps = rows(folder / "reference")
    assert len(steps) == 2
    for row in steps:
        assert row["tool_calls_mean"] >= 0.5 and row["tool_failures"] == 0 and row["tool_token_fraction"] > 0.2
        assert row["reward_environment"] == row["tool_calls_mean"]  # one instance per episode: never more
        assert row["reward_mean"] == pytest.approx(row["reward_digit"] + row["reward_environment"])
        assert torch.isfinite(torch.tensor(row["loss"])) and row["logprob_diff"] < 0.05
    samples = [json.loads(line) for line in open(folder / "reference" / "samples.jsonl")]
    for sample in samples:
        messages = json.loads(sample["messages"])
        assert [m["role"] for m in messages[:2]] == ["user", "user"]  # the prompt, then reset's message
        a, b = map(int, re.findall(r"\d+", sample["prompt"]))
        assert messages[1]["content"] == f"Hint: {len(str(a + b))}."
        assert [m["content"] for m in messages if m["role"] == "tool"] in ([], [f"{a + b}:1"])


@pytest.mark.e2e
def test_killed_inside_a_tool_call_resumes_as_the_same_run(environment_run):
    """kill -9 inside the first tool call of step 2, then --resume: the metrics are the uninterrupted run's (the
    episode, its environment included, is rebuilt from the checkpoint of step 1)."""
    command, folder = environment_run
    output_dir = str(folder / "killed")
    killed = subprocess.run(command + ["--output_dir", output_dir], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "KILL_ONCE_LOGGED": f"{output_dir}/metrics.jsonl"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert [r["step"] for r in rows(output_dir)] == [1] and os.path.isdir(os.path.join(output_dir, "checkpoint-1"))
    resumed = subprocess.run(command + ["--resume", output_dir], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "continuing at step 2" in resumed.stdout + resumed.stderr
    assert_same_metrics(rows(output_dir), rows(folder / "reference"))
