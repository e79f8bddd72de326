"""Content hashes over named tensors, so a package or an adapter base can be verified byte for byte."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def tensors_digest(tensors: Mapping[str, torch.Tensor], extra: Any = None) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes (and ``extra`` as canonical JSON)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(canonical_json([name, str(t.dtype).removeprefix("torch."), list(t.shape)]))
        # numpy's stubs declare ndarray's buffer protocol only for Python >= 3.12
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    if extra is not None:
        h.update(canonical_json(extra))
    return h.hexdigest()
