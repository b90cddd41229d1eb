"""Rewards through one API: `function(prompts, completions, **row_fields) -> list[float]`.

A reward model (any sequence-classification model scoring question + response, by default
OpenAssistant/reward-model-deberta-v3-large-v2) is wrapped to that same API, and rule-based functions
are loaded from `file.py:function` or `module:function`; an --environment's `reward()` is one more
(EnvironmentReward). Several rewards are summed with weights.
"""

import contextlib
import importlib
import math
import os
import signal
import threading
import traceback

import torch

from nanorlhf.config import load_module
from nanorlhf.errors import UserError


def load_source(source, flag):
    """The module of a `--reward_fn`, `--tools` or `--environment` spec's left side (`path/to/file.py` or
    `package.module`), imported once; errors name `flag`."""
    if source.endswith(".py"):
        if not os.path.isfile(source):
            raise UserError(f"{flag}: file {source!r} does not exist (path is relative to {os.getcwd()})")
        return load_module(source)
    try:
        return importlib.import_module(source)
    except ImportError as e:
        raise UserError(f"{flag}: cannot import module {source!r} ({e})") from None


def load_reward_fn(spec):
    """`path/to/file.py:function` or `package.module:function` -> the callable."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UserError(f"--reward_fn {spec!r} must look like path/to/file.py:function or module:function")
    fn = getattr(load_source(source, "--reward_fn"), name, None)
    if not callable(fn):
        raise UserError(f"--reward_fn: {source!r} has no function {name!r}")
    fn.__name__ = getattr(fn, "__name__", name)
    return fn


class RewardModel:
    """A sequence-classification model as a reward function: score(question, response) per completion.

    A pair longer than the model's window (tokenizer.model_max_length capped at max_position_embeddings: 512 tokens
    for the default DeBERTa, its [CLS] and two [SEP] included) is cut so that the response, the thing being scored,
    stays whole: the prompt loses tokens from the left, its oldest turns first. A response that alone fills the
    window keeps its beginning and is scored without the prompt: no room is left for a useful part of it.
    `metrics` counts what the last call cut (logged each step as reward_reward_model_<key>): `truncated_prompts`
    (shortened or dropped) and `truncated_responses`.
    """

    def __init__(self, name, batch_size=16, dtype=torch.bfloat16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.__name__ = "reward_model"
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(self.tokenizer.model_max_length, positions or self.tokenizer.model_max_length)
        self.budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)  # for the two texts
        self.metrics = {"truncated_prompts": 0, "truncated_responses": 0}

    def encode(self, prompts, completions):
        """One encoding (a dict of id lists, special tokens in) per (prompt, completion), cut to the window as the
        class docstring says; sets `metrics`."""
        def lengths(texts):
            ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
            return [len(i) for i in ids]

        prompt_lengths, response_lengths = lengths(prompts), lengths(completions)
        # per pair: whole, the prompt cut from the left, or the response cut from the right without the prompt
        cases = ["whole" if p + r <= self.budget else "cut_prompt" if r < self.budget else "cut_response"
                 for p, r in zip(prompt_lengths, response_lengths)]
        encoded, side = [None] * len(prompts), self.tokenizer.truncation_side
        try:
            for case, truncation, truncation_side in (("whole", False, side), ("cut_prompt", "only_first", "left"),
                                                      ("cut_response", "only_second", "right")):
                idx = [i for i, c in enumerate(cases) if c == case]
                if not idx:
                    continue
                self.tokenizer.truncation_side = truncation_side
                out = self.tokenizer([prompts[i] if case != "cut_response" else "" for i in idx],
                                     [completions[i] for i in idx], truncation=truncation,
                                     max_length=self.max_length if truncation else None)
                for row, i in enumerate(idx):
                    encoded[i] = {key: values[row] for key, values in out.items()}
        finally:
            self.tokenizer.truncation_side = side
        self.metrics = {"truncated_prompts": sum(c != "whole" and p > 0 for c, p in zip(cases, prompt_lengths)),
                        "truncated_responses": sum(r > self.budget for r in response_lengths)}
        return encoded

    @torch.no_grad()
    def __call__(self, prompts, completions, **_):
        encoded, scores = self.encode(prompts, completions), []
        for i in range(0, len(encoded), self.batch_size):
            inputs = self.tokenizer.pad(encoded[i : i + self.batch_size], return_tensors="pt").to(self.device)
            scores += self.model(**inputs).logits[:, 0].float().tolist()
        return scores

    def to(self, device):
        self.model.to(device)
        return self


class RewardTimeout(BaseException):
    """Raised into a reward function past reward_timeout (a BaseException, so a broad `except Exception` in the
    user's code does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise RewardTimeout in the block after `seconds` (SIGALRM: it interrupts Python code and blocking calls such as
    sleep or I/O; a function that sets its own alarm replaces this one for the rest of its call). Main thread only."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise RewardTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def user_frames(error, fn):
    """The traceback of `error` cut to the frames in the file that defines fn (the user's own code)."""
    source = getattr(getattr(fn, "__code__", None), "co_filename", None)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == source]
    return "".join(traceback.format_list(frames)).rstrip()


