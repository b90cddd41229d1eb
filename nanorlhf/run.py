"""One RLHF run, composed from the modules that do each job, in the order a step runs. Every algorithm script makes
a `Run` from its Config and calls, each step: `generate` -> `score` -> `batch` -> (its advantages) ->
`reference_logprobs` / `update` (with its loss) -> `sync` -> `log`, inside `for step in run.steps()`.

Where each job lives: the Config's checks (config.py), the run folder and --resume (run_folder.py), how a run stops
early and what it keeps (stopping.py), the rollout: completions, rewards, the Batch, the evaluation (rollout.py), the
update: micro-batches, log-probs, importance weights, canary, epochs (update.py), the engine (engine.py), the policy
and its LoRA (policy.py), checkpoints (checkpoint.py), metrics (tracking.py). The algorithm math is in the scripts.
"""

import os
import random
import shutil
import time
from contextlib import contextmanager

import numpy as np
import torch

from nanorlhf import console, distributed
from nanorlhf.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nanorlhf.config import as_dict, check_config
from nanorlhf.data import load_prompts, template_kwargs
from nanorlhf.engine import RolloutEngine, engine_lora_rank, engine_max_num_seqs, weight_sync_mode
from nanorlhf.errors import UserError
from nanorlhf.export import check_hub_credentials, export
from nanorlhf.gpu import check_dtype_supported, check_engine_memory, is_out_of_memory
from nanorlhf.logprobs import packing_works
from nanorlhf.multiturn import MultiTurn, Template, takes_tools
from nanorlhf.policy import adamw, device, evaluating, load_policy, merged_weights
from nanorlhf.rewards import build_rewards
from nanorlhf.rollout import Rollout, make_batch, samples, tool_metrics
from nanorlhf.run_folder import announce_resume, prepare_output_dir, resume_checkpoint
from nanorlhf.stopping import Stop
from nanorlhf.tasks import resolve
from nanorlhf.tools import Toolbox, environment_tools, load_environment, load_tools, schemas
from nanorlhf.tracking import Tracker
from nanorlhf.update import Update, cosine_schedule


