"""The alphabet is data: the packaged chinese68 and user JSON files."""

from __future__ import annotations

import json

import pytest

from lprnet_edge.runtime.charset import Charset, load_charset
from lprnet_edge.runtime.errors import LprnetEdgeError

# The sirius-ai LPRNet_Pytorch alphabet (data/load_data.py upstream), in class order.
UPSTREAM_CHARS = [
    "京", "沪", "津", "渝", "冀", "晋", "蒙", "辽", "吉", "黑",
    "苏", "浙", "皖", "闽", "赣", "鲁", "豫", "鄂", "湘", "粤",
    "桂", "琼", "川", "贵", "云", "藏", "陕", "甘", "青", "宁",
    "新",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "A", "B", "C", "D", "E", "F", "G", "H", "J", "K",
    "L", "M", "N", "P", "Q", "R", "S", "T", "U", "V",
    "W", "X", "Y", "Z", "I", "O", "-",
]


def test_packaged_charset_is_the_upstream_alphabet():
    cs = load_charset("chinese68")
    assert list(cs.chars) == UPSTREAM_CHARS
    assert len(cs) == 68
    assert cs.blank == 67 and cs.chars[cs.blank] == "-"
    assert cs.region_chars == 31
    assert load_charset() == cs  # the default


def test_encode_and_regions():
    cs = load_charset()
    assert cs.encode("京PL3N67") == [0, 54, 51, 34, 53, 37, 38]
    assert "".join(cs.chars[i] for i in cs.encode("皖AD12345")) == "皖AD12345"
    assert cs.region_of("皖A12345") == "皖"
    assert cs.region_of("A12345") is None
    assert cs.region_of("") is None
    assert cs.index["O"] == 66


@pytest.mark.parametrize("text", ["京PL3N6x", "京-123", "ABC#"])
def test_encode_rejects_unknown_characters_and_blank(text):
    with pytest.raises(LprnetEdgeError, match="not in charset"):
        load_charset().encode(text)


def test_json_file_round_trip(tmp_path):
    cs = Charset("digits", tuple("0123456789") + ("_",), blank=10)
    p = tmp_path / "digits.json"
    p.write_text(json.dumps(cs.to_dict()), encoding="utf-8")
    loaded = load_charset(p)
    assert loaded == cs
    assert loaded.encode("042") == [0, 4, 2]
    assert loaded.region_of("042") is None
    assert load_charset(str(p)) == cs


def test_invalid_definitions(tmp_path):
    with pytest.raises(LprnetEdgeError, match="out of range"):
        Charset("x", ("a", "b"), blank=2)
    with pytest.raises(LprnetEdgeError, match="not unique"):
        Charset("x", ("a", "a", "-"), blank=2)
    with pytest.raises(LprnetEdgeError, match="invalid charset"):
        Charset.from_dict({"name": "x", "blank": 0})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(LprnetEdgeError, match="not valid JSON"):
        load_charset(bad)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(LprnetEdgeError, match="chinese68"):
        load_charset("klingon")
