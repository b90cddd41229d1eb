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

With --environment every episode makes its own instance of the class and resets it with its dataset row; a message
reset() returns is a user message after the prompt's (the episode's `prompt_ids` are rendered with it), and the
instance's public methods are the episode's tools besides --tools (docs/tools.md, Environments).
"""

import dataclasses
import json

import numpy as np

from nanorlhf import distributed
from nanorlhf.engine import Completion, completion_seeds
from nanorlhf.errors import UserError
from nanorlhf.rewards import user_frames
from nanorlhf.tools import environment_tools, parse_calls

DUMMY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclasses.dataclass
class Episode(Completion):
    """A Completion (what every script reads: token_ids, text, logprobs, truncated) of several turns. token_ids: every
    id after the prompt; text: the last model turn's text; logprobs: the sampler's, 0 where loss_mask is 0."""

    loss_mask: list = dataclasses.field(default_factory=list)  # 1 on sampled ids, 0 on tool and template ids
    messages: list = dataclasses.field(default_factory=list)  # the whole conversation, prompt messages first
    prompt_ids: list = dataclasses.field(default_factory=list)  # the prompt's ids (with reset()'s message, if any)
    environment: object = None  # the episode's own --environment instance
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
    (nanorlhf.tools.Toolbox), `tools`: the run's {name: function}; `environment`: the --environment class (None
    without), made fresh for each episode; `failed(together)`: the run's save-and-say before an error stops it."""

    def __init__(self, engine, template, toolbox, tools, max_turns, max_new_tokens, environment=None,
                 max_prompt_tokens=None, failed=None):
        self.engine, self.template, self.toolbox, self.tools = engine, template, toolbox, tools
        self.max_turns, self.budget = max_turns, max_new_tokens
        self.environment, self.max_prompt_tokens, self.failed = environment, max_prompt_tokens, failed
        self.methods = list(environment_tools(environment)) if environment else []  # each instance's tools

    def episodes(self, prompts, n, seed, temperature=1.0, top_p=1.0, greedy=False, first_index=0):
        """n episodes per prompt (prompt-major): prompts are the PromptStream's dicts (token_ids, messages, fields)."""
        sampling = dict(temperature=temperature, top_p=top_p, greedy=greedy)
        episodes = self._start(prompts, [k // n for k in range(len(prompts) * n)])
        indices = [(first_index + k // n) * n + k % n for k in range(len(episodes))]  # global, for seeds
        tools = [{**self.tools, **{name: getattr(e.environment, name) for name in self.methods}} for e in episodes]
        running = list(range(len(episodes)))
        # the first turn's seeds are the ones engine.generate draws for n completions per prompt
        seeds = completion_seeds(seed, max(indices, default=-1) + 1)
        outs = self.engine.generate([e.prompt_ids for e in episodes], 1, None, self.budget,
                                    seeds=[seeds[i] for i in indices], **sampling)
        for turn in range(1, self.max_turns + 1):
            calls = {}
            for k, out in zip(running, outs):
                if self._take_turn(episodes[k], out) and turn < self.max_turns:
                    calls[k] = parse_calls(out.text)
            results = self.toolbox.run([[(c, tools[k]) for c in calls[k]] for k in calls])
            running = [k for k, turn_results in zip(calls, results) if self._add_results(episodes[k], turn_results)]
            if not running:
                break
            outs = self.engine.generate([episodes[k].prompt_ids + episodes[k].token_ids for k in running], 1, None,
                                        [self.budget - len(episodes[k].token_ids) for k in running],
                                        seeds=turn_seeds(seed, turn, [indices[k] for k in running]), **sampling)
        return episodes

    def _start(self, prompts, order):
        """An empty episode of prompts[p] for each p in order; with --environment, each its own instance, reset with
        the prompt's row: a message reset() returns is a user message after the prompt's. A reset that raises (or
        makes the prompt longer than max_prompt_tokens) stops the run, after the last completed step is saved, as a
        raising reward does."""
        episodes, error = [], None
        try:
            for index in order:
                prompt = prompts[index]
                episodes.append(Episode(index, [], "", [], False, messages=[dict(m) for m in prompt["messages"]],
                                        prompt_ids=prompt["token_ids"]))
                if self.environment:
                    self._reset(episodes[-1], prompt["fields"])
        except UserError as e:
            error = e
        # under torchrun every rank starts its episodes here: all of them stop together, so they can save together
        if distributed.any_rank(error is not None):
            error = str(error or "another rank's --environment failed (its message names it)")
            message, _, frames = error.partition("\n")
            saved = f" {self.failed(together=True)}" if self.failed else ""
            raise UserError(message + saved + (f"\n{frames}" if frames else "")) from None
        return episodes

    def _reset(self, episode, row):
        name, step = f"--environment {self.environment.__name__}", f"{self.environment.__name__}()"
        try:
            episode.environment = self.environment()
            step = "reset(**row)"
            message = episode.environment.reset(**row)
        except Exception as e:
            frames = user_frames(e, self.environment.reset)
            raise UserError(f"{name}: {step} raised {type(e).__name__}: {e} (the row's columns: {', '.join(row)})."
                            + (f"\n{frames}" if frames else "")) from None
        if message is not None:
            episode.messages.append({"role": "user", "content": str(message)})
            try:
                episode.prompt_ids = self.template.ids(episode.messages, generation_prompt=True)
            except Exception as e:  # e.g. a template that wants user and assistant messages to alternate
                raise UserError(f"{name}: the chat template cannot take reset()'s message as a user message after "
                                f"the prompt's ({type(e).__name__}: {e})") from None
            if self.max_prompt_tokens and len(episode.prompt_ids) > self.max_prompt_tokens:
                raise UserError(f"{name}: reset()'s message makes the prompt {len(episode.prompt_ids)} tokens, over "
                                f"--max_prompt_tokens {self.max_prompt_tokens}; raise it or shorten the message.")

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
