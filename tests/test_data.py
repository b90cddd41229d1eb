import json

import pytest
from transformers import AutoTokenizer

from nanorlhf.data import PromptStream, hh_messages, load_rows, to_messages
from nanorlhf.errors import UserError
from nanorlhf.tiny import build_tiny_policy

HH = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: Why did the"


def test_hh_rlhf_dialogue_becomes_messages_up_to_last_assistant_turn():
    assert hh_messages(HH) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert to_messages("What is 2 + 2?") == [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tiny_policy(str(path), ["Hi there, tell me a joke. What is 2 + 2?"] * 10)
    return AutoTokenizer.from_pretrained(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_stream_skips_long_prompts_and_resumes_exactly(tmp_path, tokenizer):
    rows = [{"chosen": HH}, {"chosen": "short"}, {"chosen": "x " * 500}] * 4
    data = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    stream = PromptStream(data, tokenizer, "chosen", max_prompt_tokens=64, seed=0)
    first = stream.next(5)
    assert stream.skipped > 0 and all(len(p["token_ids"]) <= 64 for p in first)
    assert first[0]["fields"]["chosen"] in (HH, "short")
    state = stream.state()
    expected = [p["text"] for p in stream.next(6)]  # crosses into the next epoch
    again = PromptStream(data, tokenizer, "chosen", max_prompt_tokens=64, seed=0)
    again.load_state(state)
    assert [p["text"] for p in again.next(6)] == expected


def test_dataset_errors(tmp_path, tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    data = load_rows(write_jsonl(tmp_path / "d.jsonl", [{"question": "hi"}]))
    with pytest.raises(UserError, match="--prompt_field 'prompt' is not a column.*question"):
        PromptStream(data, tokenizer, "prompt", 64, 0)
    long_only = load_rows(write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 500}]))
    with pytest.raises(UserError, match="longer than 8 tokens"):
        PromptStream(long_only, tokenizer, "prompt", 8, 0).next(1)


def test_system_prompt_and_chat_template_kwargs_reach_the_template(tmp_path):
    import datasets

    from nanorlhf.data import template_kwargs
    from nanorlhf.tiny import build_policy_at_shape

    tokenizer = AutoTokenizer.from_pretrained(build_policy_at_shape(str(tmp_path / "m"), 64, 1, 512))
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}")
    rows = datasets.Dataset.from_list([{"prompt": "2+2"}])
    stream = PromptStream(rows, tokenizer, "prompt", 100, 0, system_prompt="Be brief.",
                          template_kwargs=template_kwargs('{"enable_thinking": false}'))
    prompt = stream.next(1)[0]
    assert tokenizer.decode(prompt["token_ids"]) == "<system>Be brief.<user>2+2<nothink>"
    assert prompt["text"] == "2+2"  # the rewards see the user's prompt, not the system message
    plain = PromptStream(rows, tokenizer, "prompt", 100, 0).next(1)[0]
    assert tokenizer.decode(plain["token_ids"]) == "<user>2+2"
    with pytest.raises(UserError, match="--chat_template_kwargs takes a JSON object"):
        template_kwargs("enable_thinking=false")
    with pytest.raises(UserError, match="--prompt_template replaces"):
        PromptStream(rows, tokenizer, "prompt", 100, 0, "Q: {prompt}", system_prompt="Be brief.")
