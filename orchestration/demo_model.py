"""The quick demo's foundation model: a small LLaMA-style model the model owner pretrains on its
public corpus (Milton) encoded with the public ULT table, so it is ULT-ready from the start.

Built once and cached (``<cache>/demo/<settings hash>``); later demos load it in a second. An
interrupted pretraining resumes from its checkpoint (``common.ult.pretrain``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from privtune.common.checkpoint import remove_checkpoint
from privtune.common.corpus import public_corpus
from privtune.common.models import ULT_TABLE_FILE, LoadedModel, TinySpec, save_model, tiny_model
from privtune.common.paths import cache_dir
from privtune.common.ult.config import UltConfig
from privtune.common.ult.pretrain import PretrainConfig, pretrain_ult
from privtune.common.ult.table import VERSION as ULT_TABLE_VERSION
from privtune.common.ult.table import build_table
from privtune.common.ult.tokenizer import UltTokenizer


@dataclass(frozen=True)
class DemoModelSpec:
    vocab_size: int = 2048
    patch_size: int = 8
    band_width: int = 32
    n_layers: int = 6
    hidden: int = 128
    heads: int = 4
    block_size: int = 128
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def demo_model(spec: DemoModelSpec = DemoModelSpec()) -> Path:
    """Folder of the ULT-ready demo model (weights + public ULT table), pretraining it if needed."""
    # A cached model is only as good as its table's format: a new format means a new folder.
    folder = cache_dir("demo") / f"ult-llama-t{ULT_TABLE_VERSION}-{spec.digest()}"
    if (folder / ULT_TABLE_FILE).exists():
        return folder
    documents = public_corpus()
    checkpoint = folder.with_name(folder.name + ".checkpoint")
    print(
        f"[demo] building the public ULT table from Milton ({sum(len(d.text) for d in documents) / 1e6:.1f} M "
        "characters)",
        flush=True,
    )
    table = build_table(
        [d.text for d in documents],
        UltConfig(vocab_size=spec.vocab_size, patch_size=spec.patch_size, band_width=spec.band_width),
    )
    tokenizer = UltTokenizer(table)
    model = tiny_model(
        "llama",
        vocab_size=spec.vocab_size,
        spec=TinySpec(n_layers=spec.n_layers, hidden=spec.hidden, heads=spec.heads, max_positions=spec.block_size),
        seed=spec.seed,
    )
    print(
        f"[demo] pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M-parameter LLaMA on ULT-encoded "
        f"Milton ({spec.steps} steps; resumable, cached afterwards)",
        flush=True,
    )
    result = pretrain_ult(
        model,
        tokenizer,
        documents,
        PretrainConfig(
            steps=spec.steps, batch_size=spec.batch_size, block_size=spec.block_size, lr=spec.lr, seed=spec.seed
        ),
        checkpoint=checkpoint,
    )
    if result.losses:
        print(f"[demo] pretraining loss {result.losses[-1]:.3f} after {result.steps} steps", flush=True)
    model.eval()
    staging = folder.with_name(folder.name + ".tmp")
    save_model(LoadedModel(model, tokenizer, "demo"), staging)
    staging.rename(folder)
    remove_checkpoint(checkpoint)
    return folder
