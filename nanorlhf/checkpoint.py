"""Checkpoints written atomically (temp dir, fsync, rename): a crash, kill -9 or Ctrl-C mid-write never leaves a
broken one, and a run folder left in any state by a dead run is tidied when the next run starts.

A checkpoint holds the LoRA adapter (a normal peft adapter folder, loadable on its own), the optimizer,
the scheduler, the RNG states, the step and the data position, and the run's Config (config.json);
`--resume` continues from it exactly.
"""

import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from nanorlhf.errors import UserError

STATE = "trainer_state.pt"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def rng_state():
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def checkpoints(output_dir):
    """{step: path} of the complete checkpoints in a run folder."""
    if not os.path.isdir(output_dir):
        return {}
    return {int(m.group(1)): os.path.join(output_dir, d) for d in os.listdir(output_dir)
            if (m := CHECKPOINT.fullmatch(d))}


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir, step, model, optimizer, scheduler, progress, extra_modules=None, rng=None,
                    config=None, keep=0):
    """Write <output_dir>/checkpoint-<step>; `progress` is a JSON-able dict (step, episodes, data position), `rng`
    the RNG states to store (default: the current ones), `config` the run's Config as a dict. Afterwards only the
    newest `keep` checkpoints are kept (0: all); older ones go only once this one is complete."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-checkpoint-")
    model.save_pretrained(tmp)
    modules = {name: m.state_dict() for name, m in (extra_modules or {}).items()}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng or rng_state(),
                "modules": modules}, os.path.join(tmp, STATE))
    with open(os.path.join(tmp, "progress.json"), "w") as f:
        json.dump(progress, f)
    if config is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    _fsync_tree(tmp)  # the data is on disk before the rename makes the checkpoint visible
    if os.path.exists(final):  # the same step saved again (after a resume): swap, never delete first
        old = final + ".old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    if keep > 0:
        for older in sorted(checkpoints(output_dir))[:-keep]:
            shutil.rmtree(os.path.join(output_dir, f"checkpoint-{older}"))
    return final


def tidy_run_folder(output_dir):
    """Undo what a run killed while saving left behind: temp folders are removed, and a `checkpoint-N.old` (a
    re-save killed between its two renames) becomes checkpoint-N again when the new one never arrived."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(".tmp-checkpoint-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".old") and CHECKPOINT.fullmatch(name[:-4]):
            final = path[:-4]
            if os.path.exists(final):
                shutil.rmtree(path)
            else:
                os.replace(path, final)


def set_aside_later_checkpoints(output_dir, step):
    """Resuming from checkpoint-<step> abandons the checkpoints after it: renamed checkpoint-N.after-<step>, so that a
    later `--resume <run folder>` never picks one of them. Returns their names."""
    later = [s for s in sorted(checkpoints(output_dir)) if s > step]
    for s in later:
        os.replace(os.path.join(output_dir, f"checkpoint-{s}"), os.path.join(output_dir, f"checkpoint-{s}.after-{step}"))
    return [f"checkpoint-{s}" for s in later]


def find_checkpoint(path, tidy=True, flag="--resume"):
    """`path` is a checkpoint folder, or a run folder whose newest checkpoint is taken. tidy: first undo what a killed
    save left there (tidy_run_folder); off for a reader that must leave the folder as it is (export)."""
    if os.path.isfile(os.path.join(path, "progress.json")):
        return path
    if tidy:
        tidy_run_folder(path)
    found = checkpoints(path)
    if not found:
        raise UserError(f"{flag} {path!r} is not a checkpoint: expected a run folder with checkpoint-<step> folders, "
                        "or one of those folders")
    return found[max(found)]


def saved_config(path):
    """The Config (a dict) a checkpoint was saved with; {} for checkpoints older than config.json."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)


def load_checkpoint(path, model, optimizer, scheduler, device="cpu"):
    """Restore model adapter, optimizer and scheduler in place; returns (progress dict, {name: state_dict} of the
    extra modules saved with it, RNG states). The RNG states are returned, not set: whatever is built after loading
    (the vLLM engine seeds the global generators) would overwrite them; see set_rng_state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors"), device=str(device)))
    state = torch.load(os.path.join(path, STATE), weights_only=False, map_location=device)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    with open(os.path.join(path, "progress.json")) as f:
        return json.load(f), state["modules"], state["rng"]
