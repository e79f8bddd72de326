import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.families import family_by_name, family_of, get_blocks, get_final_norm, set_blocks, stem_of
from privtune.common.models import tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_blocks_found_and_replaced_consistently(family):
    model = tiny_model(family)
    assert family_of(model).name == family
    blocks = list(get_blocks(model))
    assert len(blocks) == 6
    assert get_final_norm(model) is not None
    kept = [0, 2, 5]
    set_blocks(model, [blocks[i] for i in kept], source_indices=kept)
    assert len(get_blocks(model)) == 3
    assert getattr(model.config, family_of(model).num_layers_key) == 3
    layer_ids = [sub.layer_idx for block in get_blocks(model) for sub in block.modules() if hasattr(sub, "layer_idx")]
    assert layer_ids and set(layer_ids) == {0, 1, 2}
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(PrivtuneError, match="unknown model family 'bert'"):
        family_by_name("bert")

    class NotAModel(torch.nn.Module):
        config = type("C", (), {"model_type": "bert"})()

    with pytest.raises(PrivtuneError, match="'bert' is not supported"):
        family_of(NotAModel())


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_stem_gives_the_first_block_its_input_and_the_head_its_logits(family):
    """The stem around the model's own blocks reproduces the model's forward at both ends."""
    model = tiny_model(family).double().eval()
    blocks = get_blocks(model)
    seen = {}
    blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(first=args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    blocks[-1].register_forward_hook(lambda _m, _args, out: seen.update(last=out[0] if isinstance(out, tuple) else out))
    ids = torch.randint(3, 200, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits
        stem = stem_of(model)
        positions = torch.arange(9).unsqueeze(0)
        torch.testing.assert_close(stem.embed(model.get_input_embeddings()(ids), positions), seen["first"])
        torch.testing.assert_close(stem.logits(seen["last"], model.get_output_embeddings()), logits)
    assert stem.max_positions == model.config.max_position_embeddings if family != "gpt2" else model.config.n_positions
