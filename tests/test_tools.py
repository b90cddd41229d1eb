"""Tools and multi-turn episodes (nanorlhf/tools.py, nanorlhf/multiturn.py): parsing calls, failing safely, the code
tool's limits, the episode's ids and loss mask, the budgets, no gradient on tool tokens, the real engine going on
after a tool turn, and one step of GRPO, RLOO and PPO with --tools end to end on a tiny model taught to call a tool
(tool_calling_model; REINFORCE's, with --environment, is in test_environment.py)."""

import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_script

from nanorlhf import tools
from nanorlhf.engine import Completion
from nanorlhf.errors import UserError
from nanorlhf.multiturn import MultiTurn, Template, takes_tools
from nanorlhf.rollout import make_batch
from nanorlhf.tasks import resolve


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def fail(x: str) -> str:
    """Always raises.

    Args:
        x: anything
    """
    raise ValueError("broken tool")


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "done"


def long(n: int) -> str:
    """A long answer.

    Args:
        n: how many words
    """
    return " ".join(["word"] * n)


TOOLS = {"add": add, "fail": fail, "slow": slow, "long": long}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve("demo:addition"))


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_parse_calls_reads_hermes_calls_and_reports_malformed_ones():
    text = f"Let me add. {call('add', a=1, b=2)} and {call('long', n=3)}"
    assert [(c.name, c.arguments) for c in tools.parse_calls(text)] == [("add", {"a": 1, "b": 2}), ("long", {"n": 3})]
    assert tools.parse_calls("no call here") == []
    string_arguments = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
    assert tools.parse_calls(string_arguments)[0].arguments == {"a": 1, "b": 2}
    for bad in ("<tool_call>{not json}</tool_call>", '<tool_call>{"name": "add"', '<tool_call>["add"]</tool_call>',
                '<tool_call>{"arguments": {}}</tool_call>'):
        (parsed,) = tools.parse_calls(bad)
        assert parsed.name is None and parsed.error


def test_toolbox_turns_every_failure_into_a_counted_message(tokenizer):
    box = tools.Toolbox(TOOLS, timeout=1.0, tokenizer=tokenizer, max_tokens=20)
    turns = [[tools.parse_calls(call("add", a=2, b=3))[0]],
             tools.parse_calls("<tool_call>{oops</tool_call>") + tools.parse_calls(call("nope"))
             + tools.parse_calls(call("fail", x="y")) + tools.parse_calls(call("add", a=1)),
             tools.parse_calls(call("slow", seconds=30)) + tools.parse_calls(call("add", a=1, b=1)),
             tools.parse_calls(call("long", n=500))]
    start = time.monotonic()
    results = box.run([[(c, TOOLS) for c in calls] for calls in turns])
    assert time.monotonic() - start < 5  # the hanging call is given up on at the timeout
    assert [(r.content, r.failed) for r in results[0]] == [("5", False)]
    malformed, unknown, raising, bad_arguments = results[1]
    assert malformed.failed and "could not be read" in malformed.content
    assert unknown.failed and "no tool named 'nope'" in unknown.content and "add, fail" in unknown.content
    assert raising.failed and "ValueError: broken tool" in raising.content
    assert bad_arguments.failed and "TypeError" in bad_arguments.content
    timed_out, after = results[2]  # an episode's calls run in order: the one after the hanging call never starts
    assert timed_out.failed and "did not return within 1 s" in timed_out.content
    assert after.failed and "did not return within 1 s" in after.content
    (cut,) = results[3]
    assert cut.truncated and not cut.failed and cut.content.endswith("[truncated]")
    assert len(tokenizer(cut.content.removesuffix(" [truncated]")).input_ids) <= 20


def test_calls_of_a_turn_run_concurrently(tokenizer):
    box = tools.Toolbox(TOOLS, timeout=10, tokenizer=tokenizer, max_tokens=0)
    start = time.monotonic()
    results = box.run([[(tools.parse_calls(call("slow", seconds=0.5))[0], TOOLS)] for _ in range(8)])
    assert time.monotonic() - start < 2.0  # 8 x 0.5 s one after another would take 4 s
    assert all(r.content == "done" for (r,) in results)


