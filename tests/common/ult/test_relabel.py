"""Relabelling a model into the key's id order, and the keyed p0 file the PMixED service takes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from privtune.cli import main
from privtune.common.errors import PrivtuneError
from privtune.common.models import LoadedModel, TinySpec, save_model, tiny_model
from privtune.common.offsite.adapter import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, embedding_tensors
from privtune.common.ult import UltTokenizer, bind_key, new_key_file, permuted_rows, save_table
from privtune.common.ult.relabel import load_keyed_public, relabel_model, relabel_state, save_keyed_public

from .conftest import ENGLISH, KEY, english_table

SPEC = TinySpec(n_layers=2, hidden=16, heads=2, max_positions=512)


def ult_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model on the test table's vocabulary; the LLaMA one gets its own (untied) head."""
    model = tiny_model(family, vocab_size=english_table().config.vocab_size, spec=SPEC, seed=seed).eval()
    if family == "llama":
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(
            torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed))
        )
    return model


def rows() -> torch.Tensor:
    return torch.from_numpy(permuted_rows(english_table(), KEY))


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied head
def test_keyed_model_on_keyed_ids_is_the_public_model_on_public_ids(family):
    table, index = english_table(), rows()
    public = ult_model(family)
    keyed = relabel_model(public, index)
    public_ids = torch.tensor([UltTokenizer(table).encode(ENGLISH[:200])])
    keyed_ids = torch.tensor([UltTokenizer(table, KEY).encode(ENGLISH[:200])])
    assert not torch.equal(public_ids, keyed_ids)
    with torch.no_grad():
        public_logits, keyed_logits = public(public_ids).logits, keyed(keyed_ids).logits
    # The keyed logit of keyed id k is the public logit of public id rows[k].
    torch.testing.assert_close(keyed_logits, public_logits[..., index], rtol=0, atol=1e-5)
    assert torch.equal(index[keyed_logits.argmax(-1)], public_logits.argmax(-1))
    assert not torch.equal(public.get_input_embeddings().weight, keyed.get_input_embeddings().weight)


def test_relabel_state_moves_only_the_embedding_rows():
    state = {INPUT_EMBEDDINGS: torch.arange(512.0)[:, None], "block.0.mlp.weight": torch.ones(3)}
    keyed = relabel_state(state, rows())
    assert torch.equal(keyed[INPUT_EMBEDDINGS][:, 0], rows().float())
    assert keyed["block.0.mlp.weight"] is state["block.0.mlp.weight"]
    assert relabel_state(state, None) == state


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keyed_public_file_round_trip(tmp_path, family):
    model = ult_model(family)
    path = save_keyed_public(model, rows(), tmp_path / "p0.safetensors")
    loaded = load_keyed_public(path, model)
    expected = embedding_tensors(relabel_model(model, rows()))
    assert (
        set(loaded)
        == set(expected)
        == ({INPUT_EMBEDDINGS} if family == "gpt2" else {INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS})
    )
    for name in expected:
        assert torch.equal(loaded[name], expected[name])


def test_keyed_public_file_refuses_trained_rows_another_model_and_garbage(tmp_path):
    model = ult_model("llama")
    path = save_keyed_public(model, rows(), tmp_path / "p0.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors[INPUT_EMBEDDINGS][7, 0] += 1e-3  # one coordinate "trained": no longer the public rows
    save_file(tensors, str(tmp_path / "trained.safetensors"), metadata=metadata)
    with pytest.raises(PrivtuneError, match="not the public model's rows reordered"):
        load_keyed_public(tmp_path / "trained.safetensors", model)
    with pytest.raises(PrivtuneError, match="another base model"):
        load_keyed_public(path, ult_model("llama", seed=1))
    save_file(load_file(str(path)), str(tmp_path / "plain.safetensors"))
    with pytest.raises(PrivtuneError, match="not a keyed public embeddings file"):
        load_keyed_public(tmp_path / "plain.safetensors", model)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(PrivtuneError, match="cannot read"):
        load_keyed_public(tmp_path / "garbage.safetensors", model)
    with pytest.raises(PrivtuneError, match="512 ids but the model has 300"):
        save_keyed_public(tiny_model("llama", vocab_size=300, spec=SPEC), rows(), tmp_path / "x.safetensors")


def test_cli_writes_what_the_service_loads_and_checks_the_key(tmp_path, capsys):
    table = bind_key(english_table(), KEY)
    model = ult_model("gpt2")
    folder = save_model(
        LoadedModel(model, UltTokenizer(english_table()), "tiny-ult"), tmp_path / "model"
    )  # public table
    save_table(table, tmp_path / "table.json")
    key_file = tmp_path / "federation.key"
    new_key_file(key_file, secret=KEY.secret)
    out = tmp_path / "p0.safetensors"
    args = ["ult", "keyed-public", "--model", str(folder), "--table", str(tmp_path / "table.json"), "-o", str(out)]
    assert main([*args, "--key-file", str(key_file)]) == 0
    assert torch.equal(load_keyed_public(out, model)[INPUT_EMBEDDINGS], model.get_input_embeddings().weight[rows()])
    other = tmp_path / "other.key"
    new_key_file(other)
    assert main([*args, "--key-file", str(other)]) == 2
    assert "wrong ULT key" in capsys.readouterr().err
