"""Synthetic prompt -> answer tasks with exact answers, the data behind the offline zoo.

A prompt is ``"<marker> <input>="`` (``rev cab=``, ``count abca=``) and the answer follows directly,
so one merged model can tell the tasks apart by their first word. Generation is deterministic: the
same (task, seed, sizes) always gives the same rows, and the splits of a task never share a prompt,
so test scores measure generalization, not memorization.

Each expert task also names a *decoy*: a neighbouring convention for the same marker (``rev`` that
copies instead of reversing). The zoo's base model sees both conventions during pretraining, so it
carries every skill but does not know which one each marker asks for; an expert is then a gentle
fine-tune that settles its own marker's convention. That keeps task vectors small, the regime in
which merging is meaningful (see docs/ARCHITECTURE.md, "The offline zoo: making merging mean something").
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

LETTERS = "abcdefgh"
MIN_LEN, MAX_LEN = 3, 6


@dataclass(frozen=True)
class Task:
    """A marker word, a generator of inputs and the rule that answers them."""

    name: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    decoy: Callable[[str], str] | None = None
    """The other convention the base model saw for this marker; None for pretraining-only tasks."""

    def prompt(self, x: str) -> str:
        return f"{self.name} {x}="

    def input_of(self, prompt: str) -> str:
        """Inverse of ``prompt``: the input a prompt of this task was made from."""
        return prompt[len(self.name) + 1 : -1]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def _shift(word: str, by: int) -> str:
    return "".join(LETTERS[(LETTERS.index(ch) + by) % len(LETTERS)] for ch in word)


def _copy(w: str) -> str:
    return w


def _length(w: str) -> str:
    return str(len(w))


EXPERT_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("rev", _word, solve=lambda w: w[::-1], decoy=_copy),
        Task("sort", _word, solve=lambda w: "".join(sorted(w)), decoy=lambda w: "".join(sorted(w, reverse=True))),
        Task("count", _word, solve=lambda w: str(w.count("a")), decoy=_length),
        Task("next", _word, solve=lambda w: _shift(w, 1), decoy=lambda w: _shift(w, -1)),
    )
}
"""The four tasks the zoo fine-tunes one expert each on: reverse a word, sort its letters, count
its letter ``a``, replace each letter by the next one (``h`` wraps to ``a``). Their decoys: copy the
word, sort it descending, give its length, replace each letter by the previous one."""

GENERIC_TASKS: dict[str, Task] = {t.name: t for t in (Task("copy", _word, _copy), Task("len", _word, _length))}
"""Tasks only the base is pretrained on, for breadth: they train the decoys' skills under own markers."""

SPLITS = ("calib", "train", "test")
"""Drawn in this order, each excluding the prompts of the ones before, so test stays unseen; test is
drawn last so that it can grow without changing what the experts were trained or calibrated on."""


def sample_rows(task: Task, n: int, rng: random.Random, exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """``n`` labeled rows with distinct prompts, none of them in ``exclude``."""
    seen = set(exclude)
    rows: list[dict[str, str]] = []
    draws_left = 100 * n + 1000
    while len(rows) < n:
        if draws_left == 0:
            raise ValueError(f"task {task.name!r} has fewer than {n} distinct prompts left to draw")
        draws_left -= 1
        x = task.make_input(rng)
        if task.prompt(x) not in seen:
            seen.add(task.prompt(x))
            rows.append({"prompt": task.prompt(x), "answer": task.solve(x)})
    return rows


def make_splits(task: Task, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Disjoint labeled splits of ``task``, e.g. ``sizes={"calib": 128, "train": 2000, "test": 500}``.

    A split's rows do not depend on the sizes of the splits drawn after it (``SPLITS`` order), so
    growing the test split never changes calib or train.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {list(SPLITS)}")
    rng = random.Random(f"adamerge-zoo/{task.name}/{seed}")
    splits: dict[str, list[dict[str, str]]] = {}
    used: set[str] = set()
    for split in SPLITS:
        if split in sizes:
            splits[split] = sample_rows(task, sizes[split], rng, exclude=used)
            used.update(row["prompt"] for row in splits[split])
    return splits


def with_decoys(task: Task, rows: list[dict[str, str]], rate: float, seed: int = 0) -> list[dict[str, str]]:
    """``rows`` with the answer replaced by the task's decoy convention in a ``rate`` share of them."""
    if task.decoy is None:
        return rows
    rng = random.Random(f"adamerge-zoo/decoy/{task.name}/{seed}")
    return [
        {"prompt": r["prompt"], "answer": task.decoy(task.input_of(r["prompt"]))} if rng.random() < rate else r
        for r in rows
    ]


def unlabeled(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows reduced to their prompts: what an unsupervised merge objective may see."""
    return [{"prompt": row["prompt"]} for row in rows]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, keys in insertion order, so equal data gives equal bytes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_eval_splits(out_dir: str | Path, seed: int = 0, n_calib: int = 128, n_test: int = 500, n_train: int = 2000
                      ) -> None:
    """``out_dir/<task>/calib.jsonl`` (prompts only) and ``test.jsonl`` (prompt + answer) per expert task.

    Test is drawn after train, so ``n_train`` must be the zoo's. The shipped zoo's ``data`` folder
    is this function's output for the defaults; a test keeps it so.
    """
    for name, task in EXPERT_TASKS.items():
        splits = make_splits(task, {"calib": n_calib, "train": n_train, "test": n_test}, seed)
        write_jsonl(Path(out_dir) / name / "calib.jsonl", unlabeled(splits["calib"]))
        write_jsonl(Path(out_dir) / name / "test.jsonl", splits["test"])
