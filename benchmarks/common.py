"""What every benchmark script shares: its command line's common flags, its JSON file, its printed table, the
environment of the algorithm runs it starts.

A script runs as a plain file, so it puts the repository on sys.path and then imports from here:

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script
    from benchmarks.common import Table, parser, write_json  # noqa: E402

Standard library only: the GPU machine (no vllm, trl or datasets) imports it too.
"""

import argparse
import json
import os
import re
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(doc, epilog=None):
    """A benchmark's command line: the first line of its docstring as the description, flags never abbreviated."""
    return argparse.ArgumentParser(description=doc.split("\n")[0], allow_abbrev=False, epilog=epilog)


def add_output_flags(p, tiny=None, workdir=None, plot=None):
    """The flags benchmarks end with, each given where its help is: --tiny (`tiny` says what it shrinks to: the
    test's size), --workdir (`workdir` says what is kept there), --json (always), --plot (`plot` says what PNG)."""
    if tiny:
        p.add_argument("--tiny", action="store_true", help=tiny)
    if workdir:
        p.add_argument("--workdir", help=workdir)
    p.add_argument("--json", help="write the results here")
    if plot:
        p.add_argument("--plot", help=plot)


def check_head_size(p, hidden):
    """The random models have heads of 64: --hidden must be a multiple of it (vLLM's CPU attention needs >= 32)."""
    if hidden % 64:
        p.error("--hidden must be a multiple of 64 (head size 64: vLLM's CPU attention needs >= 32)")


def in_turn(variants, round_):
    """The order the variants run in, in round `round_`: each round starts one later, so that a change in the
    machine's load hits every variant alike."""
    start = round_ % len(variants)
    return [*variants[start:], *variants[:start]]


def make_workdir(args, prefix):
    """--workdir (created if missing), or a new temporary folder named after the benchmark."""
    workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(workdir, exist_ok=True)
    return workdir


def child_env(threads=0):
    """The environment of an algorithm script the benchmark starts: output unbuffered (its log follows the run),
    wandb off, no tokenizer threads; OMP_NUM_THREADS where `threads` is given."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def settings(args, leave_out=("json", "plot")):
    """The flags of the run, for its JSON, without the ones that name this machine's paths."""
    return {key: value for key, value in vars(args).items() if key not in leave_out}


def machine(device, threads=None):
    """Where, and under what load, the numbers were taken: the head of a result JSON (torch threads where given)."""
    info = {"device": device} if threads is None else {"device": device, "threads": threads}
    return {**info, "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()}


def write_json(path, results):
    """`results` to `path`, its folder created, indented as every file in benchmarks/results/ is."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


class Table:
    """A table printed row by row as results come (flushed, so a long benchmark shows its progress).

    Columns are (title, format spec) pairs, e.g. ("s/step", ">8.2f"). A title, a string value and None (printed
    "-") take only the spec's alignment and width; columns are one space apart.
    """

    def __init__(self, *columns):
        self.columns = columns

    def print_header(self):
        header = " ".join(f"{title:{_layout(spec)}}" for title, spec in self.columns)
        print(header)
        print("-" * len(header))

    def print_row(self, *values):
        cells = []
        for value, (_, spec) in zip(values, self.columns, strict=True):
            if value is None or isinstance(value, str):
                cells.append(f"{'-' if value is None else value:{_layout(spec)}}")
            else:
                cells.append(f"{value:{spec}}")
        print(" ".join(cells), flush=True)


def _layout(spec):
    """The alignment and width of a format spec: '>8.2f' -> '>8'."""
    return re.match(r"[<>^]?\d*", spec).group()
