"""One command for whoever has a GPU: a few steps in the default configuration (bfloat16, gradient checkpointing,
LoRA r 64 with dropout 0.05 on all linear layers, up to 1500-token completions), checked, with PASS/FAIL lines.

  python benchmarks/gpu_check.py                  # the whole GRPO loop; needs the CUDA stack of requirements.txt
  python benchmarks/gpu_check.py --trainer_only   # the training phase alone: torch, transformers and peft only

Whole loop: GRPO/grpo.py's main() runs in this process on a small random model built locally (Qwen2 architecture,
`--shape`; or `--model <local folder>`) with a rule-based reward, and its real methods are watched, not replaced:
  - the engine is built once, and around every weight push it wakes the weights, pushes, then wakes the KV cache
    (on a CPU vLLM's sleep is a no-op: SKIP);
  - the trainer's optimizer state is off the GPU while the engine generates;
  - the logprob canary (engine vs trainer log-probs of the sampled tokens) stays under 0.02 on every step, and the
    importance weights trainer/sampler stay sane;
  - the policy learns something the engine sees: the engine's log-prob of a fixed set of completions moves with
    the trainer's (update fidelity: correlation of the per-token change across the run);
  - peak GPU memory and seconds of each phase (generate, reference, old log-probs, train, sync).
Trainer only (`--trainer_only`, no vLLM, no download): reference + old log-probs + train of one step of
`--prompts_per_step` x `--group_size` sequences at Qwen2.5-1.5B's shape with random weights, loaded through
nanorlhf.policy.load_policy, with gradient checkpointing on and off: peak memory and seconds of each phase.
`--tiny` shrinks everything (and runs the whole loop in float32) so that the script runs in a minute on a CPU:
what tests/test_benchmarks.py runs.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from nanorlhf.config import load_module  # noqa: E402

CANARY = 0.02  # bf16 engine vs bf16 trainer: 0.001-0.002 at a 32k-vocabulary shape (tests/test_user_config_e2e.py)
SHAPES = {  # hidden, layers, vocab: Qwen2 architecture, head size 64
    "small": (1024, 8, 32768),
    "qwen2.5-1.5b": (1536, 28, 151936),
    "tiny": (128, 2, 4096),
}
QWEN25_1P5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                   tie_word_embeddings=True, rope_theta=1000000.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer_only", action="store_true", help="training phase only: torch, transformers, peft")
    p.add_argument("--model", default="", help="a local model folder (default: a random model of --shape)")
    p.add_argument("--shape", default="small", choices=SHAPES, help="random model built for the whole-loop check")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps of the whole-loop check")
    p.add_argument("--prompts_per_step", type=int, default=16)
    p.add_argument("--group_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=1500)
    p.add_argument("--prompt_tokens", type=int, default=200, help="trainer only: prompt length")
    p.add_argument("--micro_batch_tokens", type=int, default=8192)
    p.add_argument("--learning_rate", type=float, default=1e-4, help="whole loop: high enough to move in 3 steps")
    p.add_argument("--workdir", default="", help="where models and runs go (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: runs in about a minute on a CPU")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.steps, args.prompts_per_step, args.group_size = "tiny", 2, 4, 2
        args.max_new_tokens, args.prompt_tokens, args.micro_batch_tokens = 32, 16, 256
    return args


class Report:
    def __init__(self):
        self.lines, self.failed = [], False

    def check(self, name, ok, detail):
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        self.failed |= ok is False
        self.lines.append({"check": name, "status": status, "detail": detail})
        print(f"{status}  {name}: {detail}", flush=True)


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# --- the whole loop --------------------------------------------------------------------------------------------


def watch(cls, name, record):
    """Wrap cls.name so that every call is recorded (phase, seconds, peak trainer memory); the real method runs."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        reset_peak()
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        record(name, time.perf_counter() - start, peak_gib(), args)
        return result

    setattr(cls, name, wrapper)


