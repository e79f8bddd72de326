import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.families import blocks_prefix
from privtune.common.offsite import DistillConfig, OffsiteConfig, build_emulator_model, distill_emulator, middle_kd
from privtune.common.offsite.distill import alignment_config, kd_loss, load_middle_state, logit_kd_loss, middle_state
from privtune.common.offsite.lm import forward_logits
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
    with pytest.raises(PrivtuneError, match="another model, data or settings"):
        distill_emulator(
            full, build_emulator_model(full, CFG), blocks, DistillConfig(steps=9), checkpoint=checkpoint, progress=False
        )


def test_logit_kd_is_the_mean_kl_from_the_teacher():
    teacher = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    student = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.5, 0.5]]])
    p, q = teacher.softmax(-1), student.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert logit_kd_loss(teacher, student).item() == pytest.approx(expected.item(), rel=1e-6)
    assert logit_kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


@torch.no_grad()
def _logit_kl(full, emulator, blocks):
    full.eval()
    emulator.eval()
    return logit_kd_loss(full(blocks).logits, emulator(blocks).logits).item()


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2's transposed Conv1D and nn.Linear
def test_middle_lora_with_logit_kd_lowers_both_kds_and_merges_into_the_middle(family):
    full = tiny(family)
    emulator = build_emulator_model(full, CFG)
    blocks = token_blocks(32, 24, seed=0)
    before = snapshot(emulator)
    names = set(before)
    cfg = DistillConfig(steps=25, batch_size=4, lr=1e-2, lm_weight=0.0, logit_kd_weight=1.0, middle_lora_r=4)
    heldout = token_blocks(8, 24, seed=1)
    kd_before, kl_before = middle_kd(full, emulator, heldout), _logit_kl(full, emulator, heldout)
    result = distill_emulator(full, emulator, blocks, cfg, progress=False)
    assert middle_kd(full, emulator, heldout) < 0.95 * kd_before  # rank 4 of 32 dimensions: a small step
    assert _logit_kl(full, emulator, heldout) < kl_before
    assert all(loss > 0 for loss in result.logit_kd_losses)
    after = emulator.state_dict()
    assert set(after) == names  # merged: a plain model again, no LoRA tensors left
    prefix = blocks_prefix(emulator) + "."
    changed = {int(k[len(prefix) :].split(".")[0]) for k in names if not torch.equal(before[k], after[k])}
    assert changed == {1, 2}
    assert all(p.requires_grad for p in emulator.parameters())


def test_resume_with_middle_lora_reproduces_the_run_and_keeps_one_step(tmp_path):
    full, blocks = tiny("llama"), token_blocks(16, 24)
    cfg = DistillConfig(steps=6, batch_size=4, lr=3e-3, checkpoint_every=2, middle_lora_r=2, logit_kd_weight=0.5)
    straight = build_emulator_model(full, CFG)
    whole = distill_emulator(full, straight, blocks, cfg, progress=False)

    def stop_at_3(step, losses):
        if step == 3:
            raise Interrupted

    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        distill_emulator(
            full, build_emulator_model(full, CFG), blocks, cfg, checkpoint=checkpoint, progress=False, on_step=stop_at_3
        )
    fresh = build_emulator_model(full, CFG)
    result = distill_emulator(full, fresh, blocks, cfg, checkpoint=checkpoint, progress=False)
    assert result.resumed_from == 2 and result.steps == 6
    assert torch.allclose(torch.tensor(result.history), torch.tensor(whole.history))  # the whole run, resumed part too
    expected, got = straight.state_dict(), fresh.state_dict()
    assert all(torch.allclose(expected[k], got[k], atol=1e-7) for k in expected)
    assert [p.name for p in checkpoint.iterdir()] == ["step-000000006"]


def test_bad_distillation_settings_are_refused():
    with pytest.raises(PrivtuneError, match=">= 0"):
        DistillConfig(logit_kd_weight=-1.0)
    with pytest.raises(PrivtuneError, match=">= 0"):
        DistillConfig(middle_lora_r=-2)


def test_middle_state_carries_a_distillation_into_a_fresh_emulator():
    full, blocks = tiny("llama"), token_blocks(16, 24)
    distilled = build_emulator_model(full, CFG)
    distill_emulator(full, distilled, blocks, DistillConfig(steps=3, batch_size=4, lr=3e-3), progress=False)
    fresh = build_emulator_model(full, CFG)
    assert middle_kd(full, fresh, blocks) != middle_kd(full, distilled, blocks)
    load_middle_state(fresh, middle_state(distilled))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in distilled.state_dict().items())
    assert {k.split(".")[0] for k in middle_state(distilled)} == {"1", "2"}  # only the kept middle blocks


def test_the_alignment_stage_continues_the_main_one_on_kd_alone(family):
    """KD-only stage after an LM + KD one: lowers the logit KL further without the LM term driving it."""
    full = tiny(family)
    emulator = build_emulator_model(full, CFG)
    blocks, heldout = token_blocks(32, 24, seed=0), token_blocks(8, 24, seed=1)
    main = DistillConfig(steps=10, batch_size=4, lr=1e-3, seed=3)
    distill_emulator(full, emulator, blocks, main, progress=False)
    align = alignment_config(main, 20, logit_kd_weight=2.0)
    assert (align.lm_weight, align.logit_kd_weight, align.kd_weight) == (0.0, 2.0, main.kd_weight)
    assert (align.steps, align.warmup_steps, align.seed, align.lr) == (20, 2, 13, main.lr)
    result = distill_emulator(full, emulator, blocks, align, progress=False)
    assert result.logit_kd_losses[-1] > 0  # the stage computes the full model's logits
    before = heldout_kl(full, emulator, heldout)
    distill_emulator(full, emulator, blocks, alignment_config(align, 20), progress=False)
    assert heldout_kl(full, emulator, heldout) < before


@torch.no_grad()
def heldout_kl(full, emulator, blocks) -> float:
    return logit_kd_loss(forward_logits(full, blocks), forward_logits(emulator, blocks)).item()
