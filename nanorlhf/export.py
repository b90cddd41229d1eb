"""Export a checkpoint as a merged Hugging Face model folder that transformers and vLLM load as they are.

    python -m nanorlhf.export <run folder or checkpoint folder> <out_dir> [--push_to_hub <user/repo>]

A run folder means its newest checkpoint-<step>. The folder written holds the base model with the LoRA adapter
merged into it (W + scale B A, peft's merge_and_unload) in the run's dtype as safetensors, the base model's
tokenizer with its chat template, and README.md: a model card with the run's Config, the metrics of the
checkpoint's step and the command that made it. Nothing in the run folder is touched, and the export appears
all at once (written next to out_dir, then renamed).

The merge happens in the run's dtype, on the CPU (the GPU may still hold a run's engine): the same tensors as a
`--weight_sync merged` push. In float32 the merged model is the trained policy, exactly; in bfloat16 the merge
rounds away part of small updates that the unmerged adapter keeps (docs/performance.md, "Update fidelity in
bfloat16: sync modes"), so the adapter folder in the checkpoint remains the lossless form.
"""

import json
import os
import re
import shlex
import shutil
import sys
import tempfile

from nanorlhf import console
from nanorlhf.checkpoint import find_checkpoint, saved_config
from nanorlhf.errors import UserError, exit_on_user_error

USAGE = "usage: python -m nanorlhf.export <run folder or checkpoint folder> <out_dir> [--push_to_hub <user/repo>]"
RUN_NAME = re.compile(r"(.+)-\d{8}-\d{6}")  # runs/<algo>-<date>-<time>, the default output_dir


def find_export_checkpoint(path):
    """The checkpoint to export: `path` itself, or a run folder's newest (the run folder is only read)."""
    return find_checkpoint(path, tidy=False, flag="export:")


def check_hub_credentials(repo):
    """One UserError unless a Hugging Face token is configured and accepted; call it before any long work."""
    from huggingface_hub import get_token, whoami

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(f"--push_to_hub takes a repository id like user/model-name, got {repo!r}")
    if not get_token():
        raise UserError(f"--push_to_hub {repo}: no Hugging Face credentials on this machine; log in with "
                        "`hf auth login` or set HF_TOKEN, or export without --push_to_hub")
    try:
        whoami()
    except Exception as e:  # noqa: BLE001 - offline, revoked token, proxy: all mean the same to the user
        raise UserError(f"--push_to_hub {repo}: the Hugging Face token was not accepted ({str(e).splitlines()[0]}); "
                        "check your login with `hf auth whoami`, or export without --push_to_hub") from None


def export(checkpoint, out_dir, push_to_hub="", algorithm=""):
    """Write the merged model of `checkpoint` (a checkpoint folder, or a run folder: its newest checkpoint) to
    `out_dir` (new or empty) and return out_dir; `push_to_hub` ("user/repo") also uploads it. `algorithm` names
    the script for the model card (default: read from the run folder's name, runs/<algo>-<date>-<time>)."""
    checkpoint = find_export_checkpoint(checkpoint)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"out_dir {out_dir!r} already exists and is not empty; name a new folder (nothing is "
                        "overwritten)")
    if push_to_hub:  # before the long part, so a missing login costs nothing
        check_hub_credentials(push_to_hub)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanorlhf.policy import DTYPES
    from nanorlhf.tasks import resolve

    config = saved_config(checkpoint)
    with open(os.path.join(checkpoint, "adapter_config.json")) as f:
        adapter = json.load(f)
    base = resolve(config["model"]) if "model" in config else adapter["base_model_name_or_path"]
    dtype = config.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        raise UserError(f"{checkpoint}/config.json has dtype {dtype!r}; expected one of {', '.join(DTYPES)}")

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])
        except OSError as e:
            raise UserError(f"the base model {base!r} of {checkpoint} could not be loaded "
                            f"({str(e).splitlines()[0]})") from None
        model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)  # the chat template travels with the tokenizer
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(checkpoint, out_dir, config, base, dtype, algorithm, push_to_hub))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); os.replace onto it would also work, but only on POSIX
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub:
        upload(out_dir, push_to_hub)
    return out_dir


def upload(out_dir, repo):
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        url = api.upload_folder(folder_path=out_dir, repo_id=repo, commit_message="nanoRLHF export")
    except Exception as e:  # noqa: BLE001 - the export itself is done: say so, and how to retry the upload
        raise UserError(f"--push_to_hub {repo}: the upload failed ({str(e).splitlines()[0]}); the export is complete "
                        f"in {out_dir}, upload it again with `hf upload {repo} {out_dir}`") from None
    console.say(f"uploaded {out_dir} to {url}")


def final_metrics(checkpoint, step):
    """The metrics.jsonl row of `step` from the run folder holding the checkpoint, or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "metrics.jsonl")
    if not os.path.exists(path):
        return None
    row = None
    with open(path) as f:
        for line in f:
            try:
                candidate = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if candidate.get("step") == step:
                row = candidate
    return row


def model_card(checkpoint, out_dir, config, base, dtype, algorithm, push_to_hub):
    with open(os.path.join(checkpoint, "progress.json")) as f:
        progress = json.load(f)
    run_folder = os.path.dirname(os.path.abspath(checkpoint))
    if not algorithm and (match := RUN_NAME.fullmatch(os.path.basename(run_folder))):
        algorithm = match.group(1)
    model_name = config.get("model", base)
    hub_base = "/" in model_name and ":" not in model_name and not os.path.exists(model_name)  # a hub id
    command = ["python", "-m", "nanorlhf.export", checkpoint, out_dir] + (["--push_to_hub", push_to_hub]
                                                                           if push_to_hub else [])
    metrics = final_metrics(checkpoint, progress.get("step"))
    front = ["---", "library_name: transformers", "tags:", "- nanorlhf", "- rlhf"]
    front += [f"- {algorithm}"] if algorithm else []
    front += [f"base_model: {model_name}"] if hub_base else []
    lines = front + ["---", "", f"# {os.path.basename(os.path.abspath(out_dir))}", "",
                     f"`{model_name}` fine-tuned with nanoRLHF" + (f" ({algorithm.upper()})" if algorithm else "")
                     + f", LoRA merged into the base weights, {dtype}.", "",
                     f"- base model: `{model_name}`" + (f" (`{base}`)" if base != model_name else ""),
                     f"- algorithm: {algorithm or 'unknown (not recorded in the run folder)'}",
                     f"- checkpoint: `{checkpoint}`, step {progress.get('step')}, {progress.get('episodes')} episodes",
                     f"- exported with: `{shlex.join(command)}`", ""]
    if config.get("prompt_template"):
        lines += [f"Trained on plain-text prompts, `{config['prompt_template']}`, not on the chat template.", ""]
    lines += ["## Metrics at this step", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines += ["(no metrics.jsonl row for this step next to the checkpoint)"]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=1) if config else "{}", "```", ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return
    push_to_hub = ""
    if "--push_to_hub" in argv:
        i = argv.index("--push_to_hub")
        if i + 1 == len(argv):
            raise UserError("--push_to_hub needs a repository id, e.g. --push_to_hub user/model-name")
        push_to_hub = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 2 or any(a.startswith("--") for a in argv):
        raise UserError(f"expected a run or checkpoint folder and an output folder ({USAGE})")
    out_dir = export(argv[0], argv[1], push_to_hub)
    print(f"exported {find_export_checkpoint(argv[0])} to {out_dir}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