class Run:
    def __init__(self, cfg, algo):
        self.cfg, self.algo, self.times = cfg, algo, {}
        self.world_size = distributed.world_size()
        self.total_steps = check_config(cfg, self.world_size)  # everything the user named is checked before
        self.episodes_per_step = cfg.prompts_per_step * cfg.group_size  # anything is written
        check_dtype_supported(cfg.dtype)  # a GPU without bf16 says so before the trainer loads
        distributed.setup()  # under torchrun: this process is one rank of the data-parallel group (else a no-op)
        console.say(f"{algo}: loading {cfg.model}" + ("" if cfg.verbose else
                    " (library output goes to run.log in the run folder; --verbose true shows it)"))
        if not cfg.verbose:
            console.start()  # see nanorlhf/console.py
        self.weight_sync = weight_sync_mode(cfg.weight_sync, cfg.dtype, device().type)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        model_name = self._load_inputs(cfg)
        checkpoint, changes = resume_checkpoint(cfg, self.world_size)
        # the run folder is rank 0's to tidy and write; the other ranks learn its path (and any error) from it
        self.output_dir = distributed.broadcast_from_main(
            lambda: prepare_output_dir(cfg, algo, checkpoint, self.world_size))
        console.attach(self.output_dir)
        console.say(f"run folder: {self.output_dir}")

        saved_rng = self._load_policy(model_name, checkpoint, changes)
        max_lora_rank = engine_lora_rank(cfg.lora_r) if self.weight_sync == "lora" else 0
        check_engine_memory(sum(p.numel() for p in self.policy.parameters() if not p.requires_grad), cfg.dtype,
                            cfg.vllm_gpu_memory)  # float32 on a small GPU: one sentence, not vLLM's start-up failure
        tp = cfg.vllm_tensor_parallel_size
        self.engine = RolloutEngine(model_name, self.max_model_len, cfg.dtype, cfg.vllm_gpu_memory, cfg.seed,
                                    max_lora_rank, external_launcher=self.world_size > 1,
                                    tp_group=distributed.tensor_parallel_group(tp),
                                    max_num_seqs=engine_max_num_seqs(cfg.prompts_per_step, cfg.group_size,
                                                                     self.world_size, len(self.eval_prompts), tp))
        multiturn = MultiTurn(self.engine, self.template, Toolbox(self.tools, cfg.tool_timeout, self.tokenizer,
                                                                 cfg.max_tool_response_tokens),
                              self.tools, cfg.max_turns, cfg.max_new_tokens, self.environment, cfg.max_prompt_tokens,
                              self.failed) if self.template else None
        self.rollout = Rollout(cfg, self.engine, self.optimizer, self.rewards, self.timed, self.times, self.failed,
                               multiturn)
        self.trainer = Update(cfg, self.policy, self.optimizer, self.scheduler, self.tokenizer.pad_token_id,
                              self.packed, self.timed, self.times)
        self.trainer.engine_stale = bool(checkpoint)  # the engine holds the base weights: push the resumed ones
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
        self.step, self.scored, self.closed = None, None, False  # the step running; its first scored batch (see log)
        # Ctrl-C and SIGTERM (a scheduler's preemption) finish the current step, save and exit: see steps()
        self.stop = Stop(self.output_dir, self.world_size, self.save, self.close)

    def _load_inputs(self, cfg):
        """The tokenizer, the rewards and the prompts: everything the user named, checked before anything is
        written. Returns the model's local path (a demo or real-model name resolved, see tasks.py)."""
        from transformers import AutoConfig, AutoTokenizer

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
        tool_schemas, in_template = self._load_tools(cfg)
        reward_model = cfg.reward_model
        own_reward = cfg.reward_fn or callable(getattr(self.environment, "reward", None))
        if own_reward and "reward_model" not in cfg.explicit:
            reward_model = ""  # --reward_fn (or reward()) alone replaces the default reward model; naming both combines
        self.rewards = build_rewards(resolve(reward_model) if reward_model != "none" else "", cfg.reward_fn,
                                     cfg.reward_weights, cfg.reward_timeout, self.environment)
        self.prompts, self.eval_prompts = load_prompts(cfg, self.tokenizer, resolve, tool_schemas, in_template)
        if cfg.push_to_hub:  # a missing login says so now, not after the training
            check_hub_credentials(cfg.push_to_hub)
        return model_name

    def _load_tools(self, cfg):
        """--tools and --environment: self.tools {name: function} ({} without), self.environment (the class, or None)
        and self.template, the chat template's tool turns (checked now, multiturn.py; None without either). Returns
        the schemas of every tool (the environment's methods last) and whether the chat template takes them."""
        self.tools = load_tools(cfg.tools) if cfg.tools else {}
        self.environment = load_environment(cfg.environment) if cfg.environment else None
        methods = environment_tools(self.environment) if self.environment else {}
        clash = sorted(set(self.tools) & set(methods))
        if clash:
            raise UserError(f"--tools and --environment both have a tool named {', '.join(clash)}; rename one")
        self.template = None
        if not self.tools and not self.environment:
            return None, True
        tool_schemas, kwargs = schemas({**self.tools, **methods}), template_kwargs(cfg.chat_template_kwargs)
        in_template = bool(tool_schemas) and takes_tools(self.tokenizer, tool_schemas, kwargs)
        if tool_schemas and not in_template:
            console.say(f"note: the chat template of {cfg.model} takes no tools: they are described in a system "
                        "message, in the Hermes <tool_call> format")
        self.template = Template(self.tokenizer, cfg.model, {**kwargs, **({"tools": tool_schemas} if in_template
                                                                           else {})})
        return tool_schemas, in_template

    def _load_policy(self, model_name, checkpoint, changes):
        """The policy with its LoRA adapter, the optimizer and the schedule, restored from `checkpoint` when resuming.
        Returns the checkpoint's random states (restored last, once the engine and wandb have drawn from them)."""
        cfg, saved_rng = self.cfg, None
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
        self.start_step = 1
        if checkpoint:
            progress, self.saved_modules, saved_rng = load_checkpoint(checkpoint, self.policy, self.optimizer,
                                                                      self.scheduler, device())
            self.start_step = progress["step"] + 1
            self.prompts.load_state(progress["data"])
            announce_resume(checkpoint, progress["step"], changes, self.output_dir)
        return saved_rng

    # --- what a script calls, in the order it calls it --------------------------------------------------

    def steps(self):
        """Yield step numbers; checkpoint every save_every steps and at the end. Ctrl-C or SIGTERM finishes the
        current step, saves a checkpoint and exits with status 130 or 143; a second one aborts at once.
        max_skipped_steps non-finite steps in a row (see update.py) stop the run with status 2."""
        cfg, stop = self.cfg, self.stop
        console.running = True
        try:
            for step in range(self.start_step, self.total_steps + 1):
                if step == self.start_step and stop.agreed():  # came before it (PPO's value initialisation)
                    stop.exit(f"stopped before step {step}; nothing new to save")
                self.times.clear()
                self.times["step_start"] = time.perf_counter()
                self.step, self.scored = step, None
                stop.begin(step, {"data": self.prompts.state(), "rng": rng_state()})
                self.trainer.begin(step)
                yield step
                stopping, skipped = stop.agreed(), self.trainer.skipped_in_a_row
                if stopping or skipped >= cfg.max_skipped_steps or step % cfg.save_every == 0 or \
                        step == self.total_steps:
                    saved = self.save(step)
                if skipped >= cfg.max_skipped_steps:
                    raise UserError(f"{skipped} steps in a row had a non-finite loss or gradient (the "
                                    f"last: step {step}), so the run stops (--max_skipped_steps {cfg.max_skipped_steps}); "
                                    f"{saved} holds the weights of the last finite step. Lower --learning_rate or "
                                    f"check the reward's scale, then --resume {self.output_dir}")
                if stopping:
                    stop.exit(f"saved {saved}; continue with --resume {self.output_dir}")
            self.step = None
            if self.start_step <= self.total_steps and cfg.export_model and distributed.is_main():
                model_dir = os.path.join(self.output_dir, "model")
                shutil.rmtree(model_dir, ignore_errors=True)  # a model exported by an earlier end of this run
                export(saved, model_dir, cfg.push_to_hub, self.algo)
                console.say(f"final model (LoRA merged, Hugging Face format): {model_dir}")
        finally:
            self.close()

    def generate(self, prompts, n, seed, with_greedy=False):
        """n completions per prompt (prompt-major); with_greedy: also one greedy completion per prompt (rollout.py)."""
        return self.rollout.generate(prompts, n, seed, with_greedy)

    def score(self, prompts, completions):
        """(rewards (N,), {reward name: (N,)}) for the completions of `prompts` (prompt-major)."""
        with self.timed("time_score"):
            rewards, parts = self.rollout.score(prompts, completions)
        if self.step is not None and self.scored is None:
            self.scored = prompts, completions, rewards, parts
        return rewards, parts

    def batch(self, prompts, completions, keep=None, **per_sample):
        """A Batch of the kept completions with their prompts and any (N,) or (N, ...) per-sample tensors."""
        return make_batch(prompts, completions, keep, **per_sample)

    def micro_batches(self, batch, grad=True):
        return self.trainer.micro_batches(batch, grad)

    def reference_logprobs(self, batch, temperature=None):
        return self.trainer.reference_logprobs(batch, temperature)

    def policy_logprobs(self, batch, temperature=None):
        return self.trainer.policy_logprobs(batch, temperature)

    def update(self, batch, loss_fn, epochs=1, temperature=None):
        """The step's optimizer steps with the script's loss (update.py says what loss_fn sees and returns)."""
        return self.trainer.update(batch, loss_fn, epochs, temperature)

    def sync(self):
        """Push the updated policy into the engine, in place: the merged weights W + scale B A, or (weight_sync lora;
        auto outside float32) the adapter's A and B alone, served by vLLM's LoRA kernels (docs/performance.md)."""
        from peft import get_peft_model_state_dict

        if not self.trainer.engine_stale:  # no optimizer step since the last push (a skipped step, an empty batch)
            return
        self.trainer.engine_stale = False
        with self.timed("time_sync"):
            if self.weight_sync == "lora":
                adapter = get_peft_model_state_dict(self.policy)
                self.engine.push_lora(adapter, self.policy.peft_config["default"].to_dict())
            else:
                self.engine.push_weights(merged_weights(self.policy, torch.bfloat16 if self.cfg.dtype == "bfloat16"
                                                        else None))

    def evaluate(self):
        return self.rollout.evaluate(self.eval_prompts)

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
            **tool_metrics(completions),
            **reward_counters,
            **self.times,
            **metrics,
        }
        row.update(distributed.mean_over_ranks({k: v for k, v in row.items() if k not in ("reward_mean", "reward_std")}))
        for rate in ("generate_tokens_per_second", "train_tokens_per_second"):  # every rank works: the run's rate is
            if rate in row:                                                      # about the sum of theirs
                row[rate] *= self.world_size
        if not self.tracker:  # rank 0 writes the run folder
            return row
        self.tracker.log(row)
        if self.cfg.samples_every and self.scored and (step == 1 or step % self.cfg.samples_every == 0):
            self.tracker.log_samples(step, samples(*self.scored))  # rank 0's share: the step's first prompts
        return row

    # --- keeping the run: checkpoints, stops, phases ----------------------------------------------------

    def stop_agreed(self):
        """Whether to stop here (Ctrl-C or SIGTERM), the same answer on every rank (stopping.py)."""
        return self.stop.agreed()

    def register(self, name, module):
        """Checkpoint `module` (e.g. a value head) with the run, and restore it now if resuming."""
        self.extra_modules[name] = module
        if name in self.saved_modules:
            module.load_state_dict(self.saved_modules[name])
        return module

    def save(self, step, snapshot=None):
        """checkpoint-<step> of the current weights, optimizer and scheduler; the data position and RNG are the
        current ones, or those of `snapshot` (taken at the start of step + 1, see stopping.py)."""
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
        """Save the last completed step for a run about to stop in the middle of a step, close the run, and say
        what was kept (stopping.py)."""
        return self.stop.failed(self.trainer.stepped, together)

    @contextmanager
    def timed(self, name):
        """Time a phase of the step into self.times[name]. Out of memory inside it stops the run with one sentence
        naming the phase and the field to lower, after saving the last completed step (stopping.py)."""
        start = time.perf_counter()
        try:
            yield
        except Exception as e:  # torch's OutOfMemoryError, or vLLM's allocator failing to wake (nanorlhf/gpu.py)
            if not is_out_of_memory(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise self.stop.out_of_memory(name, self.trainer.stepped) from None
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def close(self):
        """Restore the signal handlers, finish the metrics (plot, wandb, summary). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.stop.restore_handlers()
        if self.tracker:
            self.tracker.close()
        console.say(f"run folder: {self.output_dir}")