def test_python_tool_runs_code_in_a_limited_subprocess(monkeypatch):
    assert tools.python("print(6 * 7)") == "42\n"
    assert "ZeroDivisionError" in tools.python("1 / 0") and "[exit status 1]" in tools.python("1 / 0")
    assert tools.python("import os; print(os.getcwd())").strip().startswith(os.path.realpath(
        os.environ.get("TMPDIR", "/tmp")))
    assert "MemoryError" in tools.python("x = bytearray(4 << 30)")  # past the 1 GiB address-space limit
    monkeypatch.setitem(tools.PYTHON_LIMITS, "seconds", 1.0)
    assert "did not finish within 1 s" in tools.python("while True: pass")
    if tools.no_network_prefix():  # else the docstring says the code has the network
        out = tools.python("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)")
        assert "OSError" in out or "unreachable" in out


def test_load_tools_from_a_file_and_schema_errors(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text('def lookup(key: str) -> str:\n    """Look a key up.\n\n    Args:\n        key: the key\n    """\n'
                    '    return key.upper()\n\ndef untyped(key):\n    return key\n')
    loaded = tools.load_tools(f"{path}:lookup")
    assert loaded["lookup"]("a") == "A"
    assert tools.schemas(loaded)[0]["function"]["parameters"]["properties"]["key"]["type"] == "string"
    with pytest.raises(UserError, match="--tools: untyped needs type hints"):
        tools.load_tools(f"{path}:untyped")
    with pytest.raises(UserError, match="--tools.*no function 'missing'"):
        tools.load_tools(f"{path}:missing")


def test_template_checks(tokenizer):
    assert not takes_tools(tokenizer, tools.schemas({"add": add}), {})  # the tiny ChatML template: described instead
    template = Template(tokenizer, "demo", {})
    assert tokenizer.decode(template.end) == "\n"  # ChatML: the newline after <|im_end|>
    original = tokenizer.chat_template
    try:  # a template that renders the last message differently (as Qwen3's thinking template does)
        tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ('!' if loop.last else '') + ':' + "
                                   "m['content'] + '<|im_end|>' }}{% endfor %}")
        with pytest.raises(UserError, match="adding a tool message changes how the earlier messages render"):
            Template(tokenizer, "some/model", {})
        tokenizer.chat_template = "{{ raise_exception('tool role') if messages[-1]['role'] == 'tool' }}"
        with pytest.raises(UserError, match="refuses a tool message"):
            Template(tokenizer, "some/model", {})
    finally:
        tokenizer.chat_template = original


