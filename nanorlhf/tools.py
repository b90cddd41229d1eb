"""Tools a model calls during an episode: loading them (`--tools file.py:fn1,fn2`; `--environment file.py:Class`, whose
public methods are the tools of each episode's own instance), their JSON schemas, parsing the model's calls, and
running one turn's calls across the batch at once, failures included.

A tool is a plain typed Python function with a docstring (Google style: `Args:` names each parameter); its JSON schema
comes from transformers (`transformers.utils.get_json_schema`) and reaches the model through the chat template's
`tools=`, or, for a template that takes none, through a system message in the same format (`describe`).

Supported call format: Hermes / Qwen, the one Qwen2.5, Qwen3, Hermes and most open chat templates use:

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

(several per turn allowed; "arguments" may be an object or a JSON string of one). A call that is not that JSON, names
no known tool, raises, or runs past `tool_timeout` becomes a tool message saying so (`ToolResult.failed`): the run goes
on. A result longer than `max_tool_response_tokens` is cut (`ToolResult.truncated`); error messages are not.

`python` is a ready code-execution tool (see its docstring for what it isolates and what it does not).
"""

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from nanorlhf.errors import UserError

CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def load_tools(spec):
    """`path/to/file.py:fn1,fn2` or `package.module:fn1,fn2` -> {name: function}; each must have a usable schema."""
    from nanorlhf.rewards import load_source

    source, sep, names = spec.rpartition(":")
    if not sep or not source or not names:
        raise UserError(f"--tools {spec!r} must look like path/to/file.py:fn1,fn2 or module:fn1,fn2")
    module, tools = load_source(source, "--tools"), {}
    for name in names.split(","):
        tools[name] = getattr(module, name, None)
        if not callable(tools[name]):
            raise UserError(f"--tools: {source!r} has no function {name!r}")
        check_schema(tools[name], "--tools")
    return tools


def load_environment(spec):
    """`path/to/file.py:Class` or `package.module:Class` -> the class (one instance per episode, see
    environment_tools); its tools must have usable schemas."""
    from nanorlhf.rewards import load_source

    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UserError(f"--environment {spec!r} must look like path/to/file.py:Class or module:Class")
    environment = getattr(load_source(source, "--environment"), name, None)
    if not isinstance(environment, type):
        raise UserError(f"--environment: {source!r} has no class {name!r}")
    for fn in environment_tools(environment).values():
        check_schema(fn, "--environment")
    return environment


def environment_tools(environment):
    """{name: function} of an --environment class's tools: its public methods (not starting with `_`), `reset` and
    `reward` left out. Bound to an episode's instance with getattr(instance, name)."""
    return {name: fn for name, fn in inspect.getmembers(environment, inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "reward")}


def check_schema(fn, flag):
    """A UserError naming `flag` unless transformers can make fn's JSON schema (type hints and a docstring)."""
    from transformers.utils import get_json_schema

    try:
        get_json_schema(fn)
    except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
        raise UserError(f"{flag}: {fn.__name__} needs type hints on every argument and a docstring whose Args: "
                        f"section describes each ({type(e).__name__}: {e})") from None


def schemas(tools):
    """The JSON schemas (OpenAI function format) of {name: function}."""
    from transformers.utils import get_json_schema

    return [get_json_schema(fn) for fn in tools.values()]


def describe(tool_schemas):
    """A system message's text that describes the tools in the Hermes format, for a chat template without `tools`."""
    listed = "\n".join(json.dumps(s) for s in tool_schemas)
    return ("# Tools\n\nYou can call functions to help with the request. Their signatures, one JSON object a line:\n"
            f"<tools>\n{listed}\n</tools>\n\nTo call one, answer with a JSON object holding its name and arguments "
            'inside <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function name>, "arguments": '
            "<arguments as a JSON object>}\n</tool_call>")


@dataclasses.dataclass
class Call:
    name: str | None  # None: the call could not be parsed
    arguments: dict
    error: str = ""  # why it could not be parsed


def parse_calls(text):
    """The Hermes-format calls in a model turn's text, in order ([] when it calls nothing)."""
    calls = []
    for body, end in CALL.findall(text):
        try:
            call = json.loads(body)
            arguments = call.get("arguments", {}) if isinstance(call, dict) else None
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not end:
                raise ValueError("no closing </tool_call>")
            if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
                raise ValueError('not an object with a string "name" and an object "arguments"')
            calls.append(Call(call["name"], arguments))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            calls.append(Call(None, {}, str(e).splitlines()[0]))
    return calls


@dataclasses.dataclass
class ToolResult:
    name: str
    content: str
    failed: bool = False  # malformed call, unknown tool, raised, or timed out
    truncated: bool = False  # cut to max_tool_response_tokens


