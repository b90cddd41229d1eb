"""The README's "A tour of a run", run as written on the short demo run the tests share (tests/conftest.py): `runs/demo`
is that run (a link), and the tour's first command is the one that made it, with the test's shorter settings. The
tour's Python block (the final model in transformers and vLLM) runs in tests/test_export.py, on the same run."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tour():
    """(the bash lines, the Python block) of the README's tour."""
    section = open(os.path.join(ROOT, "README.md")).read().split("## A tour of a run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    bash = [line.split("  #")[0].strip() for lang, code in blocks if lang == "bash" for line in code.splitlines()]
    return [line for line in bash if line], next(code for lang, code in blocks if lang == "python")


@pytest.fixture(scope="module")
def workdir(grpo_demo_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tour")
    (folder / "runs").mkdir()
    os.symlink(grpo_demo_run[0], folder / "runs" / "demo")
    return folder


def run(command, cwd, **kwargs):
    command = re.sub(r"^\.venv/bin/python ", sys.executable + " ", command)  # the README's venv is this one
    env = {**os.environ, "PYTHONPATH": ROOT, "VLLM_CPU_KVCACHE_SPACE": "2"}
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def test_tour_commands_run_as_written(grpo_demo_run, workdir):
    bash, _ = tour()
    first, *rest = bash
    assert first == ".venv/bin/python GRPO/grpo.py --demo --output_dir runs/demo"
    assert "grpo.py --demo" in open(os.path.join(grpo_demo_run[0], "command.txt")).read()
    outputs = {}
    for command in rest:
        result = run(command, workdir)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        outputs[command.split()[0]] = result.stdout
    samples = [json.loads(line) for line in outputs["tail"].splitlines()]
    assert len(samples) == 4 and {"prompt", "completion", "reward"} <= set(samples[0])
    assert len(re.findall(r'"eval_reward_mean": [0-9.]+', outputs["grep"])) == 2  # steps 1 and 8 of the short run
    assert '"output_dir"' in outputs["cat"] and "grpo.py --demo" in outputs["cat"]
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "README.md"} <= set(outputs["ls"].split())
    assert os.path.isfile(workdir / "exported" / "model.safetensors")
