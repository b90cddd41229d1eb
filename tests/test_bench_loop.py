"""The loop benchmarks (engine_rebuild, batching_sparse, step_breakdown, ppo_value_init) run end to end at --tiny size: exit 0, the
table printed, the JSON complete with positive numbers, and the rebuild strategy really rebuilding. Which side is
faster is measured in benchmarks/, never asserted here.

The four scripts are started together (they only need to finish, not to be timed), so the slowest one, not their
sum, sets how long this file takes: mostly vLLM engine starts (about 25 s each on an idle CPU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: at these sizes a second OpenMP thread only spin-waits, which on busy shared cores costs seconds a step.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BENCHMARKS = ("engine_rebuild", "batching_sparse", "step_breakdown", "ppo_value_init")


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Start the selected benchmarks at --tiny, together; each test waits for its own. Yields {name: (process,
    folder)}."""
    selected = {item.name for item in request.session.items if item.path.name == os.path.basename(__file__)}
    started = {}
    for name in [n for n in BENCHMARKS if f"test_{n}_tiny" in selected]:
        folder = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--tiny",
               "--json", str(folder / "out.json"), "--plot", str(folder / "plot.png")]
        if name != "batching_sparse":
            cmd += ["--workdir", str(folder / "work")]
        log = open(folder / "log.txt", "w+")
        started[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV),
                         folder, log)
    yield {name: (proc, folder) for name, (proc, folder, _) in started.items()}
    for proc, _, log in started.values():
        if proc.poll() is None:
            proc.kill()
        log.close()


def finished(runs, name):
    """Wait for one benchmark; returns (its output, its JSON report) after checking exit 0 and the plot."""
    proc, folder = runs[name]
    proc.wait(timeout=900)
    output = (folder / "log.txt").read_text()
    assert proc.returncode == 0, output[-5000:]
    assert (folder / "plot.png").stat().st_size > 0
    return output, json.loads((folder / "out.json").read_text())


@pytest.mark.e2e
def test_engine_rebuild_tiny(runs):
    output, report = finished(runs, "engine_rebuild")
    assert "rebuild/persistent step time" in output
    assert set(report["results"]) == {"persistent", "rebuild"}
    for result in report["results"].values():
        assert result["timed_steps"] == 1  # 2 steps, the first is the warm-up
        for key in ("step_seconds", "sync_seconds", "sync_share", "generate_seconds", "train_seconds", "max_rss_gib"):
            assert result[key] > 0, key
    # persistent: one engine for the whole run; rebuild: a new one after every update (1 + one per step)
    assert all(builds == 1 for run in report["results"]["persistent"]["engine_builds"] for builds in run)
    assert report["results"]["rebuild"]["engine_builds"] == [[2, 3]]
    assert report["results"]["rebuild"]["logprob_diff"] < 0.05  # the rebuilt engine holds the trained weights
    assert report["ratios"]["step_seconds"] > 0 and report["ratios"]["sync_seconds"] > 0


def test_batching_sparse_tiny(runs):
    output, report = finished(runs, "batching_sparse")
    assert "fixed/budget=peak: CPU time" in output and "full/sparse: CPU time" in output
    rows = report["rows"]
    assert set(rows) == {"fixed", "budget=peak", "budget=mean", "sparse"}
    for name, row in rows.items():
        assert row["cpu_seconds"] > 0 and row["padded_tokens"] >= row["real_tokens"] > 0, name
        assert 0 <= row["padding_fraction"] < 1, name
        assert row["largest_micro_batch_tokens"] <= max(report["budgets"]["peak"], max(report["completion_lengths"])
                                                        + report["settings"]["prompt_tokens"]), name
    for name in ("fixed", "budget=peak", "budget=mean"):  # the same log-probs summed: the same gradient
        assert rows[name]["samples"] == report["settings"]["samples"]
        assert rows[name]["grad_max_rel_diff"] < 1e-4, name
    # sorted token-budget batches pad less than fixed ones at the same peak size (a property, not a timing)
    assert rows["budget=peak"]["padding_fraction"] <= rows["fixed"]["padding_fraction"]
    assert rows["sparse"]["samples"] == report["settings"]["samples"] - len(report["equal_groups"]) * \
        report["settings"]["group_size"]
    assert all(value > 0 for value in report["ratios"].values())


@pytest.mark.e2e
def test_step_breakdown_tiny(runs):
    output, report = finished(runs, "step_breakdown")
    assert "mean seconds per step" in output
    grpo = report["results"]["grpo"]
    assert grpo["timed_steps"] == 1 and grpo["steps"] == [2]
    assert grpo["step_seconds"] > 0 and grpo["engine_builds"] == 1
    for phase in ("generate", "score", "train", "sync"):
        assert grpo["seconds"][phase] > 0, phase
    assert grpo["seconds"]["reference"] > 0  # the GRPO demo has kl_coef > 0: a reference pass
    assert abs(sum(grpo["share"].values()) - 1) < 1e-6
    assert report["failed"] == []


@pytest.mark.e2e
def test_ppo_value_init_tiny(runs):
    output, report = finished(runs, "ppo_value_init")
    assert "EV steps 1-10" in output
    assert set(report["results"]) == {"with value init", "without (value_init_steps 0)"}
    for result in report["results"].values():
        assert len(result["reward_per_step"]) == 3 and len(result["explained_variance_per_step"]) == 3
        assert 0 <= result["reward_first_10_steps"] <= 1
    work = runs["ppo_value_init"][1] / "work"
    with open(work / "seed42-initdemo" / "value_init.jsonl") as f:  # the critic was fitted before PPO started
        rows = [json.loads(line) for line in f]
    # 2 fitting rounds, then the round that measures the last fit (or earlier: value_init_ev reached)
    assert 2 <= len(rows) <= 3 and rows[0]["value_loss"] is not None and rows[-1]["value_loss"] is None
    assert not (work / "seed42-init0" / "value_init.jsonl").exists() or \
        (work / "seed42-init0" / "value_init.jsonl").read_text() == ""
