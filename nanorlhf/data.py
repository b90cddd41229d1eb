"""Prompts: a hub dataset or a local .jsonl/.json/.parquet file, turned into chat prompts and token ids.

The prompt column may hold a plain string (one user message), a list of {"role", "content"} messages,
or an Anthropic/hh-rlhf dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ..."), which becomes the messages
up to the last "Assistant:" turn. The tokenizer's chat template then renders the generation prompt.
"""

import json
import os
import re

import numpy as np

from nanorlhf import distributed
from nanorlhf.errors import UserError

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def load_rows(dataset, split="train"):
    """A datasets.Dataset from a local file (by extension) or the hub."""
    import datasets

    ext = os.path.splitext(dataset)[1]
    if ext in LOCAL_FORMATS or os.path.exists(dataset):
        if not os.path.isfile(dataset):
            raise UserError(f"--dataset: file {dataset!r} does not exist (path is relative to {os.getcwd()})")
        if ext not in LOCAL_FORMATS:
            raise UserError(f"--dataset: {dataset!r} is not a .jsonl, .json or .parquet file")
        return datasets.load_dataset(LOCAL_FORMATS[ext], data_files=dataset, split="train")
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as e:  # no network, a typo, a private dataset: all mean the same to the user
        raise UserError(f"--dataset {dataset!r} could not be loaded from the hub ({type(e).__name__}); "
                        "check the name, or pass a local .jsonl/.json/.parquet file") from None


def hh_messages(text):
    """Anthropic/hh-rlhf dialogue -> chat messages, up to (not including) the last Assistant turn."""
    text = "\n\n" + text.lstrip("\n")
    text = text[: text.rfind("\n\nAssistant:")]
    parts = HH_TURN.split(text)  # ['', 'Human', 'hi', 'Assistant', 'hello', 'Human', '...']
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def to_messages(value):
    if isinstance(value, list):
        return value
    if "\n\nAssistant:" in value and value.lstrip("\n").startswith("Human:"):
        return hh_messages(value)
    return [{"role": "user", "content": value}]


def prompt_text(messages):
    """The prompt as plain text, for reward models and reward functions."""
    if len(messages) == 1:
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def template_kwargs(text):
    """--chat_template_kwargs: a JSON object ("" = none) -> dict of variables for the chat template."""
    try:
        kwargs = json.loads(text) if text else {}
    except json.JSONDecodeError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise UserError(f"--chat_template_kwargs takes a JSON object such as '{{\"enable_thinking\": false}}', "
                        f"got {text!r}")
    return kwargs


