"""Instruction-following prompts with verifiable IFEval constraints, written deterministically from templates.

Each row is an ordinary request (a topic x a kind of request, e.g. "Describe how a bicycle works.") followed by one
or two constraints in IFEval's own wording (the package's `build_description`), with the columns IFEval uses, so the
reward (reward.py) and google/IFEval's rows read the same way:

    {"prompt": "...", "instruction_id_list": ["change_case:english_lowercase", ...], "kwargs": [{}, ...],
     "topic": "bicycles", "split": "train" | "held_in" | "held_out"}

Files (python examples/instruction-following/make_data.py --out DIR):
    train.jsonl          training topics, TRAIN_TYPES only
    eval.jsonl           evaluation topics, HELD_OUT_TYPES only: never seen in training (generalisation)
    eval_held_in.jsonl   evaluation topics, TRAIN_TYPES (the same kinds of constraint on unseen requests)
Types whose verifier needs nltk data that no registry package ships (NEEDS_NLTK_DATA) are never generated.
"""

import argparse
import json
import os
import random

from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT

TRAIN_TYPES = [
    "change_case:english_lowercase",
    "punctuation:no_comma",
    "length_constraints:number_words",
    "length_constraints:number_paragraphs",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_content:number_placeholders",
    "startend:end_checker",
    "combination:repeat_prompt",
]
HELD_OUT_TYPES = [
    "change_case:english_capital",
    "startend:quotation",
    "detectable_format:title",
    "detectable_content:postscript",
    "keywords:letter_frequency",
]
# Their verifiers call nltk's punkt_tab sentence/word tokenizer, whose data nltk downloads at run time (not here).
NEEDS_NLTK_DATA = ["length_constraints:number_sentences", "change_case:capital_word_frequency"]
# A pair the IFEval registry allows but no response satisfies: all-lowercase or all-capital text and section headers
# that its checker matches case-sensitively ("Section 1"). (End phrases and postscripts are matched in lowercase.)
CASE_TYPES = {"change_case:english_lowercase", "change_case:english_capital"}
CASE_SENSITIVE = {"detectable_format:multiple_sections"}

# topic -> words that an answer about it would naturally use (keyword constraints draw from them)
TOPICS = {
    "the ocean": ["water", "waves", "salt", "fish"], "coffee": ["beans", "morning", "cup", "caffeine"],
    "bicycles": ["wheels", "pedal", "ride", "chain"], "libraries": ["books", "quiet", "read", "shelves"],
    "volcanoes": ["lava", "eruption", "ash", "mountain"], "gardening": ["soil", "seeds", "water", "plants"],
    "the moon": ["night", "orbit", "light", "craters"], "bread": ["flour", "oven", "yeast", "dough"],
    "rain": ["clouds", "water", "umbrella", "storm"], "chess": ["board", "king", "move", "pieces"],
    "honey bees": ["hive", "flowers", "honey", "queen"], "trains": ["tracks", "station", "travel", "engine"],
    "winter": ["snow", "cold", "ice", "coat"], "music": ["song", "rhythm", "sound", "notes"],
    "forests": ["trees", "leaves", "animals", "shade"], "recycling": ["plastic", "waste", "paper", "bins"],
    "the sun": ["light", "heat", "star", "energy"], "dogs": ["bark", "walk", "loyal", "tail"],
    "cooking pasta": ["water", "salt", "sauce", "boil"], "friendship": ["trust", "time", "help", "share"],
    "deserts": ["sand", "heat", "dry", "cactus"], "computers": ["software", "memory", "screen", "data"],
    "birds": ["wings", "nest", "fly", "feathers"], "sleep": ["night", "rest", "dreams", "bed"],
    "rivers": ["water", "flow", "bridge", "fish"], "the internet": ["network", "websites", "data", "search"],
    "mountains": ["climb", "peak", "snow", "rocks"], "tea": ["leaves", "cup", "hot", "green"],
    "museums": ["art", "history", "visit", "exhibits"], "exercise": ["health", "run", "muscles", "energy"],
    # evaluation topics (never in train.jsonl)
    "cats": ["purr", "whiskers", "play", "fur"], "the weather": ["rain", "wind", "forecast", "sunny"],
    "apples": ["fruit", "tree", "sweet", "red"], "swimming": ["pool", "water", "strokes", "breath"],
    "airplanes": ["wings", "flight", "pilot", "sky"], "cheese": ["milk", "taste", "aged", "slice"],
    "robots": ["machines", "sensors", "tasks", "program"], "spring": ["flowers", "warm", "green", "bloom"],
    "painting": ["colors", "brush", "canvas", "art"], "camping": ["tent", "fire", "night", "outdoors"],
}
EVAL_TOPICS = ["cats", "the weather", "apples", "swimming", "airplanes", "cheese", "robots", "spring", "painting",
               "camping"]
