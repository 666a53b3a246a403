"""Array-op helpers for reading and writing token rows inside jitted environments.

Every function is pure, works on int32 token ids of the shared vocabulary (``envs.vocab``),
accepts traced values (dynamic starts / lengths / numbers), and is ``jit`` / ``vmap`` safe:
no Python control flow on array values, no data-dependent shapes. Out-of-vocabulary ids
(negative, >= 64) are simply "not a digit / not a letter / not EOS"; nothing here raises on
array *values*, only on bad static arguments (ValueError naming the argument).

Conventions: a *row* is a 1-D int32 array; an *action* ends at its first ``<eos>`` or
``<pad>`` (``action_length``); "left-aligned" means real tokens first, ``<pad>`` after.
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

from envs import vocab

Piece = Union[int, jax.Array, tuple]

_MAX_UINT_DIGITS = 9  # 10**9 - 1 fits in int32


def _i32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.int32)


def _check_digits(name: str, n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_UINT_DIGITS:
        raise ValueError(f"{name} must be a Python int in [1, {_MAX_UINT_DIGITS}], got {n!r}")
    return n


def _check_row(name: str, row) -> jax.Array:
    row = jnp.asarray(row)
    if row.ndim != 1:
        raise ValueError(f"{name} must be a 1-D token row, got shape {row.shape}")
    return row.astype(jnp.int32)


def take(arr, idx, fill=0) -> jax.Array:
    """``arr[idx]`` along the first axis with ``fill`` for out-of-range indices (no clamping).

    ``idx`` is an int array of any shape; result shape ``idx.shape + arr.shape[1:]``.
    """
    arr = jnp.asarray(arr)
    idx = _i32(idx)
    n = arr.shape[0]
    picked = jnp.take(arr, jnp.clip(idx, 0, n - 1), axis=0)
    inside = (idx >= 0) & (idx < n)
    inside = inside.reshape(inside.shape + (1,) * (arr.ndim - 1))
    return jnp.where(inside, picked, jnp.asarray(fill, arr.dtype))


def take2(table, i, j, fill=0) -> jax.Array:
    """``table[i, j]`` for a 2-D table and scalar indices, ``fill`` when out of range."""
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D, got shape {table.shape}")
    i, j = _i32(i), _i32(j)
    picked = table[jnp.clip(i, 0, table.shape[0] - 1), jnp.clip(j, 0, table.shape[1] - 1)]
    inside = (i >= 0) & (i < table.shape[0]) & (j >= 0) & (j < table.shape[1])
    return jnp.where(inside, picked, jnp.asarray(fill, table.dtype))


# --------------------------------------------------------------------------- classification

def is_digit(tok) -> jax.Array:
    """``tok`` is one of the digit tokens ``0``..``9`` (elementwise bool)."""
    t = _i32(tok)
    return (t >= vocab.DIGIT_0) & (t < vocab.DIGIT_0 + 10)


def digit_value(tok) -> jax.Array:
    """Digit token -> its value 0..9 (int32); ``-1`` where ``tok`` is not a digit."""
    t = _i32(tok)
    return jnp.where(is_digit(t), t - vocab.DIGIT_0, -1).astype(jnp.int32)


def is_letter(tok) -> jax.Array:
    """``tok`` is one of the letter tokens ``a``..``z`` (elementwise bool)."""
    t = _i32(tok)
    return (t >= vocab.LETTER_A) & (t < vocab.LETTER_A + 26)


def letter_index(tok) -> jax.Array:
    """Letter token -> its index (a=0 .. z=25, int32); ``-1`` where ``tok`` is not a letter."""
    t = _i32(tok)
    return jnp.where(is_letter(t), t - vocab.LETTER_A, -1).astype(jnp.int32)


def digit_token(d) -> jax.Array:
    """Value 0..9 -> digit token id (values are clipped into 0..9)."""
    return (vocab.DIGIT_0 + jnp.clip(_i32(d), 0, 9)).astype(jnp.int32)


def letter_token(i) -> jax.Array:
    """Index 0..25 -> letter token id (indices are clipped into 0..25)."""
    return (vocab.LETTER_A + jnp.clip(_i32(i), 0, 25)).astype(jnp.int32)


# --------------------------------------------------------------------------- reading

def action_length(action) -> jax.Array:
    """Number of tokens before the first ``<eos>`` or ``<pad>`` (len(action) if neither occurs)."""
    a = _check_row("action", action)
    stop = (a == vocab.EOS) | (a == vocab.PAD)
    # static unrolled select chain: fuses into one elementwise loop under vmap (an XLA:CPU
    # reduction over a short minor axis is about 2x slower)
    n = jnp.int32(a.shape[0])
    for i in reversed(range(a.shape[0])):
        n = jnp.where(stop[i], jnp.int32(i), n)
    return n


def has_eos(action) -> jax.Array:
    """The action's terminator is an explicit ``<eos>`` (not a ``<pad>`` or the row's end)."""
    a = _check_row("action", action)
    n = action_length(a)
    return (n < a.shape[0]) & (take(a, n) == vocab.EOS)


def first_index(mask, default=None) -> jax.Array:
    """Index of the first True in a 1-D bool ``mask``; ``default`` (len(mask)) if none."""
    m = jnp.asarray(mask, bool)
    if m.ndim != 1:
        raise ValueError(f"mask must be 1-D, got shape {m.shape}")
    n = m.shape[0]
    d = n if default is None else default
    idx = jnp.min(jnp.where(m, jnp.arange(n, dtype=jnp.int32), n))
    return jnp.where(idx == n, d, idx).astype(jnp.int32)


def _window(row: jax.Array, start, size: int, fill: int = vocab.PAD) -> tuple[jax.Array, jax.Array]:
    """``row[start:start+size]`` with ``fill`` outside the row (no clamping of ``start``).

    Returns (window, in_range) where in_range[i] says position start+i lies inside the row.
    """
    n = row.shape[0]
    if isinstance(start, int):                          # static: slice and pad
        inside = jnp.asarray([0 <= start + i < n for i in range(size)])
        vals = [row[start + i] if 0 <= start + i < n else jnp.int32(fill) for i in range(size)]
        return jnp.stack(vals).astype(jnp.int32), inside
    pos = _i32(start) + jnp.arange(size, dtype=jnp.int32)
    inside = (pos >= 0) & (pos < n)
    return take(row, pos, fill).astype(jnp.int32), inside


def parse_uint(tokens, start, max_digits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Read a run of digit tokens beginning at ``tokens[start]``.

    Returns ``(value, n_digits, ok)``: ``n_digits`` is the length of the digit run starting at
    ``start`` (counted up to ``max_digits + 1``), ``value`` the decimal value of its first
    ``min(n_digits, max_digits)`` digits, and ``ok`` is ``1 <= n_digits <= max_digits`` (the
    run is non-empty and not longer than ``max_digits``). Leading zeros are accepted ("07" = 7).
    ``start`` may be traced and may lie outside the row (then ``ok`` is False).
    """
    _check_digits("max_digits", max_digits)
    row = _check_row("tokens", tokens)
    win, _ = _window(row, start, max_digits + 1)
    dig = is_digit(win)
    # static unrolled scan over <= 10 positions (cheaper to compile and run than cumprod /
    # gathers): inside the run while every token so far is a digit; Horner for the value
    inside = jnp.bool_(True)
    n = jnp.int32(0)
    value = jnp.int32(0)
    for i in range(max_digits + 1):
        inside = inside & dig[i]
        n = n + inside.astype(jnp.int32)
        if i < max_digits:
            value = jnp.where(inside, value * 10 + (win[i] - vocab.DIGIT_0), value)
    value = value.astype(jnp.int32)
    ok = (n >= 1) & (n <= max_digits)
    return value, n, ok


