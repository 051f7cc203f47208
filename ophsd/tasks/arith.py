"""``arith``: a seeded, endless generator of multi-step arithmetic word problems.

The offline default task: no files needed. Each problem is a short story with 2-4 steps
(add, subtract, multiply, divide exactly); the worked solution has one line per step and ends
``#### <answer>`` like GSM8K; answers are non-negative integers. Example ``i`` of a split is a
pure function of ``(seed, split, i)``, so any slice can be regenerated anywhere.
"""
from __future__ import annotations

import random
import zlib
from typing import Iterator

from ophsd.tasks.base import Dataset, Example
from ophsd.tasks.math_tasks import MathTask

NAMES = ["Ava", "Ben", "Chen", "Dina", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards",
         "coins", "beads", "eggs"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "baskets", "crates"]


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}/{split}/{index}".encode()))


def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """``(question, worked_solution, answer)`` for one random story."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friend = rng.choice([n for n in NAMES if n != name])
    total = rng.randint(5, 60)
    story = [f"{name} has {total} {item}."]
    steps = [f"{name} starts with {total} {item}."]
    for _ in range(rng.randint(2, 4)):
        op = rng.choice(["buy", "give", "multi", "share", "find"])
        if op == "buy":
            k, per = rng.randint(2, 6), rng.randint(2, 12)
            cont = rng.choice(CONTAINERS)
            story.append(f"Then {name} buys {k} {cont} with {per} {item} in each.")
            steps.append(f"{k} {cont} x {per} = {k * per} {item}; {total} + {k * per} = {total + k * per}.")
            total += k * per
        elif op == "give" and total > 1:
            g = rng.randint(1, total - 1)
            story.append(f"{name} gives {g} {item} to {friend}.")
            steps.append(f"{total} - {g} = {total - g}.")
            total -= g
        elif op == "multi" and total <= 200:
            m = rng.randint(2, 4)
            word = {2: "doubles", 3: "triples", 4: "quadruples"}[m]
            story.append(f"Then {name} {word} the number of {item}.")
            steps.append(f"{total} x {m} = {total * m}.")
            total *= m
        elif op == "share" and total >= 4:
            divisors = [d for d in range(2, 7) if total % d == 0]
            if not divisors:
                continue
            d = rng.choice(divisors)
            story.append(f"{name} splits the {item} equally into {d} groups and keeps one group.")
            steps.append(f"{total} / {d} = {total // d}.")
            total //= d
        else:
            f = rng.randint(1, 30)
            story.append(f"{name} finds {f} more {item}.")
            steps.append(f"{total} + {f} = {total + f}.")
            total += f
    if len(steps) < 3:  # at least two operations
        f = rng.randint(1, 30)
        story.append(f"{name} finds {f} more {item}.")
        steps.append(f"{total} + {f} = {total + f}.")
        total += f
    story.append(f"How many {item} does {name} have now?")
    solution = "\n".join(steps) + f"\n#### {total}"
    return " ".join(story), solution, total


class ArithTask(MathTask):
    """Endless seeded arithmetic word problems (train and dev streams never share a generator key)."""

    name = "arith"
    max_new_tokens = 256

    def __init__(self, seed: int = 0, size: int = 200, **kw):
        super().__init__(**kw)
        self.seed = int(seed)
        self.size = int(size)  # default number of examples load() returns

    def example(self, index: int, split: str = "train") -> Example:
        q, sol, ans = make_problem(_rng(self.seed, split, index))
        return Example(id=f"arith-{split}-{index}", question=q, answer=str(ans),
                       solution=sol.rsplit("####", 1)[0].strip(), source=f"arith:{self.seed}:{split}:{index}")

    def stream(self, split: str = "train", start: int = 0) -> Iterator[Example]:
        """Endless iterator over a split (training loops draw from this)."""
        i = start
        while True:
            yield self.example(i, split)
            i += 1

    def load(self, path=None, limit=None) -> Dataset:
        """``path`` is ignored (None expected); returns ``limit or size`` train-stream examples."""
        if path is not None:
            raise ValueError("task 'arith' generates its data; do not pass a data file")
        n = self.size if limit is None else limit
        return Dataset([self.example(i, "train") for i in range(n)], path="arith:train")

    def dataset(self, path=None, split="all", dev_size=500, seed=0, limit=None) -> Dataset:
        # The generator has disjoint streams instead of a carved split.
        if split not in ("all", "train", "dev"):
            raise ValueError(f"split must be all, train or dev, got {split!r}")
        stream = "dev" if split == "dev" else "train"
        n = limit if limit is not None else (dev_size if split == "dev" and isinstance(dev_size, int)
                                             else self.size)
        return Dataset([self.example(i, stream) for i in range(n)], path=f"arith:{stream}")
