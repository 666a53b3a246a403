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


#: ``take`` reads tables of at most this many rows by select chains unless told otherwise
SELECT_MAX = 32


def take(arr, idx, fill=0, select: bool | None = None) -> jax.Array:
    """``arr[idx]`` along the first axis with ``fill`` for out-of-range indices (no clamping).

    ``idx`` is an int array of any shape; result shape ``idx.shape + arr.shape[1:]``.
    ``select=True`` reads the table as the select chain ``out = fill; out = where(idx == k,
    arr[k], out)`` for k = 0..n-1 instead of a gather: elementwise, so under ``vmap`` (one index
    per env) a vectorized loop over the batch, where XLA:CPU emits a gather as a scalar loop,
    and one gather left in a fused kernel keeps the whole kernel scalar. n selects per element,
    so ``select=None`` (default) picks the chain for tables of at most ``SELECT_MAX`` rows and
    the gather above. Measured A/B at B=1024, one core, same outputs: calculator (all its
    look-ups and action windows as chains) +36% env-steps/s batch-minor, kv_search and maze
    +0-5%; 2-D tables of 25-40 cells read as chains (``take2(select=True)``) were 1.6-2x slower.
    """
    arr = jnp.asarray(arr)
    idx = _i32(idx)
    n = arr.shape[0]
    if select is None:
        select = n <= SELECT_MAX
    if select:
        hit_shape = idx.shape + (1,) * (arr.ndim - 1)
        out = jnp.full(idx.shape + arr.shape[1:], fill, arr.dtype)
        for k in range(n):
            out = jnp.where((idx == k).reshape(hit_shape), arr[k], out)
        return out
    picked = jnp.take(arr, jnp.clip(idx, 0, n - 1), axis=0)
    inside = (idx >= 0) & (idx < n)
    inside = inside.reshape(inside.shape + (1,) * (arr.ndim - 1))
    return jnp.where(inside, picked, jnp.asarray(fill, arr.dtype))


def take2(table, i, j, fill=0, select: bool = False) -> jax.Array:
    """``table[i, j]`` for a 2-D table and scalar indices, ``fill`` when out of range
    (``select=True``: a select chain over the flattened table, see ``take``)."""
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D, got shape {table.shape}")
    i, j = _i32(i), _i32(j)
    h, w = table.shape
    inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    if select:
        return take(table.reshape(-1), jnp.where(inside, i * w + j, -1), fill, select=True)
    picked = table[jnp.clip(i, 0, h - 1), jnp.clip(j, 0, w - 1)]
    return jnp.where(inside, picked, jnp.asarray(fill, table.dtype))


