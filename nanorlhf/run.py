"""One RLHF run's plumbing, shared by every algorithm script: setup from the Config, and the per-step
services the scripts call in order (generate, score, update, sync, log). The algorithm math is not here.

Every script's Config carries the same names for the same things (see ../shared/DESIGN.md), so this
module reads them directly: cfg.model, cfg.dataset, cfg.group_size, cfg.micro_batch_tokens, ...
"""

import itertools
import json
import math
import os
import random
import shutil
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

from nanorlhf import console, distributed
from nanorlhf.checkpoint import (find_checkpoint, load_checkpoint, rng_state, save_checkpoint, saved_config,
                                 set_aside_later_checkpoints, set_rng_state, tidy_run_folder)
from nanorlhf.config import as_dict
from nanorlhf.data import PromptStream, load_rows, template_kwargs
from nanorlhf.engine import RolloutEngine, engine_lora_rank
from nanorlhf.errors import UserError
from nanorlhf.export import check_hub_credentials, export
from nanorlhf.logprobs import (IS_MODES, completion_logprobs, importance_weights, packing_works,
                               padding_fraction, token_budget_batches)
from nanorlhf.policy import adamw, device, evaluating, load_policy, merged_weights, move_optimizer_state
from nanorlhf.rewards import build_rewards
from nanorlhf.tasks import resolve
from nanorlhf.tracking import Tracker


class Batch(dict):
    """Per-sample data of one step: token-id lists and (B,) or (B, C) tensors, C = longest completion.
    `batch.x` reads `batch["x"]`; `select(idx)` slices every entry together (and trims C to the slice)."""

    __getattr__ = dict.__getitem__

    def __setattr__(self, key, value):
        self[key] = value

    def __len__(self):
        return len(self["completion_ids"])

    def select(self, idx, device=None):
        width = max(len(self["completion_ids"][i]) for i in idx)
        index = torch.tensor(idx)
        out = Batch()
        for key, value in self.items():
            if torch.is_tensor(value):
                value = value[index.to(value.device)].to(device or value.device)
                out[key] = value[:, :width] if value.dim() == 2 else value
            elif isinstance(value, list):
                out[key] = [value[i] for i in idx]
            else:
                out[key] = value
        return out


# Config fields that change the model's shape: a checkpoint cannot be resumed with other values
SHAPE_FIELDS = ("model", "lora_r", "lora_target_modules")
SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}  # exit status 128 + signal number


def resume_changes(saved, current):
    """["field old -> new", ...] for the fields a resumed run changes; one UserError if a SHAPE_FIELDS one changed."""
    ignored = {"resume", "output_dir", "overwrite"}
    changed = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v and k not in ignored}
    shape = [k for k in SHAPE_FIELDS if k in changed]
    if shape:
        raise UserError("--resume: " + ", ".join(f"{k} is {changed[k][1]!r} but the checkpoint was trained with "
                                                  f"{changed[k][0]!r}" for k in shape)
                        + "; these shape the model, so a resumed run keeps them (drop the flags, or start a new run)")
    return [f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()]


