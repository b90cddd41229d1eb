"""One command for whoever has a GPU: a few steps in the default configuration (bfloat16, gradient checkpointing,
LoRA r 64 with dropout 0.05 on all linear layers, up to 1500-token completions), checked, with PASS/FAIL lines.

  python benchmarks/gpu_check.py                  # the whole GRPO loop; needs the CUDA stack of requirements.txt
  python benchmarks/gpu_check.py --trainer_only   # the training phase alone: torch, transformers and peft only
  python benchmarks/gpu_check.py --self_test      # plant each defect below in turn: each check must fail on its own

Whole loop: GRPO/grpo.py's main() runs in this process on a small random model built locally (Qwen2 architecture,
`--shape`; or `--model <local folder>`) with a rule-based reward and an evaluation, and its real methods are watched:
  - the engine is built once; every push (merged: reload_weights, lora: _load_lora_tensors) comes after a wake of the
    weights alone and before the KV cache's wake; the engine's record of what sleeps is vLLM's after every call, an
    empty share of prompts after a push included (the engine sleeps through vLLM on a CPU too, where it frees nothing);
  - on a GPU: Adam's moments are off the GPU while the engine generates (state["step"] may stay: the fused AdamW keeps
    it there), and every sleep frees what the wake-ups before it mapped;
  - the logprob canary (engine vs trainer log-probs of the sampled tokens) stays under 0.02 on every step, and the
    importance weights trainer/sampler stay sane;
  - after the run, `--churn` large known adapters pushed through Run.sync: after each the engine's log-probs are the
    trainer's (a push one step stale would be far off) and vLLM holds exactly the newest adapter id;
  - peak trainer memory (vLLM's sleep-mode pool left out), seconds of each phase, pinned host memory.
Trainer only (`--trainer_only`, no vLLM, no download): reference + old log-probs + train of one step of
`--prompts_per_step` x `--group_size` sequences at Qwen2.5-1.5B's shape with random weights, loaded through
nanorlhf.policy.load_policy, with gradient checkpointing on and off: peak memory and seconds of each phase.
`--tiny` shrinks everything (and runs the whole loop in float32) so that the script runs in a minute on a CPU:
what tests/test_benchmarks.py runs.
"""

import contextlib
import gc
import json
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

import torch  # noqa: E402

