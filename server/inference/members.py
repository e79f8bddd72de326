"""What the service serves: the base model (the public p0) and the data owners' adapters (members).

Two ways to name them:

- a federated run folder (``--run RUN``, or the ``--out`` folder holding it as ``server/``): the
  base model is the run's ``config.model`` in ``RUN/metrics.json`` and the members are
  ``RUN/adapters/*/`` except ``aggregate``: the member track's adapters, each trained from the
  public start on one owner's data (or one disjoint shard of it) alone;
- explicitly (``--model SRC --adapters DIR ...``), each DIR an adapter folder as
  ``common.offsite.save_adapter`` and the run folder write it (a peft folder with privtune's
  ``manifest.json``).

Either way every member's manifest must record ``depends_on`` (see
:mod:`privtune.common.federation.provenance`), and the set is refused, naming the members, unless
each depends on one owner, no two share an owner's data and no two are identical: the privacy unit
of PMixED is one member's data, so an aggregate (trained on everyone's data), two adapters of one
owner, or one adapter named twice would make the per-member figure protect no one.

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
from privtune.common.federation.provenance import DependsOn, check_disjoint_members, depends_on_of, manifest_file
from privtune.common.offsite.adapter import load_adapter
from privtune.common.pmixed.ensemble import MemberAdapter
from privtune.common.ult.relabel import load_keyed_public
from privtune.server.run_folder import ADAPTERS, AGGREGATE, locate_run, recorded_model


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
        """The members, refused unless each is one owner's data and they are pairwise disjoint."""
        return checked_members(self.adapters)

    def load_public_embeddings(self, base_model: nn.Module) -> dict[str, torch.Tensor] | None:
        """p0's keyed rows, checked against ``base_model``; None when p0 is the base model as it is."""
        if self.public_embeddings is None:
            return None
        return load_keyed_public(self.public_embeddings, base_model)


def read_member(folder: Path) -> tuple[MemberAdapter, DependsOn]:
    """The member adapter in ``folder`` and the data it depends on, both checked."""
    state, manifest = load_adapter(folder)
    try:
        recorded = json.loads(manifest_file(folder).read_text())
    except json.JSONDecodeError as err:
        raise PrivtuneError(f"adapter in {folder} is corrupt ({err}); export it again") from None
    return MemberAdapter(folder.name, state, manifest), depends_on_of(recorded, f"adapter {folder}")


def load_member(folder: Path) -> MemberAdapter:
    return read_member(folder)[0]


def checked_members(folders: tuple[str, ...]) -> list[MemberAdapter]:
    """The members in ``folders``, refused unless each is one owner's data and they are pairwise
    disjoint and distinct (see module doc)."""
    from privtune.common.offsite.digest import tensors_digest

    resolved = [str(Path(f).resolve()) for f in folders]
    repeated = sorted({f for f in folders if resolved.count(str(Path(f).resolve())) > 1})
    if repeated:
        raise PrivtuneError(
            f"adapter folder(s) {', '.join(repeated)} named more than once: one member's data would count as "
            "several members; name each member once"
        )
    read = [(folder, *read_member(Path(folder))) for folder in folders]
    check_disjoint_members([(folder, depends_on, tensors_digest(member.state)) for folder, member, depends_on in read])
    return [member for _, member, _ in read]


def from_run_folder(run: Path, model: str | None = None, public_embeddings: str | None = None) -> ServedModel:
    """Members of a federated run; ``model`` overrides the base model recorded in the run.

    ``run`` is the server's run folder, or the ``--out`` folder of ``privtune simulate``/``demo``
    that holds it as ``server/``.
    """
    run = locate_run(run)
    adapters_dir = run / ADAPTERS
    folders = sorted(str(p) for p in adapters_dir.iterdir() if p.is_dir() and p.name != AGGREGATE)
    if not folders:
        raise PrivtuneError(f"{adapters_dir} holds no data owner's adapter (only {AGGREGATE!r} or nothing)")
    if model is None:
        model = recorded_model(run)
    checked_members(tuple(folders))  # refused here, before any service starts
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
    folders = tuple(str(Path(a)) for a in adapters)
    checked_members(folders)  # refused here, before any service starts
    return ServedModel(model, folders, public_embeddings)
