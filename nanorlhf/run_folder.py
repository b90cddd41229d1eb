"""The run folder and `--resume`: which checkpoint a run continues from, what it may change, and the folder it
writes to (config.json, command.txt, a run it replaces with --overwrite).

A run folder is the run: a resumed run finds its checkpoint there (the newest complete one, see checkpoint.py),
keeps the fields that shape the model, says which others changed, and sets aside the later checkpoints of the run
that died, so that each step stays in the folder once.
"""

import itertools
import json
import os
import shlex
import shutil
import sys
import time

from nanorlhf import console, distributed
from nanorlhf.checkpoint import find_checkpoint, saved_config, set_aside_later_checkpoints, tidy_run_folder
from nanorlhf.config import as_dict
from nanorlhf.errors import UserError

# Config fields that change the model's shape: a checkpoint cannot be resumed with other values
SHAPE_FIELDS = ("model", "lora_r", "lora_target_modules")


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


def resume_checkpoint(cfg, world_size):
    """(checkpoint path or None, the fields it changes) for --resume; checked before anything is written.
    Rank 0 tidies the folder and finds the checkpoint; the other ranks learn its path (and any error) from it."""
    if not cfg.resume:
        return None, []
    checkpoint = distributed.broadcast_from_main(lambda: find_checkpoint(cfg.resume))
    changes = resume_changes(saved_config(checkpoint), as_dict(cfg))
    with open(os.path.join(checkpoint, "progress.json")) as f:
        saved_world_size = json.load(f).get("world_size", 1)
    if saved_world_size != world_size:
        raise UserError(f"--resume: {checkpoint} was trained on {saved_world_size} process(es) but this run "
                        f"has {world_size}; resume it with the same number (each rank's random state "
                        "is saved with it), or start a new run")
    return checkpoint, changes


def prepare_output_dir(cfg, algo, checkpoint, world_size):
    """The run folder, made ready (rank 0 only): the checkpoint's folder when resuming without --output_dir, a new
    runs/<algo>-<time> when none is named; a folder holding another run is refused unless --overwrite."""
    output_dir = cfg.output_dir
    if not output_dir and checkpoint:
        output_dir = os.path.dirname(os.path.abspath(checkpoint))
    if not output_dir:  # a new folder per run, so reruns never collide
        output_dir = base = os.path.join("runs", f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}")
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
    if world_size > 1:  # how to start it again: torchrun's shape (one node's processes, the nodes)
        nodes = world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world_size)),
                    *(["--nnodes", str(nodes)] if nodes > 1 else [])]
    with open(os.path.join(output_dir, "command.txt"), "a") as f:
        f.write(shlex.join([*launcher, *sys.argv]) + "\n")
    return output_dir


def announce_resume(checkpoint, step, changes, output_dir):
    """Say where the run continues and what changed; set aside the later checkpoints of the run that died there."""
    console.say(f"resumed from {checkpoint}: continuing at step {step + 1}"
                + "".join(f"\n  changed since that checkpoint: {c}" for c in changes))
    in_place = os.path.dirname(os.path.abspath(checkpoint)) == os.path.abspath(output_dir)
    aside = set_aside_later_checkpoints(output_dir, step) if in_place and distributed.is_main() else []
    if aside:
        console.say(f"  later checkpoints of the run that died renamed <name>.after-{step}: {', '.join(aside)}")
