"""decore-eval's correctness rule and its MemoTrap loader against hand-worked values (issue 27).

``prefix_em``: the generation's first line, lower case, alphanumeric words without articles,
starts with the target's words. Each case below is decided by hand from that sentence. The
loader: a hand-written file read back as exactly its rows, the shipped file's rows each a
distinct quote with two different endings, and the prompt and the two candidates of an item.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuits.detectors.decore_eval import MEMOTRAP, build_tasks, load_memotrap, memotrap_prompt, prefix_em
from interp.errors import UserError
from tests.tiny import loaded, tiny_llama

# (generated, target, correct?), each worked out by hand.
CASES = [
    ("Paris is the capital of France", "Paris", True),
    ("paris.", " Paris", True),  # case and punctuation are not words
    ("The Paris of the north", "Paris", True),  # an article is no word
    ("Parisian cafes", "Paris", False),  # words, not characters: "parisian" is not "paris"
    ("London\nParis", "Paris", False),  # the first line only
    ("Paris\nLondon", "Paris", True),
    ("New\nYork", "New York", False),  # the second line does not complete the first
    ("New York City", "New York", True),
    ("New Jersey", "New York", False),
    ("York, New", "New York", False),  # in order
    ("", "Paris", False),
    ("Paris", "", False),  # an empty target is never matched
    ("the", "The", False),  # a target of articles only is empty
    ("  Rome.", " Rome.", True),
    ("Rome, Italy", "Rome", True),
    ("Rome-Italy", "Rome Italy", True),  # the hyphen separates words
    ("42 is the answer", "42", True),
    ("4 2", "42", False),
]


@pytest.mark.parametrize(("generated", "target", "correct"), CASES)
def test_prefix_em_by_hand(generated: str, target: str, correct: bool) -> None:
    assert prefix_em(generated, target) is correct


def test_a_hand_written_memotrap_file_is_read_back_as_its_rows(tmp_path: Path) -> None:
    rows = [{"id": "a", "stem": "Slow and steady wins the", "memorised": "race", "instructed": "prize"},
            {"id": "b", "stem": "Curiosity killed the", "memorised": "cat", "instructed": "mood"}]
    path = tmp_path / "memo.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({**rows[1], "extra": 1}) + "\n")
    assert load_memotrap(path) == rows
    assert memotrap_prompt(rows[0]) == 'Write a quote that ends in the word "prize": Slow and steady wins the'


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"id": "a", "stem": "x", "memorised": "y"}', "missing 'instructed'"),
        ('{"id": "a", "stem": " ", "memorised": "y", "instructed": "z"}', "missing 'stem'"),
        ('{"id": "a", "stem": "x", "memorised": "Cat", "instructed": "cat "}', "equals the memorised one"),
        ("{not json", "line 1: not valid JSON"),
    ],
)
def test_a_bad_memotrap_line_is_named(line: str, says: str, tmp_path: Path) -> None:
    path = tmp_path / "memo.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=says):
        load_memotrap(path)


def test_the_shipped_memotrap_file() -> None:
    rows = load_memotrap()
    lines = [json.loads(ln) for ln in MEMOTRAP.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert len(rows) == len(lines)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["stem"] for r in rows}) == len(rows)
    for r in rows:
        assert r["memorised"].lower() != r["instructed"].lower()
        assert not r["stem"].endswith(r["memorised"])  # the stem stops before the memorised word


def test_memotrap_items_ask_for_the_instructed_ending_against_the_memorised_one() -> None:
    rows = {r["id"]: r for r in load_memotrap()}
    items = build_tasks(loaded(tiny_llama()), tasks=("memotrap",))["memotrap"]
    assert sorted(i.id for i in items) == sorted(rows)
    splits = [i.split for i in items]
    assert splits.count("validation") == len(rows) // 2  # half of them, the rest for testing
    for item in items:
        r = rows[item.id]
        assert item.prompt == f'Write a quote that ends in the word "{r["instructed"]}": {r["stem"]}'
        assert (item.target, item.other) == (f" {r['instructed']}.", f" {r['memorised']}.")


def test_intervals_pair_each_method_with_greedy_on_the_same_test_items() -> None:
    """Wilson by its closed form; the paired difference over the test items both methods
    answered, in item order whatever the row order; McNemar's exact p from the binomial by hand."""
    import math

    import pandas as pd

    from circuits.detectors.decore_eval import test_intervals
    from interp.stats import newcombe_paired

    greedy = dict(zip("abcdefghij", [1, 1, 0, 0, 1, 0, 1, 0, 0, 1], strict=True))
    decore = dict(zip("jihgfedcbaz", [1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 0], strict=True))  # z: greedy lacks it
    rows = [{"task": "nqswap", "method": "greedy", "k": 0, "split": "test", "item": i, "correct": bool(c)}
            for i, c in greedy.items()]
    rows += [{"task": "nqswap", "method": "decore-entropy", "k": 2, "split": "test", "item": i, "correct": bool(c)}
             for i, c in decore.items()]
    rows += [{"task": "nqswap", "method": "decore-entropy", "k": k, "split": s, "item": "v", "correct": False}
             for k, s in ((2, "validation"), (3, "test"))]  # another split, another k: not counted
    table = pd.DataFrame([{"task": "nqswap", "method": "greedy", "k": 0},
                          {"task": "nqswap", "method": "decore-entropy", "k": 2}])
    intervals, p = test_intervals(pd.DataFrame(rows), table)
    assert set(intervals) == {"nqswap:greedy:test_accuracy", "nqswap:decore-entropy:test_accuracy",
                              "nqswap:decore-entropy:minus_greedy"}
    # Wilson for 8 of 11 (decore, item z included), z = the 97.5 % normal quantile.
    z, n, x = 1.959963984540054, 11, 8
    centre = (x / n + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(x / n * (1 - x / n) / n + z * z / (4 * n * n))
    acc = intervals["nqswap:decore-entropy:test_accuracy"]
    assert (acc.value, acc.n, acc.method) == (x / n, n, "wilson")
    assert acc.lo == pytest.approx(centre - half, abs=1e-12)
    assert acc.hi == pytest.approx(centre + half, abs=1e-12)
    # Paired on a..j by item (decore's rows come in another order), z left out.
    items = list("abcdefghij")
    a = [float(decore[i]) for i in items]
    b = [float(greedy[i]) for i in items]
    diff = intervals["nqswap:decore-entropy:minus_greedy"]
    assert diff.n == 10
    assert diff.value == pytest.approx(sum(a) / 10 - sum(b) / 10, abs=1e-12)
    want = newcombe_paired(a, b)  # its bounds are checked by hand in tests/unit/test_stats.py
    assert (diff.lo, diff.hi) == (pytest.approx(want.lo, abs=1e-12), pytest.approx(want.hi, abs=1e-12))
    right_only = sum(x == 1 and y == 0 for x, y in zip(a, b, strict=True))
    wrong_only = sum(x == 0 and y == 1 for x, y in zip(a, b, strict=True))
    m = right_only + wrong_only
    tail = sum(math.comb(m, j) for j in range(min(right_only, wrong_only) + 1)) / 2**m
    assert p["nqswap:decore-entropy:mcnemar_p"] == pytest.approx(min(1.0, 2 * tail), abs=1e-12)
