import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.families import blocks_prefix
from privtune.common.offsite import DistillConfig, OffsiteConfig, build_emulator_model, distill_emulator, middle_kd
from privtune.common.offsite.distill import kd_loss
from tests.common.offsite.conftest import snapshot, tiny, token_blocks

CFG = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2)


class Interrupted(Exception):
    pass


def test_kd_loss_formula():
    teacher = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # rms over all entries = sqrt(25/4) = 2.5
    student = torch.tensor([[3.0, 2.0], [1.0, 0.0]])
    assert kd_loss(teacher, student).item() == pytest.approx(((2 / 2.5) ** 2 + (1 / 2.5) ** 2) / 4)


def test_distillation_reduces_kd_and_trains_only_the_middle(family):
    full = tiny(family)
    emulator = build_emulator_model(full, CFG)
    blocks, heldout = token_blocks(32, 24, seed=0), token_blocks(8, 24, seed=1)
    full_before, emulator_before = snapshot(full), snapshot(emulator)
    kd_before = middle_kd(full, emulator, heldout)
    # KD alone: on random tiny models the LM term (weight 1 vs. a KD of ~0.03 on GPT-2) can dominate
    cfg = DistillConfig(steps=25, batch_size=4, lr=1e-3, lm_weight=0.0)
    result = distill_emulator(full, emulator, blocks, cfg, progress=False)
    kd_after = middle_kd(full, emulator, heldout)
    assert result.steps == 25 and len(result.kd_losses) == 25
    assert kd_after < 0.8 * kd_before
    assert all(torch.equal(full_before[k], v) for k, v in full.state_dict().items())
    prefix = blocks_prefix(emulator) + "."
    changed = [k for k, v in emulator.state_dict().items() if not torch.equal(emulator_before[k], v)]
    assert all(k.startswith(prefix) for k in changed)
    assert {int(k[len(prefix) :].split(".")[0]) for k in changed} == {1, 2}  # positions of the kept middle blocks
    assert all(p.requires_grad for p in emulator.parameters())  # trainability restored afterwards


def test_resume_continues_the_step_count_and_reproduces_the_uninterrupted_run(tmp_path):
    full, blocks = tiny("llama"), token_blocks(16, 24)
    cfg = DistillConfig(steps=8, batch_size=4, lr=3e-3, checkpoint_every=3, seed=5)
    straight = build_emulator_model(full, CFG)
    distill_emulator(full, straight, blocks, cfg, progress=False)

    resumed = build_emulator_model(full, CFG)
    checkpoint = tmp_path / "distill.ckpt"

    def stop_at_4(step, losses):
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        distill_emulator(full, resumed, blocks, cfg, checkpoint=checkpoint, progress=False, on_step=stop_at_4)
    fresh = build_emulator_model(full, CFG)  # a new process would start from the undistilled emulator
    result = distill_emulator(full, fresh, blocks, cfg, checkpoint=checkpoint, progress=False)
    assert result.resumed_from == 3 and result.steps == 8 and len(result.kd_losses) == 5
    expected, got = straight.state_dict(), fresh.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    again = distill_emulator(full, build_emulator_model(full, CFG), blocks, cfg, checkpoint=checkpoint, progress=False)
    assert again.resumed_from == 8 and again.kd_losses == []
    with pytest.raises(PrivtuneError, match="another model, split, data or settings"):
        distill_emulator(
            full, build_emulator_model(full, CFG), blocks, DistillConfig(steps=9), checkpoint=checkpoint, progress=False
        )
