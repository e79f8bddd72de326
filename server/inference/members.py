"""What the service serves: the base model (the public p0) and the data owners' adapters (members).

Two ways to name them:

- a federated run folder (``--run RUN``, or the ``--out`` folder holding it as ``server/``): the
  base model is the run's ``config.model`` in ``RUN/metrics.json`` and the members are
  ``RUN/adapters/*/`` except ``aggregate`` (the aggregate was trained on every owner's data, so it
  is no member of an ensemble whose privacy
  unit is one owner's shard);
- explicitly (``--model SRC --adapters DIR ...``), each DIR an adapter folder as
  ``common.offsite.save_adapter`` and the run folder write it (a peft folder with privtune's
  ``manifest.json``).

Members of a ULT federation carry embeddings in the federation key's id order; p0 must then be
the base model with its rows in that order too, a file a key holder makes (``--public-embeddings``,
see :mod:`common.ult.relabel`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.offsite.adapter import load_adapter
from privtune.common.pmixed.ensemble import MemberAdapter
from privtune.common.ult.relabel import load_keyed_public

AGGREGATE = "aggregate"


@dataclass(frozen=True)
class ServedModel:
    """Paths only (cheap to ship to Ray actors); :meth:`load_members` reads the tensors."""

    model: str
    adapters: tuple[str, ...] = field(default_factory=tuple)
    public_embeddings: str | None = None

    @property
    def n_members(self) -> int:
        return len(self.adapters)

    def load_members(self) -> list[MemberAdapter]:
        return [load_member(Path(folder)) for folder in self.adapters]

    def load_public_embeddings(self, base_model: nn.Module) -> dict[str, torch.Tensor] | None:
        """p0's keyed rows, checked against ``base_model``; None when p0 is the base model as it is."""
        if self.public_embeddings is None:
            return None
        return load_keyed_public(self.public_embeddings, base_model)


def load_member(folder: Path) -> MemberAdapter:
    state, manifest = load_adapter(folder)
    return MemberAdapter(folder.name, state, manifest)


def from_run_folder(run: Path, model: str | None = None, public_embeddings: str | None = None) -> ServedModel:
    """Members of a federated run; ``model`` overrides the base model recorded in the run.

    ``run`` is the server's run folder, or the ``--out`` folder of ``privtune simulate``/``demo``
    that holds it as ``server/``.
    """
    if not (run / "adapters").is_dir() and (run / "server" / "adapters").is_dir():
        run = run / "server"
    adapters_dir = run / "adapters"
    if not adapters_dir.is_dir():
        raise PrivtuneError(f"{run} has no adapters/ folder: is it a finished federated run (privtune simulate --out)?")
    folders = sorted(str(p) for p in adapters_dir.iterdir() if p.is_dir() and p.name != AGGREGATE)
    if not folders:
        raise PrivtuneError(f"{adapters_dir} holds no data owner's adapter (only {AGGREGATE!r} or nothing)")
    if model is None:
        metrics = run / "metrics.json"
        try:
            model = json.loads(metrics.read_text())["config"]["model"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            raise PrivtuneError(
                f"{metrics} does not name the run's base model (config.model); pass it with --model"
            ) from None
    return ServedModel(str(model), tuple(folders), public_embeddings)


def from_arguments(
    run: str | None, model: str | None, adapters: list[str] | None, public_embeddings: str | None = None
) -> ServedModel:
    if public_embeddings is not None and not Path(public_embeddings).is_file():
        raise PrivtuneError(
            f"--public-embeddings {public_embeddings} does not exist (make it with 'privtune ult keyed-public')"
        )
    if run:
        if adapters:
            raise PrivtuneError("give --run RUN or --adapters DIR..., not both")
        return from_run_folder(Path(run), model, public_embeddings)
    if not model or not adapters:
        raise PrivtuneError("name what to serve: --run RUN, or --model SRC --adapters DIR [DIR ...]")
    missing = [a for a in adapters if not Path(a).is_dir()]
    if missing:
        raise PrivtuneError(f"adapter folder(s) {', '.join(missing)} do not exist")
    return ServedModel(model, tuple(str(Path(a)) for a in adapters), public_embeddings)
