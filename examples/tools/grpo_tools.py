"""GRPO with a calculator tool: the model learns to call `multiply` instead of guessing products.

This is GRPO/grpo.py's `main` with the example's defaults; nothing in the scripts knows about this task. The pieces a
researcher writes for their own tool task are the same three as here:
- the tool (calculator.py: a typed function with a docstring), passed as
  `--tools examples/tools/calculator.py:multiply`;
- the data (task.py: "What is 473 * 58?" with the product in an `answer` column), passed as `--dataset`;
- the reward (task.py:correct, which reads `messages=`, the whole conversation, and checks the final answer).

Each episode runs up to `max_turns` model turns: a turn that writes `<tool_call>{"name": "multiply", "arguments":
{"a": 473, "b": 58}}</tool_call>` gets the calculator's result as a tool message and another turn; a turn that calls
nothing ends the episode. Only the model's tokens carry loss (docs/tools.md). Logged besides the usual: reward_correct,
reward_used_calculator (weight 0: logged only), tool_calls_mean, turns_mean, tool_failures, tool_token_fraction.

Run:  python examples/tools/grpo_tools.py --demo    (CPU, the tiny model warm-started by warm_start.py, minutes)
      python examples/tools/grpo_tools.py           (SmolLM2-135M-Instruct, bf16; on a CPU add --weight_sync merged)
      python examples/tools/plot.py runs/<run>      (reward and tool calls per step -> <run>/tools.png)
"""

import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "GRPO"), ROOT]

import grpo  # noqa: E402
import warm_start  # noqa: E402
from nanorlhf.config import parse_config  # noqa: E402
from nanorlhf.errors import exit_on_user_error  # noqa: E402

TOOLS = "calculator:multiply"  # modules of this folder (on sys.path above), as r1-v0's math_verifier
DATA = "calculator:train"  # the task's rows at the demo model's digits, written into the cache on first use
EVAL_DATA = "calculator:eval"


@dataclass
class Config(grpo.Config):
    model: str = "smollm2-135m-instruct"  # the real local model (nanorlhf/real_model.py); its template takes no tools
    reward_model: str = "none"  # the answer is checked, no reward model
    reward_fn: str = "task:correct,task:used_calculator"  # right final answer; tool use (logged only)
    reward_weights: str = "1,0"  # used_calculator is logged, not rewarded: only the answer counts
    dataset: str = DATA  # "What is 473 * 58?" rows with an `answer` column (task.py), or a file of yours
    prompt_field: str = "prompt"  # question column
    max_prompt_tokens: int = 1024  # the real model's prompt holds the tool's description (about 300 tokens)
    tools: str = TOOLS  # the calculator
    max_turns: int = 3  # call, read the result, answer (and one turn to spare)
    max_new_tokens: int = 128  # the whole episode: call, tool result, answer
    group_size: int = 8  # completions per question
    eval_dataset: str = EVAL_DATA  # held-out questions: greedy accuracy as eval_reward_correct
    eval_split: str = "train"  # a local file's only split
    eval_every: int = 10  # greedy evaluation every N steps (and at step 1 and the last step)
    eval_limit: int = 100  # evaluate on the first N questions


# --demo: the tiny model (warm-started on calculator transcripts, warm_start.py), float32, short episodes
DEMO = {**grpo.DEMO, "model": "calculator:demo-model", "reward_fn": Config.reward_fn, "dataset": DATA,
        "eval_dataset": EVAL_DATA, "eval_split": "train", "eval_every": 10, "eval_limit": 100, "max_prompt_tokens": 64,
        "max_new_tokens": 64, "max_turns": 3, "total_episodes": 7680, "prompts_per_step": 32, "group_size": 8,
        "learning_rate": 2e-3, "save_every": 20}


def resolve(cfg):
    """The example's names -> local paths (the model and data are built into the cache on first use)."""
    names = {"calculator:demo-model": warm_start.demo_model,
             "calculator:train": lambda: warm_start.demo_data()["train"],
             "calculator:eval": lambda: warm_start.demo_data()["eval"]}
    for field in ("model", "dataset", "eval_dataset"):
        if getattr(cfg, field) in names:
            setattr(cfg, field, names[getattr(cfg, field)]())
    return cfg


if __name__ == "__main__":
    with exit_on_user_error():
        grpo.main(resolve(parse_config(Config, demo=DEMO)), algo="grpo")
