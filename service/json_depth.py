"""How deeply JSON text nests, measured without parsing it.

Python's JSON parser recurses once per level: thousands of levels ran into the recursion limit,
and a finalizer that the garbage collector ran at that depth failed in turn. Text from outside
is measured first and refused when it nests deeper than any of ours needs.
"""

from __future__ import annotations

import itertools
import re

# A sign-up nests three levels, its attributes at most signup_input.MAX_ATTRIBUTES_DEPTH more;
# a bounce notification about as many.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes


def nests_deeper(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests (or would, if it were whole) deeper than `limit`, found without
    recursion: the strings taken out, each bracket left a step up or down, the deepest point
    the running sum of the steps (all in C loops: 64 KiB of brackets in about 2 ms)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    steps = memoryview(brackets.translate(_STEPS)).cast("b")
    return max(itertools.accumulate(steps), default=0) > limit
