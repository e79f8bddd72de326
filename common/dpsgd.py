"""DP-SGD on the trainable (adapter) parameters, with Opacus, accounted in the privacy ledger.

Only parameters with ``requires_grad`` are hooked, clipped and noised: Opacus' GradSampleModule
hooks just the modules that own trainable parameters, and the optimizer holds only those, so the
frozen emulator is neither hooked nor touched. Per-sample gradients use Opacus' hooks mode; layers
it has no grad sampler for (GPT-2's ``Conv1D``, LLaMA's ``LlamaRMSNorm`` when whole adapter blocks
are trained) fall back, inside hooks mode, to Opacus' per-layer functorch sampler (vmap over the
layer), which needs no registration and is checked against per-example autograd in the tests. So
norms inside adapter blocks are trained like everything else in the block, not silently frozen.

Privacy unit: one example is one row of the examples tensor, and epsilon protects exactly that.
With the record unit (:func:`record_examples`) a row is one whole record of the owner's data (a
document, a ``.jsonl`` line or a paragraph), its first ``max_tokens`` tokens followed by
:data:`PAD`: so the per-example gradient Opacus clips is the record's gradient and Poisson sampling
is over records. With the block unit a row is a
packed token block, and a record spanning k blocks gets only group privacy over k. The unit is
recorded with every round; a ledger never composes rounds of different units.

Padding is on the right and causal attention never looks ahead, so a record's logits do not
depend on the padding after it; the padding's targets are masked out of the loss, so it adds
nothing to the loss or the gradient (checked in the tests). Each batch is cut to its longest
record.

Batches are Poisson samples (Opacus' DPDataLoader): every example joins each step independently
with probability q, which is what the RDP accountant assumes. An empty sample still takes a
(noise-only) step, as the analysis requires.

q, the number of steps and the batch size the noisy gradient sum is divided by are public
parameters, never computed from the examples. Under add/remove adjacency the number of records n
is private: q = batch / n, or steps = epochs / q, would make the accountant's inputs (and the
released gradient's scale) differ between neighbouring datasets, outside the analysis. A public q
needs nothing else: the subsampled Gaussian's RDP bound holds for every n, so there is no declared
record count to check the data against (a refusal when the real count differs from a declaration
would itself be a release computed from n). The expected batch is then q * n, private and unused;
callers choose q about (wanted batch) / (their public estimate of n), and a q far off only changes
the batch size and the noise per record, never the guarantee.

OPT's decoder layer flattens (batch, seq, features) to (batch*seq, features) before its MLP, so
Opacus would see every token as an example: per-token clipping, an example's influence up to
seq_len times the clipping norm, and no valid guarantee. While a round runs, its MLP modules are
wrapped to see batch-first inputs again; and after every backward pass each trainable parameter's
per-sample gradient must have exactly one row per example, or the round stops with an error.

Accounting: epsilon comes from Opacus' RDP accountant for the actual (noise multiplier, sample
rate, steps) of every round so far. The history lives in the ledger's DP-SGD records, so it
survives restarts and rounds run by fresh processes; the cumulative epsilon is recomputed from it
inside the ledger's transaction. A round is checked before training and recorded (atomically,
against the budget) before its first step, so a client declines to train rather than overspend.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import TensorDataset

from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ledger import Ledger, Record
from privtune.common.packing import record_rows
from privtune.common.tokens import IGNORE, PAD, TokenRows, Tokens

Step = tuple[float, float, int]  # the RDP accountant's history entry: (noise multiplier, sample rate, steps)
TARGET_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PrivacyUnit:
    """What one DP-SGD example is, i.e. what the epsilon protects; recorded with every round."""

    name: str
    """Short, the ledger's ``unit`` field: "record" or "training block (N tokens)"."""
    statement: str
    """The sentence the ledger's DP-SGD statement gives as the unit."""


