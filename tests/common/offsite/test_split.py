import math

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks, num_blocks
from privtune.common.offsite import OffsiteConfig, build_emulator_model, split_indices
from privtune.common.offsite.split import uniform_keep
from tests.common.offsite.conftest import tiny, token_blocks


def test_smollm2_sized_2_8_2_worked_example():
    split = split_indices(30, OffsiteConfig(k_bottom=2, k_top=2, n_emulator=8))
    assert split.bottom == [0, 1]
    assert split.top == [28, 29]
    # 26 middle blocks (2..27); keep round(i*25/7): 0, 3.57, 7.14, 10.7, 14.3, 17.9, 21.4, 25 -> +2
    assert split.middle_kept == [2, 6, 9, 13, 16, 20, 23, 27]
    assert split.kept == [0, 1, 2, 6, 9, 13, 16, 20, 23, 27, 28, 29]


@pytest.mark.parametrize("n", range(1, 40))
def test_uniform_keep_matches_the_formula_and_keeps_both_ends(n):
    for m in range(1, n + 1):
        kept = uniform_keep(n, m)
        assert len(kept) == m == len(set(kept))
        assert kept[0] == 0
        if m > 1:
            assert kept[-1] == n - 1
            assert kept == [math.floor(i * (n - 1) / (m - 1) + 0.5) for i in range(m)]


def test_identity_when_emulator_keeps_every_middle_block():
    split = split_indices(6, OffsiteConfig(k_bottom=1, k_top=2, n_emulator=3))
    assert split.kept == list(range(6))
    assert split.middle_kept == [1, 2, 3]


def test_one_block_emulator_keeps_the_first_middle_block():
    assert split_indices(10, OffsiteConfig(k_bottom=2, k_top=2, n_emulator=1)).middle_kept == [2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k_bottom": 3, "k_top": 3, "n_emulator": 1}, "leaves no middle block"),
        ({"k_bottom": 2, "k_top": 2, "n_emulator": 3}, "out of range"),
        ({"k_bottom": 1, "k_top": 1, "n_emulator": 0}, "out of range"),
    ],
)
def test_invalid_splits_are_refused(kwargs, message):
    with pytest.raises(PrivtuneError, match=message):
        split_indices(6, OffsiteConfig(**kwargs))


def test_invalid_configs_are_refused():
    with pytest.raises(PrivtuneError, match="adapter kind"):
        OffsiteConfig(adapter="prefix")
    with pytest.raises(PrivtuneError, match="empty"):
        OffsiteConfig(k_bottom=0, k_top=0)


def test_emulator_holds_copies_of_the_kept_blocks_and_leaves_the_full_model_alone(family):
    full = tiny(family)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    emulator = build_emulator_model(full, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2))
    assert emulator.offsite_split.kept == [0, 1, 4, 5]
    assert num_blocks(emulator) == 4 and num_blocks(full) == 6
    for pos, orig in enumerate(emulator.offsite_split.kept):
        src, dst = get_blocks(full)[orig], get_blocks(emulator)[pos]
        for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    full_ptrs = {p.data_ptr() for p in full.parameters()}
    assert not full_ptrs & {p.data_ptr() for p in emulator.parameters()}
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    for model in (full, emulator):  # KV-cache slots: the emulator's renumbered, the full model's untouched
        for pos, block in enumerate(get_blocks(model)):
            indices = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
            assert indices == {pos}


def test_dropped_emulator_generates_with_kv_cache_as_without(family):
    emulator = build_emulator_model(tiny(family), OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2))
    prompt = token_blocks(2, 8, seed=3)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = emulator.generate(prompt, use_cache=True, **kwargs)
    uncached = emulator.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)
