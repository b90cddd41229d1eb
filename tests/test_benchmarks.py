"""The benchmark scripts run end to end at --tiny size. Their speed and memory numbers are measured in
benchmarks/, never asserted here; what is asserted is that they run, print their table, and that chunked and
plain log-probs agree."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: at these sizes a second OpenMP thread only spin-waits, which on busy shared cores costs seconds a step.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_logprob_memory_tiny(tmp_path):
    out = tmp_path / "logprob_memory.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "logprob_memory.py"), "--tiny",
                             "--json", str(out), "--plot", str(tmp_path / "plot.png")],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain/chunked" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["tokens"], r["mode"]) for r in rows} == {(t, m) for t in (256, 512) for m in ("no_grad", "train")}
    for r in rows:
        assert r["max_abs_diff"] < 1e-4  # same log-probs ...
        assert r["mode"] == "no_grad" or r["grad_max_abs_diff"] < 1e-3  # ... and the same gradient
        assert r["plain_mib"] > 0 and r["chunked_mib"] > 0
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_gpu_train_step_tiny_runs_without_vllm_trl_datasets(tmp_path):
    out = tmp_path / "gpu_train_step.json"
    script = os.path.join(ROOT, "benchmarks", "gpu_train_step.py")
    # The GPU machine has none of these: a None entry in sys.modules makes their import fail, as it would there.
    # Run from tmp_path, so the script must find the nanorlhf package on its own.
    code = ("import runpy, sys; sys.modules.update(vllm=None, trl=None, datasets=None); "
            f"sys.argv = [{script!r}, '--device', 'cpu', '--tiny', '--json', {str(out)!r}]; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/s" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    cells = {(r["completion_tokens"], r["chunked_logprobs"], r["gradient_checkpointing"]) for r in rows}
    assert cells == {(c, chunked, ckpt) for c in (64, 128) for chunked in (False, True) for ckpt in (False, True)}
    for r in rows:
        assert not r["oom"] and r["tokens_per_second"] > 0