class ScriptedEngine:
    """Stands in for the engine where the engine is not the point (the ids, the mask, the budgets): each call of
    generate answers every episode with the next scripted text, encoded as the tokenizer does, plus <|im_end|>."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, list(script), []

    def generate(self, prompt_ids, n, seed, max_new_tokens, seeds=None, **_):
        self.calls.append(len(prompt_ids) * n)
        text = self.script.pop(0)
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_ids)
        out = []
        for i in range(len(prompt_ids) * n):
            ids = self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            budget = budgets[i // n]
            out.append(Completion(i // n, ids[:budget], text, [-0.5] * min(len(ids), budget), len(ids) > budget))
        return out


def prompt(tokenizer, question="What is 123 * 456?"):
    from nanorlhf.data import PromptStream

    messages = PromptStream.with_tools(SimpleNamespace(tools=tools.schemas({"add": add}), tools_in_template=False),
                                       [{"role": "user", "content": question}])
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"token_ids": tokenizer(text, add_special_tokens=False).input_ids, "messages": messages}


def episodes(tokenizer, script, max_turns=4, budget=1000, max_tool_tokens=0, n=1):
    engine = ScriptedEngine(tokenizer, script)
    box = tools.Toolbox(TOOLS, timeout=5, tokenizer=tokenizer, max_tokens=max_tool_tokens)
    rollout = MultiTurn(engine, Template(tokenizer, "demo", {}), box, TOOLS, max_turns, budget)
    return rollout.episodes([prompt(tokenizer)], n, seed=1), engine


def test_episode_ids_and_mask(tokenizer):
    turns = [f"I will add. {call('add', a=120, b=3)}", f"{call('add', a=1, b=1)} {call('nope')}", "The answer is 56088"]
    (episode,), engine = episodes(tokenizer, turns)
    assert engine.calls == [1, 1, 1] and episode.turns == 3 and episode.tool_calls == 3 and episode.tool_failures == 1
    assert [m["role"] for m in episode.messages] == ["system", "user", "assistant", "tool", "assistant", "tool",
                                                    "tool", "assistant"]
    assert episode.messages[3]["content"] == "123" and episode.text == turns[-1] and not episode.truncated
    ids, mask = episode.token_ids, episode.loss_mask
    assert len(ids) == len(mask) == len(episode.logprobs)
    # mask 1: exactly what the model sampled, turn by turn, end-of-turn token included
    sampled = [tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)]
    assert sampled == ["<|im_end|>".join(turns) + "<|im_end|>"]
    # mask 0: exactly the tool messages as the template renders them; the sampler's log-probs are 0 there
    template = Template(tokenizer, "demo", {})
    runs, current = [], []
    for t, m in zip(ids + [None], mask + [1]):
        if m == 0:
            current.append(t)
        elif current:
            runs, current = runs + [current], []
    assert runs == [template.tool_ids(episode.messages[3:4]), template.tool_ids(episode.messages[5:7])]
    assert all(lp == 0.0 for lp, m in zip(episode.logprobs, mask) if m == 0)
    # the episode is the full render of its conversation (a prefix-preserving template), up to the last turn's end
    full = template.ids(episode.messages)
    assert prompt(tokenizer)["token_ids"] + ids + template.end == full
    # the batch carries the mask
    batch = make_batch([prompt(tokenizer)], [episode])
    assert batch.loss_mask[0].tolist() == [float(m) for m in mask]


def test_turn_and_token_budgets(tokenizer):
    (episode,), engine = episodes(tokenizer, [call("add", a=1, b=2)] * 5, max_turns=2)
    assert episode.turns == 2 and engine.calls == [1, 1]  # the last turn's call is not run: no turn is left
    assert episode.tool_calls == 1 and episode.messages[-1]["role"] == "assistant"
    # the budget counts every token: sampled and tool tokens together never pass max_new_tokens
    for budget in (10, 30, 45, 60):
        (episode,), _ = episodes(tokenizer, [call("add", a=1, b=2)] * 5, budget=budget)
        assert len(episode.token_ids) <= budget and episode.truncated
    # a result over max_tool_response_tokens is cut and counted
    (episode,), _ = episodes(tokenizer, [call("long", n=300), "ok"], max_tool_tokens=8)
    assert episode.tool_truncations == 1 and episode.messages[3]["content"].endswith("[truncated]")


def test_no_gradient_reaches_tool_tokens(tokenizer):
    """Through update.py's log-probs (the loss mask applied there) and GRPO's loss: the gradient with respect to the
    last hidden state of every position that predicts a tool token (it feeds only that position's logits) is exactly
    zero, and so are the tool tokens' importance weights and KL terms."""
    from transformers import AutoModelForCausalLM

    from nanorlhf.logprobs import importance_weights
    from nanorlhf.update import Update

    grpo = load_script("GRPO/grpo.py")
    model = AutoModelForCausalLM.from_pretrained(resolve("demo:addition"), dtype=torch.float32)
    (episode,), _ = episodes(tokenizer, [f"Add. {call('add', a=120, b=3)}", "It is 123"])
    batch = make_batch([prompt(tokenizer)], [episode])
    cfg = SimpleNamespace(temperature=1.0, top_p=1.0)
    update = Update(cfg, model, None, None, tokenizer.pad_token_id, True, None, {})
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, out: captured.setdefault("hidden", out))
    out = update.logprobs(batch, sampling=True)
    hook.remove()
    hidden = captured["hidden"]
    hidden.retain_grad()
    mask = out["mask"]
    with torch.no_grad():
        ref = out["logprobs"] - 0.3  # a reference elsewhere: the KL term is nonzero on the model's tokens
    weights, _, _ = importance_weights(out["sampler_logprobs"], batch.vllm_logprobs, mask)
    loss, _ = grpo.compute_loss(out["logprobs"], out["logprobs"].detach(), ref, torch.tensor([1.0]), mask, 0.2, 0.1,
                                "token", 1, weights)
    loss.backward()
    tool = torch.tensor(episode.loss_mask) == 0
    start = len(prompt(tokenizer)["token_ids"]) - 1  # position t predicts token t + 1
    grad = hidden.grad[0, start : start + len(episode.token_ids)].abs().sum(-1)
    assert tool.any() and (grad[tool] == 0).all() and (grad[~tool] > 0).all()
    assert (weights[0][tool] == 0).all() and (weights[0][~tool] > 0).all()
    assert (mask[0][tool] == 0).all() and not out["canary_mask"][0][tool].any()
    assert (out["logprobs"][0][tool] == 0).all()


