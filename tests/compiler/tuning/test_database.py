"""Where tuning records live: keys, counting without TVM."""

from __future__ import annotations

from pathlib import Path

from lprnet_edge.compiler.tuning.database import DB_FILES, count_records, has_records, target_key


def test_target_key_is_canonical():
    a = {"kind": "llvm", "mcpu": "znver1", "num-cores": 2}
    b = {"num-cores": 2, "kind": "llvm", "mcpu": "znver1"}
    assert target_key(a) == target_key(b)
    assert target_key(a) != target_key({**a, "mcpu": "cortex-a72"})


def test_count_records(tmp_path: Path):
    assert count_records(tmp_path) == 0 and not has_records(tmp_path)
    (tmp_path / DB_FILES[1]).write_text('[0, 1]\n[0, 2]\n\n')
    assert count_records(tmp_path) == 2 and has_records(tmp_path)
