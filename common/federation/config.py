"""The federated run's configuration, shared by the ServerApp and every ClientApp.

Flower hands both sides the same run config (``[tool.flwr.app.config]`` in pyproject.toml, plus
``--run-config`` overrides). This dataclass is its typed form; field ``foo_bar`` is run-config key
``foo-bar``. The defaults here and in pyproject.toml must agree (a test checks it).

``member-shards`` (m) and ``member-steps``: after the federated rounds every owner trains m PMixED
members from the public starting adapter, member i on the i-th of m disjoint shards of its own
documents only (0 turns the member track off); ``member-steps`` steps each (0: rounds x local-steps).

``dp-unit``: what DP-SGD's epsilon protects. ``record`` (default): one training example per record,
its first ``dp-record-max-tokens`` tokens; a record is what ``dp-records`` says: ``documents`` (a
``.txt`` file, a ``.jsonl`` line), ``paragraphs`` (blank-line separated), or ``auto``: paragraphs
for the embedded corpus (42 whole works are far too few records for DP to leave any signal),
documents for a data folder. ``block``: one packed token block, and a record spanning k blocks
gets only group privacy. ``dp-physical-batch`` (0: off) computes each Poisson batch in pieces of at
most that many examples, the same DP-SGD step, so large expected batches fit in memory.
``dp-sample-rate`` (q): the public probability that an example joins a DP-SGD step; the accountant
uses it and nothing computed from the owner's data (an owner's record count is private). Each
owner's expected batch is q times its number of examples: set q to about ``batch-size`` over a
public estimate of that number. Under DP-SGD ``batch-size`` is the public divisor of each step's
noisy gradient sum.

``emulator-quantize``: ``4bit`` makes the data owners hold the emulator's frozen blocks in NF4
(bitsandbytes on CUDA, :mod:`privtune.common.offsite.quantize`), ``none`` in full precision.
``gradient-checkpointing``: owners recompute their adapter blocks in the backward too (the frozen
middle always is), for less activation memory; plain training only, not with DP-SGD.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from privtune.common.errors import PrivtuneError

STRATEGIES = ("fedavg", "fedadam", "fedprox")
ENCODINGS = ("raw", "ult")
ADAPTERS = ("lora", "full")
DP_UNITS = ("record", "block")
DP_RECORDS = ("auto", "documents", "paragraphs")
QUANTIZE_CHOICES = ("none", "4bit")


@dataclass(frozen=True)
class FederationConfig:
    num_server_rounds: int = 3
    model: str = "tiny-llama"
    encoding: str = "raw"
    k_bottom: int = 1
    k_top: int = 1
    n_emulator: int = 1
    adapter: str = "lora"
    lora_r: int = 8
    distill_steps: int = 0
    package: str = ""
    local_steps: int = 20
    batch_size: int = 8
    block_size: int = 64
    max_train_blocks: int = 256
    learning_rate: float = 1e-3
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    update_clip: float = 100.0
    max_examples_per_owner: int = 0
    ldp_epsilon: float = 0.0
    ldp_embedding: str = "smollm2"
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    dp_unit: str = "record"
    dp_records: str = "auto"
    dp_record_max_tokens: int = 256
    dp_physical_batch: int = 0
    dp_sample_rate: float = 0.25
    member_shards: int = 1
    member_steps: int = 0
    round_timeout: float = 600.0
    seed: int = 0
    run_dir: str = "runs/flwr"
    eval_ids: str = ""
    overwrite: bool = False
    device: str = "auto"
    emulator_quantize: str = "none"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds must be at least 1"),
            (self.encoding in ENCODINGS, f"encoding must be one of {ENCODINGS}"),
            (self.adapter in ADAPTERS, f"adapter must be one of {ADAPTERS}"),
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.local_steps >= 1 and self.batch_size >= 1, "local-steps and batch-size must be positive"),
            (self.update_clip > 0, "update-clip must be positive"),
            (
                all(math.isfinite(e) and e >= 0 for e in (self.ldp_epsilon, self.dp_epsilon)),
                "epsilons must be finite and >= 0 (0 turns the mechanism off)",
            ),
            (self.max_examples_per_owner >= 0, "max-examples-per-owner must be >= 0 (0 weighs owners equally)"),
            (0 < self.dp_delta < 1, "dp-delta must be in (0, 1)"),
            (0 < self.fraction_train <= 1, "fraction-train must be in (0, 1]"),
            (self.member_shards >= 0, "member-shards must be >= 0 (0: no PMixED members)"),
            (self.dp_unit in DP_UNITS, f"dp-unit must be one of {DP_UNITS}"),
            (self.dp_records in DP_RECORDS, f"dp-records must be one of {DP_RECORDS}"),
            (self.dp_record_max_tokens >= 2, "dp-record-max-tokens must be at least 2"),
            (self.dp_physical_batch >= 0, "dp-physical-batch must be >= 0 (0: each Poisson batch in one piece)"),
            (0 < self.dp_sample_rate <= 1, "dp-sample-rate must be in (0, 1] (the public DP-SGD sampling rate)"),
            (self.member_steps >= 0, "member-steps must be >= 0 (0: as many as the federated track)"),
            (self.emulator_quantize in QUANTIZE_CHOICES, f"emulator-quantize must be one of {QUANTIZE_CHOICES}"),
            (
                not (self.gradient_checkpointing and self.dp_epsilon > 0),
                "gradient-checkpointing does not combine with DP-SGD (dp-epsilon > 0): Opacus' per-example "
                "gradient hooks must see each layer run once per step; turn one of them off",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PrivtuneError(f"invalid run config: {message}")

    @property
    def private(self) -> bool:
        """Whether the owners' data is protected (LDP or DP-SGD), which limits what they may release."""
        return self.ldp_epsilon > 0 or self.dp_epsilon > 0

    @property
    def member_track_steps(self) -> int:
        """Training steps of each PMixED member: ``member-steps``, or as many as the federated track takes."""
        return self.member_steps or self.num_server_rounds * self.local_steps

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise PrivtuneError(
                    f"unknown run-config key {key!r}; known keys: {', '.join(n.replace('_', '-') for n in known)}"
                )
            kind = type(getattr(cls, name)) if hasattr(cls, name) else str
            try:
                values[name] = _parse_bool(value) if kind is bool else kind(value)
            except (TypeError, ValueError):
                raise PrivtuneError(f"run-config key {key!r} must be {kind.__name__}, got {value!r}") from None
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def _parse_bool(value: Any) -> bool:
    """Flower passes TOML booleans; ``--set overwrite=false`` passes text, which ``bool()`` would call true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(value)
    return text == "true"
