"""Counts of the fuzz harness (tests/test_fuzz.py), printed at the end of the
pytest run by conftest.py: how many cases each target ran and how they ended."""
from collections import Counter, defaultdict

COUNTS: dict[str, Counter] = defaultdict(Counter)


def record(target: str, outcome: str) -> None:
    COUNTS[target]["cases"] += 1
    COUNTS[target][outcome] += 1


def lines() -> list[str]:
    out = []
    for target, c in sorted(COUNTS.items()):
        rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "cases")
        out.append(f"fuzz {target}: {c['cases']} cases ({rest})")
    return out
