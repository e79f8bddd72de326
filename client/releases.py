"""What a data owner tells the model owner, by privacy mode: every value is covered or withheld.

Anything computed from private data that leaves the site must be covered by a guarantee the owner's
ledger records. So, per mode, a train reply's ``metrics`` are:

- no protection: ``num-examples``, ``train-loss``, ``train-seconds``, ``train-tokens``;
- LDP only: the same, all computed from the LDP-perturbed text alone (post-processing of the
  perturbation the ledger records; the perturbed text keeps each document's length, which
  token-level LDP does not hide), plus ``ldp-epsilon-token`` (the mechanism's, from public
  embeddings) and ``ldp-epsilon-document-max`` (token epsilon times the longest perturbed document);
- DP-SGD (with or without LDP): ``num-examples`` = 1 and nothing else but ``ldp-epsilon-token``
  under LDP. The noised adapter is the only DP-SGD release; the loss, the example count, the
  training time (Poisson batch sizes), the epsilon spent and the noise multiplier all depend on the
  examples or their number, so they stay in the owner's ledger and log. The server weighs owners
  equally under DP-SGD.

Federated evaluation (perplexity on held-out text that is never perturbed) is released only
without protection; under LDP or DP-SGD the owner declines it. Member-track replies carry the
member adapters and the owner's name only, in every mode.
"""

from __future__ import annotations

from privtune.client.data import OwnerData
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import NUM_EXAMPLES
from privtune.common.offsite.train import TrainResult

LDP_TOKEN = "ldp-epsilon-token"
EVALUATION_WITHHELD = "evaluation withheld: the held-out text is not covered by LDP or DP-SGD"


def train_metrics(cfg: FederationConfig, data: OwnerData, result: TrainResult) -> dict[str, float]:
    """The ``metrics`` record of a federated train reply (see the module docstring)."""
    if cfg.dp_epsilon > 0:
        return {NUM_EXAMPLES: 1.0, **{k: v for k, v in data.ldp.items() if k == LDP_TOKEN}}
    return {
        NUM_EXAMPLES: float(len(data.train)),
        "train-loss": result.mean_loss,
        "train-seconds": result.seconds,
        "train-tokens": float(result.tokens),
        **data.ldp,
    }


def may_evaluate(cfg: FederationConfig) -> bool:
    return not cfg.private
