"""Text in, text out: tokenisation, out-of-vocabulary handling, per-document accounting, ledger, CLI, memory."""

import hashlib
import json
import shutil

import pytest
import torch

from privtune.cli import main
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ldp import (
    CusText,
    EmbeddingSpace,
    LdpConfig,
    SanText,
    build_mechanism,
    load_embedding,
    make_generator,
    perturb_text,
)
from privtune.common.ldp.perturb import content_subject, perturb_file, text_pieces
from privtune.common.ledger import Ledger
from privtune.common.text_tokenizer import ByteTokenizer

SENTENCE = "Harry Potter was a highly unusual boy in many ways."


@pytest.fixture(scope="module")
def tiny():
    return load_embedding("tiny")


def test_perturb_text_returns_text_and_a_computed_release(tiny):
    mechanism = SanText(tiny, 30.0)
    out, release = perturb_text(SENTENCE, mechanism, seed=0)
    assert isinstance(out, str) and out != SENTENCE
    n = len(SENTENCE.encode())
    assert release.n_tokens == n and release.unit == "token"
    assert release.token_epsilon == pytest.approx(30.0 * (release.diameter + 2 * tiny.rounding_bound), rel=1e-6)
    assert release.document_epsilon == pytest.approx(n * release.token_epsilon)
    assert release.metric_epsilon == 30.0 and release.mechanism == "santext"


def test_document_epsilon_is_the_sum_over_tokens(tiny):
    mechanism = CusText(tiny, 2.0, top_k=8)
    for text in ("", "a", "ab\n\t ", "é€😀"):
        _, release = perturb_text(text, mechanism, seed=1)
        assert release.n_tokens == len(text.encode())
        assert release.document_epsilon == pytest.approx(release.n_tokens * release.token_epsilon)
        assert 0 < release.token_epsilon <= 2.0 + 1e-12


def test_whitespace_and_special_tokens_are_perturbed_too():
    """With a flat embedding every token is equally likely: spaces, newlines and pad/bos/eos ids move like letters."""
    space = EmbeddingSpace.from_matrix(torch.zeros(259, 4) + torch.eye(259, 4) * 1e-3, ByteTokenizer(), name="flat")
    mechanism = SanText(space, 0.1)
    ids = torch.tensor(ByteTokenizer().encode(" \n\t") * 2000 + [0, 1, 2] * 2000)
    out = mechanism.sample(ids, make_generator(0))
    kept = (out == ids).float().mean()
    assert kept < 0.02  # ~1/259 of them by chance


def test_out_of_vocabulary_tokens_are_refused_or_mapped_never_passed_through():
    """A 150-row matrix under the 259-id byte tokenizer: ids >= 150 (the UTF-8 bytes of ï and é) have no row."""
    matrix = torch.randn(150, 6, generator=torch.Generator().manual_seed(0))
    text = "naïve café"
    refusing = EmbeddingSpace.from_matrix(matrix, ByteTokenizer(), name="short")
    with pytest.raises(PrivtuneError, match="no row in embedding 'short'"):
        perturb_text(text, SanText(refusing, 1.0), seed=0)
    mapping = EmbeddingSpace.from_matrix(matrix, ByteTokenizer(), name="short", unknown_id=3)
    ids = mapping.encode(text)
    oov = torch.tensor(ByteTokenizer().encode(text)) >= 150
    assert oov.sum() == 4 and (ids[oov] == 3).all()
    for seed in range(20):
        out = SanText(mapping, 5.0).sample(ids, make_generator(seed))
        assert (out < 150).all()  # an out-of-vocabulary id can never be emitted
    assert all(ch not in perturb_text(text, SanText(mapping, 5.0), seed=0)[0] for ch in "ïé")


def test_ledger_records_before_sampling_and_refusal_releases_nothing(tiny, tmp_path):
    ledger = Ledger(tmp_path / "owner.db", owner="alice")
    mechanism = SanText(tiny, 10.0)
    _, first = perturb_text("hello", mechanism, ledger=ledger, document_id="doc-1")
    ledger.set_budget("ldp", first.document_epsilon * 1.5)
    with pytest.raises(BudgetExceededError, match="doc-1"):
        perturb_text("hello", mechanism, ledger=ledger, document_id="doc-1")
    perturb_text("hello", mechanism, ledger=ledger, document_id="doc-2")
    records = ledger.records("ldp")
    assert [r.subject for r in records] == ["doc-1", "doc-2"]
    assert records[0].details["token_epsilon"] == pytest.approx(first.token_epsilon)


