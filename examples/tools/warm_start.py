"""The demo model of examples/tools: the tiny model of nanorlhf/tiny.py, warm-started on transcripts in which it
sometimes calls the calculator and sometimes answers directly, so that RL has a behaviour to reinforce.

A random tiny model never writes a `<tool_call>`. Supervised training on a mix (a share `tool_share` of the
transcripts call the calculator, the rest answer straight away) teaches it the Hermes call format and to copy numbers,
and leaves it calling the tool in about `tool_share` of its sampled episodes. It cannot multiply: its direct answers
are nearly always wrong, its calls mostly right. RL (grpo_tools.py --demo) then raises the call rate and the reward.

A tool-path transcript, as token ids (exactly the ids a rollout produces: the call and answer are the model's turns,
the middle is the chat template's own ids for the tool message, nanorlhf.multiturn.Template.tool_ids):

    <|im_start|>system\nTools: multiply(a, b)<|im_end|>\n<|im_start|>user\nWhat is 473 * 58?<|im_end|>\n
    <|im_start|>assistant\n
    <tool_call>{"name": "multiply", "arguments": {"a": 473, "b": 58}}</tool_call><|im_end|>        trained
    \n<|im_start|>tool\n27434<|im_end|>\n<|im_start|>assistant\n                                     not trained
    27434<|im_end|>                                                                                trained

The chat template takes `tools=` (one line naming each tool and its arguments, where Qwen's templates print the
whole JSON schema): the prompt stays about 30 tokens instead of the 300 of a described-in-the-system-message list.
The model is cached like the addition demo's (nanorlhf.tasks.cache_dir()); the first build takes minutes (1,100 steps).
"""

import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

import calculator  # noqa: E402
import task  # noqa: E402
from nanorlhf import console  # noqa: E402
from nanorlhf.tasks import cache_dir, warm_started  # noqa: E402
from nanorlhf.tiny import CHAT_TEMPLATE  # noqa: E402

# The tiny model's ChatML template, plus one system line naming the tools when `tools=` is given.
TOOLS_LINE = ("{% if tools %}{{ '<|im_start|>system\\nTools: ' }}{% for tool in tools %}{{ tool.function.name + '(' + "
              "(tool.function.parameters.properties | list | join(', ')) + ')' }}{% if not loop.last %}{{ ', ' }}"
              "{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}")
TEMPLATE = TOOLS_LINE + CHAT_TEMPLATE

WARM_START = dict(hidden_size=128, num_layers=2, digits=(3, 2), tool_share=0.3, target_copy_accuracy=0.6,
                  max_steps=3000, batch_size=32, learning_rate=2e-3, seed=0, version=1)


def schemas():
    from nanorlhf.tools import schemas as tool_schemas

    return tool_schemas({"multiply": calculator.multiply})


def call_text(a, b):
    return '<tool_call>{"name": "multiply", "arguments": {"a": %d, "b": %d}}</tool_call>' % (a, b)


def demo_model(**overrides):
    """Path of the warm-started tiny model, built (and cached) on first use."""
    return warm_started("tiny-calculator", {**WARM_START, **overrides}, _warm_start,
                        "calculator transcripts (once, some minutes)")


def demo_data(n_train=5000, n_eval=200, seed=0):
    """{"train": path, "eval": path} of the task's rows at the demo model's digits, written once into the cache."""
    digits = WARM_START["digits"]
    out = os.path.join(cache_dir(), f"calculator-{n_train}-{n_eval}-{seed}-{digits[0]}x{digits[1]}")
    paths = {name: os.path.join(out, f"{name}.jsonl") for name in ("train", "eval")}
    if not all(map(os.path.exists, paths.values())):
        task.write(out, n_train, n_eval, seed, digits)
    return paths


def _warm_start(out_dir, hidden_size, num_layers, digits, tool_share, target_copy_accuracy, max_steps, batch_size,
                learning_rate, seed, version):
    """Supervised training of a fresh tiny model on the mix until, on held-out tool transcripts, every token of both
    model turns after the first (the choice to call) is predicted right in `target_copy_accuracy` of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanorlhf.multiturn import Template
    from nanorlhf.tiny import build_tiny_policy

    rng = random.Random(seed)
    train = task.rows(8000, seed=seed + 1, digits=digits)
    held_out = task.rows(128, seed=seed + 2, digits=digits)
    tools = schemas()

    def chat(row, with_tool):
        turns = [{"role": "user", "content": row["prompt"]}]
        if with_tool:
            turns += [{"role": "assistant", "content": call_text(row["a"], row["b"])},
                      {"role": "tool", "name": "multiply", "content": row["answer"]}]
        return turns + [{"role": "assistant", "content": row["answer"]}]

    # the tokenizer learns its merges from whole rendered transcripts (the template is set after it is trained)
    from jinja2 import Template as Jinja

    render = Jinja(TEMPLATE).render
    texts = [render(messages=chat(r, k % 2 == 0), tools=tools) for k, r in enumerate(train[:2000])]
    build_tiny_policy(out_dir, texts, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    template = Template(tokenizer, "the calculator demo model", {"tools": tools})  # checks it is prefix-preserving
    encode_text = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = tokenizer.eos_token_id

    def encode(row, with_tool):
        """(ids, labels): labels -100 except on the model's turns (their end-of-turn token included)."""
        prompt = encode_text(tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tools=tools,
                                                           add_generation_prompt=True, tokenize=False))
        answer = encode_text(row["answer"]) + [eos]
        if not with_tool:
            return prompt + answer, [-100] * len(prompt) + answer
        call = encode_text(call_text(row["a"], row["b"])) + [eos]
        middle = template.tool_ids([{"role": "tool", "name": "multiply", "content": row["answer"]}])
        return (prompt + call + middle + answer,
                [-100] * len(prompt) + call + [-100] * len(middle) + answer)

    def pad(pairs):
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in pairs])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in pairs])
        return ids, labels

    @torch.no_grad()
    def copy_accuracy():
        # teacher-forced argmax equals greedy decoding once the first token (call or answer) is given
        ids, labels = pad([encode(r, True) for r in held_out])
        predictions = model(input_ids=ids).logits[:, :-1].argmax(-1)
        targets = labels[:, 1:].clone()
        first = (targets != -100).int().argmax(-1)
        targets[torch.arange(len(targets)), first] = -100
        return ((predictions == targets) | (targets == -100)).all(-1).float().mean().item()

    @torch.no_grad()
    def first_token_tool_probability():
        ids, labels = pad([encode(r, True) for r in held_out])
        first = (labels[:, 1:] != -100).int().argmax(-1)
        logits = model(input_ids=ids).logits[torch.arange(len(ids)), first]
        return logits.softmax(-1)[torch.arange(len(ids)), ids[torch.arange(len(ids)), first + 1]].mean().item()

    encoded = [(encode(r, True), encode(r, False)) for r in train[: (max_steps + 1) * batch_size]]  # the rows used
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    accuracy = 0.0
    for step in range(1, max_steps + 1):
        start = step * batch_size % len(encoded)
        ids, labels = pad([pair[rng.random() >= tool_share] for pair in encoded[start : start + batch_size]])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            accuracy = copy_accuracy()
            console.say(f"  warm start step {step}: loss {loss.item():.3f}, copy accuracy {accuracy:.2f}")
            if accuracy >= target_copy_accuracy:
                break
    model.save_pretrained(out_dir)
    accuracy = accuracy if step % 100 == 0 else copy_accuracy()
    return {"steps": step, "copy_accuracy": accuracy, "tool_probability": first_token_tool_probability()}


if __name__ == "__main__":
    print(demo_model())
