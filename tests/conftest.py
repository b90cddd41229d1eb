import json
import os
import subprocess
import sys
import time

import pytest
from filelock import FileLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pytest-xdist (pyproject.toml: -n 2) runs two test files at a time. Most of a test is a subprocess's start-up
# (imports, vLLM's engine build: one core) and a tiny model's Python-bound steps, so two at a time take a third off
# the suite (27.9 -> 18.4 min measured on 2 cores). Each worker's processes get their share of the cores, as an
# OpenMP thread spinning on a taken core costs seconds a step; set before torch is imported, so this process's own
# tests get it too.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from nanorlhf.config import load_module  # noqa: E402


# The files that take longest (minutes each), first: pytest-xdist hands out whole files in this order (pyproject.toml:
# --dist loadfile --no-loadscope-reorder), so the two workers finish about together.
SLOW_FILES = ["test_distributed_e2e.py", "test_faults.py", "test_benchmarks.py", "test_user_config_e2e.py",
              "test_bench_loop.py", "test_algorithms_e2e.py", "test_real_model.py", "test_tools.py", "test_environment.py"]


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: SLOW_FILES.index(item.path.name) if item.path.name in SLOW_FILES else len(SLOW_FILES))


def load_script(relpath):
    """Import an algorithm script as a module (its main() does not run: it is behind __main__)."""
    return load_module(os.path.join(ROOT, relpath))


# The GRPO demo, short, with LoRA dropout (so resuming must restore the RNG): 8 steps of 16 prompts x 8 completions,
# a checkpoint every 2 steps. test_grpo_e2e checks its metrics, test_faults compares interrupted runs with it.
GRPO_SHORT = ["--demo", "--total_episodes", "1024", "--prompts_per_step", "16", "--save_every", "2",
              "--lora_dropout", "0.05"]


def without_wandb_credentials():
    """This process's environment without WANDB_* variables: runs with wandb on log offline, as a new user's do."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}


def run_grpo_demo(output_dir):
    return subprocess.run([sys.executable, os.path.join(ROOT, "GRPO", "grpo.py"), *GRPO_SHORT, "--output_dir",
                           output_dir, "--wandb", "true"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=without_wandb_credentials(), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def grpo_demo_run(tmp_path_factory):
    """(run folder, CompletedProcess) of GRPO_SHORT with wandb on and no credentials (offline, stdin closed). Under
    pytest-xdist the first worker that needs it runs it, in the session's shared temporary folder, and the others
    wait for it and read the same run."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        output_dir = str(tmp_path_factory.mktemp("grpo") / "run")
        result = run_grpo_demo(output_dir)
    else:
        shared = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own folder
        output_dir, record = str(shared / "grpo" / "run"), shared / "grpo.json"
        with FileLock(str(shared / "grpo.lock")):
            if not record.exists():
                done = run_grpo_demo(output_dir)
                record.write_text(json.dumps([done.args, done.returncode, done.stdout, done.stderr]))
        result = subprocess.CompletedProcess(*json.loads(record.read_text()))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def start_run(command):
    """Start a run (its command line, launcher first) with its output on one pipe and no wandb credentials."""
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL,
                            env=without_wandb_credentials())


def interrupt(command, output_dir, step, signum):
    """Start a run, send `signum` once it has logged `step`; returns (exit status, output)."""
    path, started = os.path.join(output_dir, "metrics.jsonl"), time.time()
    proc = start_run(command)

    def logged():  # by this process: a resumed run first moves the dead run's later rows aside (a new file)
        if not os.path.exists(path) or os.path.getmtime(path) < started:
            return 0
        lines = open(path).read().split("\n")[:-1]  # whole lines only: the run may be writing the next one
        return json.loads(lines[-1])["step"] if lines else 0

    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and logged() < step:
            time.sleep(0.02)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the test failed on the way: leave no run behind on the shared cores
            proc.kill()
    return proc.returncode, out


def assert_same_metrics(rows, reference):
    """A resumed run's metrics.jsonl rows are the uninterrupted run's: each step once, every value but the wall-clock
    measurements (which differ between any two runs) within float32 rounding."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(rows, reference):
        keys = [k for k in b if not k.startswith("time_") and not k.endswith("_per_second")]
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-5, abs=1e-6), a["step"]