def test_ppo_gae_runs_over_the_model_tokens_only():
    """GAE and the score's place with tool tokens inside a completion: the same as on the model's tokens alone."""
    ppo = load_script("PPO/ppo.py")
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    values, scores = torch.randn(2, 7, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, -2.0])
    logprobs, ref = torch.randn(2, 7), torch.randn(2, 7)
    rewards = ppo.token_rewards(scores, logprobs, ref, mask, 0.1)
    advantages, returns = ppo.compute_gae(rewards, values, mask, 0.9, 0.8)
    assert rewards[0, 5] != 0 and rewards[1, 2] != 0 and (rewards[~mask] == 0).all()  # the score on the last kept
    for row in range(2):
        kept = mask[row]
        alone = ppo.compute_gae(rewards[row : row + 1, kept], values[row : row + 1, kept], kept[kept][None], 0.9, 0.8)
        assert torch.allclose(advantages[row, kept], alone[0][0]) and torch.allclose(returns[row, kept], alone[1][0])
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


@pytest.fixture(scope="module")
def engine():
    from nanorlhf.engine import RolloutEngine

    engine = RolloutEngine(resolve("demo:addition"), 1024, "float32", seed=0)
    yield engine
    engine.close()


class FirstTurnScripted:
    """The real engine, except that the first turn is scripted (the tiny model never calls a tool by itself)."""

    def __init__(self, engine, tokenizer, text):
        self.engine, self.scripted = engine, ScriptedEngine(tokenizer, [text])

    def generate(self, *args, **kwargs):
        if self.scripted.script:
            return self.scripted.generate(*args, **kwargs)
        return self.engine.generate(*args, **kwargs)


def test_real_engine_goes_on_after_a_tool_turn(engine, tokenizer):
    template, box = Template(tokenizer, "demo", {}), tools.Toolbox(TOOLS, 5, tokenizer, 0)
    first = f"Let me add. {call('add', a=120, b=3)}"
    rollout = MultiTurn(FirstTurnScripted(engine, tokenizer, first), template, box, TOOLS, 2, 200)
    group = rollout.episodes([prompt(tokenizer)], 3, seed=7, temperature=1.0)
    for episode in group:
        assert episode.turns == 2 and episode.messages[3] == {"role": "tool", "name": "add", "content": "123"}
        n_first = len(tokenizer(first, add_special_tokens=False).input_ids) + 1
        tool_ids = template.tool_ids(episode.messages[3:4])
        assert episode.loss_mask == [1] * n_first + [0] * len(tool_ids) + [1] * (len(episode.token_ids) - n_first
                                                                                 - len(tool_ids))
        second = episode.token_ids[n_first + len(tool_ids) :]
        assert 0 < len(second) <= 200 - n_first - len(tool_ids)
        assert all(lp < 0 for lp in episode.logprobs[n_first + len(tool_ids) :])  # the real sampler's log-probs
    assert len({tuple(e.token_ids) for e in group}) > 1  # each episode its own seed
    # the same seed gives the same episodes (turn seeds are drawn from the step's seed)
    again = MultiTurn(FirstTurnScripted(engine, tokenizer, first), template, box, TOOLS, 2, 200)
    assert [e.token_ids for e in again.episodes([prompt(tokenizer)], 3, seed=7, temperature=1.0)] == \
        [e.token_ids for e in group]
    # unscripted, the real engine's episodes end after one turn that calls nothing, as single-turn completions would
    plain = MultiTurn(engine, template, box, TOOLS, 3, 16).episodes([prompt(tokenizer)], 2, seed=3)
    reference = engine.generate([prompt(tokenizer)["token_ids"]], 2, 3, 16)
    assert [e.token_ids for e in plain] == [c.token_ids for c in reference] and all(e.turns == 1 for e in plain)


# --- one step of each script with tools, on a tiny model that calls them --------------------------------------------

CALL = '<tool_call>{"name": "f"}</tool_call>'  # what the tool-calling model writes: one token of its vocabulary
TOOLS_LINE = ("{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | map(attribute='function.name') | join(', '))"
              " + '<|im_end|>\\n' }}{% endif %}")


