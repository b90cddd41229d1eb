"""examples/instruction-following: the data generator and the IFEval-verifier reward (pure functions, no engine)."""

import json
import os

import pytest
from conftest import ROOT, load_script

from nanorlhf.data import load_rows
from nanorlhf.errors import UserError
from nanorlhf.rewards import build_rewards

make_data = load_script("examples/instruction-following/make_data.py")
reward = load_script("examples/instruction-following/reward.py")
REWARD_SPEC = os.path.join(ROOT, "examples/instruction-following/reward.py")


def ids(rows):
    return {i for row in rows for i in row["instruction_id_list"]}


def test_generator_is_deterministic(tmp_path):
    first, second = make_data.write(str(tmp_path / "a")), make_data.write(str(tmp_path / "b"))
    assert sorted(first) == ["eval", "eval_held_in", "train"]
    for name in first:
        with open(first[name]) as a, open(second[name]) as b:
            assert a.read() == b.read()
    assert make_data.make_splits(seed=1)["train"] != make_data.make_splits(seed=0)["train"]


def test_held_out_types_never_train():
    splits = make_data.make_splits()
    assert not set(make_data.TRAIN_TYPES) & set(make_data.HELD_OUT_TYPES)
    assert ids(splits["train"]) == set(make_data.TRAIN_TYPES)
    assert ids(splits["eval"]) == set(make_data.HELD_OUT_TYPES)
    assert ids(splits["eval_held_in"]) <= set(make_data.TRAIN_TYPES)
    train_topics = {row["topic"] for row in splits["train"]}
    eval_topics = {row["topic"] for name in ("eval", "eval_held_in") for row in splits[name]}
    assert not train_topics & eval_topics  # the evaluation requests are unseen, whatever their constraints
    assert {row["split"] for row in splits["eval"]} == {"held_out"}


def test_rows_carry_the_verifiers_own_wording_and_no_conflicting_pair():
    for rows in make_data.make_splits(n_train=300).values():
        for row in rows:
            assert len(row["instruction_id_list"]) in (1, 2) and len(row["kwargs"]) == len(row["instruction_id_list"])
            for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
                assert make_data.description(instruction_id, kwargs) in row["prompt"]
            if len(row["instruction_id_list"]) == 2:
                assert not make_data.conflict(*row["instruction_id_list"])


def test_types_needing_nltk_data_are_not_generated():
    splits = make_data.make_splits()
    assert not ids(row for rows in splits.values() for row in rows) & set(make_data.NEEDS_NLTK_DATA)
    assert set(make_data.NEEDS_NLTK_DATA) == set(reward.NLTK_DATA)


def test_a_type_needing_missing_nltk_data_is_refused_with_a_sentence():
    import nltk
    try:
        nltk.data.find("tokenizers/punkt_tab")
        pytest.skip("nltk's punkt_tab is installed here: the types that need it work")
    except LookupError:
        pass
    checker = reward.INSTRUCTION_DICT["length_constraints:number_sentences"]("length_constraints:number_sentences")
    checker.build_description(num_sentences=2, relation="less than")
    with pytest.raises(LookupError):  # why the type is excluded: the verifier itself cannot run here
        checker.check_following("One sentence. Two sentences.")
    with pytest.raises(ValueError, match="punkt_tab"):
        reward.constraints(["p"], ["One."], [["length_constraints:number_sentences"]],
                           [[{"num_sentences": 2, "relation": "less than"}]])


