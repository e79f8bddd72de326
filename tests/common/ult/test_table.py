import json
from collections import Counter
from itertools import groupby

import pytest

import privtune.common.ult.table as table_module
from privtune.common.errors import PrivtuneError
from privtune.common.ult import LookupTable, UltConfig, bind_key, build_table, load_table, save_table
from privtune.common.ult.text import run_code, run_of

from .conftest import ENGLISH, KEY
from .test_bwt import naive_bwts


def reference_counts(texts: list[str], patch_size: int) -> Counter:
    """Symbol counts straight from the definition: patches -> textbook BWTS -> runs."""
    counts: Counter = Counter()
    for text in texts:
        for start in range(0, len(text), patch_size):
            column = naive_bwts([ord(c) for c in text[start : start + patch_size]])
            counts.update(run_code(len(list(run)), char) for char, run in groupby(column))
    return counts


@pytest.mark.parametrize("patch_size", [1, 4, 8, 10, 16])
def test_ranking_matches_reference_counts(patch_size):
    texts = [ENGLISH, "\x00\n\t" * 7, "日本語🎉" * 5]
    table = build_table(texts, UltConfig(vocab_size=4096, patch_size=patch_size))
    counts = reference_counts(texts, patch_size)
    assert list(table.symbols) == sorted(counts, key=lambda code: (-counts[code], code))


def test_ties_are_broken_by_code_and_capacity_truncates():
    # "abc" alone: one Lyndon word, its BWTS is "cab": three runs of one, all equally frequent.
    config = UltConfig(vocab_size=UltConfig().base + 2, patch_size=3)
    table = build_table(["abc"], config)
    assert table.symbols == (run_code(1, ord("a")), run_code(1, ord("b")))
    assert run_of(table.symbols[1]) == (1, ord("b"))


@pytest.mark.parametrize("corpus", [[], [""], ["", ""]])
def test_an_empty_corpus_is_refused(corpus):
    with pytest.raises(PrivtuneError, match="holds no text"):
        build_table(corpus)


def test_build_is_deterministic_and_files_stream_like_strings(tmp_path, monkeypatch):
    monkeypatch.setattr(table_module, "_BATCH_CHARS", 40)  # many small, patch-aligned chunks
    path = tmp_path / "corpus.txt"
    path.write_text(ENGLISH * 2 + "\r\nend", encoding="utf-8", newline="")
    config = UltConfig(patch_size=6)
    from_file = build_table([path], config)
    assert from_file == build_table([path], config)
    assert from_file == build_table([ENGLISH * 2 + "\r\nend"], config)


def test_save_load_round_trip(tmp_path):
    table = bind_key(build_table([ENGLISH], UltConfig(vocab_size=300, patch_size=5, band_width=7)), KEY)
    path = save_table(table, tmp_path / "t.json")
    assert load_table(path) == table
    assert (path.stat().st_mode & 0o777) == 0o600  # a key-bound table is private


def _valid_payload() -> dict:
    table = build_table([ENGLISH], UltConfig(vocab_size=300))
    return {
        "format": "privtune-ult-table",
        "version": 2,
        "modality": "text",
        "config": table.config.to_dict(),
        "base": table.config.base,
        "codec": {},
        "key_check": None,
        "symbols": list(table.symbols),
    }


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.update(version=3),
        lambda p: p.update(format="something-else"),
        lambda p: p.update(modality="audio"),
        lambda p: p.update(symbols=[1, 1]),
        lambda p: p.update(symbols=[-1]),
        lambda p: p.update(symbols="abc"),
        lambda p: p.update(key_check="abcd"),
        lambda p: p.update(base=99),
        lambda p: p["config"].update(vocab_size=10),
        lambda p: p["config"].update(patch_size=0),
        lambda p: p.update(symbols=list(range(400))),  # more than the capacity
        lambda p: p.pop("config"),
    ],
)
def test_malformed_tables_name_the_path(tmp_path, change):
    payload = _valid_payload()
    path = tmp_path / "table.json"
    path.write_text(json.dumps(payload))
    assert isinstance(load_table(path), LookupTable)
    change(payload)
    path.write_text(json.dumps(payload))
    with pytest.raises(PrivtuneError, match=str(path)):
        load_table(path)


@pytest.mark.parametrize("content", [b"not json", b"\xff\xfe", b"[1, 2]"])
def test_non_tables_name_the_path(tmp_path, content):
    path = tmp_path / "junk.json"
    path.write_bytes(content)
    with pytest.raises(PrivtuneError, match=str(path)):
        load_table(path)
    with pytest.raises(PrivtuneError, match="missing.json"):
        load_table(tmp_path / "missing.json")


def test_a_version_1_table_is_refused_with_how_to_rebuild_it(tmp_path):
    payload = _valid_payload()
    payload["version"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(PrivtuneError, match="version 1.*rebuild it with 'privtune ult build-table'"):
        load_table(path)