class PromptStream:
    """Endless shuffled pass over the dataset (a new order each epoch), tokenizing prompts as they are taken.

    Prompts are rendered with the tokenizer's chat template (after `system_prompt` as a system message unless the row
    has its own, with `template_kwargs` as template variables), or with `template` (a str.format pattern with a
    {prompt} slot) when given. The reward functions see the prompt without the system message. Prompts longer than `max_prompt_tokens` are skipped and counted (`skipped`). `state()` /
    `load_state()` give the exact position, so a resumed run takes the same prompts it would have.
    `shard`: under torchrun every rank reads the same n prompts and keeps its contiguous share of them (each prompt's
    `index` is its position among the n), so all ranks stay at the same data position (nanorlhf/distributed.py).
    """

    def __init__(self, rows, tokenizer, prompt_field, max_prompt_tokens, seed, template="", system_prompt="",
                 template_kwargs=None, shard=False, tools=None, tools_in_template=True):
        if template and (system_prompt or template_kwargs):
            raise UserError("--system_prompt and --chat_template_kwargs apply through the chat template, which "
                            "--prompt_template replaces: write the system text into the template instead")
        if prompt_field not in rows.column_names:
            raise UserError(f"--prompt_field {prompt_field!r} is not a column of the dataset "
                            f"(columns: {', '.join(rows.column_names)})")
        if len(rows) == 0:
            raise UserError("--dataset has no rows")
        self.rows, self.tokenizer, self.prompt_field = rows, tokenizer, prompt_field
        self.max_prompt_tokens, self.seed, self.template = max_prompt_tokens, seed, template
        self.system_prompt, self.template_kwargs = system_prompt, template_kwargs or {}
        self.epoch, self.cursor, self.skipped, self.taken = 0, 0, 0, 0
        self._order = None
        self.shard = shard
        # --tools: their schemas go to the template's `tools=`, or into the system message (`describe`) for a template
        # that takes none (nanorlhf/multiturn.py, takes_tools)
        self.tools, self.tools_in_template = tools, tools_in_template

    def _index(self):
        if self._order is None:
            self._order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.rows))
        return int(self._order[self.cursor])

    def next(self, n):
        """n prompts: dicts with `text`, `token_ids` and `fields` (the row's columns)."""
        prompts = []
        while len(prompts) < n:
            row = self.rows[self._index()]
            self.cursor += 1
            if self.cursor == len(self.rows):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            messages = to_messages(row[self.prompt_field])
            text = prompt_text(messages)  # the reward functions' prompt: without the system prompt or the tools
            if self.template:  # a plain-text prompt for base models, e.g. R1-Zero's "...User: {prompt}\nAssistant:"
                rendered = self.template.format(prompt=prompt_text(messages))
            else:
                system = [{"role": "system", "content": self.system_prompt}] \
                    if self.system_prompt and messages[0]["role"] != "system" else []
                messages = self.with_tools(system + messages)
                rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                              **self.template_kwargs, **self.tools_kwargs())
            token_ids = self.tokenizer(rendered, add_special_tokens=False).input_ids
            if len(token_ids) > self.max_prompt_tokens:
                self.skipped += 1
                if self.taken == 0 and self.skipped >= min(1000, len(self.rows)):
                    raise UserError(f"the first {self.skipped} prompts are all longer than {self.max_prompt_tokens} "
                                    "tokens; raise --max_prompt_tokens (and check the model's context window)")
                continue
            self.taken += 1
            fields = {k: v for k, v in row.items() if k not in ("prompts", "completions")}
            prompts.append({"text": text, "token_ids": token_ids, "fields": fields, "index": len(prompts),
                            "messages": messages})  # as rendered (multi-turn episodes go on from them)
        first, count = distributed.shard(n) if self.shard else (0, n)
        return prompts[first : first + count]

    def tools_kwargs(self):
        return {"tools": self.tools} if self.tools and self.tools_in_template else {}

    def with_tools(self, messages):
        """The messages with the tools described in the system message, for a template that takes no `tools`."""
        if not self.tools or self.tools_in_template:
            return messages
        from nanorlhf.tools import describe

        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{messages[0]['content']}\n\n{describe(self.tools)}"}] + messages[1:]
        return [{"role": "system", "content": describe(self.tools)}] + messages

    def state(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "skipped": self.skipped, "taken": self.taken}

    def load_state(self, state):
        self.epoch, self.cursor, self.skipped, self.taken = state["epoch"], state["cursor"], state["skipped"], state["taken"]
        self._order = None


def load_prompts(cfg, tokenizer, resolve, tools=None, tools_in_template=True):
    """The run's prompt stream (this rank's share of each step) and its evaluation prompts ([] unless eval_every),
    from cfg's dataset, prompt and chat fields; `resolve` maps demo names to local paths (nanorlhf.tasks)."""
    template = getattr(cfg, "prompt_template", "")
    chat = dict(system_prompt=cfg.system_prompt, template_kwargs=template_kwargs(cfg.chat_template_kwargs),
                tools=tools, tools_in_template=tools_in_template)
    prompts = PromptStream(load_rows(resolve(cfg.dataset)), tokenizer, cfg.prompt_field, cfg.max_prompt_tokens,
                           cfg.seed, template, **chat, shard=True)
    if cfg.eval_every <= 0:
        return prompts, []
    if not cfg.eval_dataset and os.path.exists(resolve(cfg.dataset)):
        raise UserError(f"--eval_every {cfg.eval_every} with a local --dataset needs --eval_dataset (a file of "
                        "held-out prompts): a local file has no test split to evaluate on")
    eval_rows = load_rows(resolve(cfg.eval_dataset or cfg.dataset), cfg.eval_split)
    eval_stream = PromptStream(eval_rows, tokenizer, cfg.eval_prompt_field or cfg.prompt_field,
                               cfg.max_prompt_tokens, 0, template, **chat)
    return prompts, eval_stream.next(min(cfg.eval_limit, len(eval_rows)))