from benchmarks.common import ROOT, add_output_flags, make_workdir, parser, settings, write_json  # noqa: E402
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
    p = parser(__doc__)
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
    p.add_argument("--weight_sync", default="auto", help="whole loop: auto (lora outside float32), merged or lora")
    p.add_argument("--churn", type=int, default=20, help="whole loop: large known adapters pushed after the run")
    p.add_argument("--self_test", action="store_true", help="plant each defect the checks look for, in turn, and "
                   "report which were caught (on a CPU: tiny sizes, --weight_sync lora)")
    add_output_flags(p, tiny="tiny sizes: runs in about a minute on a CPU",
                     workdir="where models and runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.self_test and not torch.cuda.is_available():
        args.tiny, args.weight_sync = True, "lora"  # the default GPU path's push, at sizes a CPU runs
    if args.tiny:
        args.shape, args.steps, args.prompts_per_step, args.group_size = "tiny", 2, 4, 2
        args.max_new_tokens, args.prompt_tokens, args.micro_batch_tokens, args.churn = 32, 16, 256, 3
    return args


class Report:
    def __init__(self, echo=True):
        self.lines, self.failed, self.echo = [], False, echo

    def check(self, name, ok, detail):
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        self.failed |= ok is False
        self.lines.append({"check": name, "status": status, "detail": detail})
        if self.echo:
            print(f"{status}  {name}: {detail}", flush=True)


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# --- the whole loop --------------------------------------------------------------------------------------------


def watch(cls, name, record, stack):
    """Wrap cls.name (until `stack` closes) so that every call is recorded (phase, seconds, peak trainer memory); the
    real method runs."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        reset_peak()
        pool = engine_pool_bytes()
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        peak = peak_gib()
        # vLLM's sleep-mode pool is counted as allocated by torch even while it sleeps: not the trainer's
        record(name, time.perf_counter() - start, peak and peak - pool / 2**30, args)
        return result

    stack.enter_context(mock.patch.object(cls, name, wrapper))


def engine_pool_bytes():
    """Bytes in vLLM's sleep-mode pool (awake or asleep): 0 without a CUDA vLLM."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator, cumem_available
    except ImportError:
        return 0
    return CuMemAllocator.get_instance().get_current_usage() if cumem_available and CuMemAllocator.instance else 0


def gpu_used_bytes():
    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def vllm_sleeping(llm):
    """What vLLM's executor records as asleep (in-process engine core)."""
    return set(llm.llm_engine.engine_core.engine_core.model_executor.sleeping_tags)


def rpc_name(method):
    return method if isinstance(method, str) else getattr(method, "__name__", str(method))


PUSHES = ("reload_weights", "_load_lora_tensors")  # the RPCs of push_weights (merged) and push_lora (lora)


def push_order_faults(sequence):
    """The pushes (either RPC) that do not come after a wake of the weights alone (the last sleep/wake before them) or
    whose next wake, generate or sleep is not the KV cache's wake or a sleep, as "call i: before -> push -> after";
    ["no push"] if none."""
    pushes = [i for i, (m, d) in enumerate(sequence) if m == "collective_rpc" and d in PUSHES]
    faults = [] if pushes else ["no push"]
    for i in pushes:
        before = [(m, d) for m, d in sequence[:i] if m in ("wake_up", "sleep")][-1:]
        after = [(m, d) for m, d in sequence[i + 1 :] if m in ("wake_up", "generate", "sleep")][:1]
        if before != [("wake_up", ["weights"])] or after not in ([("wake_up", ["kv_cache"])], [("sleep", None)], []):
            faults.append(f"call {i}: {before} -> {sequence[i][1]} -> {after}")
    return faults


def moments_on_device(states):
    """State entries of Adam (other than "step", which the fused AdamW keeps on the parameters' device by design) that
    are not on the host: what must be empty while the engine generates."""
    return [key for state in states for key, value in state.items()
            if torch.is_tensor(value) and key != "step" and value.device.type != "cpu"]


def sleeps_free_memory(events):
    """events: (method, used bytes before, used bytes after) of every vLLM sleep and wake_up. Each sleep must free at
    least 90% of what the wake-ups since the previous sleep mapped; at least one sleep followed a wake."""
    woken, checked, ok = 0, 0, True
    for method, before, after in events:
        if method == "wake_up":
            woken += after - before
        elif method == "sleep" and woken > 0:
            ok &= before - after >= 0.9 * woken
            woken, checked = 0, checked + 1
    return ok and checked > 0


def direct_push_check(run, churn, report):
    """Push `churn` large known adapters through the run's own sync, one after another; after each, the engine's
    log-probs of fixed sequences must be the trainer's (a push one step stale gives the previous adapter's, far off),
    and with --weight_sync lora vLLM must hold exactly the newest adapter id, one more per push."""
    from vllm import SamplingParams

    from nanorlhf.logprobs import completion_logprobs
    from nanorlhf.policy import evaluating

    engine, policy = run.engine, run.policy
    generator = torch.Generator().manual_seed(1)
    vocab = min(policy.config.vocab_size, 1000)
    prompts = torch.randint(10, vocab, (4, 12), generator=generator).tolist()
    completions = torch.randint(10, vocab, (4, 12), generator=generator).tolist()
    params = {n: p for n, p in policy.named_parameters() if "lora_B" in n}
    saved = {n: p.detach().clone() for n, p in params.items()}
    gaps, shifts, ids_ok, first_id = [], [], True, engine.lora_request and engine.lora_request.lora_int_id
    previous = None
    for push in range(churn):
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=generator).to(p) * 0.5)
        (run.trainer if hasattr(run, "trainer") else run).engine_stale = True
        run.sync()
        engine.wake_up()  # the KV cache too: vLLM schedules nothing while any of it sleeps
        outputs = engine.llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompts, completions)],
                                      SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
                                      lora_request=engine.lora_request)
        engine.sleep()
        served = torch.tensor([out.prompt_logprobs[len(p) + t][c[t]].logprob for out, p, c in
                               zip(outputs, prompts, completions) for t in range(len(c))])
        with evaluating(policy):
            out = completion_logprobs(policy, prompts, completions, 0)
        trainer = out["logprobs"][out["mask"]].float().cpu()
        gaps.append((served - trainer).abs().mean().item())
        if previous is not None:
            shifts.append((trainer - previous).abs().mean().item())  # how far apart two pushes are
        previous = trainer
        if engine.lora_request is not None:
            manager = engine.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
                .model_runner.lora_manager
            ids_ok &= set(manager.list_adapters()) == {engine.lora_request.lora_int_id} == {(first_id or 0) + push + 1}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    served_newest = max(gaps) < CANARY and min(shifts, default=1) > 10 * CANARY and ids_ok
    report.check("engine serves the newest push", served_newest,
                 f"{churn} large known adapters pushed through Run.sync: engine vs trainer log-probs "
                 f"{', '.join(f'{g:.4f}' for g in gaps)} (< {CANARY}); two pushes apart by "
                 f"{min(shifts, default=float('nan')):.2f} (a stale push would show that much)"
                 + ("; vLLM holds exactly the newest adapter id" if engine.lora_request else "; merged weights")
                 + ("" if ids_ok else ": NOT the newest adapter id alone"))


