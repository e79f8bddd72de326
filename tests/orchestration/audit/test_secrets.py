import math

import numpy as np
import pytest

from privtune.audit import attacks
from privtune.audit.secrets import CANARY_DIGITS, AuditSecrets, Canary, new_canaries, plant, split_records
from privtune.common.corpus import Document
from privtune.common.errors import PrivtuneError
from privtune.common.packing import holdout_split


def corpus(n=400):
    speech = "Speak the speech, I pray you, as I pronounced it to you, trippingly on the tongue, number {i}."
    return [Document("play", "\n\n".join(speech.format(i=i) for i in range(n)))]


def test_each_record_is_a_document_and_every_secret_survives_the_clients_held_out_cut(tmp_path):
    canaries = new_canaries(3, (1, 4))
    secrets, planted = plant("owner-0", corpus(), canaries, max_documents=80, seed=0)
    assert len(planted) == 80 and len(secrets.members) == 80 - (1 + 4 + 1)
    trained = " ".join(doc.text for doc in holdout_split(planted, 0.1).train)
    for canary in canaries:
        assert trained.count(canary.text) == canary.repeats
    assert {doc.text for doc in planted} >= set(secrets.members)
    assert not set(secrets.members) & set(secrets.non_members)
    assert len(secrets.non_members) == len(secrets.members)
    assert not {doc.text for doc in planted} & set(secrets.non_members)
    assert AuditSecrets.load(secrets.save(tmp_path)) == secrets


def test_too_little_text_is_refused():
    with pytest.raises(PrivtuneError, match="too little room"):
        plant("owner-0", corpus(30), [], max_documents=80, seed=0)


def test_records_are_paragraphs_of_readable_length():
    doc = Document("d", "short\n\n" + "x" * 100 + "\n\n" + "y" * 1000)
    assert split_records([doc]) == ["x" * 100]


def test_canaries_have_the_stated_format_and_repeats():
    canaries = new_canaries(5, (1, 4, 16))
    assert [c.repeats for c in canaries] == [1, 4, 16, 1, 4]
    assert all(len(c.secret) == CANARY_DIGITS and c.secret.isdigit() for c in canaries)


def test_exposure_is_maximal_for_a_secret_that_outranks_every_candidate_and_near_chance_otherwise():
    canary = Canary("12345678", 1)

    def favours_the_secret(texts):
        return [np.array([0.0 if t == canary.text else -1.0]) for t in texts]

    assert attacks.exposure(favours_the_secret, canary, sample=255) == pytest.approx(math.log2(256))

    def indifferent(texts):
        return [np.array([-float(sum(map(ord, t)) % 97)]) for t in texts]

    values = [attacks.exposure(indifferent, Canary(s, 1), sample=255) for s in attacks.random_secrets(40)]
    assert 0.5 < np.mean(values) < 3.0  # chance is 1/ln 2 = 1.44 bits


def test_min_k_looks_at_the_least_likely_tokens():
    logprobs = [np.array([-0.1, -0.1, -0.1, -0.1, -5.0]), np.array([-1.0] * 5)]
    assert list(attacks.min_k_scores(logprobs, 0.2)) == [-5.0, -1.0]
    assert list(attacks.loss_scores(logprobs)) == pytest.approx([-1.08, -1.0])
