"""Moving a model's embedding rows from the public ULT id order into a federation key's order.

The model owner pretrains on text encoded with the public table, so embedding (and LM head) row
``base + r`` belongs to rank ``r``. Under the key, rank ``r`` has another id, and a key holder
relabels the rows with :func:`common.ult.keys.permuted_rows`. Three places need that: a data
owner's warm start, a key holder's evaluation of the public model on keyed ids, and the public
model p0 of the PMixED service, whose members' embeddings are keyed.

The last one leaves the data owners' sites as a file, :func:`save_keyed_public`. What it reveals:
its rows are the public rows reordered, so whoever holds the public model reads the key's
permutation of the vocabulary off it. ULT is obfuscation, not a privacy guarantee (README), and the
members' warm-started embeddings already let the model owner estimate the same permutation; the
file only makes the ensemble's p0 exact. It carries nothing learned from private data, and
:func:`load_keyed_public` refuses a file whose rows are not exactly the public model's rows,
because a p0 that depended on private data would void the PMixED guarantee.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.offsite.adapter import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, embedding_tensors
from privtune.common.offsite.digest import tensors_digest

KEYED_PUBLIC_FORMAT = "privtune-keyed-public/1"
EMBEDDING_NAMES = (INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS)


def key_rows(table_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> torch.Tensor:
    """The row index of a table and key file: ``keyed_weight = public_weight[rows]`` (the key is checked)."""
    from privtune.common.ult.keys import load_key_file, permuted_rows
    from privtune.common.ult.table import load_table

    return torch.from_numpy(permuted_rows(load_table(table_path), load_key_file(key_path)))


def relabel_state(state: Mapping[str, torch.Tensor], rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``state`` with its embedding tensors (canonical adapter names) in the key's order; the rest untouched."""
    if rows is None:
        return dict(state)
    return {name: (t[rows].clone() if name in EMBEDDING_NAMES else t) for name, t in state.items()}


def relabel_model(model: nn.Module, rows: torch.Tensor | None) -> nn.Module:
    """A copy of ``model`` whose input (and, if untied, output) embedding rows are in the key's order."""
    model = copy.deepcopy(model)
    if rows is not None:
        with torch.no_grad():
            for _name, weight in embedding_tensors(model).items():
                weight.copy_(weight[rows])
    return model


def save_keyed_public(model: nn.Module, rows: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write the public model's embedding rows in the key's order, for the PMixED service's p0."""
    from safetensors.torch import save_file

    public = embedding_tensors(model)
    vocab = public[INPUT_EMBEDDINGS].shape[0]
    if rows.shape != (vocab,):
        raise PrivtuneError(
            f"the ULT table has {rows.shape[0]} ids but the model has {vocab} embedding rows: "
            "use the ULT-ready model the federation trained on, with its table"
        )
    keyed = {name: weight.detach()[rows].contiguous() for name, weight in public.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(keyed, str(path), metadata={"format": KEYED_PUBLIC_FORMAT, "public_digest": tensors_digest(public)})
    return path


def load_keyed_public(path: str | os.PathLike[str], model: nn.Module) -> dict[str, torch.Tensor]:
    """The keyed p0 embeddings in ``path``, checked to be exactly ``model``'s own rows, reordered."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise PrivtuneError(
            f"cannot read keyed public embeddings {path} ({err}); make them with 'privtune ult keyed-public'"
        ) from None
    if metadata.get("format") != KEYED_PUBLIC_FORMAT:
        raise PrivtuneError(f"{path} is not a keyed public embeddings file (make one with 'privtune ult keyed-public')")
    public = embedding_tensors(model)
    if metadata.get("public_digest") != tensors_digest(public) or set(tensors) != set(public):
        raise PrivtuneError(f"{path} was made from another base model than the one served; remake it from this model")
    for name, weight in public.items():
        if tensors[name].shape != weight.shape or not _same_rows(tensors[name], weight.detach()):
            raise PrivtuneError(
                f"{path}: {name} is not the public model's rows reordered (trained or altered embeddings?); p0 must "
                "not depend on private data, so the service refuses it. Remake it with 'privtune ult keyed-public'"
            )
    return tensors


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b`` with its rows reordered (as multisets of rows, bit for bit)."""
    if a.dtype != b.dtype:
        return False

    def rows(t: torch.Tensor) -> np.ndarray:  # one opaque byte string per row, sortable
        x = t.detach().contiguous().view(torch.uint8).numpy()  # any dtype, bfloat16 included
        return x.view(np.dtype((np.void, x.shape[1]))).ravel()

    return bool(np.array_equal(np.sort(rows(a)), np.sort(rows(b))))