def record_unit(records: str, max_tokens: int) -> PrivacyUnit:
    """One record of the owner's data: a document (a file, a ``.jsonl`` line) or a paragraph."""
    what = {"documents": "a document (a .txt file or a .jsonl line)", "paragraphs": "a blank-line separated paragraph"}
    if records not in what:
        raise PrivtuneError(f"records must be one of {sorted(what)}, got {records!r}")
    whole = "" if records == "documents" else "; a whole document of k paragraphs gets only group privacy over k"
    return PrivacyUnit(
        "record",
        f"one record ({what[records]} of the owner's data); each record's contribution is bounded: at most the "
        f"first {max_tokens} tokens of a record are trained on{whole}",
    )


def block_unit(block_size: int) -> PrivacyUnit:
    return PrivacyUnit(
        f"training block ({block_size} tokens)",
        f"one training block ({block_size} tokens of packed text): a document spanning k blocks gets only group "
        "privacy over k",
    )


def record_examples(records: Sequence[Sequence[int]], max_tokens: int) -> torch.Tensor:
    """One row per record of plain token ids (:func:`privtune.common.packing.record_rows`, ids only).

    Records of fewer than two tokens have no next token to predict: they are dropped rather than
    counted as examples that train nothing.
    """
    return record_rows([Tokens.plain(r) for r in records], max_tokens).ids


