"""benchmarks/gpu_check.py --self_test on the CPU: the whole loop clean (every check passes), then each defect the checks
look for planted in turn (every check fails on its own): the check users with a GPU run can fail, and can pass."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_catches_every_planted_defect(tmp_path):
    out = tmp_path / "self_test.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--self_test",
                             "--workdir", str(tmp_path), "--json", str(out)],
                            capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    data = json.loads(out.read_text())
    lines = data["self_test"]
    summary = f"self-test: {len(lines)} of {len(lines)} planted defects caught"
    assert result.returncode == 0 and summary in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert {line["check"] for line in lines} >= {"engine built once", "sleep/wake + push order",
                                                 "engine's sleep record is vLLM's", "logprob canary",
                                                 "engine serves the newest push",
                                                 "optimizer state off the GPU while generating"}
    assert all(line["caught"] for line in lines)
    # the clean run: what a GPU user's run must show, run here on the CPU engine
    for name in ("engine built once", "sleep/wake + push order", "engine's sleep record is vLLM's", "logprob canary",
                 "engine serves the newest push", "evaluation ran", "losses finite"):
        assert data["clean"][name] == "PASS", name
