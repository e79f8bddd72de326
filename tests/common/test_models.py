import json
import time

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.models import load_model, save_model, smollm2_folder


@pytest.mark.parametrize("source,family", [("tiny-gpt2", "gpt2"), ("tiny-llama", "llama"), ("tiny-opt", "opt")])
def test_tiny_sources_are_real_runnable_models(source, family):
    loaded = load_model(source)
    assert loaded.family.name == family
    ids = torch.tensor([loaded.tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.tokenizer.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_models_are_deterministic():
    a, b = load_model("tiny-llama").model, load_model("tiny-llama").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("source", ["tiny-gpt2", "tiny-llama", "tiny-opt"])
def test_local_folder_round_trip(tmp_path, source):
    loaded = load_model(source)
    save_model(loaded, tmp_path)
    again = load_model(str(tmp_path))
    assert again.family == loaded.family
    ids = torch.tensor([loaded.tokenizer.encode("round trip")])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, loaded.model(ids).logits)


def test_folder_without_tokenizer_says_how_to_fix(tmp_path):
    load_model("tiny-gpt2").model.save_pretrained(tmp_path)
    with pytest.raises(PrivtuneError, match="no tokenizer files.*save_pretrained"):
        load_model(str(tmp_path))


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(PrivtuneError, match=str(tmp_path / "nope")):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"junk")
    with pytest.raises(PrivtuneError, match="no config.json"):
        load_model(str(tmp_path))


def test_corrupt_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PrivtuneError, match="corrupt"):
        load_model(str(tmp_path))
    load_model("tiny-llama").model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PrivtuneError, match="could not load the weights"):
        load_model(str(tmp_path))


def test_unknown_family_in_folder(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert"
    with pytest.raises(PrivtuneError):
        load_model(str(tmp_path))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrivtuneError, match="neither a local folder nor a reachable"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_packaged_smollm2_converts_once_and_generates(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    assert smollm2.family.name == "llama"
    assert model.config.num_hidden_layers == 30
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.isfinite(logits).all()
    assert "Paris" in tok.decode(out[0, ids.shape[1] :].tolist())
    # The cached safetensors copy exists and a second load is fast.
    assert (smollm2_folder() / "config.json").exists()
    start = time.perf_counter()
    again = load_model("smollm2")
    assert time.perf_counter() - start < 10
    assert torch.equal(again.model.lm_head.weight, model.lm_head.weight)