@dataclass(frozen=True)
class DpSgdConfig:
    """Clipping norm, delta, and either a noise multiplier or a target epsilon over planned training.

    With ``target_epsilon`` the noise multiplier is solved so that ``total_steps`` steps (or
    ``total_epochs`` epochs, i.e. epochs / q steps) at the round's sample rate reach exactly the
    target; every round then uses the same noise, and rounds beyond the plan are refused.
    """

    max_grad_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    total_steps: int | None = None
    total_epochs: float | None = None
    schedule: tuple[tuple[float, int], ...] | None = None
    """All the training an example takes part in, as (sample rate, steps) pairs (rounds at different
    sample rates, e.g. a federated track over the whole data and a member track over one shard)."""

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivtuneError("DP-SGD needs exactly one of noise_multiplier and target_epsilon")
        lengths = [self.total_steps, self.total_epochs, self.schedule]
        if self.target_epsilon is not None and sum(x is not None for x in lengths) != 1:
            raise PrivtuneError(
                "a DP-SGD target epsilon needs the planned training length: exactly one of total_steps, total_epochs "
                "and schedule"
            )
        if self.schedule is not None and not all(0 < q <= 1 and n >= 1 for q, n in self.schedule):
            raise PrivtuneError(
                f"a DP-SGD schedule needs sample rates in (0, 1] and positive step counts, got {self.schedule}"
            )
        if not self.max_grad_norm > 0:
            raise PrivtuneError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise PrivtuneError(f"delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise PrivtuneError(f"noise_multiplier must be positive, got {self.noise_multiplier}")


@dataclass(frozen=True)
class Release:
    """What a round's training is released as (recorded with the round in the ledger)."""

    kind: str = ""
    """e.g. "federated adapter", "PMixED member"."""
    part: str = ""
    """Which one, e.g. "round 2", "shard 1 of 2"."""


@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    epsilon_before: float
    epsilon_after: float

    @property
    def step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class RoundResult:
    plan: RoundPlan
    epsilon: float
    losses: list[float] = field(default_factory=list)
    record: Record | None = None


def epsilon_for(history: Sequence[Step], delta: float, orders: Sequence[float] | None = None) -> float:
    """Epsilon at ``delta`` of composing the given DP-SGD steps, from Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta, alphas=None if orders is None else list(orders)))


@lru_cache(maxsize=64)
def noise_multiplier_for(config: DpSgdConfig, sample_rate: float) -> float:
    """The configured noise multiplier, or the one that reaches the target over the planned steps.

    Cached: the bisection evaluates the accountant dozens of times, and every round asks again.
    """
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    if config.schedule is not None and config.target_epsilon is not None:
        return _noise_for_schedule(config.target_epsilon, config.delta, config.schedule)
    from opacus.accountants.utils import get_noise_multiplier

    if config.total_steps is not None:
        steps = config.total_steps
    elif config.total_epochs is not None:
        steps = math.ceil(config.total_epochs / sample_rate)
    else:
        raise PrivtuneError("a DP-SGD target epsilon needs the planned training length: total_steps or total_epochs")
    return float(
        get_noise_multiplier(
            target_epsilon=config.target_epsilon,
            target_delta=config.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    )


def _noise_for_schedule(target: float, delta: float, schedule: tuple[tuple[float, int], ...]) -> float:
    """The smallest noise multiplier (to 0.1%) whose epsilon over the whole schedule is at most ``target``.

    Epsilon falls as the noise grows, so bisection finds it; the upper end is returned, so the planned
    training never exceeds the target.
    """

    def epsilon(sigma: float) -> float:
        return epsilon_for([(sigma, q, n) for q, n in schedule], delta)

    low, high = 0.0, 1.0
    while epsilon(high) > target:
        low, high = high, 2 * high
        if high > 1e6:
            raise PrivtuneError(f"no noise multiplier reaches epsilon {target} at delta {delta} over {schedule}")
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if epsilon(middle) > target else (low, middle)
    return high


def history_of(records: Sequence[Record]) -> list[Step]:
    return [(r.details["noise_multiplier"], r.details["sample_rate"], r.details["steps"]) for r in records]


LEGACY_UNIT = "training example"
"""The unit of rounds recorded without one: a token block."""


def _check_same_unit(records: Sequence[Record], unit: PrivacyUnit) -> None:
    """Epsilons per different units are different promises: one history never mixes them."""
    other = {str(r.details.get("unit", LEGACY_UNIT)) for r in records} - {unit.name}
    if other:
        raise PrivtuneError(
            f"DP-SGD round refused: this ledger's DP-SGD history is per {sorted(other)[0]!r} and this round's unit "
            f"is {unit.name!r}; epsilons of different units do not compose. Keep the run's dp-unit, or give this "
            "training a fresh workspace (and its own budget)"
        )


def plan_round(
    config: DpSgdConfig,
    sample_rate: float,
    steps: int,
    ledger: Ledger | None = None,
    subject: str = "",
    unit: PrivacyUnit | None = None,
) -> RoundPlan:
    """What a round of ``steps`` steps at ``sample_rate`` would cost; refuses if it would exceed a budget.

    Raises :class:`BudgetExceededError` when the cumulative epsilon after the round would exceed
    the ledger's DP-SGD budget or the config's target. Records nothing.
    """
    if not 0 < sample_rate <= 1:
        raise PrivtuneError(
            f"the DP-SGD sample rate must be in (0, 1], got {sample_rate}; set dp-sample-rate (a public rate, about "
            "the wanted batch size over a public estimate of the number of records)"
        )
    if steps < 1:
        raise PrivtuneError(f"a DP-SGD round needs at least one step, got {steps}")
    sigma = noise_multiplier_for(config, sample_rate)
    records = ledger.records("dpsgd", subject) if ledger is not None else []
    if unit is not None:
        _check_same_unit(records, unit)
    history = history_of(records)
    plan = RoundPlan(
        sigma,
        sample_rate,
        int(steps),
        config.delta,
        config.max_grad_norm,
        epsilon_for(history, config.delta),
        epsilon_for([*history, (sigma, sample_rate, steps)], config.delta),
    )
    if config.target_epsilon is not None and plan.epsilon_after > config.target_epsilon * (1 + TARGET_TOLERANCE):
        raise BudgetExceededError(
            f"DP-SGD round refused: {steps} more steps would bring epsilon from {plan.epsilon_before:.4g} to "
            f"{plan.epsilon_after:.4g} (delta {config.delta:g}), above the target {config.target_epsilon:g} planned "
            "over the configured total steps/epochs; raise target_epsilon or the planned length, or stop training"
        )
    if ledger is not None:
        ledger.set_cumulative("dpsgd", plan.epsilon_after, delta=config.delta, subject=subject, dry_run=True)
    return plan


def reserve_round(
    ledger: Ledger, plan: RoundPlan, unit: PrivacyUnit, subject: str = "", release: Release | None = None
) -> Record:
    """Record the round in the ledger before training; the cumulative epsilon is recomputed in the transaction.

    ``release`` says what the round's training is released as, so the ledger lists every kind of
    release its DP-SGD epsilon covers; ``unit`` what the epsilon protects."""
    release = release or Release()

    def cumulative(records: list[Record]) -> float:
        _check_same_unit(records, unit)
        return epsilon_for([*history_of(records), plan.step], plan.delta)

    return ledger.set_cumulative(
        "dpsgd",
        cumulative,
        delta=plan.delta,
        subject=subject,
        details={
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "sampling": "Poisson; the sample rate and the steps are public configuration, not computed from the "
            "number of records",
            "steps": plan.steps,
            "max_grad_norm": plan.max_grad_norm,
            "accountant": "rdp (opacus)",
            "release": release.kind,
            "part": release.part,
            "unit": unit.name,
            "unit_statement": unit.statement,
        },
    )


def lm_per_sample_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's own targets, shape (batch,).

    The targets are the positions whose label is not :data:`IGNORE` (default: every token before
    the :data:`PAD`; an instruction's response only, :mod:`privtune.common.tokens`). The loss must
    separate over examples (a mean over the batch of per-example losses): a token mean over the
    whole batch would make each example's gradient depend on the others' lengths. Padding is fed as
    token 0 and its targets are masked out. Position ids are passed expanded to the batch, which
    Opacus needs when position embeddings are trained (GPT-2).
    """
    labels = TokenRows.of(input_ids).labels if labels is None else labels
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    logits = model(input_ids=input_ids.clamp(min=0), position_ids=positions).logits[:, :-1]
    per_token = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].clamp(min=0).reshape(-1), reduction="none"
    ).view(batch, length - 1)
    targets = (labels[:, 1:] != IGNORE).to(per_token.dtype)
    return (per_token * targets).sum(dim=1) / targets.sum(dim=1).clamp(min=1)