def test_cli_perturbs_a_file_and_records_it(tmp_path, capsys):
    source, target, ledger_path = tmp_path / "in.txt", tmp_path / "out.txt", tmp_path / "ledger.db"
    source.write_text("To be, or not to be,\nthat is the question.\n")
    args = [
        "ldp",
        "perturb",
        "--epsilon",
        "40",
        "--embedding",
        "tiny",
        "--ledger",
        str(ledger_path),
        "--seed",
        "7",
        str(source),
        "-o",
        str(target),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "per token:" in printed and "per document:" in printed and "record #1" in printed
    assert target.read_text() != source.read_text()
    (record,) = Ledger(ledger_path).records("ldp")
    assert record.subject == content_subject(hashlib.sha256(source.read_bytes()).hexdigest())
    assert record.details["n_tokens"] == len(source.read_bytes())
    assert main(["ledger", "budget", str(ledger_path), "ldp", "--epsilon", str(record.total * 1.5)]) == 0
    target.unlink()
    assert main(args) == 2  # a second release of the same document would exceed the budget
    assert not target.exists()
    assert "refused" in capsys.readouterr().err
    assert main(["ledger", "show", str(ledger_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["guarantees"][0]["unit"] == "document"


def test_renamed_or_copied_documents_keep_their_budget(tmp_path, capsys):
    source, ledger_path = tmp_path / "diary.txt", tmp_path / "ledger.db"
    source.write_text("Dear diary, today I met the queen.\n")
    common = ["--epsilon", "40", "--embedding", "tiny", "--ledger", str(ledger_path)]
    assert main(["ldp", "perturb", *common, str(source), "-o", str(tmp_path / "a.txt")]) == 0
    first = Ledger(ledger_path).records("ldp")[0]
    assert main(["ledger", "budget", str(ledger_path), "ldp", "--epsilon", str(first.total * 1.5)]) == 0
    renamed = source.rename(tmp_path / "renamed.txt")
    copied = tmp_path / "elsewhere" / "copy.txt"
    copied.parent.mkdir()
    shutil.copy(renamed, copied)
    for path in (renamed, copied):
        assert main(["ldp", "perturb", *common, str(path), "-o", str(tmp_path / "b.txt")]) == 2
        assert "refused" in capsys.readouterr().err
    assert len(Ledger(ledger_path).records("ldp")) == 1


@pytest.mark.parametrize("bad", ["nan", "inf", "0", "-3"])
def test_cli_refuses_a_bad_memory_cap_without_a_traceback(tmp_path, capsys, bad):
    source = tmp_path / "in.txt"
    source.write_text("hello")
    args = ["ldp", "perturb", "--epsilon", "1", "--embedding", "tiny", "--memory-cap-mb", bad]
    assert main([*args, str(source), "-o", str(tmp_path / "out.txt")]) == 2
    err = capsys.readouterr().err
    assert "memory cap" in err and "Traceback" not in err


def test_file_pieces_rebuild_the_text_and_are_cut_at_whitespace(tmp_path):
    text = "word " * 50 + "é" * 40 + "\n" + "x" * 70 + " tail 😀"
    source = tmp_path / "in.txt"
    source.write_text(text, encoding="utf-8")
    digest = hashlib.sha256()
    pieces = list(text_pieces(source, digest, piece_bytes=16))
    assert "".join(pieces) == text and len(pieces) > 10
    assert digest.hexdigest() == hashlib.sha256(text.encode()).hexdigest()
    assert all(p[0].isspace() for p in pieces[1:] if not p.startswith(("é", "x")))


def test_streamed_file_is_charged_for_all_its_tokens_once(tiny, tmp_path):
    text = "To be, or not to be, that is the question: " * 40
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text(text)
    ledger = Ledger(tmp_path / "owner.db", owner="alice")
    release, subject = perturb_file(source, target, SanText(tiny, 40.0), seed=3, ledger=ledger, piece_bytes=64)
    assert release.n_tokens == len(text.encode()) and subject.startswith("sha256:")
    (record,) = ledger.records("ldp")
    assert record.subject == subject and record.amount == pytest.approx(release.document_epsilon)
    assert target.read_text() != text and len(target.read_text()) > 0.5 * len(text)


def test_cli_custext(tmp_path):
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("All the world's a stage")
    assert (
        main(
            [
                "ldp",
                "perturb",
                "--epsilon",
                "3",
                "--embedding",
                "tiny",
                "--mechanism",
                "custext",
                "--top-k",
                "6",
                str(source),
                "-o",
                str(target),
            ]
        )
        == 0
    )
    assert target.exists()


def _status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def test_49k_vocabulary_stays_within_the_memory_cap():
    """128 distinct tokens over a random 49152 x 576 matrix: unchunked that is 100 MB of working arrays."""

    class Wide(ByteTokenizer):
        vocab_size = 49152

    space = EmbeddingSpace.from_matrix(
        torch.randn(49152, 576, generator=torch.Generator().manual_seed(0)), Wide(), name="random49k"
    )
    cap_mb = 16
    mechanism = SanText(space, 1.0, memory_cap_mb=cap_mb)
    assert mechanism.rows_per_chunk * mechanism.bytes_per_row() <= cap_mb << 20
    ids = torch.randperm(49152, generator=torch.Generator().manual_seed(1))[:128]
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (Linux >= 4.0)
    except OSError:
        pytest.skip("cannot reset the peak RSS counter here; the chunk-size assertion above still ran")
    before = _status_mb("VmRSS")
    out = mechanism.sample(ids, make_generator(0))
    growth = _status_mb("VmHWM") - before
    assert out.shape == ids.shape and (out >= 0).all() and (out < 49152).all()
    assert growth < 3 * cap_mb, f"peak memory grew by {growth:.0f} MB with a {cap_mb} MB cap"


@pytest.mark.slow
def test_real_smollm2_embedding_perturbs_a_sentence():
    for config in (LdpConfig(epsilon=1.0), LdpConfig(epsilon=3.0, mechanism="custext", top_k=20)):
        mechanism = build_mechanism(config)
        out, release = perturb_text(SENTENCE, mechanism)
        assert out != SENTENCE
        assert 0 < release.token_epsilon < 1e3 and release.n_tokens >= 10
        assert release.document_epsilon == pytest.approx(release.n_tokens * release.token_epsilon)
    santext = build_mechanism(LdpConfig(epsilon=1.0))
    diameter = santext.guarantee.diameter
    points = santext.space.points
    assert 5 < diameter < 50
    # no pair of rows is farther apart than the bound: check the rows farthest from the centroid
    far = santext.space.sq_norms.topk(256).indices
    assert float(torch.cdist(points[far], points).max()) <= diameter