def whole_loop(args, workdir, report, plant=None):
    """The GRPO loop with its real methods watched; `plant`: a context manager that plants a defect (self-test)."""
    from nanorlhf.engine import RolloutEngine
    from nanorlhf.run import Run
    from nanorlhf.tiny import build_policy_at_shape

    grpo = load_module(os.path.join(ROOT, "GRPO", "grpo.py"))
    os.makedirs(workdir, exist_ok=True)
    model = args.model
    if not model:
        hidden, layers, vocab = SHAPES[args.shape]
        model = os.path.join(workdir, f"model-{args.shape}")
        if not os.path.exists(os.path.join(model, "config.json")):
            build_policy_at_shape(model, hidden, layers, vocab, 4096)
    data = os.path.join(workdir, "prompts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": f"Tell a long story about the number {i}."}) + "\n" for i in range(512))
    with open(os.path.join(workdir, "reward.py"), "w") as f:  # any text, scored by its share of the letter e
        f.write("def score(prompts, completions, **_):\n"
                "    return [c.count('e') / max(len(c), 1) for c in completions]\n")
    episodes = args.steps * args.prompts_per_step * args.group_size
    cfg = grpo.Config(model=model, reward_model="none", reward_fn=os.path.join(workdir, "reward.py") + ":score",
                      dataset=data, prompt_field="prompt", total_episodes=episodes,
                      prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, micro_batch_tokens=args.micro_batch_tokens,
                      learning_rate=args.learning_rate, output_dir=os.path.join(workdir, "grpo"), overwrite=True,
                      wandb=False, save_every=10**6, weight_sync=args.weight_sync,
                      eval_every=args.steps, eval_dataset=data, eval_limit=args.prompts_per_step)  # evaluation too
    cfg.explicit = set()
    if args.tiny:  # a check that the script runs, in seconds: CPUs without AVX-512 crawl through bf16 matmuls
        cfg.dtype = "float32"

    phases, vllm_calls, memory_events, state, fidelity, records = [], [], [], {}, [], []

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

    def wrap_llm(llm, method):
        original = getattr(llm, method)

        def wrapper(*a, **kw):
            before = gpu_used_bytes()
            result = original(*a, **kw)
            after = gpu_used_bytes()
            detail = kw.get("tags") if method == "wake_up" else (rpc_name(a[0]) if method == "collective_rpc" else None)
            vllm_calls.append((method, detail, after / 2**30))
            if method in ("sleep", "wake_up"):
                memory_events.append((method, before, after))
            if method == "generate" and "run" in state:  # is Adam's state off the GPU right now?
                state.setdefault("on_device", []).extend(moments_on_device(state["run"].optimizer.state.values()))
            return result

        setattr(llm, method, wrapper)

    def engine_call(name):  # after every engine call: is the engine's record of what sleeps vLLM's?
        original = getattr(RolloutEngine, name)

        def wrapper(engine, *a, **kw):
            result = original(engine, *a, **kw)
            records.append((name, set(engine.sleeping), vllm_sleeping(engine.llm)))
            return result

        return wrapper

    original_init = RolloutEngine.__init__

    def engine_init(engine, *a, **kw):
        kw["sleep_mode"] = True  # on a CPU too: vLLM's sleep frees nothing there but keeps its record of what sleeps
        original_init(engine, *a, **kw)
        for method in ("sleep", "wake_up", "collective_rpc", "generate"):
            wrap_llm(engine.llm, method)

    original_run_init = Run.__init__

    def run_init(run, *a, **kw):
        original_run_init(run, *a, **kw)
        state["run"] = run

    with contextlib.ExitStack() as stack:
        for name in ("generate", "reference_logprobs", "update", "sync"):
            watch(Run, name, record, stack)
        stack.enter_context(mock.patch.object(RolloutEngine, "__init__", engine_init))
        stack.enter_context(mock.patch.object(RolloutEngine, "builds", 0))
        stack.enter_context(mock.patch.object(Run, "__init__", run_init))
        if plant:
            stack.enter_context(plant())
        for name in ("generate", "push_weights", "push_lora", "sleep"):  # around the planted versions
            stack.enter_context(mock.patch.object(RolloutEngine, name, engine_call(name)))
        grpo.main(cfg)
        with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        run = state["run"]
        # an empty share of prompts right after a push (a torchrun rank, a refill round, an evaluation shard)
        (run.trainer if hasattr(run, "trainer") else run).engine_stale = True
        run.sync()
        run.generate([], args.group_size, 0)
        direct_push_check(run, args.churn, report)

    report.check("engine built once", all(r["engine_builds"] == 1 for r in rows),
                 f"engine_builds {[r['engine_builds'] for r in rows]}")
    sequence = [(m, d) for m, d, _ in vllm_calls]
    faults = push_order_faults(sequence)
    report.check("sleep/wake + push order", not faults, "; ".join(faults[:3]) if faults else
                 f"{sum(m == 'collective_rpc' and d in PUSHES for m, d in sequence)} pushes: "
                 + " -> ".join(f"{m}({d})" if d else m for m, d in sequence[:12]) + " ...")
    wrong = [(name, mine, theirs) for name, mine, theirs in records if mine != theirs]
    report.check("engine's sleep record is vLLM's", bool(records) and not wrong,
                 f"after {len(records)} engine calls, an empty share after a push included"
                 + (f"; first wrong after {wrong[0][0]}: engine {sorted(wrong[0][1])}, vLLM {sorted(wrong[0][2])}"
                    if wrong else ""))
    if torch.cuda.is_available():
        on_device = state.get("on_device", [])
        report.check("optimizer state off the GPU while generating", not on_device,
                     f"Adam's moments on the host during every generate call (step may stay): {sorted(set(on_device))}")
        report.check("sleep frees the engine's memory", sleeps_free_memory(memory_events),
                     "; ".join(f"{m} {(a - b) / 2**30:+.2f} GiB" for m, b, a in memory_events[:8]))
    else:
        report.check("optimizer state off the GPU while generating", None, "no GPU: the self-test checks its predicate")
        report.check("sleep frees the engine's memory", None, "vLLM's sleep frees nothing on a CPU")
    canary = [r["logprob_diff"] for r in rows]
    report.check("logprob canary", max(canary) < CANARY, f"{', '.join(f'{c:.4f}' for c in canary)} (< {CANARY})")
    ratios = [(r["is_ratio_mean"], r["is_ratio_max"], r["is_clipped_fraction"]) for r in rows]
    report.check("importance weights", all(0.5 < m < 1.5 and c < 0.05 for m, _, c in ratios),
                 "; ".join(f"mean {m:.3f} max {x:.2f} clipped {c:.4f}" for m, x, c in ratios))
    moved = fidelity[1:]  # at step 1 the policy is the base: nothing has moved yet
    report.check("update fidelity", bool(moved) and min(moved) > 0.5,
                 f"correlation of the engine's and the trainer's log-prob change from the base, per sampled token, "
                 f"steps 2..: {', '.join(f'{c:.3f}' for c in moved)} (> 0.5; scale-free: the direct check above is "
                 "the one that sees a stale push)")
    report.check("losses finite", all(r["loss"] == r["loss"] and abs(r["loss"]) < float("inf") for r in rows),
                 f"{[round(r['loss'], 5) for r in rows]}")
    report.check("evaluation ran", any("eval_reward_mean" in r for r in rows),
                 f"eval_reward_mean {[r.get('eval_reward_mean') for r in rows]}")
    for name in ("generate", "reference_logprobs", "update", "sync"):
        calls = [p for p in phases if p["phase"] == name]
        peaks = [p["trainer_peak_gib"] for p in calls if p["trainer_peak_gib"] is not None]
        report.check(f"phase {name}", None, f"{sum(p['seconds'] for p in calls) / max(len(calls), 1):.2f} s per call"
                     + (f", trainer peak {max(peaks):.1f} GiB (vLLM's pool left out)" if peaks else ""))
    if torch.cuda.is_available():
        used = [u for m, _, u in vllm_calls if m == "generate"]
        report.check("GPU memory in use at the end of generate", None, f"{max(used):.1f} GiB (engine + trainer)")
        if hasattr(torch.cuda, "host_memory_stats"):  # pinned host memory: sleep's backups, Adam's moments
            stats = torch.cuda.host_memory_stats()
            report.check("pinned host memory", None, f"reserved {stats.get('reserved_bytes.current', 0) / 2**30:.2f}"
                         f" GiB, peak {stats.get('reserved_bytes.peak', 0) / 2**30:.2f} GiB after {len(rows)} steps")
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


