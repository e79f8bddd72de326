import pytest

from privtune.cli import main
from privtune.common.ult import load_table

from .ult.conftest import ENGLISH

SAMPLE = ENGLISH.encode() + "\r\n\t\x00 日本語 🎉 \U0010ffff\n".encode() + b"\xff\xfe not UTF-8\n" + b"no final newline"


@pytest.fixture
def files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(ENGLISH * 2)
    (corpus / "b.txt").write_text("Some other public text.\n")
    data = tmp_path / "private.txt"
    data.write_bytes(SAMPLE)
    return tmp_path, corpus, data


def test_build_encode_decode_round_trip_byte_for_byte(files, capsys):
    tmp, corpus, data = files
    table, key = tmp / "table.json", tmp / "owner.key"
    assert (
        main(
            [
                "ult",
                "build-table",
                str(corpus),
                "-o",
                str(table),
                "--patch-size",
                "10",
                "--vocab-size",
                "1024",
                "--band-width",
                "8",
            ]
        )
        == 0
    )
    loaded = load_table(table)
    assert (loaded.config.patch_size, loaded.config.vocab_size, loaded.config.band_width) == (10, 1024, 8)
    assert main(["ult", "new-key", "-o", str(key)]) == 0
    assert main(["ult", "bind-key", "--table", str(table), "--key-file", str(key), "-o", str(tmp / "bound.json")]) == 0
    encoded, decoded = tmp / "enc.txt", tmp / "dec.txt"
    assert (
        main(
            ["ult", "encode", "--table", str(tmp / "bound.json"), "--key-file", str(key), str(data), "-o", str(encoded)]
        )
        == 0
    )
    ids = [int(t) for t in encoded.read_text().split()]
    assert ids and all(0 <= i < 1024 for i in ids)
    assert (
        main(
            [
                "ult",
                "decode",
                "--table",
                str(tmp / "bound.json"),
                "--key-file",
                str(key),
                str(encoded),
                "-o",
                str(decoded),
            ]
        )
        == 0
    )
    assert decoded.read_bytes() == SAMPLE


def test_long_files_stream_in_chunks(files, monkeypatch):
    import privtune.common.ult_cli as ult_cli

    monkeypatch.setattr(ult_cli, "_PATCHES_PER_LINE", 3)
    monkeypatch.setattr(ult_cli, "_DECODE_BATCH_IDS", 50)
    tmp, corpus, data = files
    table = tmp / "table.json"
    assert main(["ult", "build-table", str(corpus / "a.txt"), "-o", str(table)]) == 0
    assert main(["ult", "encode", "--table", str(table), str(data), "-o", str(tmp / "enc.txt")]) == 0
    assert len((tmp / "enc.txt").read_text().splitlines()) > 10
    assert main(["ult", "decode", "--table", str(table), str(tmp / "enc.txt"), "-o", str(tmp / "dec.txt")]) == 0
    assert (tmp / "dec.txt").read_bytes() == SAMPLE