class Toolbox:
    """Runs the calls of one turn for the whole batch: each episode's calls one after another, in the order the model
    wrote them (an --environment's state sees them in that order), in a thread of its own, all episodes at once. A
    call still running `timeout` seconds after the start, or not started by then, is reported as timed out (and a
    running one left to finish in its daemon thread: Python cannot stop a thread; the `python` tool stops its own
    subprocess). `tokenizer` and `max_tokens` cut long results."""

    def __init__(self, tools, timeout, tokenizer, max_tokens):
        self.tools, self.timeout, self.tokenizer, self.max_tokens = tools, timeout, tokenizer, max_tokens

    def run(self, turns):
        """turns: per episode a list of (Call, {name: function}) -> per episode a list of ToolResult."""
        deadline = time.monotonic() + self.timeout if self.timeout else None
        threads = []
        for calls in turns:
            box = []  # the episode's results so far, appended by its thread
            thread = threading.Thread(target=self._episode, args=(calls, deadline, box), daemon=True)
            thread.start()
            threads.append((thread, box))
        results = []
        for calls, (thread, box) in zip(turns, threads):
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
            done = box[: len(calls)]  # what returned in time (the thread may append later)
            results.append([r if r.failed else self._cut(r) for r in done]  # errors are short and whole
                           + [ToolResult(call.name, f"error: tool {call.name} did not return within {self.timeout:g}"
                                         " s", failed=True) for call, _ in calls[len(done):]])
        return results

    @staticmethod
    def _episode(calls, deadline, box):
        for call, tools in calls:
            if deadline is not None and time.monotonic() >= deadline:
                return  # the turn is over: a later call must not change an environment's state behind it
            box.append(Toolbox._call(call, tools))

    @staticmethod
    def _call(call, tools):
        if call.name is None:
            return ToolResult("invalid", f"error: the tool call could not be read ({call.error}); write "
                              '<tool_call>{"name": ..., "arguments": {...}}</tool_call>', failed=True)
        if call.name not in tools:
            return ToolResult(call.name, f"error: there is no tool named {call.name!r}; the tools are: "
                              f"{', '.join(tools)}", failed=True)
        try:
            value = tools[call.name](**call.arguments)
            return ToolResult(call.name, value if isinstance(value, str) else json.dumps(value, default=str))
        except Exception as e:  # a raising tool, or arguments it does not take
            return ToolResult(call.name, f"error: tool {call.name} raised {type(e).__name__}: {str(e)[:300]}",
                              failed=True)

    def _cut(self, result):
        if not self.max_tokens:
            return result
        ids = self.tokenizer(result.content, add_special_tokens=False, verbose=False).input_ids
        if len(ids) <= self.max_tokens:
            return result
        text = self.tokenizer.decode(ids[: self.max_tokens], skip_special_tokens=True)
        return dataclasses.replace(result, content=text + " [truncated]", truncated=True)


# --- a ready code-execution tool ---------------------------------------------------------------------------------

PYTHON_LIMITS = {"seconds": 10.0, "cpu_seconds": 10, "memory_bytes": 1 << 30, "file_bytes": 10 << 20,
                 "output_chars": 4000}

_CHILD = """import resource, sys
cpu, memory, files = {cpu}, {memory}, {files}
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
code = sys.stdin.read()
del resource, sys, cpu, memory, files
exec(compile(code, "<tool>", "exec"), {{"__name__": "__main__"}})
"""

_no_network = None  # the command prefix that takes the network away, [] where none works (checked once)


def no_network_prefix():
    """`unshare -rn` (a new, empty network namespace: no interface but loopback, which is down) where this system
    lets an unprivileged user make one; [] otherwise (then the code has the machine's network)."""
    global _no_network
    if _no_network is None:
        _no_network = []
        if shutil.which("unshare"):
            try:
                if subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0:
                    _no_network = ["unshare", "-rn"]
            except (OSError, subprocess.TimeoutExpired):
                pass
    return _no_network


def python(code: str) -> str:
    """Run a Python program and return what it prints (stdout, then stderr).

    Args:
        code: the Python source to run; print the values you want to see.
    """
    # Isolation: a fresh interpreter (-I: no user site, no PYTHON* variables) in a subprocess, in an empty temporary
    # folder (its cwd, HOME and TMPDIR) deleted afterwards, with CPU-time, memory, file-size limits (setrlimit) and a
    # wall-clock timeout (the process group is killed). No network where `unshare -rn` works (no_network_prefix();
    # otherwise it has the network). Not a sandbox: it runs as this user and may read, or write with an absolute
    # path, any file this user can. Limits: PYTHON_LIMITS.
    limits = PYTHON_LIMITS
    child = _CHILD.format(cpu=int(limits["cpu_seconds"]), memory=int(limits["memory_bytes"]),
                          files=int(limits["file_bytes"]))
    with tempfile.TemporaryDirectory(prefix="nanorlhf-python-") as folder:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
        process = subprocess.Popen(no_network_prefix() + [sys.executable, "-I", "-c", child], cwd=folder, env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            out, _ = process.communicate(code.encode(), timeout=limits["seconds"])
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            return f"error: the program did not finish within {limits['seconds']:g} s"
    text = out.decode(errors="replace")
    if len(text) > limits["output_chars"]:
        text = text[: limits["output_chars"]] + "\n[output cut]"
    return text if process.returncode == 0 else f"{text}\n[exit status {process.returncode}]".lstrip()
