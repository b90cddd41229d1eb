"""Verifiable instruction-following rewards: IFEval's own checkers, as packaged by `if-verifiable`.

Each row names its constraints the way google/IFEval does: `instruction_id_list` (e.g. "punctuation:no_comma") and
`kwargs` (one dict of arguments per constraint; keys set to None are ignored, as in IFEval's dataset). A completion is
checked by if-verifiable's `evaluate_output_for_sample`, which runs the checkers that IFEval's authors wrote
(strict mode: the completion as it is, no first/last line dropped, no markdown stripped).

    --reward_fn examples/instruction-following/reward.py:constraints      fraction of the row's constraints met
    --reward_fn ...reward.py:constraints,...reward.py:all_constraints --reward_weights 1,0
                 also logs IFEval's prompt-level accuracy (1 only when every constraint is met) as *_all_constraints

The case checkers call langdetect, which samples; its seed is fixed here so that a completion always gets the same
reward.
"""

import langdetect
import nltk
from if_verifiable import IFEvalSample, evaluate_output_for_sample
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

langdetect.DetectorFactory.seed = 0
NLTK_DATA = {"length_constraints:number_sentences": "tokenizers/punkt_tab",
             "change_case:capital_word_frequency": "tokenizers/punkt_tab"}


def check_ids(instruction_ids):
    """Unknown ids would be skipped silently by the package (a row then scores on fewer constraints): refuse them,
    and ids whose checker needs nltk data that is not installed."""
    for instruction_id in instruction_ids:
        if instruction_id not in INSTRUCTION_DICT:
            raise ValueError(f"unknown IFEval instruction id {instruction_id!r} in instruction_id_list")
        if instruction_id in NLTK_DATA:
            try:
                nltk.data.find(NLTK_DATA[instruction_id])
            except LookupError:
                raise ValueError(f"{instruction_id} needs nltk's {NLTK_DATA[instruction_id]} data, which is not "
                                 "installed: drop that constraint, or install the data with nltk.download") from None


def scores(prompts, completions, instruction_id_list, kwargs):
    """if-verifiable's EvaluationScores for each completion."""
    out = []
    for prompt, completion, ids, arguments in zip(prompts, completions, instruction_id_list, kwargs):
        check_ids(ids)
        sample = IFEvalSample(key=0, prompt=prompt, instruction_id_list=list(ids), kwargs=list(arguments))
        out.append(evaluate_output_for_sample("ifeval", sample, completion)[1])
    return out


def constraints(prompts, completions, instruction_id_list, kwargs, **_):
    """Fraction of the row's constraints that the completion satisfies (IFEval's instruction-level strict score)."""
    return [s.partial_strict for s in scores(prompts, completions, instruction_id_list, kwargs)]


def all_constraints(prompts, completions, instruction_id_list, kwargs, **_):
    """1.0 when the completion satisfies every constraint of its row (IFEval's prompt-level strict accuracy)."""
    return [s.binary_strict for s in scores(prompts, completions, instruction_id_list, kwargs)]
