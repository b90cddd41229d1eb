"""Command line -> Config dataclass: `--field value` overrides a default, `--demo` swaps in demo defaults.

Every script keeps its hyperparameters in a `Config` dataclass at the top (the constants a researcher
edits). `parse_config` turns `sys.argv` into an instance of it, with one clear error for an unknown
field or a value of the wrong type.
"""

import dataclasses
import importlib.util
import inspect
import os
import re
import sys
import typing

from nanorlhf.errors import UserError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_type(cls, field):
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint  # `str | None` -> str


def _convert(name, kind, text):
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise UserError(f"--{name} takes true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{name} takes a {kind.__name__}, got {text!r}") from None


def _comments(cls):
    """The trailing `# comment` of each field in the class source (and its dataclass bases): its help line."""
    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        comments.update(m.groups() for m in map(pattern.match, inspect.getsource(klass).splitlines()) if m)
    return comments


@dataclasses.dataclass
class RunConfig:
    """Fields every script shares and few people touch; each script's `Config` extends this class, so adding one
    does not mean editing six files. `--help` lists them after the script's own fields."""

    vllm_tensor_parallel_size: int = 1  # ranks (GPUs) sharing one vLLM engine under torchrun: an engine too big for one GPU
    weight_sync: str = "auto"  # updates into the engine: merged (W + scale B A in place), lora (A, B; vLLM's LoRA) or auto (merged on CPU or in float32, else lora)
    vllm_is_correction: str = "token_truncate"  # trainer/sampler mismatch weight: token_truncate, sequence_truncate, sequence_mask or none
    vllm_is_cap: float = 2.0  # C in min(pi_trainer / pi_vllm, C) (sequence_mask: ratios above C get weight 0)
    micro_batch_tokens_nograd: int = 0  # token budget of a micro-batch without gradients (reference, old log-probs, values); 0 = 4 x micro_batch_tokens
    save_total_limit: int = 3  # newest checkpoints kept in the run folder (0 = all)
    max_skipped_steps: int = 3  # stop after this many steps in a row with a non-finite loss or gradient
    reward_timeout: float = 600.0  # seconds one call of a reward function may take (0 = no limit)
    warmup_steps: float = 0.0  # optimizer steps of linear warmup before the cosine decay; below 1: a fraction of them
    system_prompt: str = ""  # a system message put before every prompt (through the chat template)
    chat_template_kwargs: str = ""  # JSON object passed to the chat template, e.g. '{"enable_thinking": false}'
    samples_every: int = 10  # log a table of prompts, completions and rewards every N steps (0 = never)
    eval_every: int = 0  # greedy evaluation every N steps, at step 1 and at the last step (0 = none)
    eval_dataset: str = ""  # evaluation prompts: hub name or local file ("" = eval_split of the training dataset)
    eval_split: str = "test"  # split of a hub eval dataset
    eval_prompt_field: str = ""  # prompt column of eval_dataset ("" = prompt_field)
    eval_limit: int = 200  # evaluate on the first N prompts
    export_model: bool = True  # at the end, write <output_dir>/model: base + LoRA merged, for transformers and vLLM
    push_to_hub: str = ""  # at the end, also upload that model to this hub repo ("user/name"; needs a login)
    tools: str = ""  # tools the model may call, file.py:fn1,fn2 or module:fn1,fn2 (typed, with docstrings; nanorlhf.tools:python runs code)
    environment: str = ""  # file.py:Class or module:Class, one instance per episode: reset(**row), its public methods are tools, an optional reward() is added (docs/tools.md)
    max_turns: int = 4  # with tools: model turns per episode at most
    max_tool_response_tokens: int = 256  # with tools: a longer tool result is cut to this many tokens (0 = no limit)
    tool_timeout: float = 10.0  # with tools: seconds a turn's tool calls may take (0 = no limit)
    verbose: bool = False  # show the libraries' output (vLLM, torch, transformers) on the terminal, not only in run.log


