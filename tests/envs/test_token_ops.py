"""envs.token_ops against straightforward NumPy / Python references on random rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import token_ops as T
from envs import vocab

RNG = np.random.default_rng(0)
D0, A0 = vocab.DIGIT_0, vocab.LETTER_A


def ref_action_length(a):
    for i, t in enumerate(a):
        if t in (vocab.EOS, vocab.PAD):
            return i
    return len(a)


def ref_parse_uint(a, start, max_digits):
    n = 0
    i = start
    while 0 <= i < len(a) and D0 <= a[i] < D0 + 10 and n < max_digits + 1:
        n += 1
        i += 1
    used = min(n, max_digits)
    value = 0
    for j in range(used):
        value = value * 10 + int(a[start + j]) - D0
    return value, n, 1 <= n <= max_digits


def random_rows(n, length, digit_bias=0.6):
    """Rows mixing digits (often) with arbitrary ids, some outside the vocab."""
    rows = RNG.integers(-5, 80, size=(n, length))
    dig = RNG.random((n, length)) < digit_bias
    rows[dig] = RNG.integers(D0, D0 + 10, size=dig.sum())
    return rows.astype(np.int32)


def test_classification_matches_reference():
    toks = np.arange(-10, 80, dtype=np.int32)
    d = np.asarray(T.is_digit(toks))
    l = np.asarray(T.is_letter(toks))
    for t, di, li in zip(toks, d, l):
        name = vocab.TOKENS[t] if 0 <= t < vocab.size else None
        assert di == (name is not None and name.isdigit() and len(name) == 1)
        assert li == (name is not None and len(name) == 1 and name.isalpha())
    dv = np.asarray(T.digit_value(toks))
    li_ = np.asarray(T.letter_index(toks))
    for t, v, i in zip(toks, dv, li_):
        name = vocab.TOKENS[t] if 0 <= t < vocab.size else ""
        assert v == (int(name) if len(name) == 1 and name.isdigit() else -1)
        assert i == (ord(name) - ord("a") if len(name) == 1 and name.isalpha() else -1)
    assert np.array_equal(np.asarray(T.digit_token(np.arange(10))), np.arange(10) + D0)
    assert np.array_equal(np.asarray(T.letter_token(np.arange(26))), np.arange(26) + A0)


def test_action_length_random_and_edges():
    rows = RNG.integers(-3, 70, size=(300, 7)).astype(np.int32)
    rows[::5] = np.where(RNG.random((60, 7)) < 0.3, vocab.EOS, rows[::5])
    got = np.asarray(jax.vmap(T.action_length)(rows))
    assert list(got) == [ref_action_length(r) for r in rows]
    assert int(T.action_length(np.full(5, vocab.PAD))) == 0
    assert int(T.action_length(np.full(5, 30))) == 5
    assert int(T.action_length(np.array([30, 31, vocab.EOS, 30]))) == 2
    assert bool(T.has_eos(np.array([30, vocab.EOS, 0]))) is True
    assert bool(T.has_eos(np.array([30, vocab.PAD, vocab.EOS]))) is False
    assert bool(T.has_eos(np.array([30, 30]))) is False


@pytest.mark.parametrize("max_digits", [1, 2, 3, 5])
def test_parse_uint_random(max_digits):
    rows = random_rows(400, 9)
    starts = RNG.integers(-2, 11, size=400).astype(np.int32)
    v, n, ok = jax.jit(jax.vmap(lambda r, s: T.parse_uint(r, s, max_digits)))(rows, starts)
    for r, s, vi, ni, oki in zip(rows, starts, np.asarray(v), np.asarray(n), np.asarray(ok)):
        rv, rn, rok = ref_parse_uint(list(r), int(s), max_digits)
        assert (int(ni), bool(oki)) == (rn, rok), (r, s)
        assert int(vi) == rv, (r, s)


def test_parse_uint_edges():
    row = np.array(vocab.encode("<calc> 123 + 0045"), np.int32)
    assert tuple(int(x) for x in T.parse_uint(row, 1, 3)) == (123, 3, 1)
    assert tuple(int(x) for x in T.parse_uint(row, 1, 2))[1:] == (3, 0)   # too long
    assert tuple(int(x) for x in T.parse_uint(row, 5, 4)) == (45, 4, 1)   # leading zeros
    assert bool(T.parse_uint(row, 0, 3)[2]) is False                      # not a digit
    assert bool(T.parse_uint(row, 9, 3)[2]) is False                      # past the end
    assert bool(T.parse_uint(row, -1, 3)[2]) is False
    with pytest.raises(ValueError, match="max_digits"):
        T.parse_uint(row, 0, 0)
    with pytest.raises(ValueError, match="max_digits"):
        T.parse_uint(row, 0, 12)


def test_parse_int():
    for text, start, want in [("- 42", 0, (-42, 3, True)), ("42", 0, (42, 2, True)),
                              ("- x", 0, (0, 1, False)), ("- 0", 0, (0, 2, True))]:
        row = np.array(vocab.encode(text) + [vocab.PAD], np.int32)
        v, n, ok = T.parse_int(row, start, 3)
        assert (int(v), int(n), bool(ok)) == want, text


def test_uint_to_tokens_fixed_and_var():
    xs = np.concatenate([RNG.integers(0, 10 ** 6, 300), [0, 9, 10, 99, 100, 999999]])
    fixed = np.asarray(jax.vmap(lambda x: T.uint_to_tokens(x, 6))(xs))
    for x, row in zip(xs, fixed):
        assert vocab.decode(row) == f"{x:06d}"
    toks, n = jax.vmap(lambda x: T.uint_to_tokens_var(x, 6))(xs)
    for x, row, ni in zip(xs, np.asarray(toks), np.asarray(n)):
        assert int(ni) == len(str(x))
        assert vocab.decode(row) == str(x)
        assert np.all(row[int(ni):] == vocab.PAD)
    # clipping
    assert vocab.decode(np.asarray(T.uint_to_tokens(1234, 2))) == "99"
    assert vocab.decode(np.asarray(T.uint_to_tokens_var(-5, 3)[0])) == "0"
    with pytest.raises(ValueError, match="n_digits"):
        T.uint_to_tokens(3, 0)


def test_int_to_tokens_var_round_trip_with_parse_int():
    xs = np.concatenate([RNG.integers(-9999, 10000, 300), [0, -1, 1, -9999, 9999]])
    toks, n = jax.jit(jax.vmap(lambda x: T.int_to_tokens_var(x, 4)))(xs)
    rows = np.concatenate([np.asarray(toks), np.zeros((len(xs), 1), np.int32)], axis=1)
    v, m, ok = jax.jit(jax.vmap(lambda r: T.parse_int(r, 0, 4)))(rows)
    for x, row, ni, vi, mi, oki in zip(xs, np.asarray(toks), np.asarray(n), np.asarray(v),
                                       np.asarray(m), np.asarray(ok)):
        assert vocab.decode(row).replace(" ", "") == str(int(x))
        assert int(ni) == len(str(int(x)))
        assert (int(vi), int(mi), bool(oki)) == (int(x), int(ni), True)


@pytest.mark.parametrize("max_digits", list(range(1, 10)))
def test_digit_writing_every_width_sign_clipping_and_batch_layouts(max_digits):
    """uint/int_to_tokens_var (packed digit words read by shifts) against Python's str, for
    every width 1..9 (one and two packed words), negative values, clipping at 10**D - 1 and
    INT32 extremes, unbatched, vmap batch-first and vmap batch-last."""
    D = max_digits
    top = 10 ** D - 1
    xs = np.concatenate([RNG.integers(-top, top + 1, 200),
                         [0, 1, -1, 9, 10, -10, top, -top, top + 1, -(top + 1),
                          2 ** 31 - 1, -(2 ** 31 - 1)]]).astype(np.int64)
    xs = np.clip(xs, -(2 ** 31 - 1), 2 ** 31 - 1).astype(np.int32)

    def want_u(x):
        v = min(max(int(x), 0), top)
        return str(v)

    def want_i(x):
        v = min(abs(int(x)), top)
        return ("-" if x < 0 else "") + str(v)

    for fn, want, width in [(T.uint_to_tokens_var, want_u, D), (T.int_to_tokens_var, want_i, D + 1)]:
        first = jax.jit(jax.vmap(lambda x: fn(x, D)))(xs)
        last = jax.jit(jax.vmap(lambda x: fn(x, D), in_axes=-1, out_axes=-1))(xs)
        for toks, n in [first, (np.asarray(last[0]).T, last[1])]:
            toks, n = np.asarray(toks), np.asarray(n)
            assert toks.shape == (len(xs), width)
            for x, row, ni in zip(xs, toks, n):
                w = want(x)
                assert vocab.decode(row).replace(" ", "") == w, (D, int(x))
                assert int(ni) == len(w)
                assert np.all(row[len(w):] == vocab.PAD)
        one, n1 = fn(jnp.int32(xs[0]), D)
        assert vocab.decode(np.asarray(one)).replace(" ", "") == want(xs[0]) and int(n1) == len(want(xs[0]))


def test_num_digits():
    xs = np.concatenate([RNG.integers(-10 ** 8, 10 ** 8, 500), [0, 9, 10, -10, 99999999]])
    assert list(np.asarray(T.num_digits(xs))) == [len(str(abs(int(x)))) for x in xs]


def test_write_at_random():
    L, S = 9, 5
    f = jax.jit(T.write_at)                         # traced start / length: one compile
    for _ in range(200):
        row = RNG.integers(0, 64, L).astype(np.int32)
        seq = RNG.integers(0, 64, S).astype(np.int32)
        start = int(RNG.integers(-3, L + 3))
        length = int(RNG.integers(-1, S + 2))
        ref = row.copy()
        for j in range(max(0, min(length, S))):
            if 0 <= start + j < L:
                ref[start + j] = seq[j]
        assert np.array_equal(np.asarray(f(row, np.int32(start), seq, np.int32(length))), ref)
        if length == S:                             # static-start fast path agrees
            assert np.array_equal(np.asarray(T.write_at(row, start, seq)), ref)
    row = np.zeros(4, np.int32)
    assert list(np.asarray(T.write_at(row, 2, np.array([7, 8, 9])))) == [0, 0, 7, 8]
    assert list(np.asarray(T.write_at(row, -2, np.array([7, 8, 9])))) == [9, 0, 0, 0]


def test_pack_left_random():
    toks = RNG.integers(0, 64, (200, 8)).astype(np.int32)
    keep = RNG.random((200, 8)) < 0.5
    got = np.asarray(jax.vmap(T.pack_left)(toks, keep))
    for t, k, g in zip(toks, keep, got):
        ref = list(t[k]) + [vocab.PAD] * (8 - k.sum())
        assert list(g) == ref
    with pytest.raises(ValueError, match="keep"):
        T.pack_left(np.zeros(3, np.int32), np.zeros(4, bool))


def test_make_row():
    digits, n = T.uint_to_tokens_var(305, 4)
    row = T.make_row([vocab.OBS, vocab.RESULT, (digits, n), np.array([vocab.EOS])], 8)
    assert vocab.decode(np.asarray(row)) == "<obs> <result> 305 <eos>"
    assert row.shape == (8,) and row.dtype == jnp.int32
    # traced lengths under vmap
    xs = np.array([0, 7, 42, 999])
    rows = jax.jit(jax.vmap(lambda x: T.make_row(
        [vocab.OBS, (T.uint_to_tokens_var(x, 3))], 6)))(xs)
    assert [vocab.decode(r) for r in np.asarray(rows)] == [f"<obs> {x}" for x in xs]
    # overflow of variable pieces is truncated, fixed overflow raises
    long, ln = T.uint_to_tokens_var(123456, 6)
    assert vocab.decode(np.asarray(T.make_row([vocab.OBS, (long, ln)], 4))) == "<obs> 123"
    with pytest.raises(ValueError, match="length"):
        T.make_row([vocab.OBS, np.arange(5)], 4)
    assert np.all(np.asarray(T.make_row([], 3)) == vocab.PAD)


def test_tokens_equal_and_first_index():
    row = np.array(vocab.encode("<search> a3 r"), np.int32)
    assert bool(T.tokens_equal(row, 1, np.array(vocab.encode("a3"))))
    assert not bool(T.tokens_equal(row, 2, np.array(vocab.encode("a3"))))
    assert not bool(T.tokens_equal(row, 3, np.array(vocab.encode("r x"))))  # runs past end
    assert bool(T.tokens_equal(row, 3, np.array(vocab.encode("r x")), 1))
    assert int(T.first_index(np.array([False, True, True]))) == 1
    assert int(T.first_index(np.array([False, False]))) == 2
    assert int(T.first_index(np.array([False, False]), default=-1)) == -1


def test_sanitize_and_pad_row():
    a = np.array([-3, 0, 63, 64, 1000], np.int32)
    assert list(np.asarray(T.sanitize(a))) == [vocab.ERR, 0, 63, vocab.ERR, vocab.ERR]
    assert list(np.asarray(T.pad_row(np.array([5, 6]), 4))) == [5, 6, 0, 0]
    assert list(np.asarray(T.pad_row(np.array([5, 6, 7]), 2))) == [5, 6]


def test_take_and_take2():
    arr = RNG.integers(-50, 50, 7).astype(np.int32)
    idx = RNG.integers(-3, 10, (4, 5)).astype(np.int32)
    ref = np.where((idx >= 0) & (idx < 7), arr[np.clip(idx, 0, 6)], -99)
    assert np.array_equal(np.asarray(T.take(arr, idx, fill=-99)), ref)
    mat = RNG.integers(0, 9, (7, 3)).astype(np.int32)
    got = np.asarray(T.take(mat, np.array([0, 6, 7])))
    assert np.array_equal(got, np.stack([mat[0], mat[6], np.zeros(3, np.int32)]))
    for i in range(-1, 8):
        for j in range(-1, 4):
            want = mat[i, j] if 0 <= i < 7 and 0 <= j < 3 else -1
            assert int(jax.jit(T.take2)(mat, i, j, -1)) == want
    with pytest.raises(ValueError, match="2-D"):
        T.take2(arr, 0, 0)


def test_take_select_chain_equals_gather_random_shapes_fills_and_vmap():
    """take(select=True) (a select chain) = take(select=False) (a gather) = the NumPy reference,
    for 1-D and row tables, indices of any shape incl. out of range, bool tables, under vmap
    (one table and index per env, batch axis first or last); take2 likewise."""
    for n, tail, dtype in [(1, (), np.int32), (5, (), np.int32), (9, (3,), np.int32), (4, (), bool)]:
        arr = RNG.integers(-50, 50, (n,) + tail).astype(dtype)
        idx = RNG.integers(-3, n + 3, (4, 5)).astype(np.int32)
        fill = True if dtype is bool else -99
        ref = np.where(((idx >= 0) & (idx < n)).reshape(idx.shape + (1,) * len(tail)),
                       arr[np.clip(idx, 0, n - 1)], fill)
        for select in (False, True):
            got = np.asarray(jax.jit(lambda a, i: T.take(a, i, fill, select=select))(arr, idx))
            assert got.dtype == arr.dtype and np.array_equal(got, ref), (n, tail, select)
    tables = RNG.integers(0, 9, (16, 6)).astype(np.int32)       # one table and index per env
    idx = RNG.integers(-2, 8, 16).astype(np.int32)
    ref = np.where((idx >= 0) & (idx < 6), tables[np.arange(16), np.clip(idx, 0, 5)], -1)
    for select in (False, True):
        f = lambda t, i: T.take(t, i, -1, select=select)        # noqa: E731
        assert np.array_equal(np.asarray(jax.jit(jax.vmap(f))(tables, idx)), ref)
        assert np.array_equal(np.asarray(jax.jit(jax.vmap(f, in_axes=(-1, -1)))(tables.T, idx)), ref)
    mat = RNG.integers(0, 9, (4, 3)).astype(np.int32)
    ii, jj = np.meshgrid(np.arange(-1, 6), np.arange(-1, 5), indexing="ij")
    ref = np.where((ii >= 0) & (ii < 4) & (jj >= 0) & (jj < 3), mat[np.clip(ii, 0, 3), np.clip(jj, 0, 2)], -1)
    for select in (False, True):
        got = jax.jit(jax.vmap(lambda i, j: T.take2(mat, i, j, -1, select=select)))(ii.ravel(), jj.ravel())
        assert np.array_equal(np.asarray(got).reshape(ii.shape), ref), select


def ref_parse_int(a, start, max_digits):
    neg = 0 <= start < len(a) and a[start] == vocab.MINUS
    v, n, ok = ref_parse_uint(a, start + neg, max_digits)
    return (-v if neg else v), n + neg, ok


@pytest.mark.parametrize("max_digits", [1, 3, 4])
def test_parse_int_random_static_and_traced_start(max_digits):
    rows = random_rows(300, 9)
    minus = RNG.random(rows.shape) < 0.2
    rows[minus] = vocab.MINUS
    starts = RNG.integers(-2, 11, len(rows)).astype(np.int32)
    traced = jax.jit(jax.vmap(lambda r, s: T.parse_int(r, s, max_digits)))(rows, starts)
    static = {s: jax.jit(jax.vmap(lambda r, s=s: T.parse_int(r, s, max_digits)))(rows)
              for s in (0, 1, 7, 9)}
    for i, row in enumerate(rows):
        got = tuple(int(x[i]) for x in traced)
        assert got == tuple(int(x) for x in ref_parse_int(row, int(starts[i]), max_digits)), row
        for s, out in static.items():
            assert tuple(int(x[i]) for x in out) == \
                tuple(int(x) for x in ref_parse_int(row, s, max_digits)), (row, s)


def test_write_at_static_start_traced_length():
    L, S = 9, 5
    for start in (-3, 0, 2, 6, 9):
        f = jax.jit(lambda row, seq, n, start=start: T.write_at(row, start, seq, n))
        for _ in range(40):
            row = RNG.integers(0, 64, L).astype(np.int32)
            seq = RNG.integers(0, 64, S).astype(np.int32)
            length = int(RNG.integers(-1, S + 2))
            ref = row.copy()
            for j in range(max(0, min(length, S))):
                if 0 <= start + j < L:
                    ref[start + j] = seq[j]
            assert np.array_equal(np.asarray(f(row, seq, np.int32(length))), ref), (start, length)


def test_materialize_is_identity_for_every_dtype():
    b = RNG.random((6, 3)) < 0.5
    i = RNG.integers(-2 ** 31, 2 ** 31, (6, 4), dtype=np.int64).astype(np.int32)
    i[0, :2] = [np.iinfo(np.int32).min, np.iinfo(np.int32).max]
    u = RNG.integers(0, 2 ** 32, (6, 2), dtype=np.uint64).astype(np.uint32)
    f = RNG.standard_normal((6, 5)).astype(np.float32)
    f[0, :4] = [np.nan, -0.0, np.inf, -np.inf]
    s = np.arange(6, dtype=np.int32)                      # 0-d values under vmap
    out = jax.jit(jax.vmap(T.materialize))(b, i, u, f, s)
    for want, got in zip((b, i, u, f, s), out):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))   # bit-exact (NaN, -0.0)
    assert T.materialize() == ()
    with pytest.raises(ValueError, match="dtype"):
        T.materialize(np.zeros(2, np.float64).astype(np.float16))


def test_materialize_small_round_trip_against_reference():
    n = 500
    widths = [1, 3, 5, 9]
    fields = [RNG.random(n) < 0.5] + [RNG.integers(0, 2 ** w, n).astype(np.int32) for w in widths[1:]]
    lo_bits = sum(widths)
    tops = RNG.integers(-(2 ** (31 - lo_bits)) + 1, 2 ** (31 - lo_bits), n).astype(np.int32)
    tops[:2] = [-(2 ** (31 - lo_bits)) + 1, 2 ** (31 - lo_bits) - 1]

    def f(*xs):
        *fs, top = xs
        return T.materialize_small(list(zip(fs, widths)), top=top)
    out = jax.jit(jax.vmap(f))(*fields, tops)
    # reference: NumPy shift-and-mask packing of the same layout, then unpacking
    packed = tops.astype(np.int64) << lo_bits
    o = 0
    for x, w in zip(fields, widths):
        packed |= x.astype(np.int64) << o
        o += w
    for k, (x, w) in enumerate(zip(fields, widths)):
        o = sum(widths[:k])
        ref = (packed >> o) & ((1 << w) - 1)
        assert np.array_equal(np.asarray(out[k]).astype(np.int64), ref)
        assert np.array_equal(np.asarray(out[k]), x)
    assert np.asarray(out[0]).dtype == bool and np.asarray(out[1]).dtype == np.int32
    assert np.array_equal(np.asarray(out[-1]), tops)
    # no top / only a top
    assert [bool(v) for v in T.materialize_small([(jnp.bool_(True), 1), (jnp.bool_(False), 1)])] == [True, False]
    assert int(T.materialize_small([], top=jnp.int32(-7))[0]) == -7
    with pytest.raises(ValueError, match="31"):
        T.materialize_small([(1, 20), (1, 12)])
    with pytest.raises(ValueError, match="bits"):
        T.materialize_small([(1, 0)])


def test_materialize_vmap_rule_any_batch_axis_nested_and_unbatched():
    """``materialize``'s custom vmap rule (the pair reduction over the major axis) is the
    identity whatever the batch axis (0 or last), under nested vmap, with an unbatched argument
    (in_axes=None), under jit and inside lax.scan, and keeps the reduction over the leading axis
    in the lowered program."""
    x = RNG.integers(-2 ** 31, 2 ** 31 - 1, (5, 3, 7)).astype(np.int32)
    f = lambda v: T.materialize(v, v > 0)
    for in_axes in (0, -1, 1):
        out = jax.jit(jax.vmap(f, in_axes=in_axes, out_axes=in_axes))(x)
        assert np.array_equal(np.asarray(out[0]), x) and np.array_equal(np.asarray(out[1]), x > 0)
    nested = jax.jit(jax.vmap(jax.vmap(f, in_axes=-1, out_axes=-1)))(x)
    assert np.array_equal(np.asarray(nested[0]), x)
    unbatched = jax.vmap(lambda a, b: T.materialize(a, b), in_axes=(None, 0))(x[0], x)
    assert np.array_equal(np.asarray(unbatched[0]), np.broadcast_to(x[0], x.shape))
    assert np.array_equal(np.asarray(unbatched[1]), x)

    def body(c, v):
        (m,) = T.materialize(v + c)
        return c + 1, m
    _, scanned = jax.jit(lambda xs: jax.lax.scan(jax.vmap(body, in_axes=(None, -1), out_axes=(None, -1)),
                                                 jnp.int32(0), xs))(x)
    assert np.array_equal(np.asarray(scanned), x + np.arange(5, dtype=np.int32)[:, None, None])
    # the batch (7) stays the minor axis and the pair axis (2) is the reduced leading one
    hlo = jax.jit(jax.vmap(lambda v: T.materialize(v), in_axes=-1, out_axes=-1)).lower(x[0]).as_text()
    assert "across dimensions = [0] : (tensor<2x3x7xi32>" in hlo, hlo


@pytest.mark.parametrize("bits", [1, 3, 5, 7, 10, 31])
def test_pack_table_and_packed_take_against_numpy(bits):
    """packed_take(pack_table(v, bits), i) == v[i] for random tables and indices (several
    words, a partial last word), fill outside, unbatched and vmapped with the batch first
    or last; bad bits / shapes are rejected."""
    rng = np.random.default_rng(bits)
    n = 3 * (31 // bits) + 2
    v = rng.integers(0, 2 ** bits, n)
    words = T.pack_table(v, bits)
    assert words.shape == (-(-n // (31 // bits)),) and words.dtype == jnp.int32
    idx = np.concatenate([np.arange(-2, n + 3), rng.integers(-5, n + 5, 50)])
    want = np.where((idx >= 0) & (idx < n), v[np.clip(idx, 0, n - 1)], -7)
    # indices past n but inside the last word read the zero padding
    pad = (idx >= n) & (idx < words.shape[0] * (31 // bits))
    want = np.where(pad, 0, want)
    got = np.asarray(jax.jit(lambda i: T.packed_take(words, i, bits, fill=-7))(idx))
    np.testing.assert_array_equal(got, want)
    per = 31 // bits                                # a one-word table (the single-shift path)
    one = T.pack_table(v[:per], bits)
    assert one.shape == (1,)
    i1 = np.arange(-2, per + 3)
    want1 = np.where((i1 >= 0) & (i1 < per), v[np.clip(i1, 0, per - 1)], -7)
    np.testing.assert_array_equal(np.asarray(T.packed_take(one, i1, bits, fill=-7)), want1)
    tables = np.stack([rng.integers(0, 2 ** bits, n) for _ in range(4)])
    ws = jax.vmap(lambda t: T.pack_table(t, bits))(tables)
    first = jax.vmap(lambda w, i: T.packed_take(w, i, bits))(ws, jnp.asarray(idx[:4] % n))
    last = jax.vmap(lambda w, i: T.packed_take(w, i, bits), in_axes=(-1, -1))(ws.T, jnp.asarray(idx[:4] % n))
    np.testing.assert_array_equal(first, tables[np.arange(4), idx[:4] % n])
    np.testing.assert_array_equal(last, first)
    with pytest.raises(ValueError, match="bits"):
        T.pack_table(v, 32)
    with pytest.raises(ValueError, match="1-D"):
        T.pack_table(np.zeros((2, 2), np.int32), bits)