def whole_loop(args, workdir, report):
    from nanorlhf.engine import RolloutEngine
    from nanorlhf.run import Run
    from nanorlhf.tiny import build_policy_at_shape

    grpo = load_module(os.path.join(ROOT, "GRPO", "grpo.py"))
    model = args.model
    if not model:
        hidden, layers, vocab = SHAPES[args.shape]
        model = build_policy_at_shape(os.path.join(workdir, f"model-{args.shape}"), hidden, layers, vocab, 4096)
    data = os.path.join(workdir, "prompts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": f"Tell a long story about the number {i}."}) + "\n" for i in range(512))
    with open(os.path.join(workdir, "reward.py"), "w") as f:  # any text, scored by its share of the letter e
        f.write("def score(prompts, completions, **_):\n    return [c.count('e') / max(len(c), 1) for c in completions]\n")
    episodes = args.steps * args.prompts_per_step * args.group_size
    cfg = grpo.Config(model=model, reward_model="none", reward_fn=os.path.join(workdir, "reward.py") + ":score",
                      dataset=data, prompt_field="prompt", total_episodes=episodes,
                      prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, micro_batch_tokens=args.micro_batch_tokens,
                      learning_rate=args.learning_rate, output_dir=os.path.join(workdir, "grpo"), overwrite=True, wandb=False,
                      save_every=10**6)
    cfg.explicit = set()
    if args.tiny:  # a check that the script runs, in seconds: CPUs without AVX-512 crawl through bf16 matmuls
        cfg.dtype = "float32"

    phases, vllm_calls, state, fidelity = [], [], {}, []

    def record(name, seconds, peak, call_args):
        phases.append({"phase": name, "seconds": seconds, "trainer_peak_gib": peak})
        batch = call_args[0] if name == "update" else None
        if batch is not None and batch.get("ref_logprobs") is not None:
            # how far the policy has moved from the base on each sampled token, seen by the engine (vLLM's log-prob)
            # and by the trainer (its log-prob before this update): a lost update leaves the engine at the base
            mask = batch.old_logprobs != 0
            engine = (batch.vllm_logprobs.to(mask.device) - batch.ref_logprobs)[mask]
            trainer = (batch.old_logprobs - batch.ref_logprobs)[mask]
            fidelity.append(torch.corrcoef(torch.stack([engine, trainer]))[0, 1].item())

    for name in ("generate", "reference_logprobs", "update", "sync"):
        watch(Run, name, record)
    original_init = RolloutEngine.__init__

    def engine_init(engine, *a, **kw):
        original_init(engine, *a, **kw)
        for method in ("sleep", "wake_up", "collective_rpc", "generate"):
            wrap_llm(engine.llm, method)

    def wrap_llm(llm, method):
        original = getattr(llm, method)

        def wrapper(*a, **kw):
            result = original(*a, **kw)
            free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
            detail = kw.get("tags") if method == "wake_up" else (a[0] if method == "collective_rpc" else None)
            vllm_calls.append((method, detail, (total - free) / 2**30))
            if method == "generate" and "run" in state:  # is Adam's state off the GPU right now?
                state["optimizer_on_gpu"] = state.get("optimizer_on_gpu", False) or any(
                    v.is_cuda for s in state["run"].optimizer.state.values() for v in s.values() if torch.is_tensor(v))
            return result

        setattr(llm, method, wrapper)

    RolloutEngine.__init__ = engine_init
    original_run_init = Run.__init__

    def run_init(run, *a, **kw):
        original_run_init(run, *a, **kw)
        state["run"] = run

    Run.__init__ = run_init
    grpo.main(cfg)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]

    report.check("engine built once", all(r["engine_builds"] == 1 for r in rows),
                 f"engine_builds {[r['engine_builds'] for r in rows]}")
    sequence = [(m, d) for m, d, _ in vllm_calls]
    if torch.cuda.is_available():
        ok = True
        for i, (method, detail) in enumerate(sequence):
            if method == "collective_rpc" and detail == "reload_weights":
                before = [d for m, d in sequence[:i] if m in ("wake_up", "sleep")][-1:]
                after = [d for m, d in sequence[i + 1 :] if m in ("wake_up", "generate")][:1]
                ok &= before == [["weights"]] and after == [["kv_cache"]]
        report.check("sleep/wake + push order", ok, " -> ".join(f"{m}({d})" if d else m for m, d in sequence[:12]))
    else:
        report.check("sleep/wake + push order", None, "vLLM's sleep is a no-op on a CPU")
    report.check("optimizer state off the GPU while generating", None if not torch.cuda.is_available() else
                 not state.get("optimizer_on_gpu", False), "AdamW moments on the CPU during every generate call")
    canary = [r["logprob_diff"] for r in rows]
    report.check("logprob canary", max(canary) < CANARY, f"{', '.join(f'{c:.4f}' for c in canary)} (< {CANARY})")
    ratios = [(r["is_ratio_mean"], r["is_ratio_max"], r["is_clipped_fraction"]) for r in rows]
    report.check("importance weights", all(0.5 < m < 1.5 and c < 0.05 for m, _, c in ratios),
                 "; ".join(f"mean {m:.3f} max {x:.2f} clipped {c:.4f}" for m, x, c in ratios))
    moved = fidelity[1:]  # at step 1 the policy is the base: nothing has moved yet
    report.check("update fidelity", bool(moved) and min(moved) > 0.5,
                 f"correlation of the engine's and the trainer's log-prob change from the base, per sampled token, "
                 f"steps 2..: {', '.join(f'{c:.3f}' for c in moved)} (> 0.5)")
    report.check("losses finite", all(r["loss"] == r["loss"] and abs(r["loss"]) < float("inf") for r in rows),
                 f"{[round(r['loss'], 5) for r in rows]}")
    for name in ("generate", "reference_logprobs", "update", "sync"):
        calls = [p for p in phases if p["phase"] == name]
        peaks = [p["trainer_peak_gib"] for p in calls if p["trainer_peak_gib"] is not None]
        report.check(f"phase {name}", None, f"{sum(p['seconds'] for p in calls) / max(len(calls), 1):.2f} s per call"
                     + (f", trainer peak {max(peaks):.1f} GiB" if peaks else ""))
    if torch.cuda.is_available():
        used = [u for m, _, u in vllm_calls if m == "generate"]
        report.check("GPU memory in use at the end of generate", None, f"{max(used):.1f} GiB (engine + trainer)")
    return {"metrics": rows, "phases": phases, "vllm_calls": vllm_calls}