def mean_over_ranks(metrics):
    """Each numeric metric averaged over the torchrun ranks (a value every rank computed alike stays as it is;
    a rank's own per-sample mean becomes the whole batch's when shares are equal); None where no rank has one."""
    if distributed.world_size() == 1:
        return metrics
    gathered, out = distributed.gather_objects(metrics), {}
    for key, value in metrics.items():
        numbers = [m[key] for m in gathered if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
        out[key] = value if not numbers or len(set(numbers)) == 1 and value is not None else sum(numbers) / len(numbers)
    return out


def samples(prompts, completions, rewards, parts, count=4):
    """Rows of the samples table: the first completion of each of the first `count` prompts, with its rewards."""
    rows, seen = [], set()
    for i, c in enumerate(completions):
        if c.prompt_index in seen or len(seen) == count:
            continue
        seen.add(c.prompt_index)
        rows.append({"prompt": prompts[c.prompt_index]["text"], "completion": c.text, "reward": rewards[i].item(),
                     **{f"reward_{name}": values[i].item() for name, values in parts.items()},
                     "length": len(c.token_ids), "truncated": bool(c.truncated)})
    return rows


def cosine_schedule(optimizer, total_steps, floor=0.1, warmup_steps=0):
    """Learning rate rises linearly to its peak over `warmup_steps` optimizer steps (the first at peak / warmup_steps),
    then decays to floor x peak along a half cosine over the remaining steps. warmup_steps below 1 is a fraction of
    total_steps (as in transformers 5)."""
    warmup = round(warmup_steps * total_steps) if 0 < warmup_steps < 1 else int(warmup_steps)

    def factor(t):
        if t < warmup:
            return (t + 1) / warmup
        progress = min((t - warmup) / max(total_steps - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Run:
    def __init__(self, cfg, algo):
        from transformers import AutoConfig, AutoTokenizer

        self.cfg, self.algo, self.times = cfg, algo, {}
        self.world_size = distributed.world_size()
        tp = cfg.vllm_tensor_parallel_size
        if tp < 1 or self.world_size % tp:
            raise UserError(f"--vllm_tensor_parallel_size {tp} must divide the number of processes, "
                            f"{self.world_size}: start torchrun with a multiple of it (one process per GPU)")
        if cfg.prompts_per_step % self.world_size:
            raise UserError(f"--prompts_per_step {cfg.prompts_per_step} does not split into whole prompt groups over "
                            f"{self.world_size} processes: make prompts_per_step a multiple of the number of processes "
                            "(torchrun's --nproc_per_node x --nnodes)")
        distributed.setup()  # under torchrun: this process is one rank of the data-parallel group (else a no-op)
        console.say(f"{algo}: loading {cfg.model}" + ("" if cfg.verbose else
                    " (library output goes to run.log in the run folder; --verbose true shows it)"))
        if not cfg.verbose:
            console.start()  # see nanorlhf/console.py
        self.episodes_per_step = cfg.prompts_per_step * cfg.group_size
        self.total_steps = cfg.total_episodes // self.episodes_per_step
        if min(cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens, cfg.micro_batch_tokens) < 1:
            raise UserError("prompts_per_step, group_size, max_new_tokens and micro_batch_tokens must be at least 1")
        if not cfg.temperature > 0:  # the trainer divides the logits by it
            raise UserError(f"--temperature must be > 0 for training, got {cfg.temperature}: the loss uses the "
                            "distribution the completions were sampled from (greedy decoding is what the evaluation "
                            "does)")
        if cfg.vllm_is_correction not in IS_MODES:
            raise UserError(f"--vllm_is_correction must be one of {', '.join(IS_MODES)}, got {cfg.vllm_is_correction!r}")
        if not cfg.vllm_is_cap >= 1:
            raise UserError(f"--vllm_is_cap must be at least 1 (it caps pi_trainer / pi_vllm), got {cfg.vllm_is_cap}")
        if cfg.weight_sync not in ("auto", "merged", "lora"):
            raise UserError(f"--weight_sync must be auto, merged or lora, got {cfg.weight_sync!r}")
        # auto: in float32 both syncs are exact and merged is the faster; in bf16/fp16 a merged push rounds away small
        # updates that the trainer still sees (docs/performance.md, "Update fidelity in bfloat16: sync modes")
        self.weight_sync = cfg.weight_sync if cfg.weight_sync != "auto" else \
            "merged" if cfg.dtype == "float32" else "lora"
        max_lora_rank = engine_lora_rank(cfg.lora_r) if self.weight_sync == "lora" else 0
        if cfg.warmup_steps < 0 or cfg.samples_every < 0:
            raise UserError(f"--warmup_steps and --samples_every must be 0 or more, got {cfg.warmup_steps} and "
                            f"{cfg.samples_every}")
        if cfg.save_total_limit < 0 or cfg.max_skipped_steps < 1:
            raise UserError("--save_total_limit must be 0 (keep all) or more and --max_skipped_steps at least 1, got "
                            f"{cfg.save_total_limit} and {cfg.max_skipped_steps}")
        if self.total_steps < 1:
            raise UserError(f"--total_episodes {cfg.total_episodes} is less than one step "
                            f"(prompts_per_step x group_size = {self.episodes_per_step})")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        # Everything the user named is checked before anything is written.
        model_name = resolve(cfg.model)
        try:
            model_config = AutoConfig.from_pretrained(model_name)
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        except OSError as e:
            raise UserError(f"--model {cfg.model!r} could not be loaded ({str(e).splitlines()[0]})") from None
        context = getattr(model_config, "max_position_embeddings", None)
        self.max_model_len = cfg.max_prompt_tokens + cfg.max_new_tokens
        if context and self.max_model_len > context:
            raise UserError(f"max_prompt_tokens + max_new_tokens = {self.max_model_len} exceeds the model's context "
                            f"window of {context} tokens; lower --max_prompt_tokens or --max_new_tokens")
        reward_model = cfg.reward_model
        if cfg.reward_fn and "reward_model" not in cfg.explicit:
            reward_model = ""  # --reward_fn alone replaces the default reward model; naming both combines them
        self.rewards = build_rewards(resolve(reward_model) if reward_model != "none" else "", cfg.reward_fn,
                                     cfg.reward_weights, cfg.reward_timeout)
        template = getattr(cfg, "prompt_template", "")
        chat = dict(system_prompt=cfg.system_prompt, template_kwargs=template_kwargs(cfg.chat_template_kwargs))
        self.prompts = PromptStream(load_rows(resolve(cfg.dataset)), self.tokenizer, cfg.prompt_field,
                                    cfg.max_prompt_tokens, cfg.seed, template, **chat, shard=True)
        self.eval_prompts = []  # a greedy evaluation every eval_every steps (see evaluate)
        if cfg.eval_every > 0:
            if not cfg.eval_dataset and os.path.exists(resolve(cfg.dataset)):
                raise UserError(f"--eval_every {cfg.eval_every} with a local --dataset needs --eval_dataset (a file of "
                                "held-out prompts): a local file has no test split to evaluate on")
            eval_rows = load_rows(resolve(cfg.eval_dataset or cfg.dataset), cfg.eval_split)
            eval_stream = PromptStream(eval_rows, self.tokenizer, cfg.eval_prompt_field or cfg.prompt_field,
                                       cfg.max_prompt_tokens, 0,
                                       template, **chat)
            self.eval_prompts = eval_stream.next(min(cfg.eval_limit, len(eval_rows)))
        if cfg.push_to_hub:  # a missing login says so now, not after the training
            check_hub_credentials(cfg.push_to_hub)
        # the run folder is rank 0's to tidy and write; the other ranks learn its path (and any error) from it
        checkpoint = distributed.broadcast_from_main(lambda: find_checkpoint(cfg.resume)) if cfg.resume else None
        changes = resume_changes(saved_config(checkpoint), as_dict(cfg)) if checkpoint else []
        if checkpoint:
            with open(os.path.join(checkpoint, "progress.json")) as f:
                saved_world_size = json.load(f).get("world_size", 1)
            if saved_world_size != self.world_size:
                raise UserError(f"--resume: {checkpoint} was trained on {saved_world_size} process(es) but this run "
                                f"has {self.world_size}; resume it with the same number (each rank's random state "
                                "is saved with it), or start a new run")
        self.output_dir = distributed.broadcast_from_main(lambda: self._prepare_output_dir(checkpoint))
        console.attach(self.output_dir)
        console.say(f"run folder: {self.output_dir}")

        self.policy = load_policy(model_name, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                                  cfg.dtype, cfg.gradient_checkpointing)
        with evaluating(self.policy):  # sequences packed into shared rows, unless this model's attention mixes them
            self.packed = packing_works(self.policy, self.tokenizer.pad_token_id)
        if not self.packed:
            console.say("note: this model's attention mixes sequences packed into one row: micro-batches are padded")
        self.optimizer = adamw([p for p in self.policy.parameters() if p.requires_grad], cfg.learning_rate)
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps * getattr(cfg, "ppo_epochs", 1),
                                         warmup_steps=cfg.warmup_steps)
        self.extra_modules, self.saved_modules = {}, {}  # see register()
        self.start_step, saved_rng = 1, None
        if checkpoint:
            progress, self.saved_modules, saved_rng = load_checkpoint(checkpoint, self.policy, self.optimizer,
                                                                      self.scheduler, device())
            self.start_step = progress["step"] + 1
            self.prompts.load_state(progress["data"])
            console.say(f"resumed from {checkpoint}: continuing at step {self.start_step}"
                  + "".join(f"\n  changed since that checkpoint: {c}" for c in changes))
            in_place = os.path.dirname(os.path.abspath(checkpoint)) == os.path.abspath(self.output_dir)
            aside = set_aside_later_checkpoints(self.output_dir, progress["step"]) \
                if in_place and distributed.is_main() else []
            if aside:
                console.say(f"  later checkpoints of the run that died renamed <name>.after-{progress['step']}: "
                      f"{', '.join(aside)}")
        self.engine = RolloutEngine(model_name, self.max_model_len, cfg.dtype, cfg.vllm_gpu_memory, cfg.seed,
                                    max_lora_rank, external_launcher=self.world_size > 1,
                                    tp_group=distributed.tensor_parallel_group(cfg.vllm_tensor_parallel_size))
        # stepped: the weights changed in this step (see failed); engine_stale: the engine's are behind (see sync)
        self.stepped, self.engine_stale = False, bool(checkpoint)
        if checkpoint:
            self.sync()
        self.tracker = None if not distributed.is_main() else Tracker(  # rank 0 writes the metrics
                               self.output_dir, cfg, cfg.wandb, cfg.wandb_project, os.path.basename(self.output_dir),
                               self.total_steps * self.episodes_per_step,
                               (self.start_step - 1) * self.episodes_per_step,
                               resumed_step=self.start_step - 1 if checkpoint else None)
        # after the engine and wandb, which seed or draw from the global generators: the resumed run's dropout masks
        # are the uninterrupted run's
        if saved_rng:
            set_rng_state(saved_rng["ranks"][distributed.rank()] if "ranks" in saved_rng else saved_rng)
        self.step, self.snapshot, self.scored = None, None, None  # the step running, its start's data position and RNG
        self.skipped_steps, self.skipped_in_a_row = 0, 0
        # Ctrl-C and SIGTERM (a scheduler's preemption) finish the current step, save and exit: see steps()
        self.stop_signal, self.previous_handlers, self.closed = None, {}, False
        if threading.current_thread() is threading.main_thread():
            self.previous_handlers = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def _on_signal(self, signum, frame):
        name = SIGNALS[signum][0]
        console.say(f"\n{name}: stopping after this step ({name} again to abort now)")
        self.stop_signal = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    @property
    def stop_requested(self):
        """True once Ctrl-C or SIGTERM came to this process."""
        return self.stop_signal is not None

    def stop_agreed(self):
        """Whether to stop here, the same answer on every rank (a loop outside steps(), PPO's value initialisation,
        asks it too). The flag is read once: a signal that lands after the read counts at the next check, not in
        this one on some ranks only (they would then wait for each other in different collectives)."""
        stop = distributed.any_rank(self.stop_requested)
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM  # another rank got it: every rank stops at the same point
        return stop

    def close(self):
        """Restore the signal handlers, finish the metrics (plot, wandb, summary). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        if self.tracker:
            self.tracker.close()
        console.say(f"run folder: {self.output_dir}")

    def _prepare_output_dir(self, checkpoint):
        cfg = self.cfg
        output_dir = cfg.output_dir
        if not output_dir and checkpoint:
            output_dir = os.path.dirname(os.path.abspath(checkpoint))
        if not output_dir:  # a new folder per run, so reruns never collide
            output_dir = base = os.path.join("runs", f"{self.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
            for n in itertools.count(2):
                if not os.path.exists(output_dir):
                    break
                output_dir = f"{base}-{n}"
        holds_run = os.path.isdir(output_dir) and any(
            f == "metrics.jsonl" or f.startswith("checkpoint-") for f in os.listdir(output_dir))
        tidy_run_folder(output_dir)
        if holds_run and not checkpoint:
            if not cfg.overwrite:
                raise UserError(f"--output_dir {output_dir!r} holds another run; pass --resume {output_dir} to "
                                "continue it, --overwrite to replace it, or choose another --output_dir")
            for f in os.listdir(output_dir):
                if f in ("metrics.png", "wandb", "command.txt", "samples.jsonl", "model") or \
                        f.startswith(("checkpoint-", "metrics.jsonl")):
                    path = os.path.join(output_dir, f)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(output_dir, exist_ok=True)
        # the run's settings, so that it can be repeated from its folder: every field, and each command that ran in it
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(as_dict(cfg), f, indent=1)
        launcher = [os.path.basename(sys.executable)]
        if self.world_size > 1:  # how to start it again: torchrun's shape (one node's processes, the nodes)
            nodes = self.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)),
                        *(["--nnodes", str(nodes)] if nodes > 1 else [])]
        with open(os.path.join(output_dir, "command.txt"), "a") as f:
            f.write(shlex.join([*launcher, *sys.argv]) + "\n")
        return output_dir

    # --- the loop -------------------------------------------------------------------------------------

    def steps(self):
        """Yield step numbers; checkpoint every save_every steps and at the end. Ctrl-C or SIGTERM finishes the
        current step, saves a checkpoint and exits with status 130 or 143; a second one aborts at once.
        max_skipped_steps non-finite steps in a row (see update) stop the run with status 2."""
        cfg = self.cfg
        console.running = True
        try:
            for step in range(self.start_step, self.total_steps + 1):
                if step == self.start_step and self.stop_agreed():  # came before it (PPO's value initialisation)
                    name, status = SIGNALS[self.stop_signal]
                    console.say(f"{name}: stopped before step {step}; nothing new to save")
                    raise SystemExit(status)
                self.times = {"step_start": time.perf_counter()}
                self.step, self.snapshot, self.stepped = step, {"data": self.prompts.state(), "rng": rng_state()}, False
                self.scored = None  # the step's first scored batch, for the samples table (see log)
                yield step
                stopping = self.stop_agreed()
                if stopping or self.skipped_in_a_row >= cfg.max_skipped_steps or step % cfg.save_every == 0 or \
                        step == self.total_steps:
                    saved = self.save(step)
                if self.skipped_in_a_row >= cfg.max_skipped_steps:
                    raise UserError(f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient (the "
                                    f"last: step {step}), so the run stops (--max_skipped_steps {cfg.max_skipped_steps}); "
                                    f"{saved} holds the weights of the last finite step. Lower --learning_rate or "
                                    f"check the reward's scale, then --resume {self.output_dir}")
                if stopping:
                    name, status = SIGNALS[self.stop_signal]
                    console.say(f"{name}: saved {saved}; continue with --resume {self.output_dir}")
                    raise SystemExit(status)
            self.step = None
            if self.start_step <= self.total_steps and cfg.export_model and distributed.is_main():
                model_dir = os.path.join(self.output_dir, "model")
                shutil.rmtree(model_dir, ignore_errors=True)  # a model exported by an earlier end of this run
                export(saved, model_dir, cfg.push_to_hub, self.algo)
                console.say(f"final model (LoRA merged, Hugging Face format): {model_dir}")
        finally:
            self.close()

    def register(self, name, module):
        """Checkpoint `module` (e.g. a value head) with the run, and restore it now if resuming."""
        self.extra_modules[name] = module
        if name in self.saved_modules:
            module.load_state_dict(self.saved_modules[name])
        return module

    def save(self, step, snapshot=None):
        """checkpoint-<step> of the current weights, optimizer and scheduler; the data position and RNG are the
        current ones, or those of `snapshot` (taken at the start of step + 1, see failed())."""
        snapshot = snapshot or {"data": self.prompts.state(), "rng": rng_state()}
        for name, p in self.policy.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():  # update() never lets this happen; never save it
                raise RuntimeError(f"refusing to save non-finite weights ({name})")
        rng = snapshot["rng"]
        if self.world_size > 1:  # the weights are the same on every rank, the random states are each rank's own
            rng = {"ranks": distributed.gather_objects(rng)}
        progress = {"step": step, "episodes": step * self.episodes_per_step, "data": snapshot["data"],
                    "world_size": self.world_size}
        path = os.path.join(self.output_dir, f"checkpoint-{step}")
        if distributed.is_main():
            path = save_checkpoint(self.output_dir, step, self.policy, self.optimizer, self.scheduler, progress,
                                   self.extra_modules, rng, as_dict(self.cfg), self.cfg.save_total_limit)
        distributed.barrier()  # no rank goes on (or exits) before the checkpoint is complete
        return path

    def failed(self, together=False):
        """Save the last completed step for a run about to stop in the middle of step self.step, close the run, and
        say what was kept. together: every rank stops at this same point (under torchrun a save takes them all)."""
        resume = f"continue with --resume {self.output_dir}"
        if self.step is None or self.step == 1:
            message = "No step was completed, so nothing was saved"
        elif self.world_size > 1 and not together:  # a save takes every rank, and the others may be gone
            message = f"The newest checkpoint in {self.output_dir} holds the last saved state; {resume}"
        elif self.stepped:  # this step already changed the weights: they are not the last completed step's any more
            message = f"The newest checkpoint in {self.output_dir} holds the last saved state; {resume}"
        else:
            path = os.path.join(self.output_dir, f"checkpoint-{self.step - 1}")
            if not os.path.exists(path):
                path = self.save(self.step - 1, self.snapshot)
            message = f"Saved the last completed step in {path}; {resume}"
        self.close()
        return message

    @contextmanager
    def timed(self, name):
        """Time a phase of the step into self.times[name]. Out of memory inside it stops the run with one sentence
        naming the phase and the field to lower, after saving the last completed step (see failed())."""
        start = time.perf_counter()
        try:
            yield
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            phase, fields = ("generation", "--vllm_gpu_memory or --max_new_tokens") \
                if name in ("time_generate", "time_eval") else ("reward", "--vllm_gpu_memory (the engine's share)") \
                if name == "time_score" else ("training", "--micro_batch_tokens or --max_new_tokens")
            raise UserError(f"out of memory in {phase} ({name}) at step {self.step}: lower {fields}. "
                            + self.failed()) from None
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def generate(self, prompts, n, seed, with_greedy=False):
        """n completions per prompt from the engine (prompt-major); with_greedy: also one greedy completion per
        prompt from the same batch, returned as a second list. The trainer's optimizer state leaves the GPU
        while the engine holds it, and the engine sleeps again afterwards."""
        cfg = self.cfg
        with self.timed("time_generate"):
            move_optimizer_state(self.optimizer, "cpu")
            completions = self.engine.generate([p["token_ids"] for p in prompts], n, seed, cfg.max_new_tokens,
                                               cfg.temperature, cfg.top_p, with_greedy=with_greedy,
                                               first_index=prompts[0].get("index", 0) if prompts else 0)
            self.engine.sleep()
        tokens = sum(len(c.token_ids) for c in completions)  # summed over the step's calls (GRPO's dynamic sampling)
        self.times["generated_tokens"] = self.times.get("generated_tokens", 0) + tokens
        if with_greedy:
            return completions[: len(prompts) * n], completions[len(prompts) * n :]
        return completions

    def score(self, prompts, completions):
        """(rewards (N,), {reward name: (N,)}) for the completions of `prompts` (prompt-major)."""
        with self.timed("time_score"):
            rewards, parts = self._rewards(prompts, completions)
        if self.step is not None and self.scored is None:
            self.scored = prompts, completions, rewards, parts
        return rewards, parts

    def _rewards(self, prompts, completions):
        """A reward function that raises, hangs or returns a bad value stops the run (one sentence) after saving the
        last completed step."""
        rows = [prompts[c.prompt_index] for c in completions]
        fields = {k: [r["fields"][k] for r in rows] for k in rows[0]["fields"]} if rows else {}
        error = None
        try:
            rewards = self.rewards([r["text"] for r in rows], [c.text for c in completions], fields)
        except UserError as e:
            error = e
        # under torchrun every rank scores at this point: all of them stop here together, so they can save together
        if distributed.any_rank(error is not None):
            message, _, frames = str(error or "another rank's reward failed (its message names it)").partition("\n")
            raise UserError(f"{message}. {self.failed(together=True)}" + (f"\n{frames}" if frames else "")) from None
        return rewards

    def batch(self, prompts, completions, keep=None, **per_sample):
        """A Batch of the kept completions with their prompts and any (N,) or (N, ...) per-sample tensors."""
        idx = [i for i in range(len(completions)) if keep is None or keep[i]]
        width = max([len(completions[i].token_ids) for i in idx] + [1])
        vllm_logprobs = torch.zeros(len(idx), width)
        for row, i in enumerate(idx):
            vllm_logprobs[row, : len(completions[i].logprobs)] = torch.tensor(completions[i].logprobs)
        total_tokens = sum(len(prompts[c.prompt_index]["token_ids"]) + len(c.token_ids) for c in completions)
        batch = Batch(
            prompt_ids=[prompts[completions[i].prompt_index]["token_ids"] for i in idx],
            completion_ids=[completions[i].token_ids for i in idx],
            vllm_logprobs=vllm_logprobs,
        )
        batch.dropped_tokens = total_tokens - sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
        for key, value in per_sample.items():
            batch[key] = value[torch.tensor(idx, dtype=torch.long)] if torch.is_tensor(value) else [value[i] for i in idx]
        return batch

    def micro_batches(self, batch, grad=True):
        """Token-budget micro-batches of the batch and their padding fraction. Without gradients nothing is kept
        for backward, so the budget is micro_batch_tokens_nograd (default 4 x micro_batch_tokens)."""
        lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        budget = self.cfg.micro_batch_tokens if grad else self.cfg.micro_batch_tokens_nograd or \
            4 * self.cfg.micro_batch_tokens
        batches = token_budget_batches(lengths, budget, self.packed)
        return batches, padding_fraction(batches, lengths, self.policy if self.packed else None)

    def logprobs(self, mb, temperature=None, sampling=False, entropy=True):
        """completion_logprobs of micro-batch mb at `temperature` (default: the sampling one); sampling=True adds the
        sampler's view (sampler_logprobs, processed_logprobs) at the engine's temperature and top-p."""
        return completion_logprobs(self.policy, mb.prompt_ids, mb.completion_ids, self.tokenizer.pad_token_id,
                                   self.cfg.temperature if temperature is None else temperature,
                                   sampling=(self.cfg.temperature, self.cfg.top_p) if sampling else None,
                                   packed=self.packed, entropy=entropy)

    def reference_logprobs(self, batch, temperature=None):
        """(B, C) log-probs under the reference policy: the same base model with the LoRA adapter disabled."""
        with self.policy.disable_adapter():
            return self.policy_logprobs(batch, temperature)

    def policy_logprobs(self, batch, temperature=None):
        """(B, C) log-probs of the sampled tokens under the current policy, no grad and no dropout (0 on padding).
        Timed as time_reference, with the other no-grad passes before the update."""
        out = torch.zeros(batch.vllm_logprobs.shape, device=device())
        batches, _ = self.micro_batches(batch, grad=False)
        with self.timed("time_reference"), evaluating(self.policy):
            for idx in batches:
                lp = self.logprobs(batch.select(idx, device()), temperature, entropy=False)["logprobs"]
                out[torch.tensor(idx, device=out.device), : lp.shape[1]] = lp
        return out

    def update(self, batch, loss_fn, epochs=1, temperature=None):
        """`epochs` optimizer steps on the whole batch, each accumulating gradients over token-budget
        micro-batches. loss_fn(logprobs, entropy, mb) -> (loss, {stat: token mean}) sees one micro-batch `mb`
        with `completion_mask`, `old_logprobs` (the policy the engine sampled from, at the sampling temperature,
        no grad) and `is_weights` (importance weights trainer/sampler, nanorlhf.logprobs.importance_weights, that
        multiply the policy-gradient term of each token), and its loss must already be divided by the whole
        batch's normaliser. `temperature`: of the log-probs the loss sees (default the sampling temperature).
        Returns the loss, the stats averaged over tokens, the logprob canary (vLLM vs trainer log-probs of the
        sampled tokens, same distribution) and the importance-weight stats."""
        if distributed.total(len(batch)) == 0:  # sparse GRPO dropped every completion: nothing to learn from this step
            return {"loss": 0.0, "micro_batches": 0}
        cfg = self.cfg
        batches, pad = self.micro_batches(batch)
        batch.old_logprobs = torch.zeros(batch.vllm_logprobs.shape, device=device())
        batch.is_weights = torch.zeros(batch.vllm_logprobs.shape, device=device())
        # sums stay on the device until the end: one host sync per epoch, not several per micro-batch
        sums, loss_sum = {}, 0.0
        sampler = {"canary": 0.0, "canary_tokens": 0, "ratio": 0.0, "ratio_max": torch.zeros(()), "clipped": 0.0}
        tokens = sum(map(len, batch.completion_ids))

        def observe(idx, mb, out):
            """Record the sampler's view of micro-batch idx: old log-probs, importance weights, canary."""
            mask = out["mask"]
            weights, ratios, clipped = importance_weights(out["sampler_logprobs"], mb.vllm_logprobs, mask,
                                                          cfg.vllm_is_correction, cfg.vllm_is_cap)
            rows, width = torch.tensor(idx, device=device()), mask.shape[1]
            batch.old_logprobs[rows, :width] = out["sampler_logprobs"]
            batch.is_weights[rows, :width] = weights
            measured = out["canary_mask"]
            sampler["canary"] += ((out["processed_logprobs"] - mb.vllm_logprobs).abs() * measured).sum()
            sampler["canary_tokens"] += measured.sum()
            sampler["ratio"] += ratios.sum()
            sampler["ratio_max"] = torch.maximum(sampler["ratio_max"], ratios.max())
            sampler["clipped"] += clipped.sum()
            return out["sampler_logprobs"], weights

        # Without dropout, epoch 0's forward runs the very policy the engine sampled from: the sampler's view comes
        # with it for free. With dropout it needs its own pass without dropout (and without gradients).
        separate = cfg.lora_dropout > 0
        if separate:
            with self.timed("time_old_logprobs"), evaluating(self.policy):
                for idx in self.micro_batches(batch, grad=False)[0]:
                    mb = batch.select(idx, device())
                    observe(idx, mb, self.logprobs(mb, sampling=True, entropy=False))
        skipped = False
        with self.timed("time_train"):
            move_optimizer_state(self.optimizer, device())
            for epoch in range(epochs):
                epoch_loss = 0.0
                for idx in batches:
                    mb = batch.select(idx, device())
                    out = self.logprobs(mb, temperature, sampling=epoch == 0 and not separate)
                    mb.completion_mask = out["mask"]
                    if epoch == 0 and not separate:
                        mb.old_logprobs, mb.is_weights = observe(idx, mb, out)
                    loss, stats = loss_fn(out["logprobs"], out["entropy"], mb)
                    loss.backward()
                    epoch_loss += loss.detach()
                    n_tokens = sum(map(len, mb.completion_ids))
                    stats["entropy"] = (out["entropy"] * out["mask"]).sum() / max(n_tokens, 1)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v * n_tokens
                # torchrun: every rank's loss is divided by the global normaliser, so the sums are the whole batch's
                epoch_loss = distributed.total(float(epoch_loss))
                distributed.all_reduce_gradients([p for p in self.policy.parameters() if p.requires_grad])
                loss_sum += epoch_loss / epochs
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad], self.cfg.max_grad_norm)
                if not (math.isfinite(epoch_loss) and torch.isfinite(grad_norm)):  # never learn from it
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped = True
                    break
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.stepped = self.engine_stale = True
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.skipped_steps += skipped
        if skipped:
            what = "this step's optimizer step and weight push" if not self.stepped else \
                f"the optimizer steps from epoch {epoch + 1} of {epochs} on"
            console.say(f"warning: step {self.step}: loss {epoch_loss:.4g}, gradient norm {grad_norm.item():.4g}; "
                        f"skipped {what} ({self.skipped_in_a_row} in a row; the run stops at --max_skipped_steps "
                        f"{cfg.max_skipped_steps})", err=True)
        sampler, sums = {k: float(v) for k, v in sampler.items()}, {k: float(v) for k, v in sums.items()}
        if self.world_size > 1:  # the whole batch's stats: sums over the ranks
            keys = sorted(set().union(*distributed.gather_objects(list(sums))))
            sums = {k: distributed.total(sums.get(k, 0.0)) for k in keys}
            tokens, sampler["ratio_max"] = distributed.total(tokens), distributed.maximum(sampler["ratio_max"])
            sampler.update({k: distributed.total(sampler[k]) for k in ("canary", "canary_tokens", "ratio", "clipped")})
        stats = {k: v / max(tokens * epochs, 1) for k, v in sums.items()}
        trained_tokens = epochs * sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
        stats.update(loss=loss_sum, grad_norm=grad_norm.item(), skipped_steps=self.skipped_steps,
                     padding_fraction=pad, micro_batches=len(batches),
                     logprob_diff=sampler["canary"] / max(sampler["canary_tokens"], 1),
                     is_ratio_mean=sampler["ratio"] / max(tokens, 1), is_ratio_max=sampler["ratio_max"], is_clipped_fraction=sampler["clipped"] / max(tokens, 1),
                     lr=self.scheduler.get_last_lr()[0],
                     train_tokens_per_second=trained_tokens / self.times["time_train"],
                     # what the dropped samples (sparse) would have cost at the measured speed: an estimate
                     time_saved_sparse=distributed.total(batch.dropped_tokens) * epochs * self.times["time_train"]
                     / max(distributed.total(trained_tokens), 1))
        return stats

    def sync(self):
        """Push the updated policy into the engine, in place: the merged weights W + scale B A, or (weight_sync lora;
        auto outside float32) the adapter's A and B alone, served by vLLM's LoRA kernels (docs/performance.md)."""
        from peft import get_peft_model_state_dict

        if not self.engine_stale:  # no optimizer step since the last push (a skipped step, an empty sparse batch)
            return
        self.engine_stale = False
        with self.timed("time_sync"):
            if self.weight_sync == "lora":
                adapter = get_peft_model_state_dict(self.policy)
                self.engine.push_lora(adapter, self.policy.peft_config["default"].to_dict())
            else:
                self.engine.push_weights(merged_weights(self.policy, torch.bfloat16 if self.cfg.dtype == "bfloat16"
                                                        else None))

    @torch.no_grad()
    def evaluate(self):
        """Greedy completions of the evaluation prompts, scored by the run's rewards (with a 0/1 reward such
        as a math verifier, eval_reward_mean is the accuracy)."""
        first, count = distributed.shard(len(self.eval_prompts))  # under torchrun each rank takes its share
        prompts = self.eval_prompts[first : first + count]
        with self.timed("time_eval"):
            completions = self.engine.generate([p["token_ids"] for p in prompts], 1, 0,
                                               self.cfg.max_new_tokens, greedy=True)
            self.engine.sleep()
            rewards, parts = self._rewards(prompts, completions)  # timed as eval, not as the step's score
        lengths = distributed.gather(torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float))
        parts = {name: distributed.gather(values) for name, values in parts.items()}
        return {"eval_reward_mean": distributed.gather(rewards).mean().item(),
                **{f"eval_reward_{name}": values.mean().item() for name, values in parts.items()},
                "eval_response_length_mean": lengths.mean().item()}

    def log(self, step, rewards, completions, **metrics):
        """Write the step's metrics (metrics.jsonl, wandb, progress bar) and mark the step complete."""
        # under torchrun: the whole step's rewards and lengths (gathered), and the mean over the ranks of the rest
        rewards = distributed.gather(rewards)
        lengths = distributed.gather(torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float))
        truncated = distributed.gather(torch.tensor([c.truncated for c in completions], dtype=torch.float))
        self.times["time_step"] = time.perf_counter() - self.times.pop("step_start")
        # counters a reward function carries in a `metrics` dict (e.g. the math verifier's timeouts), read before
        # the evaluation scores its own completions (a per-call counter would then hold the evaluation's)
        reward_counters = {f"reward_{fn.__name__}_{k}": v for fn in self.rewards.functions
                           for k, v in getattr(fn, "metrics", {}).items()}
        if self.eval_prompts and (step == 1 or step % self.cfg.eval_every == 0 or step == self.total_steps):
            metrics.update(self.evaluate())
        row = {
            "step": step,
            "episodes": step * self.episodes_per_step,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "response_length_mean": lengths.mean().item(),
            "truncated_fraction": truncated.mean().item(),
            "prompts_skipped": self.prompts.skipped,
            "engine_builds": RolloutEngine.builds,
            "kl": None,  # stays null when there is no reference pass (kl_coef 0)
            "generate_tokens_per_second": self.times.pop("generated_tokens") / self.times["time_generate"],
            **reward_counters,
            **self.times,
            **metrics,
        }
        row.update(mean_over_ranks({k: v for k, v in row.items() if k not in ("reward_mean", "reward_std")}))
        for rate in ("generate_tokens_per_second", "train_tokens_per_second"):  # every rank works: the run's rate is
            if rate in row:                                                      # about the sum of theirs
                row[rate] *= self.world_size
        if not self.tracker:  # rank 0 writes the run folder
            return row
        self.tracker.log(row)
        if self.cfg.samples_every and self.scored and (step == 1 or step % self.cfg.samples_every == 0):
            self.tracker.log_samples(step, samples(*self.scored))  # rank 0's share: the step's first prompts
        return row
