"""English sentence-classification tasks for the text zoo, generated from templates over real words.

Four tasks with different label sets: ``sentiment`` (2), ``tense`` (3), ``topic`` (4) and
``emotion`` (6). ``tense`` and ``topic`` label the very same kind of sentence (who did what, in
which tense, about which subject area), and every task draws its subjects and objects from the
same word lists, so the four experts must pull one shared encoder towards different features:
the interference that makes merging them non-trivial. Generation is deterministic: the same
(task, seed, sizes) always gives the same rows, and the splits of a task never share a sentence.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from adamerge.zoo.tasks import write_jsonl

SUBJECTS = (
    "my sister", "our neighbor", "the teacher", "my friend", "the old man", "a young girl", "his brother",
    "the manager", "her cousin", "the doctor", "my uncle", "the student", "the pilot", "a tourist",
)
# topic -> (base form, past, third person present) of a verb, each with objects that fit it
ACTIVITIES: dict[str, tuple[tuple[tuple[str, str, str], tuple[str, ...]], ...]] = {
    "sports": (
        (("play", "played", "plays"), ("football", "tennis", "basketball", "hockey", "golf")),
        (("watch", "watched", "watches"), ("the match", "the race", "the final", "the boxing")),
        (("train", "trained", "trains"), ("at the gym", "for the marathon", "with the team")),
        (("win", "won", "wins"), ("the tournament", "the game", "the trophy", "a medal")),
    ),
    "food": (
        (("cook", "cooked", "cooks"), ("pasta", "a curry", "dinner", "soup", "rice")),
        (("bake", "baked", "bakes"), ("bread", "a cake", "cookies", "a pie")),
        (("eat", "ate", "eats"), ("sushi", "a sandwich", "noodles", "salad")),
        (("order", "ordered", "orders"), ("pizza", "dessert", "coffee", "breakfast")),
    ),
    "music": (
        (("sing", "sang", "sings"), ("a song", "in the choir", "an old ballad", "a lullaby")),
        (("play", "played", "plays"), ("the piano", "the guitar", "the violin", "the drums")),
        (("listen", "listened", "listens"), ("to jazz", "to the radio", "to an album", "to the orchestra")),
        (("write", "wrote", "writes"), ("a melody", "the lyrics", "a symphony")),
    ),
    "science": (
        (("study", "studied", "studies"), ("chemistry", "the stars", "physics", "cells", "fossils")),
        (("build", "built", "builds"), ("a robot", "a computer", "a telescope", "a rocket")),
        (("test", "tested", "tests"), ("the vaccine", "a theory", "the samples", "the circuit")),
        (("measure", "measured", "measures"), ("the radiation", "the temperature", "the magnetic field")),
    ),
}
SETTINGS = ("", " at home", " in the evening", " with friends", " again", " on weekends", " in the city")
TENSES = ("past", "present", "future")

THINGS = ("match", "pasta", "concert", "robot", "hotel", "movie", "service", "lecture", "coffee", "album",
          "trip", "game", "museum", "cake")
INTENSIFIERS = ("", "really ", "quite ", "truly ", "rather ")
POLARITY = {
    "negative": ("awful", "terrible", "disappointing", "dreadful", "horrible", "boring", "poor", "bland"),
    "positive": ("wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant", "great"),
}
SAY = ("said", "thought", "felt", "told us", "wrote that")

EMOTIONS = {
    "joy": ("happy", "delighted", "cheerful", "thrilled", "glad", "overjoyed"),
    "sadness": ("sad", "heartbroken", "miserable", "gloomy", "lonely", "depressed"),
    "anger": ("angry", "furious", "annoyed", "irritated", "outraged", "livid"),
    "fear": ("scared", "terrified", "afraid", "nervous", "frightened", "anxious"),
    "surprise": ("surprised", "astonished", "amazed", "stunned", "startled", "shocked"),
    "disgust": ("disgusted", "revolted", "repulsed", "sickened", "appalled", "grossed out"),
}


@dataclass(frozen=True)
class TextTask:
    """A task's label names and a generator of one sentence for a given label index."""

    name: str
    labels: tuple[str, ...]
    make: Callable[[random.Random, int], str]

    def sample(self, rng: random.Random) -> dict:
        label = rng.randrange(len(self.labels))
        return {"text": self.make(rng, label), "label": label}