def time_phases(row, path, checkpointing, prompts, completions, advantages, batches):
    """One step's reference, old log-probs and train phases of a policy loaded with or without gradient checkpointing,
    twice (the second round is timed: the first pays for kernel selection and Adam's state): seconds and peak memory
    of each into `row`. The policy and its optimizer go when this returns."""
    from nanorlhf.logprobs import completion_logprobs
    from nanorlhf.policy import device, evaluating, load_policy

    grpo = load_module(os.path.join(ROOT, "GRPO", "grpo.py"))
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
                                        0.2, 0.0, "sequence", len(prompts))
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        timed("reference", lambda: no_grad_pass(True))
        timed("old_logprobs", lambda: no_grad_pass(False))
        timed("train", train)


def trainer_only(args, workdir, report):
    from nanorlhf.logprobs import token_budget_batches

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
        try:
            time_phases(row, path, checkpointing, prompts, completions, advantages, batches)
            row["train_tokens_per_second"] = tokens / row["train_seconds"]
        except torch.OutOfMemoryError:
            row["oom"] = True
        results.append(row)
        gc.collect()  # the policy is gone: the next one takes its memory
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
        lower = off.get("oom") or on["train_peak_gib"] < off["train_peak_gib"]
        report.check("checkpointing lowers the training peak", lower,
                     f"{on['train_peak_gib']:.1f} GiB on vs {off_text} off")
    return {"trainer": results}