REQUEST = "Describe the ocean."
CASES = [  # (instruction id, kwargs, completion, satisfied?)
    ("change_case:english_lowercase", {}, "the ocean is large and full of salty water.", True),
    ("change_case:english_lowercase", {}, "The ocean is large and full of salty water.", False),
    ("change_case:english_capital", {}, "THE OCEAN IS LARGE AND FULL OF SALTY WATER.", True),
    ("change_case:english_capital", {}, "THE OCEAN is large.", False),
    ("punctuation:no_comma", {}, "Waves rise and fall all day long.", True),
    ("punctuation:no_comma", {}, "Waves rise, and fall.", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Big blue salty sea.", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "The sea is big and blue.", False),
    ("keywords:existence", {"keywords": ["salt", "waves"]}, "Salt and waves everywhere.", True),
    ("keywords:existence", {"keywords": ["salt", "waves"]}, "Salt everywhere.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["water"]}, "It is wet and blue.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["water"]}, "It is blue Water.", False),
    ("keywords:frequency", {"keyword": "fish", "frequency": 2, "relation": "at least"}, "Fish and more fish.", True),
    ("keywords:frequency", {"keyword": "fish", "frequency": 2, "relation": "at least"}, "One fish.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* water\n* salt", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* water\n* salt\n* fish", False),
    ("detectable_format:json_format", {}, '```json\n{"ocean": "big"}\n```', True),
    ("detectable_format:json_format", {}, "ocean: big", False),
    ("detectable_format:title", {}, "<<the sea>>\nIt is big.", True),
    ("detectable_format:title", {}, "The sea\nIt is big.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "It is big.\n***\nIt is blue.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "It is big. It is blue.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "It is big. Any other questions?", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? It is big.", False),
    ("startend:quotation", {}, '"It is big."', True),
    ("startend:quotation", {}, "It is big.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "It is big.\nP.S. I love it.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "It is big. I love it.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": REQUEST}, f"{REQUEST} It is big.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": REQUEST}, "It is big.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "It is *big* and *blue*.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "It is *big* and blue.", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIt is big.\nSection 2\nIt is blue.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIt is big and blue.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 1}, "Swim at [beach name].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 1}, "Swim at the beach.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zig zag.", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "A sea.", False),
]


@pytest.mark.parametrize("instruction_id, kwargs, completion, satisfied", CASES)
def test_reward_is_the_verifier_verdict(instruction_id, kwargs, completion, satisfied):
    got = reward.constraints([REQUEST], [completion], [[instruction_id]], [[kwargs]])
    assert got == [float(satisfied)]


def test_every_generated_type_has_a_hand_checked_case():
    assert {c[0] for c in CASES} == set(make_data.HELD_OUT_TYPES) | set(make_data.TRAIN_TYPES)


def test_fraction_of_constraints_and_all_of_them():
    row_ids = [["change_case:english_lowercase", "punctuation:no_comma"]]
    row_kwargs = [[{}, {}]]
    completions = ["the sea is big, and blue.", "the sea is big and blue.", "The sea, big."]
    args = ([REQUEST] * 3, completions, row_ids * 3, row_kwargs * 3)
    assert reward.constraints(*args) == [0.5, 1.0, 0.0]
    assert reward.all_constraints(*args) == [0.0, 1.0, 0.0]
    assert reward.constraints([REQUEST], [""], row_ids, row_kwargs) == [0.0]  # an empty answer meets nothing


def test_langdetect_is_seeded():
    """The case checkers ask langdetect whether the text is English; on a short text its answer depends on its seed."""
    import langdetect
    text, lowercase = "cup light", [["change_case:english_lowercase"]]
    assert len({reward.constraints([REQUEST], [text], lowercase, [[{}]])[0] for _ in range(20)}) == 1
    try:  # the text is one of those the seed decides: seeds 0 and 1 say different languages
        answers = set()
        for seed in (0, 1):
            langdetect.DetectorFactory.seed = seed
            answers.add(langdetect.detect(text))
        assert len(answers) == 2
    finally:
        langdetect.DetectorFactory.seed = 0


def test_unknown_id_is_refused_through_the_projects_reward_api():
    rewards = build_rewards("", f"{REWARD_SPEC}:constraints", "")
    with pytest.raises(UserError, match="unknown IFEval instruction id 'format:nonsense'"):
        rewards([REQUEST], ["text"], {"instruction_id_list": [["format:nonsense"]], "kwargs": [[{}]]})


def test_generated_files_score_through_the_projects_loader(tmp_path):
    """The columns survive datasets' JSON loader (kwargs with different keys per constraint) and reach the reward."""
    paths = make_data.write(str(tmp_path), n_train=50, n_eval=20)
    rows = load_rows(paths["train"])
    rewards = build_rewards("", f"{REWARD_SPEC}:constraints,{REWARD_SPEC}:all_constraints", "1,0")
    fields = {"instruction_id_list": rows["instruction_id_list"], "kwargs": rows["kwargs"]}
    with open(paths["train"]) as f:
        first = [json.loads(line) for line in f]
    assert fields["kwargs"] == [row["kwargs"] for row in first]
    total, parts = rewards(rows["prompt"], ["plain answer"] * len(rows), fields)
    assert set(parts) == {"constraints", "all_constraints"}
    assert total.tolist() == parts["constraints"].tolist()
    assert all((p == 1.0) >= (a == 1.0) for p, a in zip(parts["constraints"].tolist(),
                                                        parts["all_constraints"].tolist()))
    assert 0 < parts["constraints"].mean() < 1  # a plain answer meets some constraints (no comma, ...) and not others