def parse_int(tokens, start, max_digits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Like ``parse_uint`` but accepts one optional leading ``-``.

    Returns ``(value, n_tokens, ok)`` where ``n_tokens`` counts the ``-`` too. ``-0`` parses
    as 0 (callers that need canonical text compare against ``int_to_tokens_var``).
    """
    row = _check_row("tokens", tokens)
    s = _i32(start)
    first, _ = _window(row, s, 1)
    neg = first[0] == vocab.MINUS
    v, n, ok = parse_uint(row, s + neg.astype(jnp.int32), max_digits)
    value = jnp.where(neg, -v, v).astype(jnp.int32)
    return value, (n + neg.astype(jnp.int32)).astype(jnp.int32), ok


def tokens_equal(row, start, seq, length=None) -> jax.Array:
    """``row[start:start+length] == seq[:length]`` (False if it runs past the row's end)."""
    row = _check_row("row", row)
    seq = _check_row("seq", seq)
    L = seq.shape[0]
    n = L if length is None else jnp.clip(_i32(length), 0, L)
    win, inside = _window(row, start, L)
    rel = jnp.arange(L, dtype=jnp.int32)
    need = rel < n
    return jnp.all(jnp.where(need, (win == seq) & inside, True))


# --------------------------------------------------------------------------- writing

def uint_to_tokens(x, n_digits: int) -> jax.Array:
    """Fixed-width, zero-padded decimal digits of ``x`` -> int32 ``[n_digits]``.

    ``x`` is clipped into ``[0, 10**n_digits - 1]`` first.
    """
    _check_digits("n_digits", n_digits)
    x = jnp.clip(_i32(x), 0, 10 ** n_digits - 1)
    pows = jnp.asarray([10 ** (n_digits - 1 - i) for i in range(n_digits)], jnp.int32)
    return (vocab.DIGIT_0 + (x // pows) % 10).astype(jnp.int32)


def num_digits(x) -> jax.Array:
    """Number of decimal digits of ``|x|`` (1 for 0), int32, for |x| < 10**9."""
    a = jnp.abs(_i32(x))
    thresholds = jnp.asarray([10 ** k for k in range(1, _MAX_UINT_DIGITS)], jnp.int32)
    return (1 + jnp.sum(a[..., None] >= thresholds, axis=-1)).astype(jnp.int32)


def uint_to_tokens_var(x, max_digits: int) -> tuple[jax.Array, jax.Array]:
    """Minimal decimal digits of ``x`` (no leading zeros; "0" for 0), left-aligned.

    Returns ``(tokens [max_digits] with <pad> after the digits, length)``. ``x`` is clipped
    into ``[0, 10**max_digits - 1]``.
    """
    _check_digits("max_digits", max_digits)
    x = jnp.clip(_i32(x), 0, 10 ** max_digits - 1)
    n = num_digits(x)
    idx = jnp.arange(max_digits, dtype=jnp.int32)
    k = n - 1 - idx                                     # decimal place shown at position idx
    pow10 = jnp.zeros((max_digits,), jnp.int32)
    for e in range(max_digits):                         # static where-chain: 10 ** k
        pow10 = jnp.where(k == e, 10 ** e, pow10)
    digits = vocab.DIGIT_0 + (x // jnp.maximum(pow10, 1)) % 10
    toks = jnp.where(idx < n, digits, vocab.PAD)
    return toks.astype(jnp.int32), n


def int_to_tokens_var(x, max_digits: int) -> tuple[jax.Array, jax.Array]:
    """Signed version of ``uint_to_tokens_var``: a leading ``-`` for negative ``x``.

    Returns ``(tokens [max_digits + 1], length)``; ``|x|`` is clipped to ``10**max_digits - 1``.
    """
    x = _i32(x)
    digits, n = uint_to_tokens_var(jnp.abs(x), max_digits)
    neg = x < 0
    with_sign = jnp.concatenate([jnp.asarray([vocab.MINUS], jnp.int32), digits])
    without = jnp.concatenate([digits, jnp.asarray([vocab.PAD], jnp.int32)])
    return jnp.where(neg, with_sign, without), (n + neg.astype(jnp.int32)).astype(jnp.int32)


def write_at(row, start, seq, length=None) -> jax.Array:
    """Write ``seq[:length]`` (default: all of ``seq``) into ``row`` at ``start``.

    Positions outside the row are dropped (the write is *not* shifted back like
    ``lax.dynamic_update_slice`` would do); other positions of ``row`` keep their values.
    ``start`` and ``length`` may be traced.
    """
    row = _check_row("row", row)
    seq = _check_row("seq", seq)
    L = seq.shape[0]
    n = L if length is None else jnp.clip(_i32(length), 0, L)
    if L == 0:
        return row
    if isinstance(start, int) and length is None:       # static placement: plain slicing
        lo, hi = max(start, 0), min(start + L, row.shape[0])
        if lo >= hi:
            return row
        return row.at[lo:hi].set(seq[lo - start:hi - start])
    rel = jnp.arange(row.shape[0], dtype=jnp.int32) - _i32(start)      # [R]
    # one-hot placement (gather-free; cheap for these short rows): hot[j, i] = seq[i] -> row[j]
    hot = (rel[:, None] == jnp.arange(L, dtype=jnp.int32)[None, :]) & (rel[:, None] < n)
    vals = jnp.sum(jnp.where(hot, seq[None, :], 0), axis=1, dtype=jnp.int32)
    return jnp.where(jnp.any(hot, axis=1), vals, row).astype(jnp.int32)


def pack_left(tokens, keep) -> jax.Array:
    """Stable compaction: the tokens where ``keep`` is True, in order, then ``<pad>``s."""
    t = _check_row("tokens", tokens)
    k = jnp.asarray(keep, bool)
    if k.shape != t.shape:
        raise ValueError(f"keep must have the shape of tokens {t.shape}, got {k.shape}")
    n = t.shape[0]
    dest = jnp.where(k, jnp.cumsum(k.astype(jnp.int32)) - 1, n)   # n = dropped
    # out[j] = the token whose destination is j (at most one), PAD (= 0) if none
    hot = dest[None, :] == jnp.arange(n, dtype=jnp.int32)[:, None]
    out = jnp.sum(jnp.where(hot, t[None, :], 0), axis=1, dtype=jnp.int32)
    return jnp.where(jnp.any(hot, axis=1), out, vocab.PAD).astype(jnp.int32)


def make_row(parts: Sequence[Piece], length: int) -> jax.Array:
    """Concatenate pieces left-aligned into a row of ``length`` tokens, ``<pad>`` after.

    Each piece is a token id (int or 0-d array), a 1-D token array (all of it), or a pair
    ``(tokens, n)`` meaning the first ``n`` (possibly traced) tokens of a 1-D array. Tokens
    that would land beyond ``length`` are dropped; a ValueError is raised when the fixed
    pieces alone (ints and whole arrays) cannot fit.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive Python int, got {length!r}")
    norm = []                      # (tokens, n or None for "all of it")
    fixed = 0
    for i, p in enumerate(parts):
        if isinstance(p, tuple):
            if len(p) != 2:
                raise ValueError(f"piece {i} must be (tokens, n), got a tuple of {len(p)}")
            seq = _check_row(f"piece {i}", p[0])
            norm.append((seq, jnp.clip(_i32(p[1]), 0, seq.shape[0])))
        else:
            arr = jnp.asarray(p)
            if arr.ndim == 0:
                arr = arr[None]
            elif arr.ndim != 1:
                raise ValueError(f"piece {i} must be a token or a 1-D row, got shape {arr.shape}")
            norm.append((arr.astype(jnp.int32), None))
            fixed += arr.shape[0]
    if fixed > length:
        raise ValueError(f"fixed pieces need {fixed} tokens, more than length={length}")
    # static prefix of whole pieces: plain concatenation; the rest: gather-free writes at
    # traced offsets (no scatter, no sort: cheap under vmap on CPU)
    k = 0
    while k < len(norm) and norm[k][1] is None:
        k += 1
    head = [seq for seq, _ in norm[:k]]
    row = pad_row(jnp.concatenate(head) if head else jnp.zeros((0,), jnp.int32), length)
    offset = sum(seq.shape[0] for seq in head)
    for seq, n in norm[k:]:
        row = write_at(row, offset, seq, n)
        offset = offset + (seq.shape[0] if n is None else n)
    return row


def pad_row(row, length: int) -> jax.Array:
    """Truncate or ``<pad>``-extend a 1-D row to exactly ``length`` tokens (static)."""
    row = _check_row("row", row)
    if row.shape[0] >= length:
        return row[:length]
    return jnp.concatenate([row, jnp.full((length - row.shape[0],), vocab.PAD, jnp.int32)])


def sanitize(action) -> jax.Array:
    """Clip ids into the vocabulary: any id outside ``[0, vocab.size)`` becomes ``<err>``.

    Used by tasks that want to decode an action safely (e.g. for twins / rendering); parsing
    helpers above already treat out-of-range ids as non-matching.
    """
    a = _check_row("action", action)
    return jnp.where((a >= 0) & (a < vocab.size), a, vocab.ERR).astype(jnp.int32)
