"""Per-head copy triples folded into strided (2-D) copies.

A save's copies come as one (src, dst, bytes) triple per head, chunk and K/V
(KVAppend.copy_segments): for a 16K-token turn of an 8B model at 256-token
chunks that is ~32K copies of 64 KiB. The heads of one chunk and K/V are rows
of equal width, equally spaced on both sides (the source's head stride, the
block's head stride), so they fold into one ``copy_2d`` each.
"""

from __future__ import annotations


def fold(segments) -> list[tuple[int, int, int, int, int, int]]:
    """(src, src_pitch, dst, dst_pitch, width, height) covering exactly the given triples, in order:
    consecutive triples of one width whose sources and destinations advance by constant pitches
    (each at least the width) become one strided copy."""
    out: list[list[int]] = []
    for s, d, n in segments:
        s, d, n = int(s), int(d), int(n)
        if n <= 0:
            continue
        if out:
            cur = out[-1]
            src, sp, dst, dp, w, h = cur
            if w == n:
                if h == 1 and s - src >= n and d - dst >= n:
                    cur[1], cur[3], cur[5] = s - src, d - dst, 2
                    continue
                if h > 1 and s == src + h * sp and d == dst + h * dp:
                    cur[5] = h + 1
                    continue
        out.append([s, n, d, n, n, 1])
    return [tuple(c) for c in out]
