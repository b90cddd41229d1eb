"""Data parallel over processes: `torchrun --nproc_per_node N GRPO/grpo.py ...` (or `accelerate launch`) runs the
same script in N processes, one GPU each; plain `python GRPO/grpo.py` is one process and none of this does anything.

Every rank holds the base model, its LoRA adapter and its own vLLM engine, takes whole prompt groups of the step's
global batch, and divides its loss by the global normaliser; summing the ranks' gradients then gives the gradient
one process computes on the whole batch (docs/scaling.md). The helpers below are that plumbing: the rank and world
size from the launcher's environment, the process group (NCCL on GPU, gloo on CPU), sums and gathers.
"""

import os
from datetime import timedelta

import torch


def rank():
    return int(os.environ.get("RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main():
    """Rank 0 writes the run folder (metrics, wandb, checkpoints, the exported model) and talks to the terminal."""
    return rank() == 0


def active():
    return world_size() > 1 and torch.distributed.is_initialized()


def setup():
    """Join the launcher's process group when WORLD_SIZE > 1 (torchrun and accelerate set RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); each rank then uses GPU LOCAL_RANK. One process: nothing happens."""
    if world_size() == 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # generous timeout: a rank may wait for another one's long generation or checkpoint write
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                         timeout=timedelta(minutes=60))


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def total(value):
    """The sum of a number over the ranks (the number itself in one process): global counts and normalisers."""
    if not active():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, (int, bool)) else t.item()


def maximum(value):
    if not active():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] on every rank ([obj] in one process)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather(tensor):
    """The ranks' tensors concatenated along dim 0 in rank order (the global batch, since each rank holds a
    contiguous share of it), as a CPU tensor; (B, T) tensors are right-padded with zeros to the widest T."""
    if not active():
        return tensor.cpu()
    parts = gather_objects(tensor.detach().cpu())
    if parts[0].dim() == 2:
        width = max(t.shape[1] for t in parts)
        parts = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in parts]
    return torch.cat(parts)


def on_whole_batch(fn, *tensors):
    """fn(*tensors) computed on the whole batch's rows (gathered over the ranks), this rank's rows of its result
    returned: batch-wide statistics such as whitening see every rank's samples, as in one process."""
    if not active():
        return fn(*tensors)
    rows, width = len(tensors[0]), tensors[0].shape[1] if tensors[0].dim() == 2 else None
    start = sum(gather_objects(rows)[: rank()])
    out = fn(*[gather(t) for t in tensors])[start : start + rows]
    return (out[:, :width] if width is not None else out).to(tensors[0].device)


def any_rank(flag):
    """True on every rank when it is True on one (a Ctrl-C that reached one rank stops them all at the same step)."""
    return bool(total(int(bool(flag)))) if active() else bool(flag)


def all_reduce_gradients(parameters):
    """Sum the gradients over the ranks. Each rank's loss is already divided by the global normaliser, so the sum
    is the gradient of the whole batch; a rank with no sample this step (sparse dropped them all) adds zeros."""
    if not active():
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


def tensor_parallel_group(size):
    """The group of `size` consecutive ranks that share one vLLM engine (vllm_tensor_parallel_size), None for 1.
    Every rank must call it (it creates every group)."""
    if size == 1:
        return None
    group, _ = torch.distributed.new_subgroups_by_enumeration(
        [list(range(first, first + size)) for first in range(0, world_size(), size)])
    return group


def broadcast_from_main(fn):
    """fn() run on rank 0 alone (e.g. preparing the run folder), its result, or its UserError, on every rank."""
    from nanorlhf.errors import UserError

    if not active():
        return fn()
    result = [None]
    if is_main():
        try:
            result = [("ok", fn())]
        except UserError as e:
            result = [("error", str(e))]
    torch.distributed.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise UserError(value)
    return value


def barrier():
    if active():
        torch.distributed.barrier()


def shard(n):
    """(first, count) of this rank's contiguous share of n items: shares differ by at most one, rank order."""
    base, extra = divmod(n, world_size())
    first = rank() * base + min(rank(), extra)
    return first, base + (rank() < extra)


def close():
    if active():
        torch.distributed.destroy_process_group()


def mean_over_ranks(metrics):
    """Each numeric metric averaged over the ranks (a value every rank computed alike stays as it is; a rank's own
    per-sample mean becomes the whole batch's when shares are equal); None where no rank has one."""
    if world_size() == 1:
        return metrics
    gathered, out = gather_objects(metrics), {}
    for key, value in metrics.items():
        numbers = [m[key] for m in gathered if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
        out[key] = value if not numbers or len(set(numbers)) == 1 and value is not None else sum(numbers) / len(numbers)
    return out