class Rewards:
    """Weighted sum of reward functions, checked on every call: one float per completion, all finite. A rule-based
    function that raises or runs past `timeout` seconds becomes one UserError naming it."""

    def __init__(self, functions, weights=None, timeout=0):
        if not functions:
            raise UserError("no reward: give --reward_model and/or --reward_fn (or an --environment with reward())")
        weights = weights or [1.0] * len(functions)
        if len(weights) != len(functions):
            raise UserError(f"--reward_weights has {len(weights)} values for {len(functions)} rewards; give one each "
                            "(reward model, reward_fn in order, the environment's reward())")
        self.functions, self.weights, self.timeout = functions, weights, timeout

    def call(self, fn, name, prompts, completions, row_fields):
        if isinstance(fn, RewardModel):  # a model, not user code: its errors (out of memory) are the run's to report
            return fn(prompts, completions, **row_fields)
        try:
            with time_limit(self.timeout):
                return fn(prompts, completions, **row_fields)
        except RewardTimeout:
            raise UserError(f"reward {name} did not return within reward_timeout {self.timeout:g} s; make it faster, "
                            "or raise --reward_timeout (0 = no limit)") from None
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            frames = user_frames(e, fn)
            raise UserError(f"reward {name} raised {type(e).__name__}: {e}" + (f"\n{frames}" if frames else "")) \
                from None

    def __call__(self, prompts, completions, row_fields):
        """Returns (total (N,), {name: (N,)}) for N completions; row_fields maps column -> list of N values."""
        total, parts = torch.zeros(len(completions)), {}
        for fn, weight in zip(self.functions, self.weights):
            name = getattr(fn, "__name__", "reward")
            values = self.call(fn, name, prompts, completions, row_fields)
            if not hasattr(values, "__len__") or len(values) != len(completions):
                got = len(values) if hasattr(values, "__len__") else type(values).__name__
                raise UserError(f"reward {name} returned {got} values for {len(completions)} completions; "
                                "return one float per completion")
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError):
                raise UserError(f"reward {name} returned a non-number; return a list of floats") from None
            if not all(math.isfinite(v) for v in values):
                raise UserError(f"reward {name} returned NaN or inf; return finite floats")
            parts[name] = torch.tensor(values)
            total += weight * parts[name]
        return total, parts


class EnvironmentReward:
    """`reward()` of each episode's --environment instance, as a reward function named `environment`: the last of the
    rewards, weight 1 unless --reward_weights gives one. It raises and times out as a reward function does."""

    __name__ = "environment"

    def __init__(self, environment):
        self.__code__ = environment.reward.__code__  # user_frames shows the frames of the class's own file

    def __call__(self, prompts, completions, environments, **_):
        return [environment.reward() for environment in environments]


def build_rewards(reward_model, reward_fn, reward_weights, timeout=0, environment=None):
    """Rewards from the Config fields: a reward model name ("" for none), comma-separated reward_fn specs,
    comma-separated weights (reward model first) and reward_timeout; `environment` (the --environment class) adds its
    reward() last, when it has one."""
    functions = [load_reward_fn(spec) for spec in reward_fn.split(",") if spec]
    if reward_model:
        functions.insert(0, RewardModel(reward_model))
    if callable(getattr(environment, "reward", None)):
        functions.append(EnvironmentReward(environment))
    try:
        weights = [float(w) for w in reward_weights.split(",")] if reward_weights else None
    except ValueError:
        raise UserError(f"--reward_weights takes comma-separated numbers, got {reward_weights!r}") from None
    if not timeout >= 0:
        raise UserError(f"--reward_timeout must be 0 (no limit) or a number of seconds, got {timeout}")
    return Rewards(functions, weights, timeout)
