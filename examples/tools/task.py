"""The task of examples/tools: multiply two numbers. A small model cannot multiply multi-digit numbers in its head;
with the calculator (calculator.py) it only has to copy the factors into a call and the result into its answer.

Rows (python examples/tools/task.py --out DIR writes train.jsonl and eval.jsonl):

    {"prompt": "What is 47 * 83?", "answer": "3901", "a": 47, "b": 83}

Rewards (they read `messages=`, the whole conversation: system and user messages first, then the model's turns and
the tool's results as the model saw them):

    --reward_fn examples/tools/task.py:correct      1.0 when the final answer (the last model turn, which calls
                                                    nothing) is the product, else 0.0
    --reward_fn ...task.py:correct,...task.py:used_calculator --reward_weights 1,0
                 also logs reward_used_calculator: the share of episodes that got a result from the calculator
"""

import argparse
import json
import os
import random
import re

QUESTION = "What is {a} * {b}?"


def rows(n, seed, digits=(3, 2)):
    """n rows {"prompt", "answer", "a", "b"}: a has digits[0] digits, b digits[1]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in digits)
        out.append({"prompt": QUESTION.format(a=a, b=b), "answer": str(a * b), "a": a, "b": b})
    return out


def final_answer(messages):
    """The number the model answered with: the first number of its last turn, None when that turn is a tool call
    (the episode ran out of turns or tokens while calling) or holds no number."""
    last = messages[-1]
    if last["role"] != "assistant" or "<tool_call>" in last["content"]:
        return None
    match = re.search(r"-?\d+", last["content"])
    return match.group() if match else None


def correct(prompts, completions, messages, answer, **_):
    """1.0 when the final answer is the product, else 0.0 (with or without the calculator: only the answer counts)."""
    return [float(final_answer(m) == str(a)) for m, a in zip(messages, answer)]


def used_calculator(prompts, completions, messages, **_):
    """1.0 when the calculator answered at least one call in the episode without an error, else 0.0."""
    return [float(any(m["role"] == "tool" and not m["content"].startswith("error") for m in conversation))
            for conversation in messages]


def write(out, n_train=5000, n_eval=200, seed=0, digits=(3, 2)):
    """train.jsonl and eval.jsonl in `out` (other seeds; with few digits a question may occur in both): their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, n, offset in (("train", n_train, 0), ("eval", n_eval, 1)):
        paths[name] = os.path.join(out, f"{name}.jsonl")
        tmp = f"{paths[name]}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows(n, seed * 2 + offset + 1000, digits))
        os.replace(tmp, paths[name])
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--n_train", type=int, default=5000)
    parser.add_argument("--n_eval", type=int, default=200)
    parser.add_argument("--digits", default="3,2", help="digits of the two factors")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    digits = tuple(int(d) for d in args.digits.split(","))
    for path in write(args.out, args.n_train, args.n_eval, args.seed, digits).values():
        print(path)