def _noise_generator(sampler: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on the parameters' device (Opacus draws the noise there), seeded from the sampler's."""
    if device.type == "cpu":
        return sampler
    seed = int(torch.randint(0, 2**62, (1,), generator=sampler))
    return torch.Generator(device=device).manual_seed(seed)


def train_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: torch.Tensor,
    *,
    sample_rate: float,
    batch_size: int,
    steps: int,
    config: DpSgdConfig,
    ledger: Ledger | None = None,
    subject: str = "",
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_per_sample_loss,
    seed: int | None = None,
    proximal_mu: float = 0.0,
    release: Release | None = None,
    unit: PrivacyUnit | None = None,
    max_physical_batch: int = 0,
    labels: torch.Tensor | None = None,
) -> RoundResult:
    """Run ``steps`` DP-SGD steps on ``examples`` (n x length token ids), Poisson batches at rate ``sample_rate``.

    ``sample_rate`` (q), ``steps`` and ``batch_size`` are public (module docstring): each example joins
    each step with probability q, and the sum of clipped gradients plus noise is divided by
    ``batch_size`` (Opacus' expected batch size; a public constant, so the scaling is post-processing).

    Each row is one example and ``unit`` says what it is (default: a token block of the rows' length);
    rows of :func:`record_examples` end in :data:`PAD`. ``labels`` (default: every real token) mark
    the positions each example is trained on, :data:`IGNORE` elsewhere (an instruction's prompt);
    ``loss_fn(model, ids, labels)`` gets them with each batch, so one row stays one example.

    ``max_physical_batch`` > 0 computes each Poisson batch in pieces of at most that many examples
    (Opacus' accumulation: every piece's per-example gradients are clipped and summed, and the
    noise is added once, at the last): the same step as in one piece, so large expected batches of
    long records fit in memory at no cost in privacy.

    ``optimizer`` must hold exactly the trainable parameters. The round is planned and reserved in the
    ledger before the first step (raising :class:`BudgetExceededError` without training when it
    does not fit). The model is returned to a plain module (no hooks) afterwards.

    ``proximal_mu`` > 0 adds FedProx's proximal gradient mu * (w - w_start) to each privatised
    gradient (after clipping, noise and scaling; a gradient hook would be overwritten by Opacus). It
    depends only on the weights at the round's start and the current weights, not on the examples,
    so adding it is post-processing and costs no privacy.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable or optimized != trainable:
        raise PrivtuneError(
            "the optimizer must hold exactly the model's trainable (adapter) parameters: "
            f"{len(optimized)} optimized vs {len(trainable)} with requires_grad; freeze the rest "
            "(requires_grad_(False)) and build the optimizer over the trainable ones"
        )
    _check_examples(examples)
    labels = _checked_labels(examples, labels)
    if max_physical_batch < 0:
        raise PrivtuneError(f"max_physical_batch must be >= 0 (0: each batch in one piece), got {max_physical_batch}")
    if unit is None and bool((examples == PAD).any()):
        raise PrivtuneError("padded rows are records: pass their unit (privtune.common.dpsgd.record_unit)")
    unit = unit or block_unit(examples.shape[1])
    if batch_size < 1:
        raise PrivtuneError(
            f"the DP-SGD batch size (the public divisor of each step's noisy sum) must be >= 1, got {batch_size}"
        )
    plan = plan_round(config, sample_rate, steps, ledger, subject, unit)
    record = reserve_round(ledger, plan, unit, subject, release) if ledger is not None else None
    generator = torch.Generator().manual_seed(secrets.randbits(64) if seed is None else int(seed))
    was_training = model.training
    loader = DPDataLoader(TensorDataset(examples, labels), sample_rate=sample_rate, generator=generator)
    losses: list[float] = []
    with _batch_first_opt_mlps(model):
        private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=batch_size,
            generator=_noise_generator(generator, examples.device),
        )
        if proximal_mu > 0:
            dp_optimizer.attach_step_hook(_proximal_step(dp_optimizer.params, proximal_mu))
        model.train()
        try:
            batches = _forever(loader)
            for _ in range(steps):
                batch, batch_labels = next(batches)
                pieces = [(batch, batch_labels)]
                if max_physical_batch > 0 and len(batch):
                    pieces = list(zip(batch.split(max_physical_batch), batch_labels.split(max_physical_batch)))
                total = 0.0
                for i, (piece, piece_labels) in enumerate(pieces):
                    dp_optimizer.signal_skip_step(do_skip=i < len(pieces) - 1)
                    dp_optimizer.zero_grad(set_to_none=True)  # keeps the sum of the pieces before
                    total += _backward(private, model, dp_optimizer, TokenRows(piece, piece_labels), loss_fn)
                    dp_optimizer.step()
                if len(batch):
                    losses.append(total / len(batch))
        finally:
            dp_optimizer.zero_grad(set_to_none=True)
            private.to_standard_module()
            model.train(was_training)
    return RoundResult(plan, record.total if record is not None else plan.epsilon_after, losses, record)


def _backward(
    private: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TokenRows,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """Per-example gradients of ``batch`` into ``grad_sample`` (none for an empty batch); returns its summed loss."""
    if len(batch) == 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return 0.0
    trimmed = _trim_padding(batch)
    loss = loss_fn(private, trimmed.ids, trimmed.labels).mean()
    with warnings.catch_warnings():
        # expected: the first adapter layer's input comes from frozen layers; Opacus
        # needs only the gradient at the module's output, which the hook still receives
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    _check_one_row_per_example(model, len(batch))
    return float(loss.detach()) * len(batch)


def _check_examples(examples: torch.Tensor) -> None:
    """Rows of token ids, each with at least two tokens before its padding and none after it."""
    if examples.dim() != 2 or len(examples) == 0 or examples.shape[1] < 2:
        raise PrivtuneError(
            f"examples must be a non-empty (n, length >= 2) tensor of token ids, got shape {tuple(examples.shape)}"
        )
    real = examples != PAD
    if bool((real[:, 1:] & ~real[:, :-1]).any()) or not bool(real[:, 1].all()):
        raise PrivtuneError(
            "each example row must hold at least two tokens and be padded on the right only; build record rows "
            "with privtune.common.dpsgd.record_examples"
        )
    if bool((examples < PAD).any()):
        raise PrivtuneError(f"token ids must be >= 0 (or {PAD} for padding)")


def _checked_labels(examples: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``labels``, or every real token's: each label is its token's id or :data:`IGNORE`, and padding's is IGNORE."""
    if labels is None:
        return TokenRows.of(examples).labels
    if labels.shape != examples.shape:
        raise PrivtuneError(f"labels {list(labels.shape)} must have the examples' shape {list(examples.shape)}")
    ignored = labels == IGNORE
    if not bool((ignored | (labels == examples)).all()) or not bool(ignored[examples == PAD].all()):
        raise PrivtuneError(
            "each label must be its token's id or IGNORE (-100), and IGNORE on padding; build rows with "
            "privtune.common.packing.record_rows"
        )
    return labels


def _trim_padding(batch: TokenRows) -> TokenRows:
    """The batch cut to its longest row: columns of padding alone are not computed."""
    return batch[:, : int((batch.ids != PAD).sum(dim=1).max())]


def _proximal_step(params: list[nn.Parameter], mu: float) -> Callable[[object], None]:
    """A DPOptimizer step hook (it runs after the gradient is privatised) adding mu * (w - w_start)."""
    anchors = [p.detach().clone() for p in params]

    def add_proximal_gradient(_optimizer: object) -> None:
        for param, anchor in zip(params, anchors, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach() - anchor, alpha=mu)

    return add_proximal_gradient


def _check_one_row_per_example(model: nn.Module, batch_size: int) -> None:
    for name, p in model.named_parameters():
        grad_sample = getattr(p, "grad_sample", None)  # set by Opacus
        rows = None if grad_sample is None else grad_sample.shape[0]
        if p.requires_grad and rows != batch_size:
            raise PrivtuneError(
                f"DP-SGD: per-example gradients of {name} have {rows} rows for a batch of {batch_size} examples; the "
                "layer sees inputs without a batch dimension (or is not reached), so clipping would not bound one "
                "example's influence. Freeze that parameter or train a layer that keeps the batch dimension"
            )


class _BatchFirst(nn.Module):
    """Runs a token-wise layer on (batch, seq, features) inputs that its caller flattened to (batch*seq, features)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x.view(*self.batch_shape, x.shape[-1]))
        return out.reshape(-1, out.shape[-1])


@contextmanager
def _batch_first_opt_mlps(model: nn.Module) -> Iterator[None]:
    """Wrap the trainable MLP modules of OPT decoder layers in :class:`_BatchFirst` for the duration."""
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    restore: list[tuple[nn.Module, str, nn.Module]] = []
    handles = []
    for layer in (m for m in model.modules() if isinstance(m, OPTDecoderLayer)):
        wrappers = []
        for attr in ("final_layer_norm", "fc1", "fc2"):
            inner = getattr(layer, attr)
            if any(p.requires_grad for p in inner.parameters()):
                wrapper = _BatchFirst(inner)
                setattr(layer, attr, wrapper)
                restore.append((layer, attr, inner))
                wrappers.append(wrapper)
        if wrappers:

            def record_shape(_module, args, kwargs, wrappers=wrappers):
                hidden = args[0] if args else kwargs["hidden_states"]
                for wrapper in wrappers:
                    wrapper.batch_shape = tuple(hidden.shape[:-1])

            handles.append(layer.register_forward_pre_hook(record_shape, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attr, inner in restore:
            setattr(owner, attr, inner)


def _forever(loader) -> Iterator:
    while True:
        yield from loader
