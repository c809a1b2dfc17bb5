"""Mutated, re-signed plans through every reader that needs no inputs.

A received plan is untrusted: its digest only proves that nobody changed it after it was
signed, and anyone can sign. Each mutated plan (tests/plan_mutate.py: swapped types,
huge, negative and NaN numbers, wrong lengths, deleted and extra keys, control
characters, Rich markup, deep nesting, raw byte damage) must either be refused with a
one-line MergeplanError or be read, checked, shown and diffed without an exception and
without a raw control character in the output. Longer runs: scripts/fuzz_plans.py.
"""

from __future__ import annotations

import random

import pytest

from mergeplan.plan.codec import decode_plan, encode_plan
from plan_factory import make_full_plan
from plan_mutate import mutate_plan, through_readers

PLANS_PER_CHUNK = 600
CHUNKS = 5  # separate tests, so pytest-xdist spreads them over its workers


@pytest.fixture(scope="module")
def seed_plan():
    data = encode_plan(make_full_plan())
    return data, decode_plan(data)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_mutated_plans_are_refused_or_handled(seed_plan, chunk):
    data, orig = seed_plan
    rng = random.Random(1000 + chunk)
    read = 0
    for i in range(PLANS_PER_CHUNK):
        mutated, kind = mutate_plan(data, rng)
        try:
            outcome = through_readers(mutated, orig, strict=True)
        except BaseException as e:
            raise AssertionError(f"plan {i} of chunk {chunk} ({kind}): {type(e).__name__}: {e}") from e
        read += outcome["decode"] == "ok"
    # The mutations must not all be refused at the door, or nothing behind it is tested.
    assert read > PLANS_PER_CHUNK // 10
