import math

import pytest
import torch

from privtune.server.validation import check_update

REFERENCE = {"block.0.q.lora_A": torch.zeros(4, 8), "block.0.q.lora_B": torch.zeros(8, 4)}


def updated(**changes):
    state = {k: v.clone() for k, v in REFERENCE.items()}
    state.update(changes)
    return state


def test_an_honest_update_within_the_bound_passes():
    state = updated(**{"block.0.q.lora_A": torch.full((4, 8), 0.1)})
    assert check_update(state, REFERENCE, clip=1.0) is None  # norm = 0.1 * sqrt(32) = 0.566


@pytest.mark.parametrize(
    "state,reason",
    [
        ({"block.0.q.lora_A": torch.zeros(4, 8)}, "missing"),
        (updated(extra=torch.zeros(1)), "unexpected"),
        (updated(**{"block.0.q.lora_A": torch.zeros(4, 9)}), "shape"),
        (updated(**{"block.0.q.lora_A": torch.zeros(4, 8, dtype=torch.float64)}), "dtype"),
        (updated(**{"block.0.q.lora_B": torch.full((8, 4), math.nan)}), "NaN"),
        (updated(**{"block.0.q.lora_B": torch.full((8, 4), math.inf)}), "infinite"),
        (updated(**{"block.0.q.lora_A": torch.full((4, 8), 1.0)}), "exceeds the bound"),
    ],
)
def test_bad_updates_are_refused_with_a_reason(state, reason):
    assert reason in check_update(state, REFERENCE, clip=1.0)


def test_norm_bound_is_the_l2_distance_from_the_global_adapter():
    reference = updated(**{"block.0.q.lora_A": torch.full((4, 8), 5.0)})
    state = updated(**{"block.0.q.lora_A": torch.full((4, 8), 5.1)})
    assert check_update(state, reference, clip=0.57) is None
    assert "0.566" in check_update(state, reference, clip=0.5)