def tool_calling_model(steps=80, version=1):
    """Path of a tiny model that calls the tool `f` (built once, ~20 s, cached beside the demo model). The demo model
    with: a template that takes `tools=` as one line (the prompt stays short, as with Qwen's templates), CALL added to
    its vocabulary as one token (as Qwen's has <tool_call>), and `steps` supervised steps on transcripts: CALL, a tool
    message, one random digit. It then calls `f` in nearly every sampled first turn and answers the tool with a random
    digit, so the rewards of a step differ."""
    import random
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanorlhf.tasks import build_once, cache_dir
    from nanorlhf.tiny import CHAT_TEMPLATE

    path = os.path.join(cache_dir(), f"tiny-tool-caller-{steps}-{version}")

    def build(tmp):
        shutil.copytree(resolve("demo:addition"), tmp, dirs_exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        tokenizer.chat_template = TOOLS_LINE + CHAT_TEMPLATE
        tokenizer.add_tokens([CALL])
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rng = random.Random(0)

        def transcript():
            """(ids, labels): labels on the model's turns (content and end-of-turn token) only."""
            tools = [{"type": "function", "function": {"name": n}} for n in rng.choice([["f"], ["g", "f"]])]
            messages = [{"role": "user", "content": f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)}?"}]
            if rng.random() < 0.5:  # an --environment's reset() message
                messages.append({"role": "user", "content": f"Hint: {rng.randint(0, 99)}."})
            messages += [{"role": "assistant", "content": CALL}, {"role": "tool", "content": str(rng.randint(0, 999))},
                         {"role": "assistant", "content": str(rng.randint(0, 9))}]
            def render(conversation, generation_prompt=False):
                text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
                return tokenizer(text, add_special_tokens=False).input_ids

            ids, labels = [], []
            for k, message in enumerate(messages):
                end = render(messages[: k + 1])  # ends with the end-of-turn token and a newline
                if message["role"] == "assistant":  # learned: after the template's header, up to its end-of-turn
                    start = render(messages[:k], generation_prompt=True)
                    labels += [-100] * (len(start) - len(ids)) + end[len(start) : -1] + [-100]
                else:
                    labels += [-100] * (len(end) - len(ids))
                ids = end
            return ids, labels

        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(steps):
            batch = [transcript() for _ in range(16)]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([la + [-100] * (width - len(la)) for _, la in batch])
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_once(path, build, "config.json")  # the other test file may build it at the same time


@pytest.fixture(scope="module")
def tool_model():
    return tool_calling_model()


TOOLS_FILE = """
def f() -> str:
    \"\"\"Look the number up.\"\"\"
    return "42"


def digit(prompts, completions, messages, **_):
    # the model's last turn (a digit after the tool's answer), over 9; 0 for anything else
    return [int(m[-1]["content"]) / 9 if m[-1]["content"].isdigit() else 0.0 for m in messages]
"""


def run_with_tools(script, tmp_path, tool_model, *extra, steps=1):
    """A run of `script` (2 prompts x 2 episodes a step) on the tool-calling model with --tools f: (status, output,
    metrics rows, samples)."""
    tools_file = tmp_path / "my_tools.py"
    tools_file.write_text(TOOLS_FILE)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--demo", "--model", tool_model,
                             "--total_episodes", str(4 * steps), "--prompts_per_step", "2", "--group_size", "2",
                             "--tools", f"{tools_file}:f", "--reward_fn", f"{tools_file}:digit", "--max_turns", "2",
                             "--max_new_tokens", "24", "--max_prompt_tokens", "64", "--eval_every", "0", "--wandb",
                             "false", "--export_model", "false", "--output_dir", str(out), *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return rows, [json.loads(line) for line in open(out / "samples.jsonl")]


@pytest.mark.e2e
@pytest.mark.parametrize("script, extra", [("GRPO/grpo.py", []), ("RLOO/rloo.py", []),
                                           ("PPO/ppo.py", ["--value_init_steps", "1"])])
def test_one_step_with_tools(script, extra, tmp_path, tool_model):
    """The model calls `f`, its answer reaches the conversation, the tool tokens are out of the loss (the canary,
    which compares the trainer's log-probs with the sampler's 0 there otherwise, stays small), the loss is finite."""
    (row,), samples = run_with_tools(script, tmp_path, tool_model, *extra)
    assert row["tool_calls_mean"] >= 0.5 and row["tool_failures"] == 0 and row["turns_mean"] > 1
    assert 0.2 < row["tool_token_fraction"] < 1 and row["reward_std"] > 0
    assert math.isfinite(row["loss"]) and row["logprob_diff"] < 0.05
    messages = [json.loads(s["messages"]) for s in samples]
    assert {"role": "tool", "name": "f", "content": "42"} in [m for conversation in messages for m in conversation]
