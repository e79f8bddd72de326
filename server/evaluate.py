"""``privtune evaluate``: the offsite-tuning perplexity table on held-out private text.

Rows: zero-shot full model, emulator alone, emulator + adapter, plug-in, full fine-tuning. The
adapter is a saved one (``--adapter``, e.g. the federation's aggregate) or, with ``--train-steps``,
trained here on the training part of the same text; full fine-tuning runs only with
``--full-ft-steps``. Held-out text is the last 10% of every document (the last 10% of the conversations
in ``.jsonl`` instruction data), never trained on; in conversations only the responses are trained and
scored, as on the data owners' side.

Training and scoring compute on ``--device`` (bf16 autocast on CUDA); plugging the adapter into the
full model happens on the host, where the digest of the full model's weights is checked.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from privtune.common.device import DevicePolicy, add_device_argument
from privtune.common.errors import PrivtuneError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--package", required=True, type=Path, help="output folder of 'privtune prepare' (or its emulator/)"
    )
    parser.add_argument("--model", help="full model source (default: the one recorded by 'privtune prepare')")
    parser.add_argument(
        "--adapter", type=Path, help="adapter folder (peft folder + manifest.json), e.g. RUN/adapters/aggregate"
    )
    parser.add_argument("--train-steps", type=int, default=0, help="without --adapter: train one here for N steps")
    parser.add_argument("--full-ft-steps", type=int, default=0, help="full fine-tuning reference: N steps (0: skip)")
    parser.add_argument("--lr", type=float, default=None, help="adapter learning rate (default 1e-3 LoRA, 1e-4 full)")
    parser.add_argument("--full-ft-lr", type=float, default=5e-5)
    parser.add_argument("--data", type=Path, help="folder of .txt/.jsonl (default: the embedded Shakespeare)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks to score (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from privtune.common.corpus import local_documents, shakespeare_works
    from privtune.common.models import load_model
    from privtune.common.offsite import (
        EmulatorPackage,
        TrainConfig,
        adapter_manifest,
        adapter_state,
        evaluation_table,
        load_adapter,
        load_adapter_state,
        plug_in,
        train_adapter,
    )
    from privtune.common.packing import holdout_split, pack_rows
    from privtune.server.prepare import MODEL_REFERENCE, PACKAGE_DIR, max_positions

    policy = DevicePolicy.resolve(args.device)
    print(f"computing on {policy.describe()}")
    folder: Path = args.package
    package_dir = folder / PACKAGE_DIR if (folder / PACKAGE_DIR).is_dir() else folder
    package = EmulatorPackage.load(package_dir)
    source = args.model or _recorded_source(folder / MODEL_REFERENCE)
    loaded = load_model(source)
    full = loaded.model
    block_size = min(args.block_size, max_positions(full))
    documents = local_documents(args.data) if args.data else shakespeare_works()
    split = holdout_split(documents, 0.1)
    heldout = pack_rows(split.heldout, loaded.tokenizer, block_size, max_blocks=args.eval_blocks)
    needed = max(args.train_steps, args.full_ft_steps) * args.batch_size
    train = pack_rows(split.train, loaded.tokenizer, block_size, max_blocks=max(needed, 1))

    emulator_adapter = plugged = full_ft = None
    if args.adapter is not None:
        state, manifest = load_adapter(args.adapter)
        manifest.validate_against(package.manifest, state)
        emulator_adapter = package.instantiate()
        load_adapter_state(emulator_adapter, state)
        plugged = plug_in(full, state, manifest)
    elif args.train_steps > 0:
        emulator_adapter = package.instantiate(seed=args.seed)
        lr = args.lr or (1e-3 if package.config.adapter == "lora" else 1e-4)
        with policy.hosting({"emulator": emulator_adapter}):
            result = train_adapter(
                emulator_adapter,
                train.to(policy.device),
                TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=lr, seed=args.seed),
            )
        print(
            f"adapter: {result.steps} steps, last loss {result.last_loss:.3f}, {result.tokens_per_second:.0f} tokens/s"
        )
        plugged = plug_in(full, adapter_state(emulator_adapter), adapter_manifest(emulator_adapter))
    if args.full_ft_steps > 0:
        full_ft = copy.deepcopy(full)
        for p in full_ft.parameters():
            p.requires_grad_(True)
        with policy.hosting({"full fine-tuning copy": full_ft}):
            result = train_adapter(
                full_ft,
                train.to(policy.device),
                TrainConfig(steps=args.full_ft_steps, batch_size=args.batch_size, lr=args.full_ft_lr, seed=args.seed),
            )
        print(
            f"full fine-tuning: {result.steps} steps, last loss {result.last_loss:.3f}, "
            f"{result.tokens_per_second:.0f} tokens/s"
        )
    models = {
        source: full,
        "emulator": package.instantiate(),
        "emulator + adapter": emulator_adapter,
        "plug-in": plugged,
        "full fine-tuning": full_ft,
    }
    with policy.hosting(models):
        table = evaluation_table(
            heldout.to(policy.device),
            full_model=full,
            emulator=models["emulator"],
            emulator_adapter=emulator_adapter,
            plugin=plugged,
            full_ft=full_ft,
            batch_size=args.batch_size,
            title=f"perplexity, {source}, package {package.content_hash[:12]}",
        )
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0


def _recorded_source(reference: Path) -> str:
    try:
        return json.loads(reference.read_text())["source"]
    except FileNotFoundError:
        raise PrivtuneError(
            f"{reference} not found: pass --model with the full model the package was made from"
        ) from None
    except (json.JSONDecodeError, KeyError) as err:
        raise PrivtuneError(f"{reference} is corrupt ({err}); pass --model explicitly") from None
