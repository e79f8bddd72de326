"""``privtune ult``: build tables, make keys, encode and decode text files.

It sits above both :mod:`privtune.common.ult` and :mod:`privtune.common.models` (``keyed-public``
loads a model), so neither of those imports the other's command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from privtune.common.errors import PrivtuneError
from privtune.common.ult.config import SEP_ID, UltConfig
from privtune.common.ult.keys import (
    UltKey,
    bind_key,
    key_from_passphrase,
    load_key_file,
    new_key_file,
    permuted_rows,
)
from privtune.common.ult.table import build_table, load_table, save_table
from privtune.common.ult.tokenizer import UltTokenizer

_PATCHES_PER_LINE = 4096
_DECODE_BATCH_IDS = 1 << 20
_FORMAT_HELP = (
    "Encoded files are text: the input file's token ids (the whole file is one text, encoded "
    "exactly as the table was built), as decimal numbers separated by spaces, with a line break "
    f"after the patch separator id ({SEP_ID}) every {_PATCHES_PER_LINE} patches. Decoding reproduces the "
    "input byte for byte, bytes that are not UTF-8 included; files are streamed in both directions."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "ULT: compress text, map symbols through a frequency-ranked table and a secret key."
    parser.epilog = _FORMAT_HELP
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = sub.add_parser(
        "build-table", help="rank the symbols of a corpus into a table (one pass)", epilog=_FORMAT_HELP
    )
    build.add_argument("corpus", nargs="+", type=Path, metavar="CORPUS", help="text files or folders of them")
    build.add_argument(
        "-o", "--output", type=Path, required=True, metavar="TABLE", help="the table file to write (JSON)"
    )
    defaults = UltConfig()
    build.add_argument(
        "--patch-size", type=int, default=defaults.patch_size, help="characters per BWT patch (%(default)s)"
    )
    build.add_argument(
        "--vocab-size", type=int, default=defaults.vocab_size, help="common vocabulary size V (%(default)s)"
    )
    build.add_argument(
        "--band-width", type=int, default=defaults.band_width, help="keyed permutation band width (%(default)s)"
    )
    _key_options(build, "bind the table to this key, so that a wrong key is refused later")

    bind = sub.add_parser("bind-key", help="copy a (public) table, recording a key's check value")
    bind.add_argument("--table", type=Path, required=True, help="the table to copy")
    bind.add_argument("-o", "--output", type=Path, required=True, metavar="TABLE", help="the key-bound table to write")
    _key_options(bind, "the key to bind", required=True)

    for action, summary in (("encode", "text file -> token ids"), ("decode", "token ids -> the original text file")):
        cmd = sub.add_parser(action, help=summary, description=summary, epilog=_FORMAT_HELP)
        source, target = ("text file", "encoded file") if action == "encode" else ("encoded file", "text file")
        cmd.add_argument("input", type=Path, metavar="IN", help=f"the {source} to read")
        cmd.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help=f"the {target} to write")
        cmd.add_argument(
            "--table", type=Path, required=True, help="a table from 'privtune ult build-table' (or bind-key)"
        )
        _key_options(cmd, "the key the data is (to be) encoded with")
        if action == "decode":
            cmd.add_argument(
                "--tolerant", action="store_true", help="decode model output: ids outside the table become U+FFFD"
            )

    public = sub.add_parser(
        "keyed-public",
        help="key holder: the public model's embedding rows in the key's order (PMixED's p0)",
        description="Write the base model's embedding (and untied head) rows relabelled into the federation key's id "
        "order, for 'privtune serve --public-embeddings'. Nothing in it is learned from private data, but "
        "it reveals the key's permutation of the vocabulary to whoever has the public model: see the "
        "README's section on what ULT hides.",
    )
    public.add_argument("--model", required=True, help="the ULT-ready base model the federation trained on (folder)")
    public.add_argument("--table", type=Path, required=True, help="the federation's ULT table")
    public.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="the .safetensors file to write"
    )
    _key_options(public, "the federation key", required=True)

    key = sub.add_parser("new-key", help="write a new random key file (owner-readable only)")
    key.add_argument("-o", "--output", type=Path, required=True, metavar="KEYFILE")
    key.add_argument("--force", action="store_true", help="overwrite an existing key file")


def _key_options(parser: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--key-file", type=Path, metavar="KEY", help=f"{what}: a file from 'privtune ult new-key'")
    group.add_argument(
        "--passphrase-env", metavar="VAR", help=f"{what}: derived from the passphrase in environment variable VAR"
    )


def _key(args: argparse.Namespace) -> UltKey | None:
    if args.key_file is not None:
        return load_key_file(args.key_file)
    if args.passphrase_env is not None:
        if args.passphrase_env not in os.environ:
            raise PrivtuneError(f"environment variable {args.passphrase_env} (the ULT passphrase) is not set")
        return key_from_passphrase(os.environ[args.passphrase_env])
    return None


def run(args: argparse.Namespace) -> int:
    actions = {
        "build-table": _build,
        "bind-key": _bind,
        "encode": _encode,
        "decode": _decode,
        "new-key": _new_key,
        "keyed-public": _keyed_public,
    }
    return actions[args.action](args)


def _build(args: argparse.Namespace) -> int:
    files = []
    for item in args.corpus:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise PrivtuneError(f"corpus path {item} does not exist")
    config = UltConfig(vocab_size=args.vocab_size, patch_size=args.patch_size, band_width=args.band_width)
    table = build_table(files, config)
    key = _key(args)
    save_table(bind_key(table, key) if key else table, args.output)
    print(
        f"{args.output}: {len(table.symbols)} symbols from {len(files)} files (capacity {config.capacity})",
        file=sys.stderr,
    )
    return 0


def _bind(args: argparse.Namespace) -> int:
    key = _key(args)
    if key is None:
        raise PrivtuneError("binding a table needs the ULT key: give --key-file or --passphrase-env")
    save_table(bind_key(load_table(args.table), key), args.output)
    return 0


def _tokenizer(args: argparse.Namespace) -> UltTokenizer:
    table, key = load_table(args.table), _key(args)
    if key is not None and table.key_check is None:
        print(
            f"privtune ult: note: {args.table} is not bound to a key, so a wrong key cannot be detected; "
            "'privtune ult bind-key' records one",
            file=sys.stderr,
        )
    return UltTokenizer(table, key)


def _encode(args: argparse.Namespace) -> int:
    tokenizer = _tokenizer(args)
    chunk = tokenizer.table.config.patch_size * _PATCHES_PER_LINE
    # Chunks of whole patches encode exactly like the whole file, joined by a separator.
    with (
        _open(args.input, "r", encoding="utf-8", errors="surrogateescape", newline="") as src,
        _output(args.output) as out,
    ):
        line_end = b""
        while piece := src.read(chunk):
            out.write(line_end + " ".join(map(str, tokenizer.encode(piece))).encode("ascii"))
            line_end = f" {SEP_ID}\n".encode("ascii")
        if line_end:
            out.write(b"\n")
    return 0


def _decode(args: argparse.Namespace) -> int:
    tokenizer = _tokenizer(args)
    strict = not args.tolerant
    with _open(args.input, "rb") as src, _output(args.output) as out:

        def emit(ids: list[int]) -> None:
            out.write(_utf8(tokenizer.decode(ids, strict=strict), args))

        pending: list[int] = []
        for line in src:
            try:
                pending += map(int, line.split())
            except ValueError:
                raise PrivtuneError(
                    f"{args.input} is not an encoded file (expected token ids separated by spaces)"
                ) from None
            if len(pending) >= _DECODE_BATCH_IDS and SEP_ID in pending:
                cut = len(pending) - 1 - pending[::-1].index(SEP_ID)
                emit(pending[:cut])
                pending = pending[cut + 1 :]
        emit(pending)
    return 0


def _utf8(text: str, args: argparse.Namespace) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        if not args.tolerant:
            raise PrivtuneError(f"{args.input} decodes to lone surrogates, which a UTF-8 file cannot hold") from None
        return text.encode("utf-8", "replace")


def _new_key(args: argparse.Namespace) -> int:
    new_key_file(args.output, overwrite=args.force)
    print(
        f"{args.output}: new ULT key (keep it secret, and keep a copy: without it encoded data cannot be read)",
        file=sys.stderr,
    )
    return 0


def _keyed_public(args: argparse.Namespace) -> int:
    import torch

    from privtune.common.models import load_model
    from privtune.common.ult.relabel import save_keyed_public

    rows = torch.from_numpy(permuted_rows(load_table(args.table), _key(args)))
    save_keyed_public(load_model(args.model).model, rows, args.output)
    print(
        f"{args.output}: {args.model}'s embedding rows in the key's order (give it to the PMixED service; "
        "it reveals the key's permutation of the vocabulary, nothing learned from private data)",
        file=sys.stderr,
    )
    return 0


def _open(path: Path, mode: str, **kwargs):
    try:
        return path.open(mode, **kwargs)
    except OSError as err:
        raise PrivtuneError(f"cannot open {path}: {err.strerror or err}") from err


@contextlib.contextmanager
def _output(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once it is complete (nothing left behind on errors)."""
    if path.is_dir():
        raise PrivtuneError(f"{path} is a folder; give the file to write, e.g. {path / 'out.txt'}")
    tmp = path.with_name(f".{path.name}.partial")
    with _open(tmp, "wb") as handle:
        try:
            yield handle
        except BaseException:
            handle.close()
            tmp.unlink(missing_ok=True)
            raise
    try:
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PrivtuneError(f"cannot write {path}: {err.strerror or err}") from err
