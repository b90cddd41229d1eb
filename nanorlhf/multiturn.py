"""Multi-turn episodes with tools, on the run's persistent engine: what rollout.py's generate does when tools are set.

Turns run in lock-step: each turn is one batched `engine.generate` over the episodes still running, token ids in and
token ids out. An episode is token ids end to end, never decoded and encoded again:

    prompt ids | turn 1: sampled ids (end-of-turn token included)    mask 1, the sampler's log-probs
               | the template's tokens after that end + the tool messages + the next assistant header     mask 0
               | turn 2: sampled ids ...                              mask 1

The mask-0 ids are the chat template's own (`Template.tool_ids`: the conversation rendered with and without the turn's
tool messages, the difference of the ids); the sampled turn's text is decoded only to read its tool calls. An episode
ends when a turn calls no tool, the turn stops on the token budget (max_new_tokens counts every token after the
prompt, tool tokens included; a turn whose tool messages would not fit ends the episode there, truncated), or
max_turns model turns are done. Episodes never span steps.
"""

import dataclasses
import json

import numpy as np

from nanorlhf.engine import Completion
from nanorlhf.errors import UserError
from nanorlhf.tools import parse_calls

DUMMY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclasses.dataclass
class Episode(Completion):
    """A Completion (what every script reads: token_ids, text, logprobs, truncated) of several turns. token_ids: every
    id after the prompt; text: the last model turn's text; logprobs: the sampler's, 0 where loss_mask is 0."""

    loss_mask: list = dataclasses.field(default_factory=list)  # 1 on sampled ids, 0 on tool and template ids
    messages: list = dataclasses.field(default_factory=list)  # the whole conversation, prompt messages first
    turns: int = 0  # model turns
    tool_calls: int = 0
    tool_failures: int = 0  # malformed, unknown, raising or timed-out calls
    tool_truncations: int = 0  # results cut to max_tool_response_tokens


class Template:
    """The chat template's ids for tool messages. `render_kwargs`: what the prompts were rendered with (tools=, the
    template's variables). Checked at start (`check`): a template must render the conversation before a tool message
    the same whatever follows (prefix-preserving), or the ids appended would not be the ids the model then reads."""

    def __init__(self, tokenizer, model_name, render_kwargs):
        self.tokenizer, self.model_name, self.kwargs = tokenizer, model_name, render_kwargs
        self.check()

    def ids(self, messages, generation_prompt=False):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **self.kwargs)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def check(self):
        advice = (f"the chat template of {self.model_name} cannot carry tool turns token for token ({{}}); use a model "
                  "whose template is prefix-preserving for tool messages (e.g. Qwen2.5-Instruct), or give one without "
                  "this defect in the tokenizer's chat_template")
        try:
            before = self.ids(DUMMY)
            after = self.ids(DUMMY + [{"role": "tool", "name": "t", "content": "1"}], generation_prompt=True)
        except Exception as e:  # a template that refuses the tool role
            raise UserError(advice.format(f"it refuses a tool message: {type(e).__name__}: {e}")) from None
        if after[: len(before)] != before:
            raise UserError(advice.format("adding a tool message changes how the earlier messages render"))
        hello = self.tokenizer("Hello", add_special_tokens=False).input_ids
        self.end = self._turn_end(before, hello)
        if self.end is None:
            raise UserError(advice.format("no end-of-turn token follows the assistant's message"))

    def _turn_end(self, ids, content):
        """Where the assistant's turn ends in `ids` (the dummy's last turn, whose content is `content`): the
        template's ids after the end-of-turn token, which the model samples itself (and which must therefore be
        one of the tokenizer's special tokens)."""
        for start in range(len(ids) - len(content), -1, -1):
            if ids[start : start + len(content)] == content:
                rest = ids[start + len(content) :]
                if rest and rest[0] in self.tokenizer.all_special_ids:
                    return rest[1:]  # e.g. ChatML: "\n" after <|im_end|>
                return None
        return None

    def tool_ids(self, tool_messages):
        """The ids that follow a sampled turn's end-of-turn token: the rest of its template, `tool_messages`, and the
        next assistant turn's header."""
        before = self.ids(DUMMY)
        after = self.ids(DUMMY + tool_messages, generation_prompt=True)
        return self.end + after[len(before) :]


