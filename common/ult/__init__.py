"""ULT (Unified Lookup Tables): compression as the modality tokenizer, a frequency-ranked lookup
table into a common vocabulary, and a keyed permutation so only the key holder can read the ids.

Typical use::

    table = build_table(public_files, UltConfig(vocab_size=8192))      # model owner, public
    key = new_key_file("federation.key")                                 # data owners, shared
    tok = UltTokenizer(bind_key(table, key), key)                       # data owner, on site
    ids = tok.encode(text); assert tok.decode(ids, strict=True) == text
    keyed_embedding = public_embedding[permuted_rows(table, key)]       # warm start

Modules, each importing only those before it: :mod:`.config` (id layout) and :mod:`.markers`
(stream markers), :mod:`.bwt` (batched bijective BWT), :mod:`.text` (codec), :mod:`.table`
(ranking, files), :mod:`.keys` (key, permutation), :mod:`.mapping` (ids, escapes),
:mod:`.tokenizer`, :mod:`.fingerprints`, :mod:`.pretrain`, :mod:`.relabel` (model rows into the
key's order). The command line, ``privtune ult``, is :mod:`privtune.common.ult_cli`.
"""

from privtune.common.ult.config import UltConfig
from privtune.common.ult.fingerprints import table_fingerprints
from privtune.common.ult.keys import (
    UltKey,
    band_permutation,
    bind_key,
    key_from_passphrase,
    load_key_file,
    new_key_file,
    permuted_rows,
    verify_key,
)
from privtune.common.ult.mapping import SymbolMapper
from privtune.common.ult.table import LookupTable, build_symbol_table, build_table, load_table, save_table
from privtune.common.ult.text import TextCodec
from privtune.common.ult.tokenizer import UltTokenizer

__all__ = [
    "LookupTable",
    "SymbolMapper",
    "TextCodec",
    "UltConfig",
    "UltKey",
    "UltTokenizer",
    "band_permutation",
    "bind_key",
    "build_symbol_table",
    "build_table",
    "key_from_passphrase",
    "load_key_file",
    "load_table",
    "new_key_file",
    "permuted_rows",
    "save_table",
    "table_fingerprints",
    "verify_key",
]
