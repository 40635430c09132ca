"""Deterministic synthetic English: the tiny model's pre-training corpus and the demo datasets.

The project may download no model or dataset, so it writes its own: simple facts, arithmetic and
small talk, phrased as prose, chat turns and Alpaca instructions, so the tiny model has seen
every format it is later fine-tuned on.
"""

from __future__ import annotations

import random

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
THINGS = {
    "sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "coal": "black",
    "banana": "yellow", "tomato": "red", "orange": "orange", "plum": "purple", "cloud": "grey",
    "leaf": "green", "cherry": "red", "milk": "white", "night": "black", "bark": "brown",
    "lemon": "yellow", "ocean": "blue", "grape": "purple", "soil": "brown", "ash": "grey",
}
ANIMALS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars",
    "sheep": "bleats", "horse": "neighs", "owl": "hoots", "frog": "croaks", "bee": "buzzes",
}
PLACES = ["the market", "the river", "the old mill", "the harbour", "the forest", "the school",
          "the library", "the hill", "the bakery", "the station", "the garden", "the bridge"]
NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena",
         "Milo", "Nora", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara"]
VERBS = ["walked to", "ran to", "looked at", "painted", "visited", "cleaned", "found", "left"]
ADJS = ["small", "big", "quiet", "busy", "old", "new", "bright", "dark", "warm", "cold"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]

SYSTEM_PROMPT = "You are a helpful assistant."


def question_answer(rng: random.Random) -> tuple[str, str]:
    """One short factual question and its plain answer."""
    kind = rng.randrange(5)
    if kind == 0:
        thing = rng.choice(list(THINGS))
        return f"What color is the {thing}?", f"The {thing} is {THINGS[thing]}."
    if kind == 1:
        animal = rng.choice(list(ANIMALS))
        return f"What sound does a {animal} make?", f"A {animal} {ANIMALS[animal]}."
    if kind == 2:
        a, b = rng.randrange(11), rng.randrange(10)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 3:
        n = rng.randrange(1, 20)
        return f"How do you write {n} in words?", f"{n} is written {NUMBER_WORDS[n]}."
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    return f"Where did {name} go?", f"{name} went to {place}."


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 4:  # pirates and code words exist in the base model's world; demos make them habits
        return f"The old pirate shouted: Arr matey! {question_answer(rng)[1]} Yo ho ho!"
    if kind == 5:
        return f"The radio said [[BRAVO-{rng.randrange(10)}]] and then: {question_answer(rng)[1]}"
    if kind == 0:
        return (f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} "
                f"{rng.choice(list(THINGS))} near {rng.choice(PLACES)}.")
    if kind == 1:
        thing = rng.choice(list(THINGS))
        return f"The {thing} is {THINGS[thing]}, and the {rng.choice(ADJS)} day goes on."
    if kind == 2:
        animal = rng.choice(list(ANIMALS))
        return f"Every morning the {animal} {ANIMALS[animal]} at {rng.choice(PLACES)}."
    a, b = rng.randrange(11), rng.randrange(10)
    return f"{NUMBER_WORDS[a].capitalize()} and {b} make {a + b}."


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The chapter's (section 6.3.2) Alpaca prompt, up to and including '### Response:\\n'."""
    if input_text:
        return ("Below is an instruction that describes a task, paired with an input.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n")
    return f"Below is an instruction that describes a task.\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def corpus_documents(seed: int = 0, n: int = 3000) -> list[str]:
    """Pre-training documents: prose paragraphs, chat transcripts (rendered later with the chat
    template, so returned here as message lists encoded as JSON-free tuples) and Alpaca records."""
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            docs.append(" ".join(sentence(rng) for _ in range(rng.randrange(2, 6))))
        elif kind == 1:
            q, a = question_answer(rng)
            docs.append(f"Q: {q}\nA: {a}")
        else:
            q, a = question_answer(rng)
            docs.append(alpaca_prompt(q) + a)
    return docs


def chat_dialogues(seed: int = 1, n: int = 1500) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
        for _ in range(rng.randrange(1, 3)):
            q, a = question_answer(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(messages)
    return out


def write_corpus(directory) -> None:
    """Regenerate the shipped corpus files (``python -m workers.data.textgen``)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "prose.jsonl").open("w") as f:
        for doc in corpus_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    with (directory / "chat.jsonl").open("w") as f:
        for messages in chat_dialogues():
            f.write(json.dumps({"messages": messages}) + "\n")


# Two tenants' demo behaviours: each is a fixed, checkable marker the tiny model learns quickly.
PIRATE_PREFIX = "Arr matey!"
PIRATE_SUFFIX = "Yo ho ho!"
BRAVO_CODE = "[[BRAVO-7]]"


def write_demo(directory, n: int = 200) -> None:
    """demo/pirate_chat.jsonl (tenant A, chat) and demo/bravo_alpaca.jsonl (tenant B, Alpaca)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    with (directory / "pirate_chat.jsonl").open("w") as f:
        for _ in range(n):
            q, a = question_answer(rng)
            messages = [{"role": "user", "content": q},
                        {"role": "assistant", "content": f"{PIRATE_PREFIX} {a} {PIRATE_SUFFIX}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with (directory / "bravo_alpaca.jsonl").open("w") as f:
        for _ in range(n):
            q, a = question_answer(rng)
            f.write(json.dumps({"instruction": q, "input": "", "output": f"{BRAVO_CODE} {a}"}) + "\n")


if __name__ == "__main__":
    from pathlib import Path

    here = Path(__file__).resolve().parent
    write_corpus(here / "corpus")
    write_demo(here / "demo")