def takes_tools(tokenizer, tool_schemas, template_kwargs):
    """Whether the chat template renders `tools=` (else they go into a system message, nanorlhf.tools.describe)."""
    def render(**tools):
        return tokenizer.apply_chat_template(DUMMY[:1], tokenize=False, add_generation_prompt=True,
                                             **template_kwargs, **tools)

    return render(tools=tool_schemas) != render()


def turn_seeds(seed, turn, indices):
    """The sampling seed of each episode (global index in the step) in `turn` (>= 1), drawn from (seed, turn)."""
    drawn = np.random.default_rng([seed, turn]).integers(0, 2**31 - 1, size=max(indices, default=-1) + 1)
    return [int(drawn[i]) for i in indices]


class MultiTurn:
    """Episodes for one run: `engine` (nanorlhf.engine.RolloutEngine), `template` (Template), `toolbox`
    (nanorlhf.tools.Toolbox), `tools`: the run's {name: function}."""

    def __init__(self, engine, template, toolbox, tools, max_turns, max_new_tokens):
        self.engine, self.template, self.toolbox, self.tools = engine, template, toolbox, tools
        self.max_turns, self.budget = max_turns, max_new_tokens

    def episodes(self, prompts, n, seed, temperature=1.0, top_p=1.0, greedy=False, first_index=0):
        """n episodes per prompt (prompt-major): prompts are the PromptStream's dicts (token_ids, messages)."""
        sampling = dict(temperature=temperature, top_p=top_p, greedy=greedy)
        outs = self.engine.generate([p["token_ids"] for p in prompts], n, seed, self.budget, first_index=first_index,
                                    **sampling)
        episodes = [Episode(c.prompt_index, [], "", [], False, messages=[dict(m) for m in
                                                                          prompts[c.prompt_index]["messages"]])
                    for c in outs]
        indices = [(first_index + e.prompt_index) * n + k % n for k, e in enumerate(episodes)]  # global, for seeds
        running = list(range(len(episodes)))
        for turn in range(1, self.max_turns + 1):
            calls = {}
            for k, out in zip(running, outs):
                if self._take_turn(episodes[k], out) and turn < self.max_turns:
                    calls[k] = parse_calls(out.text)
            results = self.toolbox.run([[(c, self.tools) for c in calls[k]] for k in calls])
            running = [k for k, turn_results in zip(calls, results) if self._add_results(episodes[k], turn_results)]
            if not running:
                break
            outs = self.engine.generate([prompts[episodes[k].prompt_index]["token_ids"] + episodes[k].token_ids
                                         for k in running], 1, None,
                                        [self.budget - len(episodes[k].token_ids) for k in running],
                                        seeds=turn_seeds(seed, turn, [indices[k] for k in running]), **sampling)
        return episodes

    def _take_turn(self, episode, out):
        """Append a sampled turn; whether the episode goes on to tools (the turn called one and stopped by itself)."""
        episode.token_ids += out.token_ids
        episode.logprobs += out.logprobs
        episode.loss_mask += [1] * len(out.token_ids)
        episode.turns += 1
        episode.text = out.text
        episode.messages.append({"role": "assistant", "content": out.text})  # the calls stay in its text, as sampled
        episode.truncated = out.truncated
        return "<tool_call>" in out.text and not out.truncated and len(episode.token_ids) < self.budget

    def _add_results(self, episode, results):
        """Append a turn's tool results (counted); whether the episode goes on (False: they do not fit the budget)."""
        episode.tool_calls += len(results)
        episode.tool_failures += sum(r.failed for r in results)
        episode.tool_truncations += sum(r.truncated for r in results)
        messages = [{"role": "tool", "name": r.name, "content": r.content} for r in results]
        ids = self.template.tool_ids(messages)
        if len(episode.token_ids) + len(ids) >= self.budget:  # no room for them and a next turn: the episode ends
            episode.truncated = True
            return False
        episode.messages += messages
        episode.token_ids += ids
        episode.logprobs += [0.0] * len(ids)
        episode.loss_mask += [0] * len(ids)
        return True


def conversation(episode):
    """The episode's messages as JSON text, roles marked (what samples.jsonl and the samples table show)."""
    return json.dumps(episode.messages, ensure_ascii=False, default=str)
