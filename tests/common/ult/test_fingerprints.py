import io
import json

import torch

from privtune.common.ult import UltTokenizer, bind_key, new_key_file, permuted_rows, save_table, table_fingerprints

from .conftest import ENGLISH, english_table


def _contains_any(blob: bytes, prints: list[bytes]) -> bool:
    return any(p in blob for p in prints)


def test_fingerprints_find_the_table_and_key_but_not_what_may_leave(tmp_path):
    key = new_key_file(tmp_path / "owner.key")
    table = bind_key(english_table(), key)
    prints = table_fingerprints(table, key)
    assert all(len(p) >= 16 for p in prints)

    # Leaks are caught: the table file, the key file, the raw keyed ranking.
    assert _contains_any(save_table(table, tmp_path / "t.json").read_bytes(), prints)
    assert _contains_any((tmp_path / "owner.key").read_bytes(), prints)
    keyed_ids = permuted_rows(table, key).argsort()[table.config.base :][:32]  # keyed id of each rank
    assert _contains_any(keyed_ids.astype("<i8").tobytes(), prints)
    assert _contains_any(json.dumps(list(table.symbols)).encode(), prints)

    # What a data owner legitimately sends (trained weights, metrics) does not trip them.
    torch.manual_seed(0)
    weights = torch.nn.Embedding(table.config.vocab_size, 8).state_dict()
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    metrics = json.dumps({"loss": 3.2, "examples": 128, "epsilon": 1.5}).encode()
    assert not _contains_any(buffer.getvalue(), prints)
    assert not _contains_any(metrics, prints)


def test_unkeyed_fingerprints_cover_the_ranking_only():
    table = english_table()
    prints = table_fingerprints(table)
    ids = UltTokenizer(table).encode(ENGLISH)
    assert _contains_any(json.dumps(list(table.symbols), separators=(",", ":")).encode(), prints)
    assert not _contains_any(json.dumps(ids).encode(), prints)