def test_wrong_key_exits_2_with_a_clear_message(files, capsys):
    tmp, corpus, data = files
    table, key, other = tmp / "table.json", tmp / "owner.key", tmp / "other.key"
    main(["ult", "new-key", "-o", str(key)])
    main(["ult", "new-key", "-o", str(other)])
    assert main(["ult", "build-table", str(corpus), "-o", str(table), "--key-file", str(key)]) == 0
    assert (
        main(["ult", "encode", "--table", str(table), "--key-file", str(key), str(data), "-o", str(tmp / "enc.txt")])
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "ult",
                "decode",
                "--table",
                str(table),
                "--key-file",
                str(other),
                str(tmp / "enc.txt"),
                "-o",
                str(tmp / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "wrong ULT key" in err and "Traceback" not in err
    assert main(["ult", "decode", "--table", str(table), str(tmp / "enc.txt"), "-o", str(tmp / "x")]) == 2
    assert "bound to a secret key" in capsys.readouterr().err


def test_passphrase_from_environment(files, monkeypatch, capsys):
    tmp, corpus, data = files
    table = tmp / "table.json"
    monkeypatch.setenv("ULT_PASS", "a long shared federation passphrase")
    assert main(["ult", "build-table", str(corpus), "-o", str(table), "--passphrase-env", "ULT_PASS"]) == 0
    assert (
        main(["ult", "encode", "--table", str(table), "--passphrase-env", "ULT_PASS", str(data), "-o", str(tmp / "e")])
        == 0
    )
    assert (
        main(
            [
                "ult",
                "decode",
                "--table",
                str(table),
                "--passphrase-env",
                "ULT_PASS",
                str(tmp / "e"),
                "-o",
                str(tmp / "d"),
            ]
        )
        == 0
    )
    assert (tmp / "d").read_bytes() == SAMPLE
    monkeypatch.setenv("ULT_PASS", "another passphrase")
    assert (
        main(
            [
                "ult",
                "decode",
                "--table",
                str(table),
                "--passphrase-env",
                "ULT_PASS",
                str(tmp / "e"),
                "-o",
                str(tmp / "d"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "ult",
                "decode",
                "--table",
                str(table),
                "--passphrase-env",
                "UNSET_VAR_XYZ",
                str(tmp / "e"),
                "-o",
                str(tmp / "d"),
            ]
        )
        == 2
    )
    assert "UNSET_VAR_XYZ" in capsys.readouterr().err


def test_user_errors_exit_2_naming_the_file(files, capsys):
    tmp, corpus, data = files
    key = tmp / "owner.key"
    assert main(["ult", "new-key", "-o", str(key)]) == 0
    assert main(["ult", "new-key", "-o", str(key)]) == 2  # never overwrite a key silently
    (tmp / "bad.json").write_text("{}")
    assert main(["ult", "encode", "--table", str(tmp / "bad.json"), str(data), "-o", str(tmp / "e")]) == 2
    assert "bad.json" in capsys.readouterr().err
    table = tmp / "table.json"
    main(["ult", "build-table", str(corpus), "-o", str(table)])
    (tmp / "garbage.txt").write_text("12 x 7\n")
    assert main(["ult", "decode", "--table", str(table), str(tmp / "garbage.txt"), "-o", str(tmp / "d")]) == 2
    assert "garbage.txt" in capsys.readouterr().err
    assert main(["ult", "build-table", str(tmp / "missing"), "-o", str(table)]) == 2


def test_tolerant_decode_of_model_output(files):
    tmp, corpus, _data = files
    table = tmp / "table.json"
    main(["ult", "build-table", str(corpus), "-o", str(table)])
    (tmp / "model.txt").write_text("1 4 9999 3 5 2 0 0\n")
    assert main(["ult", "decode", "--table", str(table), str(tmp / "model.txt"), "-o", str(tmp / "d")]) == 2
    assert (
        main(["ult", "decode", "--tolerant", "--table", str(table), str(tmp / "model.txt"), "-o", str(tmp / "d")]) == 0
    )
    assert "\ufffd" in (tmp / "d").read_text()


def test_a_failed_decode_leaves_no_output(files):
    tmp, corpus, _data = files
    table = tmp / "table.json"
    main(["ult", "build-table", str(corpus), "-o", str(table)])
    (tmp / "model.txt").write_text("1 4 9999 3 5 2 0 0\n")
    assert main(["ult", "decode", "--table", str(table), str(tmp / "model.txt"), "-o", str(tmp / "d")]) == 2
    assert sorted(p.name for p in tmp.iterdir()) == ["corpus", "model.txt", "private.txt", "table.json"]


def test_output_to_a_folder_is_refused_and_leaves_nothing_behind(files, capsys):
    tmp, corpus, data = files
    table = tmp / "table.json"
    main(["ult", "build-table", str(corpus), "-o", str(table)])
    before = sorted(p.name for p in tmp.iterdir())
    assert main(["ult", "encode", "--table", str(table), str(data), "-o", str(tmp)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_an_empty_corpus_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "blank.txt").write_text("")
    for corpus in (empty, tmp_path / "blank.txt"):
        assert main(["ult", "build-table", str(corpus), "-o", str(tmp_path / "t.json")]) == 2
        assert "holds no text" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
