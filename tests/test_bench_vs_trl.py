"""benchmarks/vs_trl.py runs end to end at --tiny size: both sides train, the table is printed and the JSON holds
positive numbers for both. Which side is faster is measured in the benchmark, never asserted here."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: at these sizes a second OpenMP thread only spin-waits, which on busy shared cores costs seconds a step.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_vs_trl_tiny(tmp_path):
    out = tmp_path / "vs_trl.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vs_trl.py"), "--tiny",
                             "--trl_batch_size", "4", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "use_vllm=False" in result.stdout
    assert "nanoRLHF/trl seconds per episode" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"nanoRLHF", "trl"}
    for side in report["results"].values():
        assert side["timed_steps"] == 2
        for key in ("seconds_per_step", "seconds_per_episode", "generated_tokens_per_second",
                    "generate_phase_tokens_per_second", "mean_completion_length"):
            assert side[key] > 0, key
        assert side["mean_completion_length"] <= 16
    assert report["trl_config"]["use_vllm"] is False
    # trl at its own micro-batch size: 2 micro-batches of 4 per step, one generation of 2 prompts x 4 and one optimizer
    # step each (so a timed step holds 8 episodes on both sides)
    assert report["trl_config"]["per_device_train_batch_size"] == 4
    assert report["trl_config"]["gradient_accumulation_steps"] == 2
    for side in report["results"].values():
        assert abs(side["seconds_per_step"] / side["seconds_per_episode"] - 8) < 1e-6
    assert report["engine_builds"] == [1]
    assert report["ratios"]["seconds_per_episode"] > 0
