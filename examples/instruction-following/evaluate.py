"""Greedy constraint accuracy of a model on the evaluation files, overall and per constraint type.

    python examples/instruction-following/evaluate.py --model smollm2-135m-instruct --data DIR
    python examples/instruction-following/evaluate.py --model exported/ --data DIR    # after python -m nanorlhf.export

DIR is make_data.py's folder (eval.jsonl: held-out types, eval_held_in.jsonl: training types on unseen requests).
Prompts go through the model's chat template and the same vLLM engine as a run (nanorlhf.engine), decoding greedily,
and are scored by reward.py: `constraints` (IFEval's instruction-level strict accuracy; what a run logs as
eval_reward_mean) and `all_constraints` (prompt-level). Prints one line per file and type; --out writes them as JSON.
"""

import argparse
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reward  # noqa: E402


def evaluate(engine, tokenizer, rows, max_new_tokens):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=False) for r in rows]
    token_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    start = time.perf_counter()
    completions = engine.generate(token_ids, 1, 0, max_new_tokens, greedy=True)
    seconds = time.perf_counter() - start
    texts = [c.text for c in completions]
    args = ([r["prompt"] for r in rows], texts, [r["instruction_id_list"] for r in rows], [r["kwargs"] for r in rows])
    per_type = defaultdict(list)
    for row, text in zip(rows, texts):
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            per_type[instruction_id] += reward.constraints([row["prompt"]], [text], [[instruction_id]], [[kwargs]])
    return {"constraints": sum(reward.constraints(*args)) / len(rows),
            "all_constraints": sum(reward.all_constraints(*args)) / len(rows),
            "response_tokens_mean": sum(len(c.token_ids) for c in completions) / len(rows),
            "truncated_fraction": sum(c.truncated for c in completions) / len(rows),
            "generate_seconds": seconds,
            "per_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
            "examples": [{"prompt": r["prompt"], "completion": t} for r, t in zip(rows[:3], texts)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name (as --model of the scripts) "
                        "or a Hugging Face folder")
    parser.add_argument("--data", required=True, help="make_data.py's output folder")
    parser.add_argument("--files", default="eval,eval_held_in", help="comma-separated file names in --data")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--max_prompt_tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, default=200, help="the first N rows of each file")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="", help="write the results here as JSON")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from nanorlhf.engine import RolloutEngine
    from nanorlhf.tasks import resolve

    model = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    engine = RolloutEngine(model, args.max_prompt_tokens + args.max_new_tokens, args.dtype)
    results = {}
    for name in args.files.split(","):
        with open(os.path.join(args.data, f"{name}.jsonl")) as f:
            rows = [json.loads(line) for line in f][: args.limit]
        results[name] = evaluate(engine, tokenizer, rows, args.max_new_tokens)
        r = results[name]
        print(f"{name}: {len(rows)} prompts, constraints met {r['constraints']:.3f}, all met {r['all_constraints']:.3f}, "
              f"{r['response_tokens_mean']:.0f} tokens, truncated {r['truncated_fraction']:.2f}, "
              f"{r['generate_seconds']:.0f} s")
        for instruction_id, accuracy in r["per_type"].items():
            print(f"  {instruction_id:48s} {accuracy:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, **vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
