"""The synthetic task behind `--demo`: two-number addition, a rule-based reward, and a warm-started tiny model.

A random tiny model never answers right, so RL would see reward 0 forever. The demo model is first
taught a little addition with a short supervised warm start that stops once its greedy accuracy
reaches `target_accuracy` (well above zero, well below half): the RL run then has a signal to climb.
The model is cached, so only the first demo on a machine pays for it (about 15 seconds on 2 cores).
"""

import hashlib
import json
import os
import random
import re
import shutil
import tempfile

from nanorlhf import console

QUESTION = "What is {a} + {b}?"


def addition_rows(n, seed, max_operand=20):
    """n rows {"prompt", "answer"}: prompts are plain questions, the chat template is applied later."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": QUESTION.format(a=a, b=b), "answer": str(a + b)})
    return rows


def addition_reward(prompts, completions, answer, **_):
    """1.0 when the completion's first number equals the reference answer, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, answer):
        match = re.search(r"-?\d+", completion)
        rewards.append(float(match is not None and match.group() == str(reference)))
    return rewards


# What `--demo` swaps in, shared by every algorithm script (each adds its own learning rate etc. on top):
# CPU, no download, the warm-started tiny model on addition, exact-answer reward.
DEMO = dict(model="demo:addition", reward_model="none", reward_fn="nanorlhf.tasks:addition_reward",
            dataset="demo:addition-data", prompt_field="prompt", max_prompt_tokens=48, max_new_tokens=8,
            temperature=1.0, top_p=1.0, dtype="float32", lora_r=16, lora_alpha=32, lora_dropout=0.0,
            gradient_checkpointing=False, micro_batch_tokens=4096,
            # greedy accuracy on another sample of sums (operands 0-9: the 100 possible sums all occur in training too,
            # so this measures how often greedy decoding is right, not generalisation)
            eval_dataset="demo:addition-eval", eval_split="train", eval_every=10, eval_limit=100)


def cache_dir():
    return os.environ.get("NANORLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanorlhf"))


def demo_dataset(n=5000, seed=0):
    """Path of a local .jsonl of addition rows (the demo goes through the same loader as a user's file)."""
    max_operand = WARM_START["max_operand"]
    path = os.path.join(cache_dir(), f"addition-{n}-{seed}-{max_operand}.jsonl")
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in addition_rows(n, seed + 100, max_operand))
        os.replace(tmp, path)
    return path


WARM_START = dict(hidden_size=128, num_layers=2, max_operand=9, target_accuracy=0.2, answer_format="{}", seed=0,
                  version=1)
BOXED = "\\boxed{{{}}}"  # R1-style final answers: \boxed{12}


def resolve(name):
    """`demo:...` names the bundled demo model and datasets, `smollm2-135m-instruct` the real model of
    nanorlhf/real_model.py (each built locally on first use); others pass through."""
    from nanorlhf.real_model import NAME as REAL_MODEL, smollm2_model

    demo_names = {
        REAL_MODEL: smollm2_model,
        "demo:addition": demo_model,
        "demo:addition-boxed": lambda: demo_model(answer_format=BOXED),
        "demo:addition-data": demo_dataset,
        "demo:addition-eval": lambda: demo_dataset(n=200, seed=1),
    }
    return demo_names[name]() if name in demo_names else name


def build_once(path, build, marker):
    """`path`, a folder of the cache: returned as it is when it holds `marker`, else built first by `build(tmp)` into
    a temporary folder beside it and moved into place atomically (a concurrent builder either wins or finds it done).
    """
    if os.path.exists(os.path.join(path, marker)):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".building-")
    try:
        build(tmp)
        os.replace(tmp, path)
    except OSError:
        if not os.path.exists(path):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def warm_started(name, spec, warm_start, what):
    """Path of the cached model `name`-<hash of spec>, built on first use by warm_start(folder, **spec), which returns
    what it measured ({"steps": ..., ...}), kept with the spec in nanorlhf_warm_start.json. `what`: for the console."""
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir(), f"{name}-{key}")

    def build(tmp):
        console.say(f"demo model: warm-starting the tiny model on {what}")
        result = warm_start(tmp, **spec)
        with open(os.path.join(tmp, "nanorlhf_warm_start.json"), "w") as f:
            json.dump({**spec, **result}, f)
        console.say(f"demo model: warm-started, {', '.join(f'{k} {v:.4g}' for k, v in result.items())}; saved to {path}")

    return build_once(path, build, "nanorlhf_warm_start.json")


def demo_model(**overrides):
    """Path of the warm-started tiny addition model, built (and cached) on first use."""
    return warm_started("tiny-addition", {**WARM_START, **overrides}, _warm_start, "addition (once, about 15 s)")


def _warm_start(out_dir, hidden_size, num_layers, max_operand, target_accuracy, answer_format, seed, version):
    """Supervised training of a fresh tiny model on addition until greedy accuracy >= target_accuracy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanorlhf.tiny import build_tiny_policy

    train = addition_rows(20000, seed=seed + 1, max_operand=max_operand)
    held_out = addition_rows(256, seed=seed + 2, max_operand=max_operand)
    texts = [r["prompt"] + " " + answer_format.format(r["answer"]) for r in train[:2000]] + ["user assistant system"]
    build_tiny_policy(out_dir, texts, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)

    def encode(rows):
        """(input_ids, labels): labels are -100 except on the answer and its end-of-turn token."""
        ids, labels = [], []
        for row in rows:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
            )
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            answer = answer_format.format(row["answer"])
            a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, ids))
        pad = lambda seqs, value: torch.tensor([s + [value] * (width - len(s)) for s in seqs])  # noqa: E731
        return pad(ids, tokenizer.pad_token_id), pad(labels, -100)

    @torch.no_grad()
    def greedy_accuracy():
        # Teacher-forced argmax on the answer tokens equals greedy decoding's exact-match accuracy.
        ids, labels = encode(held_out)
        predictions = model(input_ids=ids).logits[:, :-1].argmax(-1)
        targets = labels[:, 1:]
        return ((predictions == targets) | (targets == -100)).all(-1).float().mean().item()

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    accuracy, batch_size = 0.0, 64
    for step in range(20000 // batch_size * 20):
        start = step * batch_size % len(train)
        ids, labels = encode(train[start : start + batch_size])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            accuracy = greedy_accuracy()
            if accuracy >= target_accuracy:
                break
    model.save_pretrained(out_dir)
    return {"steps": step, "greedy_accuracy": accuracy}
