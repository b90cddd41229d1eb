import math

import pytest
import torch

from nanorlhf.errors import UserError
from nanorlhf.rewards import Rewards, build_rewards, load_reward_fn
from nanorlhf.tasks import addition_reward


def write(tmp_path, body):
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return str(path)


def test_load_from_file_and_module(tmp_path):
    path = write(tmp_path, "def score(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    fn = load_reward_fn(f"{path}:score")
    assert fn(["p"], ["abc"]) == [3]
    assert load_reward_fn("nanorlhf.tasks:addition_reward") is addition_reward


@pytest.mark.parametrize("spec, words", [
    ("no_colon", "must look like"),
    ("missing_file.py:score", "does not exist"),
    ("no_such_module_xyz:score", "cannot import module"),
    ("nanorlhf.tasks:nope", "has no function 'nope'"),
])
def test_load_errors(spec, words):
    with pytest.raises(UserError, match=words):
        load_reward_fn(spec)


@pytest.mark.parametrize("returned, words", [
    ("[1.0]", "returned 1 values for 2 completions"),
    ("['a', 'b']", "non-number"),
    ("[1.0, float('nan')]", "NaN or inf"),
    ("None", "returned NoneType values"),
])
def test_bad_reward_output_is_named(tmp_path, returned, words):
    path = write(tmp_path, f"def bad(prompts, completions, **kw):\n    return {returned}\n")
    rewards = build_rewards("", f"{path}:bad", "")
    with pytest.raises(UserError, match=words):
        rewards(["p", "q"], ["a", "b"], {})


def test_weighted_sum_and_row_fields():
    double = lambda prompts, completions, **kw: [2.0] * len(completions)  # noqa: E731
    rewards = Rewards([addition_reward, double], [1.0, 0.5])
    total, parts = rewards(["What is 1 + 2?"] * 3, ["3", "It is 4", "no idea"], {"answer": ["3", "3", "3"]})
    assert total.tolist() == [2.0, 1.0, 1.0]
    assert parts["addition_reward"].tolist() == [1.0, 0.0, 0.0]


def test_weights_must_match():
    with pytest.raises(UserError, match="--reward_weights has 2 values for 1 rewards"):
        build_rewards("", "nanorlhf.tasks:addition_reward", "1,2")


def test_tiny_reward_model_scores_pairs(tmp_path):
    from nanorlhf.rewards import RewardModel
    from nanorlhf.tiny import build_tiny_reward_model

    path = build_tiny_reward_model(str(tmp_path / "rm"), ["hello there", "how are you", "fine thanks"])
    scores = RewardModel(path, dtype=torch.float32)(["hello", "how are you"], ["there", "fine"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]


def test_reward_model_cuts_the_prompt_from_the_left_and_keeps_the_response(tmp_path):
    from nanorlhf.rewards import RewardModel
    from nanorlhf.tiny import build_tiny_reward_model

    words = ["alpha", "beta", "gamma", "delta", "answer", "is", "four"]
    path = build_tiny_reward_model(str(tmp_path / "rm"), [" ".join(words)] * 20)
    rm = RewardModel(path, dtype=torch.float32)
    assert rm.max_length == 512 and rm.budget == 509  # [CLS] prompt [SEP] response [SEP]
    tokenizer = rm.tokenizer
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    long_prompt = " ".join(["alpha"] * 600 + ["beta", "gamma", "delta"] * 20)  # its beginning differs from its end
    short_prompt, short_response = "alpha beta", "the answer is four"
    long_response = " ".join(words[i % 7] for i in range(1000))
    assert len(ids(long_prompt)) > 512 and len(ids(long_response)) > 512
    prompts = [long_prompt, short_prompt, short_prompt, long_prompt]
    responses = [short_response, short_response, long_response, long_response]
    encoded = [e["input_ids"] for e in rm.encode(prompts, responses)]

    response_ids = ids(short_response)  # long prompt: its last tokens, and the whole response
    kept = 509 - len(response_ids)
    assert encoded[0] == [cls] + ids(long_prompt)[-kept:] + [sep] + response_ids + [sep]
    assert encoded[1] == [cls] + ids(short_prompt) + [sep] + response_ids + [sep]  # fits: untouched
    # a response that alone overflows keeps its beginning, without the prompt
    assert encoded[2] == encoded[3] == [cls, sep] + ids(long_response)[:509] + [sep]
    assert all(len(e) <= 512 for e in encoded)

    scores = rm(prompts, responses)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    assert rm.metrics == {"truncated_prompts": 3, "truncated_responses": 2}
    rm(prompts[1:2], responses[1:2])
    assert rm.metrics == {"truncated_prompts": 0, "truncated_responses": 0}  # counts of the last call
