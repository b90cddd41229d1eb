"""Export (python -m nanorlhf.export): the merged model of the GRPO demo run, loaded by transformers and by vLLM from
the exported folder alone, decodes greedily what the run's trained policy decodes. The README's export tour is run
as written: its bash lines as subprocesses, its Python blocks in one subprocess that also holds this module's one
vLLM engine (an engine in the pytest process would bind its threads and reseed its RNGs for every later test)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanorlhf.errors import UserError
from nanorlhf.export import check_hub_credentials, main
from nanorlhf.tasks import QUESTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [QUESTION.format(a=a, b=b) for a, b in [(3, 4), (7, 8), (2, 9), (5, 5), (9, 6), (1, 0)]]
MAX_NEW_TOKENS = 8  # the demo's max_new_tokens


def readme_tour():
    """The README's export tour: (the bash lines, the Python blocks), from "Data, runs and checkpoints"."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Data, runs and checkpoints", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    bash = [line.split("#")[0].strip() for lang, code in blocks if lang == "bash" for line in code.splitlines()]
    return [line for line in bash if line], [code for lang, code in blocks if lang == "python"]


def run_in_tour(command, workdir, **kwargs):
    """A README command (`python ...`) run as written in `workdir`, with this checkout's package and Python."""
    env = {**os.environ, **kwargs.pop("env", {})}
    env = {k: v for k, v in env.items() if v is not None}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def exported(grpo_demo_run, tmp_path_factory):
    """(run folder, export folder): the README's export command run as written, in a folder where its
    `runs/<run>` is the demo run (a link) and `exported/` is new."""
    run_folder, _ = grpo_demo_run
    bash, _ = readme_tour()
    command = next(line for line in bash if line.startswith("python -m nanorlhf.export") and "--push" not in line)
    command = command.split()
    assert command[3].startswith("runs/") and command[4] == "exported/"
    workdir = tmp_path_factory.mktemp("tour")
    (workdir / "runs").mkdir()
    os.symlink(run_folder, workdir / command[3])
    result = run_in_tour(command, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(f"to {command[4]}")
    return str(workdir / command[3]), str(workdir / "exported")


# Runs the README's Python blocks as written, next to the export, then greedy-decodes the test's prompt token ids
# with the tour's `llm`. nanorlhf.engine sets what the run's engine runs under: vLLM in-process, a 2 GiB CPU KV cache.
TOUR = """
import json, sys
import nanorlhf.engine
from vllm import SamplingParams
blocks, prompt_ids, max_tokens = json.load(sys.stdin)
namespace = {}
for code in blocks:
    exec(code, namespace)
outputs = namespace["llm"].generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                                    SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
print(json.dumps({"answer": namespace["answer"], "vllm_answer": namespace["vllm_answer"],
                  "vllm_tokens": [list(o.outputs[0].token_ids) for o in outputs]}))
"""


def prompt_token_ids(tokenizer):
    """The demo prompts as the run's PromptStream encodes them: chat template, then no added special tokens."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


@pytest.fixture(scope="module")
def tour(exported):
    """What the README's Python blocks and vLLM on the export produce: {answer, vllm_answer, vllm_tokens}."""
    from transformers import AutoTokenizer

    _, out_dir = exported
    _, python = readme_tour()
    prompt_ids = prompt_token_ids(AutoTokenizer.from_pretrained(out_dir))
    result = run_in_tour(["python", "-c", TOUR], os.path.dirname(out_dir),
                         input=json.dumps([python, prompt_ids, MAX_NEW_TOKENS]))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_export_folder_is_a_complete_model(exported):
    run_folder, out_dir = exported
    files = set(os.listdir(out_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert "chat_template.jinja" in files  # transformers 5 keeps the chat template in its own file
    assert not any(f.startswith("adapter_") for f in files)  # merged, not an adapter
    card = open(os.path.join(out_dir, "README.md")).read()
    last = json.loads(open(os.path.join(run_folder, "metrics.jsonl")).read().splitlines()[-1])
    assert last["step"] == 8
    assert "step 8, 1024 episodes" in card and f"| reward_mean | {last['reward_mean']:.4g} |" in card
    assert '"model": "demo:addition"' in card and '"lora_dropout": 0.05' in card
    run_name = os.path.basename(run_folder)  # the README's runs/grpo-<date>-<time>: the algorithm is read from it
    assert f"exported with: `python -m nanorlhf.export runs/{run_name}/checkpoint-8 exported/`" in card
    assert "fine-tuned with nanoRLHF (GRPO), LoRA merged into the base weights, float32." in card
    assert not any(name.startswith(".export-") for name in os.listdir(os.path.dirname(out_dir)))
    # the trained change is in the weights: LoRA-wrapped linears moved, the (untargeted) embeddings did not
    from safetensors.torch import load_file

    from nanorlhf.tasks import resolve

    merged = load_file(os.path.join(out_dir, "model.safetensors"))
    base = load_file(os.path.join(resolve("demo:addition"), "model.safetensors"))
    assert merged.keys() == base.keys() and all(merged[k].dtype == torch.float32 for k in merged)
    moved = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.embed_tokens.weight" not in moved


def trainer_greedy(run_folder, prompt_ids):
    """Greedy completions of the run's trainer-side policy: base + checkpoint-8's adapter through peft, unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nanorlhf.tasks import resolve

    config = json.load(open(os.path.join(run_folder, "checkpoint-8", "config.json")))
    base = AutoModelForCausalLM.from_pretrained(resolve(config["model"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(run_folder, "checkpoint-8")).eval()
    return [hf_greedy(model, ids) for ids in prompt_ids]


@torch.no_grad()
def hf_greedy(model, ids):
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


def trim(ids, eos):
    """Completion tokens up to and including the first EOS (transformers pads after it, vLLM stops)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_greedy_completions_match_the_runs_policy(exported, tour):
    """(a) vLLM on the export, (b) transformers on the export and (c) the run's trainer-side policy decode the demo
    prompts greedily to the same tokens.

    (c) stands in for the run's final engine, which is gone when the run ends: the demo run is float32 with the
    default `--weight_sync auto` = merged, so after the last step the engine held W + scale B A for every LoRA
    linear (policy.merged_weights), the same sum merge_and_unload writes into the export, and in float32 that
    push is exact (docs/performance.md, README "Performance"): the run's logprob_diff canary is ~1e-7. So (a) is
    the final engine's computation on the final engine's weights, and (c), the same adapter unmerged, is what the
    canary compared that engine with every step.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_folder, out_dir = exported
    rows = [json.loads(line) for line in open(os.path.join(run_folder, "metrics.jsonl"))]
    assert max(r["logprob_diff"] for r in rows) < 1e-5  # the engine ran the trainer's weights, exactly
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()  # the folder alone: float32 from its config
    prompt_ids = prompt_token_ids(tokenizer)

    vllm_export = tour["vllm_tokens"]
    hf_export = [trim(hf_greedy(model, ids), tokenizer.eos_token_id) for ids in prompt_ids]
    trainer = [trim(ids, tokenizer.eos_token_id) for ids in trainer_greedy(run_folder, prompt_ids)]
    assert vllm_export == hf_export == trainer
    assert len({tuple(c) for c in trainer}) > 1  # not one constant answer

    # the README's own calls (chat template applied by transformers and by vLLM) give the same answers
    assert tour["answer"] == tokenizer.decode(trainer[0], skip_special_tokens=True)
    assert tour["vllm_answer"] == tour["answer"]


def test_cli_refusals_are_one_sentence(exported, tmp_path, monkeypatch):
    """Bad paths, a missing base model and missing hub credentials: one UserError sentence each, raised before
    anything is written, nothing in the run folder modified. In process, like test_grpo_e2e's refusals; the CLI's
    `error:` line and status 2 are checked end to end by the next test."""
    run_folder, out_dir = exported
    before = sorted(os.listdir(run_folder))
    for key in [k for k in os.environ if k.startswith("HF_") or k == "HUGGING_FACE_HUB_TOKEN"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    bad_base = tmp_path / "bad" / "checkpoint-8"  # a copy whose Config names a base model that is not there
    shutil.copytree(os.path.join(run_folder, "checkpoint-8"), bad_base)
    config = json.load(open(bad_base / "config.json"))
    json.dump({**config, "model": "/no/such/model"}, open(bad_base / "config.json", "w"))
    cases = [
        ([str(tmp_path), str(tmp_path / "a")], "is not a checkpoint"),
        ([str(bad_base), str(tmp_path / "d")], "the base model '/no/such/model' of"),
        ([run_folder, out_dir], "already exists and is not empty"),
        ([run_folder, str(tmp_path / "b"), "--push_to_hub", "me/tiny-adder"], "no Hugging Face credentials"),
        ([run_folder, str(tmp_path / "c"), "--push_to_hub", "not a repo"], "takes a repository id"),
        ([run_folder], "expected a run or checkpoint folder and an output folder"),
    ]
    for argv, words in cases:
        with pytest.raises(UserError, match=re.escape(words)) as error:
            main(argv)
        assert "\n" not in str(error.value)
    assert set(os.listdir(tmp_path)) <= {"hf-home", "bad"}  # no export folder left, not even a temporary one
    assert sorted(os.listdir(run_folder)) == before
    with pytest.raises(UserError, match="no Hugging Face credentials"):  # what run.py can call before a run starts
        check_hub_credentials("me/tiny-adder")


def test_readme_push_command_says_clearly_without_credentials(exported, tmp_path):
    """The README's --push_to_hub line as written, on the demo run, without credentials: status 2, one sentence,
    nothing exported (credentials are checked before the model is loaded)."""
    _, out_dir = exported
    bash, _ = readme_tour()
    command = next(line for line in bash if "--push_to_hub" in line).split()
    assert command[:3] == ["python", "-m", "nanorlhf.export"] and command[3].startswith("runs/")
    no_login = {k: None for k in os.environ if k.startswith("HF_") or k == "HUGGING_FACE_HUB_TOKEN"}
    workdir = os.path.dirname(out_dir)
    result = run_in_tour(command, workdir, env={**no_login, "HF_HOME": str(tmp_path / "hf-home")})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --push_to_hub me/tiny-adder: no Hugging Face credentials")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not os.path.exists(os.path.join(workdir, command[4]))


def test_bfloat16_export_holds_what_a_merged_push_sends(exported, tmp_path):
    """The users' dtype: checkpoint-8 relabelled as a bfloat16 run (a copy; the run folder is not touched) exports
    bfloat16 weights equal, bit for bit, to policy.merged_weights of that policy in bfloat16, the tensors a
    `--weight_sync merged` engine would hold. (In bf16 the default sync serves the adapter unmerged; merging rounds,
    README "Export a trained model".) In process, no engine: the export is the only load."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nanorlhf.export import export
    from nanorlhf.policy import merged_weights
    from nanorlhf.tasks import resolve

    run_folder, _ = exported
    checkpoint = str(tmp_path / "run" / "checkpoint-8")
    shutil.copytree(os.path.join(run_folder, "checkpoint-8"), checkpoint)
    config = json.load(open(os.path.join(checkpoint, "config.json")))
    json.dump({**config, "dtype": "bfloat16"}, open(os.path.join(checkpoint, "config.json"), "w"))
    out_dir = str(tmp_path / "exported-bf16")
    assert export(checkpoint, out_dir, algorithm="grpo") == out_dir

    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    base = AutoModelForCausalLM.from_pretrained(resolve("demo:addition"), dtype=torch.bfloat16)
    pushed = dict(merged_weights(PeftModel.from_pretrained(base, checkpoint), torch.bfloat16))  # as run.py pushes
    assert len(pushed) == 14 and all(torch.equal(saved[name], t) for name, t in pushed.items())
    card = open(os.path.join(out_dir, "README.md")).read()
    assert "(GRPO), LoRA merged into the base weights, bfloat16." in card
    assert "(no metrics.jsonl row for this step next to the checkpoint)" in card  # the copy has no metrics.jsonl
