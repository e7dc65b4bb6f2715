"""POPE's negative sampling: which absent objects to ask about, three ways.

POPE (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language
Models") asks "Is there a/an <object> in the image?" about objects that are present (answer
yes) and absent (answer no). For each image it takes `sample_num` present objects and, after
each, one absent object chosen by a strategy (RUCAIBox/POPE, utils.py `pope`):

- random: uniformly among all the dataset's objects;
- popular: the dataset's most frequent objects first;
- adversarial: the objects that co-occur most often with that present object first;

never an object present in the image or already asked about it. Popular and adversarial fall
back to random when their ranking runs out. Frequencies and co-occurrences are counted over
the images being sampled, as POPE counts them over its ground-truth annotations. Ties are
broken by name here (POPE's order is a dict's insertion order), so a seed fixes the output.

The shapes world builds its existence questions with this module; the POPE benchmark builder
of the evaluation layer does too.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

STRATEGIES = ("random", "popular", "adversarial")
QUESTION = "Is there {} in the image?"  # POPE's --template


def question_text(obj: str) -> str:
    """POPE's question about `obj` (utils.py `create_question`): "an" before a vowel, else "a"."""
    return QUESTION.format(("an " if obj[:1] in "aeiou" else "a ") + obj)


@dataclass(frozen=True)
class ObjectStats:
    """Object frequencies and co-occurrence rankings of one collection of images."""

    objects: tuple[str, ...]  # every object, sorted by name
    popular: tuple[str, ...]  # most frequent first
    co_occurring: dict[str, tuple[str, ...]]  # object -> others, most co-occurring first

    @classmethod
    def count(cls, images: Sequence[Sequence[str]], vocabulary: Sequence[str] = ()) -> ObjectStats:
        """Count over `images` (each its list of objects). `vocabulary`: objects that random
        negatives may be drawn from beyond those seen (a dataset's whole label set)."""
        freq, pairs = Counter(), {}
        for objs in images:
            freq.update(set(objs))
            for o in set(objs):
                pairs.setdefault(o, Counter()).update(x for x in set(objs) if x != o)

        def ranked(counter: Counter) -> tuple[str, ...]:
            return tuple(sorted(counter, key=lambda o: (-counter[o], o)))

        return cls(
            objects=tuple(sorted(set(freq) | set(vocabulary))),
            popular=ranked(freq),
            co_occurring={o: ranked(c) for o, c in pairs.items()},
        )

    def negative(self, strategy: str, anchor: str, exclude: set[str], rng: random.Random) -> str | None:
        """One absent object by `strategy` for the present object `anchor`, or None if every
        known object is excluded."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown POPE strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
        ranking = {"popular": self.popular, "adversarial": self.co_occurring.get(anchor, ())}.get(strategy, ())
        for o in ranking:
            if o not in exclude:
                return o
        candidates = [o for o in self.objects if o not in exclude]
        return rng.choice(candidates) if candidates else None


def pope_questions(
    objects: Sequence[str], stats: ObjectStats, strategy: str, rng: random.Random, sample_num: int = 3
) -> list[tuple[str, str]]:
    """POPE's (object, label) pairs for one image: its first `sample_num` objects, each
    followed by one negative; label "yes" or "no"."""
    pairs, asked = [], set()
    for obj in list(objects)[:sample_num]:
        asked.add(obj)
        pairs.append((obj, "yes"))
        neg = stats.negative(strategy, obj, asked | set(objects), rng)
        if neg is not None:
            asked.add(neg)
            pairs.append((neg, "no"))
    return pairs