REQUESTS = [
    "Write a short paragraph about {topic}.", "Explain {topic} to a child.", "Describe {topic}.",
    "Give some advice to someone interested in {topic}.", "Write a short story about {topic}.",
    "Tell me some interesting facts about {topic}.", "Write a short blog post about {topic}.",
    "Why do people like {topic}?",
]
END_PHRASES = ["Any other questions?", "Is there anything else I can help with?", "That is all.",
               "Let me know if you have additional questions."]


def kwargs_for(instruction_id, rng, request, words):
    """Arguments of one constraint, sized for answers of about a hundred words."""
    relation = rng.choice(["less than", "at least"])
    return {
        "length_constraints:number_words": lambda: {
            "relation": relation, "num_words": rng.choice([30, 50, 80] if relation == "less than" else [10, 20, 40])},
        "length_constraints:number_paragraphs": lambda: {"num_paragraphs": rng.choice([2, 3])},
        "keywords:existence": lambda: {"keywords": rng.sample(words, 2)},
        "keywords:forbidden_words": lambda: {"forbidden_words": rng.sample(words, rng.choice([1, 2]))},
        "keywords:frequency": lambda: {"keyword": rng.choice(words), "relation": relation,
                                       "frequency": rng.choice([2, 3])},
        "keywords:letter_frequency": lambda: {"letter": rng.choice("abcdefghijklmnopqrstuvwxyz"),
                                              "let_relation": relation, "let_frequency": rng.choice([2, 4, 6])},
        "detectable_format:number_bullet_lists": lambda: {"num_bullets": rng.choice([2, 3, 4])},
        "detectable_format:number_highlighted_sections": lambda: {"num_highlights": rng.choice([1, 2, 3])},
        "detectable_format:multiple_sections": lambda: {"section_spliter": rng.choice(["Section", "SECTION"]),
                                                        "num_sections": rng.choice([2, 3])},
        "detectable_content:number_placeholders": lambda: {"num_placeholders": rng.choice([1, 2])},
        "detectable_content:postscript": lambda: {"postscript_marker": rng.choice(["P.S.", "P.P.S"])},
        "startend:end_checker": lambda: {"end_phrase": rng.choice(END_PHRASES)},
        "combination:repeat_prompt": lambda: {"prompt_to_repeat": request},
    }.get(instruction_id, dict)()


def conflict(a, b):
    if a in INSTRUCTION_CONFLICTS.get(b, ()) or b in INSTRUCTION_CONFLICTS.get(a, ()):
        return True
    return (a in CASE_TYPES and b in CASE_SENSITIVE) or (b in CASE_TYPES and a in CASE_SENSITIVE)


def description(instruction_id, kwargs):
    """The constraint in IFEval's words, as its checker writes it."""
    return INSTRUCTION_DICT[instruction_id](instruction_id).build_description(**kwargs)


def make_row(rng, topic, types, split):
    request = rng.choice(REQUESTS).format(topic=topic)
    ids = [rng.choice(types)]
    if rng.random() < 0.5:  # a second constraint, when one that fits with the first exists
        others = [t for t in types if not conflict(ids[0], t)]
        if others:
            ids.append(rng.choice(others))
    kwargs = [kwargs_for(i, rng, request, TOPICS[topic]) for i in ids]
    if "keywords:existence" in ids and "keywords:forbidden_words" in ids:  # never ask for a word and forbid it
        wanted = kwargs[ids.index("keywords:existence")]["keywords"]
        kwargs[ids.index("keywords:forbidden_words")] = {"forbidden_words": [w for w in TOPICS[topic]
                                                                             if w not in wanted][:1]}
    prompt = " ".join([request] + [description(i, k) for i, k in zip(ids, kwargs)])
    return {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs, "topic": topic, "split": split}


def make_rows(n, topics, types, split, seed):
    rng = random.Random(f"{split}-{seed}")
    return [make_row(rng, topics[i % len(topics)], types, split) for i in range(n)]


def make_splits(n_train=2000, n_eval=100, seed=0):
    """{"train": rows, "eval": rows (held-out types), "eval_held_in": rows (train types, eval topics)}."""
    train_topics = [t for t in TOPICS if t not in EVAL_TOPICS]
    return {"train": make_rows(n_train, train_topics, TRAIN_TYPES, "train", seed),
            "eval": make_rows(n_eval, EVAL_TOPICS, HELD_OUT_TYPES, "held_out", seed),
            "eval_held_in": make_rows(n_eval, EVAL_TOPICS, TRAIN_TYPES, "held_in", seed)}


def write(out, **sizes):
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, rows in make_splits(**sizes).items():
        paths[name] = os.path.join(out, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl, eval.jsonl, eval_held_in.jsonl")
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_eval", type=int, default=100, help="rows in each evaluation file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed).values():
        print(path)
