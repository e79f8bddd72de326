"""Structure markers inside a symbol stream (negative, so no symbol code can be mistaken for one).

A *stream* is an int64 array: entries >= 0 are symbol codes, negative entries are these markers.
Codecs produce and consume streams, :mod:`.mapping` turns them into ids and back; both depend on
this module and on nothing else of the package.
"""

SEP_MARK = -2
"""Between two patches of one text."""
INVALID_MARK = -3
"""Where an id outside the table stood (decodes to one U+FFFD)."""
BREAK_MARK = -4
"""Between two sequences of a batch."""
