"""Checkpoints written atomically (temp dir + rename): a crash or Ctrl-C mid-write never leaves a broken one.

A checkpoint holds the LoRA adapter (a normal peft adapter folder, loadable on its own), the optimizer,
the scheduler, the RNG states, the step and the data position; `--resume` continues from it exactly.
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


def save_checkpoint(output_dir, step, model, optimizer, scheduler, progress, extra_modules=None):
    """Write <output_dir>/checkpoint-<step>; `progress` is a JSON-able dict (step, episodes, data position)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-checkpoint-")
    model.save_pretrained(tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    modules = {name: m.state_dict() for name, m in (extra_modules or {}).items()}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                "modules": modules}, os.path.join(tmp, STATE))
    with open(os.path.join(tmp, "progress.json"), "w") as f:
        json.dump(progress, f)
    if os.path.exists(final):  # the same step saved again (after a resume): swap, never delete first
        old = final + ".old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def find_checkpoint(path):
    """`path` is a checkpoint folder, or a run folder whose newest checkpoint is taken."""
    if os.path.isfile(os.path.join(path, "progress.json")):
        return path
    steps = []
    if os.path.isdir(path):
        steps = [int(m.group(1)) for d in os.listdir(path) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    if not steps:
        raise UserError(f"--resume {path!r} holds no checkpoint (expected a run folder with checkpoint-<step> "
                        "folders, or one of those folders)")
    return os.path.join(path, f"checkpoint-{max(steps)}")


def load_checkpoint(path, model, optimizer, scheduler):
    """Restore model adapter, optimizer, scheduler and RNG in place; returns (progress dict, {name: state_dict}
    of the extra modules saved with it)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
    state = torch.load(os.path.join(path, STATE), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    with open(os.path.join(path, "progress.json")) as f:
        return json.load(f), state["modules"]
