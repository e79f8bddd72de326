"""The box projection: every row lands in the box and sums to 1, it is the KL projection, and it is row-wise."""

import math

import numpy as np
import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed import box as box_module
from privtune.common.pmixed.box import ROUNDING, Box, project_box, project_rows
from privtune.common.pmixed.divergence import as_distribution

BOXES = [Box(0.3, 0.6), Box(0.01, 0.02), Box(1.046, 0.5), Box(3.0, 0.05), Box(1e-5, 2.0)]


def _assert_in_box(rows: torch.Tensor, public: torch.Tensor, box: Box) -> None:
    """Checked apart from Box.verify: the laws' ratios in [e^-a, e^b], sums 1 to rounding."""
    assert torch.all((rows.sum(dim=1) - 1).abs() <= 1e-12)
    law0 = public / public.sum()
    support = law0 > 0
    ratio = (rows / rows.sum(dim=1, keepdim=True))[:, support] / law0[support]
    assert float(ratio.min()) >= math.exp(-box.lower)
    assert float(ratio.max()) <= math.exp(box.upper)
    assert bool((rows[:, ~support] == 0).all())


def _adversarial_rows(public: torch.Tensor) -> torch.Tensor:
    """Point masses on the largest and smallest p0 token, uniform, p0 itself, zeros, and tiny values."""
    vocab = len(public)
    rows = torch.zeros(6, vocab, dtype=torch.float64)
    rows[0, int(public.argmax())] = 1.0
    rows[1, int(public.argmin())] = 1.0
    rows[2] = 1.0 / vocab
    rows[3] = public
    rows[4, : vocab // 2] = 1.0
    rows[5] = 1e-300
    rows[5, 0] = 1.0
    return rows


@pytest.mark.parametrize("vocab", [2, 3, 5, 49152])
@pytest.mark.parametrize("box", BOXES)
def test_rows_land_in_the_box_and_sum_to_one(vocab, box):
    generator = torch.Generator().manual_seed(vocab)
    public = torch.softmax(3 * torch.randn(vocab, generator=generator, dtype=torch.float64), dim=0)
    random_rows = torch.softmax(
        torch.randn(8, vocab, generator=generator, dtype=torch.float64) * torch.tensor([[0.1], [1], [3], [10]] * 2),
        dim=1,
    )
    for members in (random_rows, _adversarial_rows(public)):
        rows = project_box(members, public, box)
        assert rows.dtype == torch.float64 and rows.shape == members.shape
        _assert_in_box(rows, as_distribution(public, "p0"), box)


def test_public_with_zeros_keeps_them_zero():
    public = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0], dtype=torch.float64)
    members = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    rows = project_box(members, public, Box(0.4, 0.4))
    _assert_in_box(rows, public, Box(0.4, 0.4))
    outside = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # all its mass where p0 has none
    _assert_in_box(project_box(outside, public, Box(0.4, 0.4)), public, Box(0.4, 0.4))


def test_a_member_inside_the_box_is_kept_and_p0_maps_to_itself():
    public = as_distribution(torch.tensor([0.4, 0.3, 0.2, 0.1]), "p0")
    inside = public * torch.tensor([1.2, 0.9, 0.8, 1.1], dtype=torch.float64)
    inside = inside / inside.sum()
    rows = project_rows(torch.stack([inside, public]), public, Box(0.5, 0.5))
    assert torch.allclose(rows[0], inside, rtol=1e-9, atol=0)
    assert torch.allclose(rows[1], public, rtol=1e-9, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_the_projection_minimises_the_members_log_loss_over_the_box(seed):
    """KL(p || projection) <= KL(p || any other point of the box), other points drawn at random in it."""
    rng = np.random.default_rng(seed)
    vocab = 7
    box = Box(0.2, 0.35)
    public = torch.from_numpy(rng.dirichlet(np.full(vocab, 1.0)))
    member = torch.from_numpy(rng.dirichlet(np.full(vocab, 0.3)))
    best = project_box(member[None], public, box)[0]
    others = project_box(torch.from_numpy(rng.dirichlet(np.full(vocab, 0.5), size=200)), public, box)

    def kl(q: torch.Tensor) -> torch.Tensor:
        return (member * (member.log() - q.log())).sum(dim=-1)

    assert float(kl(best)) <= float(kl(others).min()) + 1e-9
    clipped_high = best >= public * math.exp(box.upper - 1e-5)
    assert bool(clipped_high.any())  # the box binds: this is a real projection, not the identity


def test_projection_is_row_wise_bit_for_bit():
    """Replacing one member leaves every other member's projected row unchanged (the bound relies on it)."""
    generator = torch.Generator().manual_seed(3)
    public = torch.softmax(torch.randn(1000, generator=generator, dtype=torch.float64), dim=0)
    members = torch.softmax(2 * torch.randn(4, 1000, generator=generator, dtype=torch.float64), dim=1)
    together = project_box(members, public, Box(0.3, 0.4))
    replaced = members.clone()
    replaced[2] = torch.softmax(5 * torch.randn(1000, generator=generator, dtype=torch.float64), dim=0)
    after = project_box(replaced, public, Box(0.3, 0.4))
    assert torch.equal(after[[0, 1, 3]], together[[0, 1, 3]]) and not torch.equal(after[2], together[2])
    for i in range(4):
        assert torch.equal(project_box(members[i : i + 1], public, Box(0.3, 0.4))[0], together[i])


def test_verify_refuses_a_row_outside_the_box_and_nan():
    public = as_distribution(torch.tensor([0.5, 0.25, 0.25]), "p0")
    box = Box(0.1, 0.1)
    edge = public * torch.tensor([math.exp(0.1), 1.0, 1.0], dtype=torch.float64)  # exactly on the side: no margin
    for row in (edge, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), torch.full((3,), math.nan)):
        with pytest.raises(PrivtuneError, match="left the box"):
            box.verify(row[None], public)
    inside = public * torch.tensor([math.exp(0.1 - 2 * ROUNDING), 1.0, 1.0], dtype=torch.float64)
    box.verify(inside[None], public)


@pytest.mark.parametrize("lower, upper", [(0.0, 0.5), (0.5, 1e-7), (math.nan, 0.5), (0.5, math.inf), (-0.1, 0.5)])
def test_a_box_side_narrower_than_the_rounding_allowance_is_refused(lower, upper):
    with pytest.raises(PrivtuneError, match="log-width"):
        Box(lower, upper)


def test_sizes_beyond_the_rounding_analysis_are_refused(monkeypatch):
    monkeypatch.setattr(box_module, "MAX_VOCAB", 4)
    with pytest.raises(PrivtuneError, match="rounding bound"):
        project_box(np.full((1, 5), 0.2), np.full(5, 0.2), Box(0.1, 0.1))
