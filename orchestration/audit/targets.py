"""The models an attacker may hold after a run, each with the guarantee privtune claims for it.

- ``public``: the foundation model, trained on no private text (the baseline every attack is
  compared with);
- ``plugin``: the full model with the aggregated adapter, what the model owner publishes;
- ``adapter:OWNER``: one owner's adapter inside the emulator, what the model owner receives.
Each is scored on the owners' original text with the tokenizer the run trained with (in ULT runs
the key holder's keyed tokenizer, the public rows moved into the key's order).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privtune.audit.stats import group_guarantee
from privtune.common.errors import PrivtuneError
from privtune.common.text_tokenizer import TextTokenizer
from privtune.server.run_folder import ADAPTERS, AGGREGATE

SCORE_BATCH = 64


@dataclass(frozen=True)
class Claim:
    """A DP guarantee for membership of one audited record: (epsilon, delta) and what it rests on."""

    epsilon: float
    delta: float
    basis: str


@dataclass
class Target:
    name: str
    model: nn.Module
    tokenizer: TextTokenizer
    claim: Claim | None

    def sequence_logprobs(self, texts: list[str]) -> list[np.ndarray]:
        """Log-probability of every token of each text given the tokens before it (bos first)."""
        encoded = [[self.tokenizer.bos_token_id, *self.tokenizer.encode(text)] for text in texts]
        out: list[np.ndarray] = []
        self.model.eval()
        for start in range(0, len(encoded), SCORE_BATCH):
            batch = encoded[start : start + SCORE_BATCH]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out += [logprobs[row, : len(seq) - 1].numpy().astype(np.float64) for row, seq in enumerate(batch)]
        return out


@dataclass(frozen=True)
class RunView:
    """A finished run folder as the audit reads it."""

    server_dir: Path
    config: dict
    privacy: dict

    @classmethod
    def open(cls, run: Path) -> RunView:
        run = Path(run)
        server_dir = run / "server" if (run / "server" / "metrics.json").exists() else run
        metrics_path = server_dir / "metrics.json"
        if not metrics_path.exists():
            raise PrivtuneError(
                f"{run} is not a finished run folder (no metrics.json in it or in {run / 'server'}); give the --out "
                "folder of 'privtune simulate' or the run-dir of a 'flwr run'"
            )
        privacy_path = server_dir.parent / "privacy.json"
        privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else {}
        return cls(server_dir, json.loads(metrics_path.read_text())["config"], privacy)

    @property
    def owners(self) -> list[str]:
        adapters = self.server_dir / ADAPTERS
        return sorted(p.name for p in adapters.iterdir() if p.is_dir() and p.name != AGGREGATE)


def dp_claim(view: RunView, owner: str, group: int) -> Claim | None:
    """The owner's DP-SGD guarantee for one audited record: its ledger's figure per training unit,
    widened by group privacy to the ``group`` units one record can touch."""
    if float(view.config.get("dp-epsilon", 0.0)) <= 0:
        return None
    guarantees = [g for g in view.privacy.get(owner, {}).get("guarantees", []) if g.get("kind") == "dpsgd"]
    if not guarantees:
        raise PrivtuneError(
            f"the run trained with DP-SGD but {owner}'s ledger report (privacy.json) holds no DP-SGD guarantee; "
            "audit a run folder written by 'privtune simulate'"
        )
    epsilon, delta = float(guarantees[0]["epsilon"]), float(guarantees[0]["delta"])
    unit = guarantees[0].get("unit", "training example")
    eps_g, delta_g = group_guarantee(epsilon, delta, group)
    return Claim(eps_g, delta_g, f"DP-SGD ({epsilon:.3g}, {delta:g}) per {unit}, group privacy over {group}")


def run_tokenizer(view: RunView, key_file: Path | None) -> tuple[TextTokenizer, torch.Tensor | None]:
    """The tokenizer the owners trained with, and in ULT runs the rows that move public embeddings
    into the key's order (the audit then acts as a key holder)."""
    from privtune.common.models import ULT_TABLE_FILE, load_tokenizer

    if view.config.get("encoding") != "ult":
        return load_tokenizer(str(view.config["model"])), None
    from privtune.common.ult.relabel import key_rows
    from privtune.common.ult.tokenizer import UltTokenizer

    table = Path(str(view.config["model"])) / ULT_TABLE_FILE
    key = key_file or view.server_dir.parent / "federation" / "federation.key"
    if not key.exists():
        raise PrivtuneError(
            f"this run encoded text with ULT: the audit scores text as a key holder and needs the federation key "
            f"(not found at {key}; give --key-file)"
        )
    return UltTokenizer.from_files(table, key_file=key), key_rows(table, key)


def load_targets(view: RunView, owner: str, key_file: Path | None, group: int) -> list[Target]:
    from privtune.common.models import load_model
    from privtune.common.offsite.adapter import load_adapter_state
    from privtune.common.offsite.package import EmulatorPackage
    from privtune.common.ult.relabel import relabel_model
    from privtune.server.inference.members import load_member

    if owner not in view.owners:
        raise PrivtuneError(f"{owner} has no adapter in {view.server_dir / 'adapters'} (owners: {view.owners})")
    tokenizer, rows = run_tokenizer(view, key_file)
    public = relabel_model(load_model(str(view.config["model"])).model, rows)
    plugin = load_model(str(view.server_dir / "model")).model
    emulator = EmulatorPackage.load(view.server_dir / "emulator").instantiate(seed=int(view.config.get("seed", 0)))
    load_adapter_state(emulator, load_member(view.server_dir / "adapters" / owner).state)
    claim = dp_claim(view, owner, group)
    return [
        Target("public", public, tokenizer, Claim(0.0, 0.0, "trained on no private text")),
        Target("plugin", plugin, tokenizer, claim),
        Target(f"adapter:{owner}", emulator, tokenizer, claim),
    ]


def record_group(tokenizer: TextTokenizer, records: list[str], block_size: int, unit: str) -> int:
    """How many training units one record can touch: 1 for record-level DP, else the packed blocks
    a record of the longest length can straddle."""
    if "record" in unit:
        return 1
    longest = max(len(tokenizer.encode(text)) + 1 for text in records)
    return math.ceil(longest / block_size) + 1
