"""``privtune export``: a finished run's adapter in the formats the Hugging Face ecosystem loads.

``--merged`` (default) writes the base model with the adapter plugged in, and its tokenizer, so
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` read it (a
ULT run's model keeps the public ULT table instead: its ids are in the federation key's order).
``--peft`` writes the adapter folder for the base model, ``PeftModel.from_pretrained(base, DIR)``,
with ``base_model_name_or_path`` naming the base model's folder or hub id when it has one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from privtune.common.errors import PrivtuneError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="finished run: the --out folder of simulate/demo, or its server/")
    parser.add_argument("--to", required=True, type=Path, help="folder to write (new or empty)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--merged", action="store_true", help="full model with the adapter merged + tokenizer (default)")
    kind.add_argument("--peft", action="store_true", help="peft adapter folder for the base model")
    parser.add_argument("--adapter", default="aggregate", help="which folder of RUN/adapters/ (default: aggregate)")
    parser.add_argument("--model", help="base model source (default: the one the run recorded)")


def run(args: argparse.Namespace) -> int:
    from privtune.common.offsite.adapter import load_adapter
    from privtune.server.run_folder import ADAPTERS, locate_run, recorded_model

    run_dir = locate_run(args.run)
    state, manifest = load_adapter(run_dir / ADAPTERS / args.adapter)
    source = args.model or recorded_model(run_dir)
    if args.to.exists() and any(args.to.iterdir()):
        raise PrivtuneError(f"{args.to} is not empty; export into a new folder")
    if args.peft:
        from privtune.common.offsite.adapter import save_adapter

        save_adapter(args.to, state, manifest, base_model=hf_reference(source))
        print(f"peft adapter for {source} written to {args.to}")
        return 0
    from privtune.common.models import LoadedModel, load_model, save_model
    from privtune.common.offsite.plugin import plug_in

    base = load_model(source)
    save_model(LoadedModel(plug_in(base.model, state, manifest), base.tokenizer, source), args.to)
    print(f"{source} with adapter {args.adapter} merged written to {args.to}")
    return 0


def hf_reference(source: str) -> str | None:
    """What peft's ``base_model_name_or_path`` can name for a privtune model source (None for tiny-*)."""
    from privtune.common.models import SMOLLM2, TINY_PREFIX, smollm2_folder

    if source.startswith(TINY_PREFIX):
        return None
    if source == SMOLLM2:
        return str(smollm2_folder())
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