# --- the self-test: each defect the checks look for, planted in turn ------------------------------------------------


@contextlib.contextmanager
def planted(cls, name, make):
    """Replace cls.name with make(original) while the context lasts."""
    with mock.patch.object(cls, name, make(getattr(cls, name))):
        yield


def plant_rebuild():  # what rebuilding the engine at every push does to the counter the metrics log
    from nanorlhf.engine import RolloutEngine
    from nanorlhf.run import Run

    def make(sync):
        def rebuilding_sync(self):
            sync(self)
            RolloutEngine.builds += 1
        return rebuilding_sync
    return planted(Run, "sync", make)


def plant_push_asleep():  # a push while the engine's weights sleep: the weights-only wake dropped
    from nanorlhf.engine import SLEEP_TAGS, RolloutEngine

    return planted(RolloutEngine, "wake_up", lambda wake: lambda self, tags=SLEEP_TAGS:
                   None if list(tags) == ["weights"] else wake(self, tags))


def plant_old_sleep():  # issue 29 item 7: sleep() marks everything asleep without sleeping the weights a push woke
    from nanorlhf.engine import SLEEP_TAGS, RolloutEngine

    def make(_):
        def sleep(self):
            if self.sleep_mode and not self.sleeping:
                self.llm.sleep(level=1)
            self.sleeping = set(SLEEP_TAGS)
        return sleep
    return planted(RolloutEngine, "sleep", make)


def plant_temperature():  # the engine samples at half the run's temperature: not the distribution the trainer scores
    import inspect

    from nanorlhf.engine import RolloutEngine

    def make(generate):
        signature = inspect.signature(generate)

        def colder(self, *a, **kw):
            bound = signature.bind(self, *a, **kw)
            bound.apply_defaults()
            bound.arguments["temperature"] *= 0.5
            return generate(*bound.args, **bound.kwargs)
        return colder
    return planted(RolloutEngine, "generate", make)


