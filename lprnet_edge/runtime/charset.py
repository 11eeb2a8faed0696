"""The alphabet as data (``runtime/data/<name>.json``) so other alphabets can be plugged in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lprnet_edge.runtime.errors import LprnetEdgeError

DEFAULT_CHARSET = "chinese68"


@dataclass(frozen=True)
class Charset:
    """Classes of the CTC output; ``blank`` is the CTC blank index (last in LPRNet)."""

    name: str
    chars: tuple[str, ...]
    blank: int
    region_chars: int = 0  # leading classes that are regions (provinces), for per-region stats

    def __post_init__(self) -> None:
        if not 0 <= self.blank < len(self.chars):
            raise LprnetEdgeError(f"charset {self.name!r}: blank index {self.blank} out of range")
        if len(set(self.chars)) != len(self.chars):
            raise LprnetEdgeError(f"charset {self.name!r}: characters are not unique")

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        """Label indices of ``text``; raises if a character is not in the alphabet."""
        idx = self.index
        bad = [c for c in text if c not in idx or idx[c] == self.blank]
        if bad:
            raise LprnetEdgeError(f"characters {''.join(bad)!r} are not in charset {self.name!r}")
        return [idx[c] for c in text]

    def region_of(self, text: str) -> str | None:
        """The region (province) of a plate: its first character if it is a region class."""
        if self.region_chars and text and text[0] in self.chars[: self.region_chars]:
            return text[0]
        return None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "chars": list(self.chars),
            "blank": self.blank,
            "region_chars": self.region_chars,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Charset:
        try:
            return cls(
                name=str(d["name"]),
                chars=tuple(d["chars"]),
                blank=int(d["blank"]),
                region_chars=int(d.get("region_chars", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LprnetEdgeError(f"invalid charset definition: {e}") from e


def load_charset(name_or_path: str | Path = DEFAULT_CHARSET) -> Charset:
    """A packaged charset by name, or a JSON file with ``name``, ``chars``, ``blank``."""
    p = Path(name_or_path)
    if p.suffix == ".json" and p.exists():
        text = p.read_text(encoding="utf-8")
    else:
        res = resources.files("lprnet_edge.runtime") / "data" / f"{name_or_path}.json"
        if not res.is_file():
            known = sorted(
                f.name[:-5] for f in (resources.files("lprnet_edge.runtime") / "data").iterdir()
                if f.name.endswith(".json")
            )
            raise LprnetEdgeError(f"unknown charset {name_or_path!r}: use one of {known}")
        text = res.read_text(encoding="utf-8")
    try:
        return Charset.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise LprnetEdgeError(f"charset {name_or_path}: not valid JSON ({e})") from e
