"""R1-Zero style training: GRPO from a base model with a 0/1 "is the final answer right" reward.

Reproduces the shape of DeepSeek-R1-Zero's curves (https://arxiv.org/abs/2501.12948) on one GPU, as the
original nanoRLHF did with Qwen2.5-1.5B on one A100 40G: the reward is 1 when the last \\boxed{} answer
equals the reference (checked by math-verify in killable worker processes, see math_verifier.py), the
responses may grow to 8000 tokens, and every `eval_every` steps the greedy accuracy on MATH-500 and the
mean response length are logged and plotted (metrics.png in the run folder, and wandb).

This is GRPO/grpo.py's `main` with other defaults; two of its options make long responses affordable:
- sparse GRPO (`sparse`, on): a group whose completions all got the same reward has zero advantage
  everywhere, so it is dropped before any log-prob or backward work (logged: kept_fraction, and
  time_saved_sparse, the update time the dropped samples would have cost at the measured speed);
- dynamic batching (`micro_batch_tokens`): micro-batches are packed by a token budget, sorted by length, so
  8000- and 200-token responses do not share padding (logged: padding_fraction, train_tokens_per_second).

Run:  python examples/r1-v0/grpo_r1.py --demo      (CPU, tiny model, boxed addition answers, minutes)
      python examples/r1-v0/grpo_r1.py             (Qwen2.5-1.5B on MetaMathQA, eval on MATH-500, one GPU)
"""

import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "GRPO"), ROOT]  # math_verifier, grpo, nanorlhf

import grpo  # noqa: E402
from math_verifier import math_reward  # noqa: E402, F401  (importable from here, as the docs promise)
from nanorlhf import tasks  # noqa: E402
from nanorlhf.config import parse_config  # noqa: E402
from nanorlhf.errors import exit_on_user_error  # noqa: E402

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and the final answer is put in \\boxed{{}}, i.e., "
    "<think> reasoning process here </think> \\boxed{{answer here}}.\nUser: {prompt}\nAssistant: <think>"
)


@dataclass
class Config(grpo.Config):
    model: str = "Qwen/Qwen2.5-1.5B"  # a base model, not instruct: R1-Zero starts from one
    reward_model: str = "none"  # no reward model: the verifier is the reward
    reward_fn: str = "math_verifier:math_reward"  # 1 for a right last \boxed{} answer, else 0
    dataset: str = "meta-math/MetaMathQA"  # training questions (reference: the end of `response`)
    prompt_field: str = "query"  # question column
    prompt_template: str = R1_ZERO_PROMPT  # plain-text prompt with a {prompt} slot ("" = the chat template)
    max_new_tokens: int = 8000  # long reasoning is the point
    group_size: int = 8  # completions per question
    kl_coef: float = 0.0  # R1-Zero: no KL penalty (and no reference pass)
    sparse: bool = True  # drop all-equal groups before any log-prob or backward work
    loss_type: str = "token"  # long and short answers weigh per token (DAPO), not per answer
    micro_batch_tokens: int = 16384  # token budget of a micro-batch: dynamic batching
    eval_dataset: str = "HuggingFaceH4/MATH-500"  # evaluation questions with an `answer` column
    eval_split: str = "test"  # split of eval_dataset
    eval_prompt_field: str = "problem"  # question column of eval_dataset
    eval_every: int = 25  # greedy evaluation every N steps (and at step 1 and the last step)
    eval_limit: int = 500  # evaluate on the first N questions


DEMO = {**tasks.DEMO, "model": "demo:addition-boxed", "reward_fn": "math_verifier:math_reward",
        "dataset": "demo:addition-data", "prompt_field": "prompt", "prompt_template": "",
        "eval_dataset": "demo:addition-eval", "eval_split": "train", "eval_prompt_field": "prompt",
        "eval_every": 10, "eval_limit": 100, "max_new_tokens": 16, "total_episodes": 10240, "prompts_per_step": 32,
        "group_size": 8, "ppo_epochs": 2, "learning_rate": 2e-3, "micro_batch_tokens": 1024, "save_every": 20}


if __name__ == "__main__":
    with exit_on_user_error():
        grpo.main(parse_config(Config, demo=DEMO), algo="r1")