# --- the training phase alone ------------------------------------------------------------------------------------


def random_model(path, tiny):
    """Qwen2.5-1.5B's architecture (or a tiny one) with random bf16 weights, saved where load_policy can read it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not os.path.exists(os.path.join(path, "config.json")):
        shape = dict(QWEN25_1P5B, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=256, vocab_size=4096) if tiny else QWEN25_1P5B
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
    return path


def trainer_only(args, workdir, report):
    from nanorlhf.logprobs import completion_logprobs, token_budget_batches
    from nanorlhf.policy import device, evaluating, load_policy

    grpo = load_module(os.path.join(ROOT, "GRPO", "grpo.py"))
    path = random_model(os.path.join(workdir, "random-qwen2.5-1.5b" if not args.tiny else "random-tiny"), args.tiny)
    n = args.prompts_per_step * args.group_size
    generator = torch.Generator().manual_seed(0)
    vocab = 4096 if args.tiny else QWEN25_1P5B["vocab_size"]
    prompts = torch.randint(vocab, (n, args.prompt_tokens), generator=generator).tolist()
    completions = torch.randint(vocab, (n, args.max_new_tokens), generator=generator).tolist()
    advantages = torch.randn(n, generator=generator)
    batches = token_budget_batches([args.prompt_tokens + args.max_new_tokens] * n, args.micro_batch_tokens)
    tokens = n * (args.prompt_tokens + args.max_new_tokens)
    results = []
    for checkpointing in (True, False):
        row = {"gradient_checkpointing": checkpointing, "sequences": n, "tokens": tokens,
               "micro_batches": len(batches)}
        policy = load_policy(path, 64, 16, 0.05, "all-linear", "bfloat16", checkpointing)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)

        def timed(phase, fn):
            reset_peak()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row[f"{phase}_seconds"] = time.perf_counter() - start
            row[f"{phase}_peak_gib"] = peak_gib()

        def no_grad_pass(reference):
            with evaluating(policy):
                for idx in batches:
                    if reference:
                        with policy.disable_adapter():
                            completion_logprobs(policy, [prompts[i] for i in idx], [completions[i] for i in idx], 0)
                    else:
                        completion_logprobs(policy, [prompts[i] for i in idx], [completions[i] for i in idx], 0,
                                            0.9, sampling=(0.9, 0.95))

        def train():
            for idx in batches:
                out = completion_logprobs(policy, [prompts[i] for i in idx], [completions[i] for i in idx], 0, 0.9)
                old = out["logprobs"].detach()
                loss, _ = grpo.compute_loss(out["logprobs"], old, None, advantages[idx].to(device()), out["mask"],
                                            0.2, 0.0, "sequence", n)
                loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            for _ in range(2):  # the second round is timed: the first pays for kernel selection and Adam's state
                timed("reference", lambda: no_grad_pass(True))
                timed("old_logprobs", lambda: no_grad_pass(False))
                timed("train", train)
            row["train_tokens_per_second"] = tokens / row["train_seconds"]
        except torch.OutOfMemoryError:
            row["oom"] = True
        results.append(row)
        del policy, optimizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        label = f"gradient checkpointing {'on' if checkpointing else 'off'}"
        if row.get("oom"):
            report.check(f"trainer, {label}", None if not checkpointing else False, "out of memory")
        else:
            memory = (f", peak {row['reference_peak_gib']:.1f} / {row['old_logprobs_peak_gib']:.1f} / "
                      f"{row['train_peak_gib']:.1f} GiB" if torch.cuda.is_available() else "")
            report.check(f"trainer, {label}", None, f"{n} x ({args.prompt_tokens} + {args.max_new_tokens}) tokens in "
                         f"{len(batches)} micro-batches: reference {row['reference_seconds']:.2f} s, old log-probs "
                         f"{row['old_logprobs_seconds']:.2f} s, train {row['train_seconds']:.2f} s "
                         f"({row['train_tokens_per_second']:.0f} tokens/s){memory}")
    on, off = results
    if torch.cuda.is_available() and not on.get("oom"):
        off_text = "OOM" if off.get("oom") else f"{off['train_peak_gib']:.1f} GiB"
        report.check("checkpointing lowers the training peak", off.get("oom") or on["train_peak_gib"] < off["train_peak_gib"],
                     f"{on['train_peak_gib']:.1f} GiB on vs {off_text} off")
    return {"trainer": results}


def main(argv=None):
    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(workdir, exist_ok=True)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}; workdir {workdir}", flush=True)
    report = Report()
    result = (trainer_only if args.trainer_only else whole_loop)(args, workdir, report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")}, "checks": report.lines,
                       **result}, f, indent=1)
    print("FAIL" if report.failed else "PASS", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