def pack_table(values, bits: int) -> jax.Array:
    """A 1-D table of small non-negative ints packed ``bits`` each into int32 words.

    Entry k sits in word ``k // per`` at bit ``bits * (k % per)``, ``per = 31 // bits``
    entries a word (the sign bit unused). Values must lie in ``[0, 2**bits)`` (the caller's
    guarantee; they are masked, not checked). Read with ``packed_take``.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 31:
        raise ValueError(f"bits must be an int in [1, 31], got {bits!r}")
    v = _i32(values)
    if v.ndim != 1:
        raise ValueError(f"values must be a 1-D table, got shape {v.shape}")
    per = 31 // bits
    n_words = -(-v.shape[0] // per)
    v = jnp.concatenate([v, jnp.zeros((n_words * per - v.shape[0],), jnp.int32)]).reshape(n_words, per)
    shifts = bits * jnp.arange(per, dtype=jnp.int32)
    words = (v & ((1 << bits) - 1)) << shifts
    out = words[:, 0]
    for j in range(1, per):                             # disjoint bit fields: OR = sum
        out = out | words[:, j]
    return out


def packed_take(words, idx, bits: int, fill=0) -> jax.Array:
    """Entry ``idx`` of a table packed by ``pack_table(values, bits)``; ``fill`` for ``idx``
    outside ``[0, len(words) * (31 // bits))``.

    The word is read with ``take`` (a select chain for up to ``SELECT_MAX`` words) and the entry
    by a variable shift: no gather, so under ``vmap`` a vectorized loop over the batch (a whole
    2-D table read as a select chain costs one select per cell instead).
    """
    words = _i32(words)
    idx = _i32(idx)
    per = 31 // bits
    n = words.shape[0] * per
    inside = (idx >= 0) & (idx < n)
    k = jnp.where(inside, idx, 0)
    if words.shape[0] == 1:                             # one word: one shift
        w, shift = words[0], bits * k
    else:
        w, shift = take(words, k // per), bits * (k % per)
    v = (w >> shift) & ((1 << bits) - 1)
    return jnp.where(inside, v, jnp.asarray(fill, jnp.int32))


@jax.custom_batching.custom_vmap
def _fusion_barrier(v: jax.Array) -> jax.Array:
    """``v`` (int32), computed by one kernel of its own: ``max`` over the stacked pair
    ``[v, INT32_MIN]`` along a new LEADING axis. A reduction is never fused into its consumers,
    so they read the stored value instead of recomputing its producers."""
    lowest = jnp.full(v.shape, jnp.iinfo(jnp.int32).min, jnp.int32)
    return jnp.max(jnp.stack([v, lowest]), axis=0)


@_fusion_barrier.def_vmap
def _fusion_barrier_vmap(axis_size, in_batched, v):
    # vmap's own rules (stack / concatenate move the batch axis to the front) would make the
    # pair axis the MINOR one: a row reduction of length 2 per env, which XLA:CPU emits as a
    # scalar loop with the fused producer (the action parse, the look-ups) computed one env at
    # a time. Here the batch axis goes last and the pair axis first: a reduction over the major
    # axis, a loop over contiguous envs. Measured A/B at B=1024 (same outputs): calculator
    # +13-18%, kv_search +4-9% env-steps/s, maze unchanged.
    del axis_size
    (batched,) = in_batched
    if not batched:
        return _fusion_barrier(v), False
    return jnp.moveaxis(_fusion_barrier(jnp.moveaxis(v, 0, -1)), -1, 0), True


def materialize(*values):
    """Identity on a few small arrays that makes XLA compute them once (a fusion boundary).

    XLA:CPU fuses cheap elementwise producers into *every* consumer, recomputing them: under
    ``vmap`` a parse read by a dozen outputs (state leaves, reward, info) is parsed a dozen
    times, and once per token by each row-shaped output such as the observation. A reduction
    is never fused into its consumers, so each value ``v`` is returned as ``max(v, INT32_MIN)``
    (= ``v``) reduced over a stacked pair (``_fusion_barrier``, whose vmap rule keeps the
    reduction over the major axis so that it vectorizes over the batch): one small kernel per
    value that stores it, which the consumers then read.
    (``lax.optimization_barrier`` is dropped by XLA:CPU before fusion.) Each value gets its
    own barrier: packing different values into one vector would be a concatenate of
    unrelated expressions, which XLA:CPU emits as a switch per element inside the loop over
    the batch (no vectorization; LLVM even merges divisions by different constants into one
    division by a variable). Accepts bool, int32, uint32 and float32 arrays (floats and
    uint32 travel as their bit patterns); returns a tuple of the same shapes and dtypes.
    """
    arrs = [jnp.asarray(v) for v in values]
    out = []
    for i, a in enumerate(arrs):
        if a.dtype == jnp.bool_:
            out.append(_fusion_barrier(a.astype(jnp.int32)) != 0)
        elif a.dtype == jnp.int32:
            out.append(_fusion_barrier(a))
        elif a.dtype in (jnp.float32, jnp.uint32):
            bits = _fusion_barrier(jax.lax.bitcast_convert_type(a, jnp.int32))
            out.append(jax.lax.bitcast_convert_type(bits, a.dtype))
        else:
            raise ValueError(f"materialize: value {i} has dtype {a.dtype}; "
                             f"expected bool, int32, uint32 or float32")
    return tuple(out)


def materialize_small(fields: Sequence[tuple], top=None) -> tuple:
    """``materialize`` for several small values sharing work: all packed into ONE int32 lane.

    Each lane of ``materialize`` is computed separately, so values that share an expensive
    computation (e.g. the results of one parse) are cheapest stored together: ``fields`` is a
    sequence of ``(value, bits)`` with ``value`` a bool or an int32 in ``[0, 2**bits)``, packed
    from the lowest bits up; ``top`` (optional) is one signed int32 stored above them, so
    ``|top|`` must stay below ``2**(31 - sum(bits))``. The ranges are the CALLER's static
    guarantee (they are not checked on values). Returns the values (bools as bool, ints as
    int32) in order, then ``top`` if given.
    """
    total = 0
    packed = None
    for i, (value, bits) in enumerate(fields):
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
            raise ValueError(f"materialize_small: bits of field {i} must be an int >= 1, got {bits!r}")
        v = jnp.asarray(value)
        term = v.astype(jnp.int32) << total if total else v.astype(jnp.int32)
        packed = term if packed is None else packed | term
        total += bits
    if total > 31:
        raise ValueError(f"materialize_small: fields need {total} bits, more than 31")
    if top is not None:
        t = _i32(top) << total
        packed = t if packed is None else packed | t
    if packed is None:
        return ()
    (p,) = materialize(packed)
    out, o = [], 0
    for value, bits in fields:
        part = (p >> o) & ((1 << bits) - 1)
        out.append(part == 1 if jnp.asarray(value).dtype == jnp.bool_ else part)
        o += bits
    if top is not None:
        out.append(p >> total)                          # arithmetic shift: keeps the sign
    return tuple(out)


def action_row(action, action_len: int) -> jax.Array:
    """An env's ``action`` as int32 ``[action_len]`` tokens, stored once (``materialize``).

    Raises a ValueError naming the shape when ``action`` does not hold ``action_len`` tokens.
    Semantically the identity on the tokens. The barrier keeps whatever produced the action
    (a sampler, or a ``lax.scan`` slicing pre-generated actions with a dynamic index) out of the
    parse kernels, so that XLA:CPU vectorizes their loop over the batch (docs/performance.md).
    """
    a = jnp.asarray(action).astype(jnp.int32).reshape(-1)
    if a.shape[0] != action_len:
        raise ValueError(f"action must have {action_len} tokens, got shape {jnp.shape(action)}")
    (a,) = materialize(a)
    return a


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


def _static_shift(row: jax.Array, start: int, size: int, fill) -> jax.Array:
    """``out[i] = row[start + i]`` (``fill`` outside the row) for a static ``start``, built from
    one slice and constant padding (no per-token stack: that lowers to a transposed layout
    under vmap)."""
    n = row.shape[0]
    lo, hi = max(start, 0), min(start + size, n)
    if lo >= hi:
        return jnp.full((size,), fill, jnp.int32)
    parts = [jnp.full((lo - start,), fill, jnp.int32)] if lo > start else []
    parts.append(row[lo:hi].astype(jnp.int32))
    if start + size > hi:
        parts.append(jnp.full((start + size - hi,), fill, jnp.int32))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _window(row: jax.Array, start, size: int, fill: int = vocab.PAD) -> tuple[jax.Array, jax.Array]:
    """``row[start:start+size]`` with ``fill`` outside the row (no clamping of ``start``).

    Returns (window, in_range) where in_range[i] says position start+i lies inside the row.
    """
    n = row.shape[0]
    if isinstance(start, int):                          # static: slice and pad
        inside = jnp.asarray([0 <= start + i < n for i in range(size)])
        return _static_shift(row, start, size, fill), inside
    pos = _i32(start) + jnp.arange(size, dtype=jnp.int32)
    inside = (pos >= 0) & (pos < n)
    return take(row, pos, fill).astype(jnp.int32), inside


def _window_tokens(row: jax.Array, start, size: int, fill: int = vocab.PAD) -> list:
    """``row[start + i]`` for i < size (``fill`` outside the row) as a list of scalars.

    A list, not a ``[size]`` array: under ``vmap`` a per-env scalar combined with a per-env
    vector is batch-major (``[B, size]``, each env's tokens contiguous), which the kernels
    that read it cannot vectorize over the batch; separate scalars stay rows of B lanes.
    """
    n = row.shape[0]
    if isinstance(start, int):                          # static: slices
        return [row[start + i] if 0 <= start + i < n else jnp.int32(fill) for i in range(size)]
    start = _i32(start)
    return [take(row, start + i, fill).astype(jnp.int32) for i in range(size)]


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
    return _parse_digits(_window_tokens(row, start, max_digits + 1), max_digits)


def _parse_digits(win: list, max_digits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``parse_uint`` on a window of ``max_digits + 1`` tokens (scalars) that starts at the
    number."""
    # static unrolled scan over <= 10 positions (cheaper to compile and run than cumprod /
    # gathers): inside the run while every token so far is a digit; Horner for the value
    inside = jnp.bool_(True)
    n = jnp.int32(0)
    value = jnp.int32(0)
    for i in range(max_digits + 1):
        inside = inside & is_digit(win[i])
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
    _check_digits("max_digits", max_digits)
    row = _check_row("tokens", tokens)
    # one window from start (static slices, or select chains when start is traced), then the
    # digits' window is it shifted by one where it begins with '-' (one select per token)
    g = _window_tokens(row, start, max_digits + 2)
    neg = g[0] == vocab.MINUS
    v, n, ok = _parse_digits([jnp.where(neg, g[i + 1], g[i]) for i in range(max_digits + 1)],
                             max_digits)
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
    # one constant divisor per position (multiply-shift); x >= 0 so truncation = floor
    digits = [jax.lax.rem(jax.lax.div(x, jnp.int32(10 ** (n_digits - 1 - i))), jnp.int32(10))
              for i in range(n_digits)]
    return (vocab.DIGIT_0 + jnp.stack(digits, axis=-1)).astype(jnp.int32)


def num_digits(x) -> jax.Array:
    """Number of decimal digits of ``|x|`` (1 for 0), int32, for |x| < 10**9."""
    a = jnp.abs(_i32(x))
    n = jnp.ones(a.shape, jnp.int32)
    for k in range(1, _MAX_UINT_DIGITS):               # unrolled: elementwise, no reduction
        n = n + (a >= 10 ** k).astype(jnp.int32)
    return n


_DIGITS_PER_WORD = 7  # 4-bit decimal digits in one int32 lane (28 bits)


def _digit_words(x, n_digits: int, neg=None) -> tuple[list, jax.Array, jax.Array | None]:
    """The decimal digits of ``0 <= x < 10**n_digits`` packed 4 bits each, stored once.

    Returns ``(words, n, neg)``: ``words[w]`` holds the digits of the powers 10**(7w) ..
    10**(7w + 6) (digit of 10**k at bits 4(k - 7w)), ``n = num_digits(x)`` and ``neg``
    (optional, bool) passed through. Every value comes out of a ``materialize`` barrier, packed
    with ``materialize_small`` where it fits, so that a token row reading them is uniform
    elementwise code over the row (variable shifts), not one division per token position.
    """
    words = []
    for w in range(0, n_digits, _DIGITS_PER_WORD):
        word = jnp.zeros(x.shape, jnp.int32)
        for k in range(w, min(w + _DIGITS_PER_WORD, n_digits)):
            # x // 10**k % 10: divisions by constants (multiply-shift), vectorized over the batch
            d = jax.lax.rem(jax.lax.div(x, jnp.int32(10 ** k)), jnp.int32(10)) if k else \
                jax.lax.rem(x, jnp.int32(10))
            word = word | (d << (4 * (k - w)))
        words.append(word)
    n = num_digits(x)
    if n_digits <= 6:                                   # 24 digit bits + n (4) + neg (1) <= 31
        fields = [(n, 4)] + ([(neg, 1)] if neg is not None else [])
        n, *rest = materialize_small(fields, top=words[0])
        words = [rest.pop()]
        if neg is not None:
            neg = rest[0]
        return words, n, neg
    # n (4 bits) and neg (1 bit) ride above the last word's digits when they fit, else in a
    # lane of their own (max_digits == 7: one full word)
    last_bits = 4 * (n_digits - _DIGITS_PER_WORD * (len(words) - 1))
    info = n | (neg.astype(jnp.int32) << 4) if neg is not None else n
    if last_bits + 5 <= 31:
        *words, last = materialize(*words[:-1], words[-1] | (info << last_bits))
        info = last >> last_bits
        words = [*words, last & ((1 << last_bits) - 1)]
    else:
        *words, info = materialize(*words, info)
    n = info & 15
    return list(words), n, ((info >> 4) == 1 if neg is not None else None)


def _digit_of_power(words: list, p) -> jax.Array:
    """Digit of 10**p (p int32, clipped into the packed range) from ``_digit_words``."""
    hi = _DIGITS_PER_WORD * len(words) - 1
    p = jnp.clip(p, 0, hi)
    d = (words[0] >> (4 * jnp.minimum(p, _DIGITS_PER_WORD - 1))) & 15
    for w in range(1, len(words)):
        q = jnp.clip(p - _DIGITS_PER_WORD * w, 0, _DIGITS_PER_WORD - 1)
        d = jnp.where(p >= _DIGITS_PER_WORD * w, (words[w] >> (4 * q)) & 15, d)
    return d


def uint_to_tokens_var(x, max_digits: int) -> tuple[jax.Array, jax.Array]:
    """Minimal decimal digits of ``x`` (no leading zeros; "0" for 0), left-aligned.

    Returns ``(tokens [max_digits] with <pad> after the digits, length)``. ``x`` is clipped
    into ``[0, 10**max_digits - 1]``.

    With n = num_digits(x), position i < n shows the digit of 10**(n - 1 - i). The digits are
    computed once per value by divisions by constants and packed 4 bits each
    (``_digit_words``); each position then reads its digit by a shift: the same elementwise
    code for every position, which XLA:CPU vectorizes over a batch (a stack of per-position
    divisions is emitted as a per-element switch with a scalar division by a variable).
    """
    _check_digits("max_digits", max_digits)
    D = max_digits
    x = jnp.clip(_i32(x), 0, 10 ** D - 1)
    words, n, _ = _digit_words(x, D)
    i = jnp.arange(D, dtype=jnp.int32)
    toks = jnp.where(i < n, vocab.DIGIT_0 + _digit_of_power(words, n - 1 - i), vocab.PAD)
    return toks.astype(jnp.int32), n


def int_to_tokens_var(x, max_digits: int) -> tuple[jax.Array, jax.Array]:
    """Signed version of ``uint_to_tokens_var``: a leading ``-`` for negative ``x``.

    Returns ``(tokens [max_digits + 1], length)``; ``|x|`` is clipped to ``10**max_digits - 1``.
    Position i shows ``-`` if x < 0 and i = 0, else the digit of 10**(n - 1 - (i - s)) with
    s = [x < 0], while i - s < n (same uniform per-position code as ``uint_to_tokens_var``).
    """
    _check_digits("max_digits", max_digits)
    D = max_digits
    x = _i32(x)
    a = jnp.clip(jnp.abs(x), 0, 10 ** D - 1)
    words, n, neg = _digit_words(a, D, neg=x < 0)
    s = neg.astype(jnp.int32)
    i = jnp.arange(D + 1, dtype=jnp.int32)
    k = i - s
    digit = jnp.where((k >= 0) & (k < n), vocab.DIGIT_0 + _digit_of_power(words, n - 1 - k), vocab.PAD)
    toks = jnp.where(neg & (i == 0), vocab.MINUS, digit)
    return toks.astype(jnp.int32), (n + s).astype(jnp.int32)


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
    R = row.shape[0]
    if isinstance(start, int):                          # static start, traced length
        # out[j] = seq[j - start] where 0 <= j - start < n: a static shift, one select each
        rel = jnp.arange(R, dtype=jnp.int32) - start
        vals = _static_shift(seq, -start, R, 0)
        hit = (rel >= 0) & (rel < n)
        return jnp.where(hit, vals, row).astype(jnp.int32)
    rel = jnp.arange(R, dtype=jnp.int32) - _i32(start)  # [R]
    # select chain over the L source positions (elementwise: no scatter, gather or
    # reduction, so it fuses into its consumer under vmap)
    out = row
    for i in range(L):
        out = jnp.where((rel == i) & (i < n), seq[i], out)
    return out.astype(jnp.int32)


def pack_left(tokens, keep) -> jax.Array:
    """Stable compaction: the tokens where ``keep`` is True, in order, then ``<pad>``s."""
    t = _check_row("tokens", tokens)
    k = jnp.asarray(keep, bool)
    if k.shape != t.shape:
        raise ValueError(f"keep must have the shape of tokens {t.shape}, got {k.shape}")
    n = t.shape[0]
    # destination of token i = the number of kept tokens before it, as an unrolled running
    # count (a cumsum lowers to reduce-window, slow on short rows under vmap); then out[j] =
    # the token whose destination is j (at most one), <pad> if none, as a select chain
    count = jnp.int32(0)
    dest = []
    for i in range(n):
        dest.append(jnp.where(k[i], count, -1))
        count = count + k[i].astype(jnp.int32)
    pos = jnp.arange(n, dtype=jnp.int32)
    out = jnp.full((n,), vocab.PAD, jnp.int32)
    for i in range(n):
        out = jnp.where(pos == dest[i], t[i], out)
    return out.astype(jnp.int32)


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
