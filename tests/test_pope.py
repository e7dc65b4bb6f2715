"""POPE's negative sampling (tinylmm.data.pope) and its scoring rule (tinylmm.eval.pope)."""

from __future__ import annotations

import random

import pytest

from tinylmm.data.pope import STRATEGIES, ObjectStats, pope_questions
from tinylmm.eval.pope import binary_metrics, read_yes_no

IMAGES = [
    ["cat", "dog", "sofa"],
    ["cat", "dog"],
    ["cat", "tv"],
    ["car", "road"],
    ["car", "road", "dog"],
    ["cat", "sofa"],
]


def test_stats_rank_by_frequency_and_co_occurrence():
    stats = ObjectStats.count(IMAGES)
    assert stats.objects == ("car", "cat", "dog", "road", "sofa", "tv")
    assert stats.popular == ("cat", "dog", "car", "road", "sofa", "tv")  # 4, 3, 2, 2, 2, 1; ties by name
    assert stats.co_occurring["cat"] == ("dog", "sofa", "tv")  # 2, 2, 1
    assert stats.co_occurring["road"] == ("car", "dog")


def test_each_strategy_picks_its_negative():
    stats, rng = ObjectStats.count(IMAGES), random.Random(0)
    present = {"dog", "road"}
    assert stats.negative("popular", "dog", present, rng) == "cat"  # the most frequent absent object
    assert stats.negative("adversarial", "road", present, rng) == "car"  # co-occurs most with road
    assert stats.negative("adversarial", "dog", present, rng) == "cat"  # dog: cat 2, car 1, road 1, sofa 1
    for _ in range(50):
        assert stats.negative("random", "dog", present, rng) in {"car", "cat", "sofa", "tv"}
    assert stats.negative("random", "dog", set(stats.objects), rng) is None
    wider = ObjectStats.count(IMAGES, vocabulary=["zebra"])
    assert wider.negative("random", "dog", set(stats.objects), rng) == "zebra"  # the label set, seen or not


def test_rankings_fall_back_to_random_when_exhausted():
    stats, rng = ObjectStats.count(IMAGES), random.Random(1)
    # tv co-occurs only with cat: once cat is excluded, adversarial draws among the others
    drawn = {stats.negative("adversarial", "tv", {"tv", "cat"}, rng) for _ in range(200)}
    assert drawn == {"car", "dog", "road", "sofa"}


def test_pope_questions_alternate_present_and_absent():
    stats = ObjectStats.count(IMAGES)
    for strategy in STRATEGIES:
        pairs = pope_questions(["cat", "dog", "sofa"], stats, strategy, random.Random(2))
        assert [label for _, label in pairs] == ["yes", "no"] * 3
        assert [o for o, _ in pairs[::2]] == ["cat", "dog", "sofa"]
        negatives = [o for o, _ in pairs[1::2]]
        assert len(set(negatives)) == 3 and not set(negatives) & {"cat", "dog", "sofa"}
    popular = pope_questions(["cat", "dog", "sofa"], stats, "popular", random.Random(3))
    assert [o for o, _ in popular[1::2]] == ["car", "road", "tv"]
    assert pope_questions(["cat", "dog", "sofa"], stats, "popular", random.Random(3), sample_num=1) == [
        ("cat", "yes"),
        ("car", "no"),
    ]


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="unknown POPE strategy 'popularity'.*adversarial"):
        ObjectStats.count(IMAGES).negative("popularity", "cat", set(), random.Random(0))


@pytest.mark.parametrize(
    "answer, read",
    [
        ("Yes", "yes"),
        ("yes, there is a cat.", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("There is no cat in the image.", "no"),
        ("The cat is not there", "no"),
        ("Yes. No dogs though.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # not one of POPE's words
        ("no,", "no"),  # commas are dropped before splitting
    ],
)
def test_read_yes_no_follows_pope(answer, read):
    assert read_yes_no(answer) == read


def test_binary_metrics():
    answers = ["yes", "yes", "no", "no", "yes", "no", "yes", "yes"]
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    m = binary_metrics(answers, labels)  # TP 3, FP 2, TN 2, FN 1
    assert m == {
        "n": 8,
        "accuracy": 5 / 8,
        "precision": 3 / 5,
        "recall": 3 / 4,
        "f1": pytest.approx(2 * 0.6 * 0.75 / 1.35),
        "yes_ratio": 5 / 8,
    }
    none_yes = binary_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5
    with pytest.raises(ValueError, match="2 answers for 1 labels"):
        binary_metrics(["yes", "no"], ["yes"])