def plant_stale_push():  # every push one step stale: the engine gets the adapter (or weights) of the push before
    from nanorlhf.engine import RolloutEngine

    previous = {}
    stack = contextlib.ExitStack()

    def lora(push):
        def stale(self, tensors, config):
            current = {k: v.detach().clone() for k, v in tensors.items()}
            push(self, previous.get("lora", current), config)
            previous["lora"] = current
        return stale

    def merged(push):
        def stale(self, named):
            current = [(k, v.detach().clone()) for k, v in named]
            push(self, previous.get("merged", current))
            previous["merged"] = current
        return stale
    stack.enter_context(planted(RolloutEngine, "push_lora", lora))
    stack.enter_context(planted(RolloutEngine, "push_weights", merged))
    return stack


# check -> (the defect planted, the plant: a context manager factory for the whole loop, or None: a predicate test)
PLANTS = {
    "engine built once": ("the engine rebuilt at every push (the counter a rebuild bumps)", plant_rebuild),
    "sleep/wake + push order": ("each push with the engine's weights asleep (weights-only wake dropped)",
                                plant_push_asleep),
    "engine's sleep record is vLLM's": (("sleep() after a push and an empty share marks the woken weights asleep "
                                         "without sleeping them (issue 29 item 7)"), plant_old_sleep),
    "logprob canary": ("the engine samples at half the run's temperature", plant_temperature),
    "engine serves the newest push": ("every push one step stale (the previous adapter)", plant_stale_push),
    "optimizer state off the GPU while generating": (("exp_avg left on the device (a meta tensor stands in for the "
                                                      "GPU; step alone on the device passes)"), None),
    "sleep frees the engine's memory": ("a sleep that frees nothing (a recorded GPU trace, planted)", None),
}


def predicate_self_test(name):
    """The checks a CPU cannot run, on planted inputs: (clean input passes, planted input fails)."""
    if name == "optimizer state off the GPU while generating":
        clean = [{"step": torch.zeros((), device="meta"), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}]
        bad = [{"step": torch.zeros(()), "exp_avg": torch.zeros(2, device="meta"), "exp_avg_sq": torch.zeros(2)}]
        return not moments_on_device(clean), bool(moments_on_device(bad))
    gib = 2**30
    clean = [("wake_up", 10 * gib, 13 * gib), ("wake_up", 13 * gib, 20 * gib), ("sleep", 20 * gib, 10.1 * gib)]
    bad = clean[:2] + [("sleep", 20 * gib, 20 * gib)]
    return sleeps_free_memory(clean), not sleeps_free_memory(bad)


def self_test(args, workdir):
    """Run the clean loop (every check must pass), then each plant: its check must fail. One line per check."""
    quiet = Report(echo=False)
    whole_loop(args, os.path.join(workdir, "clean"), quiet)
    clean = {line["check"]: line["status"] for line in quiet.lines}
    caught, results, runs = 0, [], {}
    for name, (defect, plant) in PLANTS.items():
        if plant is None:
            passes, fails = predicate_self_test(name)
            ok, how = passes and fails, "predicate"
        else:
            if plant not in runs:
                report = Report(echo=False)
                try:
                    whole_loop(args, os.path.join(workdir, plant.__name__), report, plant)
                    runs[plant] = {line["check"]: line["status"] for line in report.lines}
                except Exception as e:  # noqa: BLE001  (a defect that crashes the run is caught too, but say so)
                    runs[plant] = {"crash": f"{type(e).__name__}: {e}"}
            status = runs[plant].get(name, "crashed: " + runs[plant].get("crash", "?"))
            ok, how = clean.get(name) == "PASS" and status == "FAIL", f"clean {clean.get(name)}, planted {status}"
        caught += ok
        results.append({"check": name, "defect": defect, "caught": ok, "how": how})
        print(f"{'caught' if ok else 'MISSED'}  {name}: planted {defect} ({how})", flush=True)
    print(f"self-test: {caught} of {len(PLANTS)} planted defects caught", flush=True)
    return caught == len(PLANTS), {"self_test": results, "clean": clean}


def main(argv=None):
    args = parse_args(argv)
    workdir = make_workdir(args, "gpu_check-")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}; workdir {workdir}", flush=True)
    report = Report()
    if args.self_test:
        passed, result = self_test(args, workdir)
        report.failed = not passed
    else:
        result = (trainer_only if args.trainer_only else whole_loop)(args, workdir, report)
    if args.json:
        write_json(args.json, {"device": device_name, "torch": torch.__version__,
                               "args": settings(args, ("json", "workdir")), "checks": report.lines, **result})
    print("FAIL" if report.failed else "PASS", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
