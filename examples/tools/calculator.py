"""The calculator tool of examples/tools: `--tools examples/tools/calculator.py:multiply`.

A tool is a plain typed function with a docstring whose `Args:` section describes each argument; nanorlhf builds its
JSON schema from them (transformers' get_json_schema) and runs the model's calls to it (nanorlhf/tools.py).
"""


def multiply(a: int, b: int) -> int:
    """Multiply two integers exactly.

    Args:
        a: the first factor
        b: the second factor
    """
    return int(a) * int(b)  # int(): a model that writes "47" gets 47, not the string repeated
