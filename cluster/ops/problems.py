"""A bundled set of short reasoning problems (generated here from templates; nothing is downloaded).

``problems(n)`` returns the first ``n`` of a fixed, seeded sequence, so every load test and calibration
run sends the same prompts.
"""

from __future__ import annotations

import random

TEMPLATES = [
    "A train leaves at {a} am at {b} km/h; a second leaves the same station an hour later at {c} km/h on the "
    "same track. How long after the second train leaves does it catch the first? Think step by step.",
    "What is the sum of the first {a} odd numbers? Explain your reasoning.",
    "A rectangle has a perimeter of {p} cm and one side of {a} cm. What is its area? Show each step.",
    "How many times does the digit {d} appear when writing all the whole numbers from 1 to {n}?",
    "If {a} workers build a wall in {b} days, how many days do {c} workers take at the same rate?",
    "Is {n} a prime number? Check the divisors step by step.",
    "A shop takes {a}% off a price, then {b}% off the reduced price. What is the total discount in percent?",
    "What is the remainder when {d}^{a} is divided by {b}? Reason step by step.",
    "A farmer has {n} sheep. All but {a} run away. How many are left? Think carefully.",
    "Anna is {a} years older than Ben. In {b} years their ages will sum to {n}. How old is Ben now?",
    "A tank fills in {a} hours with one pipe and in {b} hours with another. How long with both open?",
    "How many ways can {d} different books be arranged on a shelf? Explain.",
]


def problems(n: int, seed: int = 0) -> list[str]:
    """The first ``n`` problems of the seeded sequence (templates in turn, numbers drawn per problem)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rnd.randint(2, 12), rnd.randint(3, 15), rnd.randint(16, 30)
        out.append(
            TEMPLATES[i % len(TEMPLATES)].format(
                a=a, b=b, c=c, d=rnd.randint(2, 9), n=rnd.randint(40, 400), p=2 * (a + rnd.randint(a + 1, 40))
            )
        )
    return out
