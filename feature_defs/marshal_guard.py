"""A structural check of marshal bytes before ``marshal.loads`` reads them.

Formats 1 and 2 of a stored view state (earlier releases) are marshal streams, and
``marshal.loads`` trusts the element counts it reads: a tuple or list header claiming
2**31 elements makes it allocate 16 GB before it finds the bytes missing, and the
``MemoryError`` (or the OOM kill) would stop the worker on that entity's next event,
and again after every restart. :func:`check_marshal` walks the stream first, without
building anything, and refuses it with a typed error unless every count fits in the
bytes that follow (each element takes at least one byte), the nesting is shallow, and
every type code is one a view state can hold (no code objects). What ``marshal.loads``
then allocates is bounded by a small multiple of the input's size.

Type codes (CPython ``Python/marshal.c``, versions 2 and 4; the high bit ``0x80`` marks
an object the stream may refer back to): ``N F T S .`` singletons; ``i`` int32, ``I``
int64, ``l`` long (int32 digit count, 2 bytes a digit); ``g`` / ``y`` binary float /
complex, ``f`` / ``x`` text ones; ``s t u a A`` strings (int32 length), ``z Z``
short ones (1-byte length); ``r`` a back reference; ``( [ < >`` tuple, list, set,
frozenset (int32 count), ``)`` small tuple (1-byte count); ``{`` dict, items until
``0``.
"""

from __future__ import annotations

import struct

from headrace.core.errors import StateFormatError

__all__ = ["check_marshal", "MAX_DEPTH"]

#: deepest nesting accepted (a view state nests 5 levels: fields, rings, tiles, slots,
#: entries)
MAX_DEPTH = 32

_I32 = struct.Struct("<i").unpack_from
_SCALARS = frozenset(b"NFTS.")
_FIXED = {ord("i"): 4, ord("I"): 8, ord("g"): 8, ord("y"): 16, ord("r"): 4}
_STRINGS = frozenset(b"stuaA")
_SHORT_STRINGS = frozenset(b"zZ")
_SEQUENCES = frozenset(b"([<>")
_DICT, _NULL, _SMALL_TUPLE, _LONG = ord("{"), ord("0"), ord(")"), ord("l")
_FLOAT_TEXT, _COMPLEX_TEXT = ord("f"), ord("x")
_UNTIL_NULL = -1  # a dict on the stack: items until the NULL code


def _bad(fmt: int, why: str) -> StateFormatError:
    return StateFormatError(f"malformed view state (format {fmt}): {why}")


def check_marshal(data: bytes) -> None:
    """Check a format-1 or 2 state: its format byte, then one marshal object (trailing
    bytes are ignored, as ``marshal.loads`` does).

    Raises:
        StateFormatError: a count beyond the bytes left, a truncated object, nesting
            deeper than :data:`MAX_DEPTH`, or a type code a view state never holds
            (the message names the state's format).
    """
    fmt, end, p = data[0], len(data), 1
    open_items: list[int] = []  # per open container: items still to read
    while True:
        if p >= end:
            raise _bad(fmt, f"marshal data truncated at byte {p}")
        code = data[p] & 0x7F
        at, p = p, p + 1
        count = 0  # > 0: a container opened, with this many items to read
        if code in _SCALARS:
            pass
        elif code in _FIXED:
            p += _FIXED[code]
        elif code in _STRINGS or code == _LONG or code in _SEQUENCES:
            if p + 4 > end:
                raise _bad(fmt, f"marshal data truncated at byte {p}")
            n = _I32(data, p)[0]
            p += 4
            if code == _LONG:
                n = 2 * abs(n)
            elif n < 0:
                raise _bad(fmt, f"negative length {n} at byte {at}")
            if n > end - p:
                raise _bad(fmt, f"length {n} at byte {at} exceeds the {end - p} bytes left")
            if code in _SEQUENCES:
                count = n
            else:
                p += n
        elif code in _SHORT_STRINGS or code == _FLOAT_TEXT or code == _SMALL_TUPLE:
            if p >= end:
                raise _bad(fmt, f"marshal data truncated at byte {p}")
            n = data[p]
            p += 1
            if code == _SMALL_TUPLE:
                count = n
            else:
                p += n
        elif code == _COMPLEX_TEXT:
            for _ in range(2):
                if p >= end:
                    raise _bad(fmt, f"marshal data truncated at byte {p}")
                p += 1 + data[p]
        elif code == _DICT:
            count = _UNTIL_NULL
        elif code == _NULL:
            if not open_items or open_items[-1] != _UNTIL_NULL:
                raise _bad(fmt, f"a NULL outside a dict at byte {at}")
            open_items.pop()  # the dict is complete
        else:
            raise _bad(fmt, f"type code {chr(code)!r} at byte {at} is not a view state's")
        if p > end:
            raise _bad(fmt, f"marshal data truncated at byte {end}")
        if count:
            if len(open_items) >= MAX_DEPTH:
                raise _bad(fmt, f"nested deeper than {MAX_DEPTH} at byte {at}")
            open_items.append(count)
            continue
        # one object complete: count it against the containers it completes in turn
        while open_items and open_items[-1] != _UNTIL_NULL:
            open_items[-1] -= 1
            if open_items[-1]:
                break
            open_items.pop()
        else:
            if not open_items:
                return
