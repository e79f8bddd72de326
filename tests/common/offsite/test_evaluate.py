import math

import pytest
import torch

from privtune.common.offsite import OffsiteConfig, build_emulator_model, evaluation_table, perplexity
from privtune.common.offsite.evaluate import emulator_quality
from tests.common.offsite.conftest import tiny, token_blocks


def test_perplexity_is_exp_of_the_token_weighted_mean_nll():
    model = tiny("llama")
    blocks = token_blocks(5, 16)
    nll, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:  # one block at a time, log-softmax by hand
            logp = torch.log_softmax(model(block[None]).logits[0].double(), dim=-1)
            for t in range(1, len(block)):
                nll -= logp[t - 1, block[t]].item()
                count += 1
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = tiny("opt")
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied: zero logits everywhere
    assert perplexity(model, token_blocks(3, 10), batch_size=3) == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_evaluation_table_reports_given_models_and_skips_others(capsys):
    full, blocks = tiny("gpt2"), token_blocks(4, 12)
    table = evaluation_table(blocks, full_model=full, plugin=full, batch_size=4)
    assert table["zero_shot"] == table["plugin"] == pytest.approx(perplexity(full, blocks))
    assert table["emulator"] is table["emulator_adapter"] is table["full_ft"] is None
    assert "plug-in" in capsys.readouterr().out


def test_emulator_quality_puts_the_emulator_next_to_the_full_model():
    full = tiny("llama")
    blocks = token_blocks(4, 16)
    same = emulator_quality(full, full, blocks, batch_size=3)
    assert same["ratio"] == pytest.approx(1.0) and same["emulator_ppl"] == pytest.approx(perplexity(full, blocks))
    thinned = build_emulator_model(full, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1))
    quality = emulator_quality(full, thinned, blocks)
    assert quality["emulator_ppl"] == pytest.approx(perplexity(thinned, blocks))
    assert quality["ratio"] == pytest.approx(quality["emulator_ppl"] / quality["full_ppl"]) and quality["ratio"] != 1
