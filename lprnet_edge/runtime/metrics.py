"""Recognition metrics: exact plate match, per-character accuracy, edit distance, per region."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from lprnet_edge.runtime.charset import Charset


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@dataclass
class EvalResult:
    count: int
    correct: int
    accuracy: float
    char_accuracy: float
    mean_edit_distance: float
    per_region: dict[str, dict[str, float]] = field(default_factory=dict)
    # (path, reason) of each file left out with skip_bad; to_dict gives [path, reason] pairs.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [[path, why] for path, why in self.skipped]
        return d


class Accumulator:
    """Collects (label, prediction) pairs and summarises them."""

    def __init__(self, charset: Charset, keep_errors: int = 20) -> None:
        self.charset = charset
        self.keep_errors = keep_errors
        self.n = self.correct = self.chars = self.char_hits = self.dist = 0
        self.regions: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.errors: list[dict[str, str]] = []

    def add(self, label: str, pred: str, name: str = "") -> None:
        d = edit_distance(label, pred)
        ok = label == pred
        self.n += 1
        self.correct += ok
        self.dist += d
        self.chars += len(label)
        self.char_hits += max(len(label) - d, 0)
        region = self.charset.region_of(label) or "?"
        self.regions[region][0] += 1
        self.regions[region][1] += ok
        if not ok and len(self.errors) < self.keep_errors:
            self.errors.append({"file": name, "label": label, "prediction": pred})

    def result(self, skipped: list[tuple[str, str]] | None = None) -> EvalResult:
        n = max(self.n, 1)
        return EvalResult(
            count=self.n,
            correct=self.correct,
            accuracy=self.correct / n,
            char_accuracy=self.char_hits / max(self.chars, 1),
            mean_edit_distance=self.dist / n,
            per_region={
                r: {"count": c, "correct": k, "accuracy": k / c}
                for r, (c, k) in sorted(self.regions.items(), key=lambda kv: -kv[1][0])
            },
            skipped=[(str(p), str(why)) for p, why in skipped or []],
            errors=list(self.errors),
        )
