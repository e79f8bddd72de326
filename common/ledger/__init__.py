"""The privacy ledger: every release of private information, its guarantee, and the budget it counts against.

:mod:`.store` keeps the releases (SQLite, shared by processes), :mod:`.kinds` says what each kind of
release means and how its guarantee is stated, :mod:`.marker` remembers that a ledger existed.
"""

from privtune.common.ledger.kinds import KINDS, Budget, Kind, Record, kind_of
from privtune.common.ledger.render import render
from privtune.common.ledger.store import RELATIVE_TOLERANCE, Ledger

__all__ = ["KINDS", "RELATIVE_TOLERANCE", "Budget", "Kind", "Ledger", "Record", "kind_of", "render"]
