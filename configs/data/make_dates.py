"""Generate the quickstart task: rewrite a date written in words into strict ISO 8601 (YYYY-MM-DD).

SmolLM2-135M-Instruct cannot do this out of the box (it echoes or paraphrases the date), and every answer is
exact, so held-out exact match measures learning without a judge. Seeded; train and eval dates are disjoint.

    python configs/data/make_dates.py   # rewrites dates-train.jsonl and dates-eval.jsonl beside this file
"""

import calendar
import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = "Rewrite the date in ISO 8601 format (YYYY-MM-DD). Answer with the date only."
MONTHS = list(calendar.month_name)[1:]
ABBR = list(calendar.month_abbr)[1:]


def ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{ABBR[d.month - 1]} {d.day} {d.year}",
    lambda d: f"{calendar.day_name[d.weekday()]}, {MONTHS[d.month - 1]} {ordinal(d.day)} {d.year}",
    lambda d: f"{d.day}-{ABBR[d.month - 1]}-{d.year}",
]


def make(n: int, rng: random.Random, taken: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        d = dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(200 * 365))
        if d in taken:
            continue
        taken.add(d)
        rows.append({"instruction": INSTRUCTION, "input": rng.choice(STYLES)(d), "output": d.isoformat()})
    return rows


if __name__ == "__main__":
    rng, taken, here = random.Random(20261122), set(), Path(__file__).parent
    for name, n in [("dates-train.jsonl", 800), ("dates-eval.jsonl", 100)]:
        with open(here / name, "w") as f:
            for row in make(n, rng, taken):
                f.write(json.dumps(row) + "\n")