def check_config(cfg, world_size):
    """One UserError naming the field and the fix for a value no run can use; the number of steps otherwise.
    Checked before anything is loaded or written (fields a script adds, e.g. PPO's gamma, it checks itself)."""
    from nanorlhf.logprobs import IS_MODES

    tp = cfg.vllm_tensor_parallel_size
    if tp < 1 or world_size % tp:
        raise UserError(f"--vllm_tensor_parallel_size {tp} must divide the number of processes, "
                        f"{world_size}: start torchrun with a multiple of it (one process per GPU)")
    if cfg.prompts_per_step % world_size:
        raise UserError(f"--prompts_per_step {cfg.prompts_per_step} does not split into whole prompt groups over "
                        f"{world_size} processes: make prompts_per_step a multiple of the number of processes "
                        "(torchrun's --nproc_per_node x --nnodes)")
    if min(cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens, cfg.micro_batch_tokens) < 1:
        raise UserError("prompts_per_step, group_size, max_new_tokens and micro_batch_tokens must be at least 1")
    if not cfg.temperature > 0:  # the trainer divides the logits by it
        raise UserError(f"--temperature must be > 0 for training, got {cfg.temperature}: the loss uses the "
                        "distribution the completions were sampled from (greedy decoding is what the evaluation does)")
    if cfg.vllm_is_correction not in IS_MODES:
        raise UserError(f"--vllm_is_correction must be one of {', '.join(IS_MODES)}, got {cfg.vllm_is_correction!r}")
    if not cfg.vllm_is_cap >= 1:
        raise UserError(f"--vllm_is_cap must be at least 1 (it caps pi_trainer / pi_vllm), got {cfg.vllm_is_cap}")
    if cfg.weight_sync not in ("auto", "merged", "lora"):
        raise UserError(f"--weight_sync must be auto, merged or lora, got {cfg.weight_sync!r}")
    if cfg.warmup_steps < 0 or cfg.samples_every < 0:
        raise UserError(f"--warmup_steps and --samples_every must be 0 or more, got {cfg.warmup_steps} and "
                        f"{cfg.samples_every}")
    if cfg.save_total_limit < 0 or cfg.max_skipped_steps < 1:
        raise UserError("--save_total_limit must be 0 (keep all) or more and --max_skipped_steps at least 1, got "
                        f"{cfg.save_total_limit} and {cfg.max_skipped_steps}")
    multi_turn = cfg.tools or cfg.environment
    if multi_turn and (cfg.max_turns < 1 or cfg.max_tool_response_tokens < 0 or not cfg.tool_timeout >= 0):
        raise UserError(f"--max_turns must be at least 1, --max_tool_response_tokens and --tool_timeout 0 (no limit) "
                        f"or more, got {cfg.max_turns}, {cfg.max_tool_response_tokens} and {cfg.tool_timeout}")
    if multi_turn and getattr(cfg, "prompt_template", ""):
        raise UserError("--tools and --environment reach the model through the chat template, which "
                        "--prompt_template replaces: leave --prompt_template out")
    episodes_per_step = cfg.prompts_per_step * cfg.group_size
    if cfg.total_episodes < episodes_per_step:
        raise UserError(f"--total_episodes {cfg.total_episodes} is less than one step "
                        f"(prompts_per_step x group_size = {episodes_per_step})")
    return cfg.total_episodes // episodes_per_step


def as_dict(config):
    """Every field of a parsed Config (what config.json and wandb record)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def format_help(cls, script):
    lines = [f"usage: python {script} [--demo] [--<field> <value> ...]", ""]
    lines.append("  --demo  swap in the demo defaults: bundled tiny model, synthetic task, CPU, no download")
    comments = _comments(cls)
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    fields = dataclasses.fields(cls)
    for f in [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]:
        comment = comments.get(f.name, "")
        lines.append(f"  --{f.name} {_field_type(cls, f).__name__} (default: {f.default!r})  {comment}".rstrip())
    return "\n".join(lines)


def parse_config(cls, argv=None, demo=None):
    """Return `cls(...)` from `--field value` / `--field=value` pairs; `--demo` applies `demo` first.

    A bool field given without a value (`--sparse`) means true. The returned config carries the set of
    fields the user named explicitly in `config.explicit` (a script may treat those differently, e.g. a
    reward model named together with a reward function is combined with it instead of replaced).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        print(format_help(cls, sys.argv[0]))
        sys.exit(0)
    values = dict(demo or {}) if "--demo" in argv else {}
    argv = [a for a in argv if a != "--demo"]
    explicit = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --field value (see --help)")
        name, _, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            raise UserError(f"unknown option --{name}: run with --help to list every field")
        kind = _field_type(cls, fields[name])
        if not _ and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            if kind is not bool:
                raise UserError(f"--{name} needs a value, e.g. --{name} {fields[name].default!r}")
            text = "true"
        elif not _:
            i += 1
            text = argv[i]
        values[name] = _convert(name, kind, text)
        explicit.add(name)
        i += 1
    config = cls(**values)
    config.explicit = explicit
    return config


def load_module(path):
    """Import a Python file as a module: an algorithm script (its main() is behind `__main__`, so nothing
    runs; tests and benchmarks read its Config, DEMO and functions) or a user's reward file."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