def _activity(rng: random.Random, topic: str, tense: str) -> str:
    (base, past, present), objects = rng.choice(ACTIVITIES[topic])
    verb = {"past": past, "present": present, "future": f"will {base}"}[tense]
    return f"{rng.choice(SUBJECTS)} {verb} {rng.choice(objects)}{rng.choice(SETTINGS)}"


def _tense(rng: random.Random, label: int) -> str:
    return _activity(rng, rng.choice(list(ACTIVITIES)), TENSES[label])


def _topic(rng: random.Random, label: int) -> str:
    return _activity(rng, list(ACTIVITIES)[label], rng.choice(TENSES))


def _sentiment(rng: random.Random, label: int) -> str:
    """A third of the rows negate the opposite polarity (``was not great`` is negative)."""
    negated = rng.random() < 1 / 3
    words = POLARITY[list(POLARITY)[1 - label if negated else label]]
    was = "was not" if negated else f"was {rng.choice(INTENSIFIERS)}".rstrip()
    return f"{rng.choice(SUBJECTS)} {rng.choice(SAY)} the {rng.choice(THINGS)} {was} {rng.choice(words)}"


def _emotion(rng: random.Random, label: int) -> str:
    feeling = rng.choice(EMOTIONS[list(EMOTIONS)[label]])
    cause = _activity(rng, rng.choice(list(ACTIVITIES)), "past")
    was = rng.choice(("was", "felt", "seemed"))
    return f"{rng.choice(SUBJECTS)} {was} {feeling} when {cause}"


TEXT_TASKS: dict[str, TextTask] = {
    t.name: t
    for t in (
        TextTask("sentiment", tuple(POLARITY), _sentiment),
        TextTask("tense", TENSES, _tense),
        TextTask("topic", tuple(ACTIVITIES), _topic),
        TextTask("emotion", tuple(EMOTIONS), _emotion),
    )
}
SPLITS = ("calib", "train", "test")
"""Drawn in this order, each excluding the sentences of the ones before, so test stays unseen; test is
drawn last so that it can grow without changing what the experts were trained or calibrated on."""


def make_text_splits(task: TextTask, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint labeled splits of ``task``; a split never depends on the sizes of later ones."""
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {list(SPLITS)}")
    rng = random.Random(f"adamerge-zoo-text/{task.name}/{seed}")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split in (s for s in SPLITS if s in sizes):
        rows: list[dict] = []
        while len(rows) < sizes[split]:
            row = task.sample(rng)
            if row["text"] not in seen:
                seen.add(row["text"])
                rows.append(row)
        splits[split] = rows
    return splits


def write_text_eval_splits(out_dir: str | Path, seed: int = 0, n_calib: int = 64, n_test: int = 500,
                           n_train: int = 2000) -> None:
    """``out_dir/<task>/calib.jsonl`` (text only) and ``test.jsonl`` (text + label) per task.

    Test is drawn after train, so ``n_train`` must be the zoo's. The repository's ``data/zoo_text``
    is this function's output for the defaults; a test keeps it so.
    """
    for name, task in TEXT_TASKS.items():
        splits = make_text_splits(task, {"calib": n_calib, "train": n_train, "test": n_test}, seed)
        write_jsonl(Path(out_dir) / name / "calib.jsonl", _texts(splits["calib"]))
        write_jsonl(Path(out_dir) / name / "test.jsonl", splits["test"])


def _texts(rows: Iterable[dict]) -> list[dict]:
    """Rows reduced to their text: what an unsupervised merge objective may see."""
    return [{"text": row["text"]} for row in rows]
