from dataclasses import dataclass

import pytest

from nanorlhf.config import format_help, parse_config
from nanorlhf.errors import UserError


@dataclass
class Config:
    model: str = "base"  # the model
    lr: float = 1e-3  # learning rate
    steps: int = 10  # how many
    sparse: bool = False  # drop zeros


def test_overrides_types_and_explicit():
    cfg = parse_config(Config, ["--lr", "0.5", "--steps=3", "--sparse"])
    assert (cfg.lr, cfg.steps, cfg.sparse, cfg.model) == (0.5, 3, True, "base")
    assert cfg.explicit == {"lr", "steps", "sparse"}
    assert parse_config(Config, ["--sparse", "false"]).sparse is False


def test_demo_swaps_defaults_but_flags_win():
    cfg = parse_config(Config, ["--demo", "--steps", "7"], demo={"model": "tiny", "steps": 2})
    assert (cfg.model, cfg.steps) == ("tiny", 7)
    assert parse_config(Config, [], demo={"model": "tiny"}).model == "base"  # no --demo: no swap


@pytest.mark.parametrize("argv, words", [
    (["--lrr", "1"], "unknown option --lrr"),
    (["--steps", "ten"], "--steps takes a int"),
    (["--sparse", "maybe"], "--sparse takes true or false"),
    (["--lr"], "--lr needs a value"),
    (["lr", "1"], "unexpected argument"),
])
def test_bad_input_is_one_clear_error(argv, words):
    with pytest.raises(UserError, match=words):
        parse_config(Config, argv)


def test_help_lists_every_field_with_default_and_comment():
    text = format_help(Config, "x.py")
    for line in ("--model str (default: 'base')  the model", "--lr float (default: 0.001)  learning rate",
                 "--sparse bool (default: False)  drop zeros"):
        assert line in text
