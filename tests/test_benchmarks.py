"""The benchmark scripts run end to end at --tiny size. Their speed and memory numbers are measured in
benchmarks/, never asserted here; what is asserted is that they run, print their table, and that chunked and
plain log-probs agree."""

import json
import math
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


def test_sampling_seeds_tiny(tmp_path):
    out = tmp_path / "sampling_seeds.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sampling_seeds.py"), "--tiny",
                             "--json", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seeded/this" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float32"]
    for r in rows:  # every variant generated every token (EOS ignored), at a positive rate
        assert r["seeded_tokens"] == r["unseeded_tokens"] == r["unseeded_n1_tokens"] == 4 * 4 * 8
        assert r["seeded_tokens_per_second"] > 0 and r["unseeded_tokens_per_second"] > 0


def test_gpu_check_tiny_trainer_only_runs_without_vllm(tmp_path):
    out = tmp_path / "gpu_check.json"
    script = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    code = ("import runpy, sys; sys.modules.update(vllm=None, trl=None, datasets=None); "
            f"sys.argv = [{script!r}, '--tiny', '--trainer_only', '--workdir', {str(tmp_path)!r}, '--json', "
            f"{str(out)!r}]; runpy.run_path({script!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer, gradient checkpointing on" in result.stdout and "\nPASS\n" in result.stdout
    rows = json.loads(out.read_text())["trainer"]
    assert [r["gradient_checkpointing"] for r in rows] == [True, False]
    for r in rows:
        assert not r.get("oom") and r["train_tokens_per_second"] > 0 and r["micro_batches"] == 2


def test_gpu_check_tiny_whole_loop_on_the_cpu_engine(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--tiny",
                             "--workdir", str(tmp_path), "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = {c["check"]: c["status"] for c in json.loads(out.read_text())["checks"]}
    for name in ("engine built once", "logprob canary", "importance weights", "update fidelity", "losses finite"):
        assert checks[name] == "PASS", (name, result.stdout[-2000:])
    # vLLM's sleep frees nothing on a CPU, but the order of sleep, wake and push (the lora path's push included) is
    # still checked there (benchmarks/gpu_check.py)
    assert checks["sleep/wake + push order"] == "PASS"


def test_update_fidelity_tiny(tmp_path):
    out = tmp_path / "update_fidelity.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "update_fidelity.py"), "--tiny",
                             "--json", str(out), "--plot", str(tmp_path / "plot.png")],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "default weight_sync (bfloat16): " in result.stdout
    data = json.loads(out.read_text())
    demo = data["results"]["demo"]
    assert {(r["lr"], r["steps"]) for r in demo["rows"]} == {(lr, s) for lr in (1e-4, 1e-3) for s in (1, 2)}
    paths = ("trainer", "merged", "lora")
    for r in demo["rows"]:
        assert all(math.isfinite(r[p]["corr"]) and math.isfinite(r[p]["rel_err"]) for p in paths)
        if r["lr"] == 1e-3:  # a large update survives bf16 on every path: both syncs deliver what the trainer computes
            assert all(r[p]["corr"] > 0.98 and r[p]["rel_err"] < 0.2 for p in paths), r
    assert 0 < demo["pushed_bytes"]["lora"] < demo["pushed_bytes"]["merged"]  # A and B only
    assert data["decision"]["default"] in ("merged", "lora")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_train_phase_tiny(tmp_path):
    out = tmp_path / "train_phase.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_phase.py"), "--shape", "demo",
                             "--tiny", "--json", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["variants"]) == ["padded", "packed", "fused_head", "nograd", "fused_adam", "no_entropy",
                                     "no_mask", "fused_lora"]
    assert data["model_flops"] > 0 and data["matmul_flops_per_second"] > 0
    for row in data["variants"].values():
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1 and 0 <= row["padding_fraction"] < 1


def test_lora_saved_memory_tiny(tmp_path):
    out = tmp_path / "lora_saved_memory.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lora_saved_memory.py"), "--tiny",
                             "--json", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["dtype"], r["lora_dropout"]) for r in rows} == {(d, p) for d in ("bfloat16", "float32") for p in (0, 0.05)}
    for r in rows:  # a byte count, the same on every machine: the fused layer never keeps more than peft's
        assert 0 < r["fused_bytes"] <= r["peft_bytes"]
        if r["dtype"] == "bfloat16":  # peft keeps a float32 copy of each LoRA layer's input there
            assert r["ratio"] < 0.9


def test_adapter_passes_tiny(tmp_path):
    """The three passes of a step, each variant of the LoRA layer (peft's, the fused one), timed against the reference
    pass; here with a previous lora.py loaded as `baseline` (this one's own file stands in for it)."""
    out = tmp_path / "passes.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "adapter_passes.py"), "--tiny",
                             "--baseline_lora", os.path.join(ROOT, "nanorlhf", "lora.py"), "--json", str(out)],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["median"]) == {"reference", *(f"{p} {v}" for p in ("old_logprobs", "train")
                                                  for v in ("peft", "fused", "baseline"))}
    assert data["x_reference"]["reference"] == 1.0 and all(s > 0 for s in data["median"].values())
