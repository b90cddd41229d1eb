"""Metrics: one JSON line per step in <output_dir>/metrics.jsonl, the same numbers in wandb, a tqdm bar,
and at the end a PNG of reward and response length per step."""

import itertools
import json
import math
import os
import secrets
import string

from nanorlhf import console
from nanorlhf.config import as_dict

PLOTTED = ("reward_mean", "response_length_mean", "eval_reward_mean", "eval_response_length_mean")


def _wandb_mode():
    """online when the user has credentials, else offline (never a login prompt); WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    logged_in = os.environ.get("WANDB_API_KEY") or (os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read())
    return "online" if logged_in else "offline"


def _clean(value):
    """JSON-safe scalar: tensors to floats, NaN/inf to null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """`resumed_step`: the step of the checkpoint a resumed run continues from (None for a new run); the rows logged
    after it by the run that died are moved aside (set_aside_metrics) and wandb continues the same run."""

    def __init__(self, output_dir, config, use_wandb, project, run_name, total_episodes, episodes_done=0,
                 resumed_step=None):
        from tqdm.auto import tqdm

        self.output_dir, self.closed = output_dir, False
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.samples_path = os.path.join(output_dir, "samples.jsonl")
        if resumed_step is not None:
            set_aside_metrics(self.path, resumed_step)
            set_aside_metrics(self.samples_path, resumed_step)
        self.wandb = None
        if use_wandb:
            import wandb

            mode = _wandb_mode()
            if mode == "offline":
                console.say(f"wandb: no credentials found, logging offline to {output_dir}/wandb "
                            "(`wandb login` to go online, `wandb sync` to upload this run)", err=True)
            self.wandb = wandb.init(project=project, name=run_name, dir=output_dir, mode=mode, config=as_dict(config),
                                    id=_wandb_run_id(output_dir), resume="allow")
        self.bar = tqdm(total=total_episodes, initial=episodes_done, unit="episode", dynamic_ncols=True,
                        file=console.terminal())

    def log(self, metrics):
        metrics = {k: _clean(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        # wandb's steps only go forward: a step the dead run had already sent keeps the values sent then
        if self.wandb is not None and metrics["step"] >= self.wandb.step:
            self.wandb.log(metrics, step=metrics["step"])
        self.bar.update(metrics["episodes"] - self.bar.n)
        self.bar.set_postfix(reward=_short(metrics["reward_mean"]), kl=_short(metrics.get("kl")), refresh=False)

    def log_samples(self, step, rows):
        """A few prompts, completions and rewards: appended to samples.jsonl, and a wandb.Table named `samples`."""
        rows = [{"step": step, **{k: _clean(v) for k, v in row.items()}} for row in rows]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if self.wandb is not None and rows and step >= self.wandb.step:
            import wandb

            columns = list(rows[0])
            self.wandb.log({"samples": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])},
                           step=step)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        png = plot_metrics(self.path, os.path.join(self.output_dir, "metrics.png"))
        if self.wandb is not None:
            if png:
                import wandb

                self.wandb.log({"curves": wandb.Image(png)})
            self.wandb.finish()
        summary = reward_summary(read_metrics(self.path))
        if summary:
            console.say(summary)


def _short(value):
    return "n/a" if value is None else f"{value:.3g}"


def _wandb_run_id(output_dir):
    """The run folder's wandb id (in wandb/nanorlhf-run-id), made on the first call: a resumed run logs to the same
    wandb run."""
    path = os.path.join(output_dir, "wandb", "nanorlhf-run-id")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:  # wandb's id alphabet; `secrets`, not the run's seeded generators
            f.write("".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)))
    with open(path) as f:
        return f.read().strip()


def set_aside_metrics(path, step):
    """Keep the rows of steps <= step in metrics.jsonl; the later ones (logged by a run that died after its last
    checkpoint) move to metrics.jsonl.after-<step>, not deleted. Returns how many moved."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    later = [line for line in lines if json.loads(line)["step"] > step]
    if later:
        aside = f"{path}.after-{step}"
        for n in itertools.count(2):
            if not os.path.exists(aside):
                break
            aside = f"{path}.after-{step}-{n}"
        with open(aside, "w") as f:
            f.writelines(later)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(line for line in lines if json.loads(line)["step"] <= step)
        os.replace(tmp, path)
    return len(later)


def reward_summary(rows):
    """One line: mean reward over the first and the last quarter of the steps (None under 4 steps)."""
    rows = [r for r in rows if r.get("reward_mean") is not None]  # a non-finite reward is logged as null
    if len(rows) < 4:
        return None
    quarter = len(rows) // 4
    first, last = (sum(r["reward_mean"] for r in part) / quarter for part in (rows[:quarter], rows[-quarter:]))
    return (f"reward_mean: {first:.3f} over the first quarter of the {len(rows)} steps -> {last:.3f} over the "
            f"last quarter")


def read_metrics(path):
    """metrics.jsonl -> list of dicts; a step logged twice (a resumed run) keeps its last line."""
    by_step = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(path, png, keys=PLOTTED):
    """Save one panel per logged key (value per step) to png; returns png, or None when nothing was logged."""
    rows = read_metrics(path)
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    fig, axes = new_figure(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*points), marker=".")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    save_figure(fig, png, dpi=100)
    return png


def new_figure(*args, **kwargs):
    """plt.subplots(*args, **kwargs) on matplotlib's file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path, dpi=120):
    """Lay out, write the PNG (creating its folder) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
