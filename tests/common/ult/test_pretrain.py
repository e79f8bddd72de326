import copy
import re

import numpy as np
import pytest
import torch

from privtune.common.corpus import Document
from privtune.common.errors import PrivtuneError
from privtune.common.models import TinySpec, tiny_model
from privtune.common.packing import pack
from privtune.common.ult import UltConfig, UltTokenizer, build_table, permuted_rows
from privtune.common.ult.config import BOS_ID, EOS_ID, PAD_ID
from privtune.common.ult.pretrain import PretrainConfig, pretrain_ult, resize_for_ult

from .conftest import ENGLISH, KEY

SMALL = TinySpec(n_layers=2, hidden=64, heads=4)


def test_model_trained_on_encoded_text_generates_readable_text_for_the_key_holder():
    table = build_table([ENGLISH], UltConfig(vocab_size=256, patch_size=8))  # the public table
    public = UltTokenizer(table)
    model = resize_for_ult(tiny_model("llama", spec=SMALL), table.config)
    docs = [Document("hamlet", ENGLISH)]
    result = pretrain_ult(
        model, public, docs, PretrainConfig(steps=300, batch_size=8, block_size=64, lr=3e-3), progress=False
    )
    assert np.mean(result.losses[-20:]) < 0.5 < result.losses[0]

    # The key holder warm-starts from the public model and prompts it with keyed ids.
    keyed_model = copy.deepcopy(model)
    with torch.no_grad():
        keyed_model.get_input_embeddings().weight.copy_(
            model.get_input_embeddings().weight[torch.from_numpy(permuted_rows(table, KEY))]
        )
    keyed = UltTokenizer(table, KEY)
    prompt = pack(docs, keyed, 64)[:, :16]
    out = keyed_model.generate(prompt, max_new_tokens=48, do_sample=False, attention_mask=torch.ones_like(prompt))
    generated = out[:, 16:].tolist()

    corpus_words = set(re.findall(r"[a-z]{4,}", ENGLISH.lower()))

    def real_words(texts: list[str]) -> int:
        return sum(word in corpus_words for text in texts for word in re.findall(r"[a-z]{4,}", text.lower()))

    assert real_words(keyed.decode_batch(generated)) >= 10
    assert real_words(public.decode_batch(generated)) < 2  # the same ids, read without the key


def test_resume_continues_the_step_count_and_reproduces_the_run(tmp_path):
    table = build_table([ENGLISH], UltConfig(vocab_size=128))
    tok, docs = UltTokenizer(table), [Document("hamlet", ENGLISH)]
    cfg = PretrainConfig(steps=6, batch_size=4, block_size=32, lr=1e-3, checkpoint_every=2)
    spec = TinySpec(n_layers=1, hidden=32, heads=2)

    straight = resize_for_ult(tiny_model("llama", spec=spec), table.config)
    pretrain_ult(straight, tok, docs, cfg, progress=False)

    class Interrupted(Exception):
        pass

    def stop_at_4(step: int, loss: float) -> None:
        if step == 4:
            raise Interrupted

    path = tmp_path / "pretrain.pt"
    first = resize_for_ult(tiny_model("llama", spec=spec), table.config)
    with pytest.raises(Interrupted):
        pretrain_ult(first, tok, docs, cfg, checkpoint=path, progress=False, on_step=stop_at_4)
    resumed = resize_for_ult(
        tiny_model("llama", spec=spec, seed=1), table.config, seed=1
    )  # fresh process: other weights
    result = pretrain_ult(resumed, tok, docs, cfg, checkpoint=path, progress=False)
    assert (result.resumed_from, result.steps, len(result.losses)) == (4, 6, 2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [p.name for p in path.iterdir()] == ["step-000000006"]  # one complete step left, older ones removed

    with pytest.raises(PrivtuneError, match="another model, table"):
        pretrain_ult(
            resumed,
            tok,
            docs,
            PretrainConfig(steps=8, batch_size=4, block_size=32, lr=1e-3),
            checkpoint=path,
            progress=False,
        )


def test_resize_replaces_every_row_and_the_special_ids():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = UltConfig(vocab_size=300)
    tied = tiny_model("llama", spec=SMALL)
    old = tied.get_input_embeddings().weight.detach().clone()
    resize_for_ult(tied, config)
    new = tied.get_input_embeddings().weight
    assert new.shape == (300, 64) and tied.get_output_embeddings().weight is new
    assert tied.config.vocab_size == 300
    assert (tied.config.pad_token_id, tied.config.bos_token_id, tied.config.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert not torch.equal(new[:10], old[:10])  # ULT ids do not inherit the old tokens' rows
    assert torch.allclose(new.mean(0), old.mean(0), atol=4 * old.std() / 300**0.5)
    assert torch.allclose(new.std(0).mean(), old.std(0).mean(), rtol=0.15)

    untied = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    with torch.no_grad():
        untied.get_output_embeddings().weight.add_(5.0)
    resize_for_ult(untied, config)
    assert untied.get_output_embeddings().weight.shape == (300, 16)
    assert abs(untied.get_output_embeddings().weight.mean().item() - 5.0) < 0.1
    assert abs(untied.get_input_embeddings().weight.mean().item()) < 0.1


def test_pretrain_refuses_a_model_of_another_vocabulary():
    table = build_table([ENGLISH], UltConfig(vocab_size=128))
    with pytest.raises(PrivtuneError, match="resize_for_ult"):
        pretrain_ult(
            tiny_model("llama", spec=SMALL),
            UltTokenizer(table),
            [Document("d", ENGLISH)],
            PretrainConfig(steps=1),
            progress=False,
        )
