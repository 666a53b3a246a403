"""Run any env in a Hugging Face tokenizer's ids, inside jit: render and parse tables.

Envs keep their 64-symbol grammar (``envs.vocab``). A ``TokenizerBridge``, built once on the
host from a tokenizer, holds small integer tables so that the rollout speaks the model's own
token ids inside the same XLA program, and ``BridgedEnv(env, bridge)`` is the env seen through
them (the ``Env`` contract, rows in tokenizer ids):

- **render** (env symbols → token ids): the text of a symbol row is ``vocab.decode(row)`` (a
  space before every symbol except the first and except a digit after a digit or a letter after
  a letter). Each symbol has two renderings, ``tokenizer.encode(text)`` and
  ``tokenizer.encode(" " + text)``; a row is rendered by concatenating the rendering each
  position asks for. A task in words (``Env.phrases``) adds phrase symbols ``vocab.size + i``
  with the text ``phrases[i]`` (a space before it unless it starts with punctuation), rendered
  the same way; a run of letters that spells one of its lowercase words renders as that word
  (``fuse_words``). A row of L symbols renders to at most ``row_bound(L)`` ids. Where the
  tokenizer encodes a whole observation the same way (it is
  *canonical* for these texts: e.g. digits split one by one, as in Qwen2), the rendered ids
  equal ``tokenizer.encode(vocab.decode(row))``; ``check_canonical`` measures it and the bridge
  warns where it does not hold (e.g. Llama-3 groups digits in threes).
- **parse** (token ids → env symbols): each token id maps to the symbols of its decoded text
  (whitespace dropped) or is *unparseable* (text outside the env alphabet, partial UTF-8,
  special tokens that are not env tags). A generated action is parsed token by token whatever
  tokenization the model chose; tags written as plain text (``<``, ``calc``, ``>``) are fused
  back into the tag symbol. Any stop id parses as ``<eos>``. An unparseable token or an action
  longer than the env's row gives the env the row ``<err> <eos>``: a format error.
- **chat pieces** (constant token ids around each message) come from the tokenizer's own chat
  template (``apply_chat_template`` on placeholder conversations, split at the placeholders):
  prompt = system / user header + prompt + end of user turn + assistant header; every
  observation = what follows the assistant's stop token up to the user content + observation +
  end of user turn + assistant header. Without a chat template the pieces are empty (plus the
  tokenizer's BOS before the prompt).
- **tags** (``tags="special"``): env tags (``<calc>``, ``<obs>``, ...) are added to the
  tokenizer as special tokens where it lacks them (new embedding rows: ``init_new_rows``);
  ``tags="text"``: tags are plain text in the existing vocabulary.
- **stop ids** (``generation_config.json``'s ``eos_token_id``, one or several) end an action;
  ``vocab_limit`` (``len(tokenizer)``) bounds the ids the model may produce (a checkpoint's
  padded embedding rows beyond it are never sampled: ``ModelConfig.vocab_limit``).

Rows of a ``BridgedEnv`` are filled with ``-1`` after their real ids: lengths, not a pad id,
decide validity (every id of a real vocabulary is a real token). The trajectory stores exactly
the ids the model sampled and the ids the env emitted, so training re-scores the same ids.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from envs import vocab
from envs.base import Env

TAG_MODES = ("special", "text")
FILL = -1                      # the bridged env's fill value: not a token id
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")   # one of them must exist
# symbol kinds for the spacing rule: 0 tag, 1 digit, 2 letter, 3 operator, 4 phrase (a space
# before it), 5 glued phrase (punctuation: no space before it)
_KIND = np.array([0 if t in vocab.SPECIALS else 1 if t in vocab.DIGITS else
                  2 if t in vocab.LETTERS else 3 for t in vocab.TOKENS], np.int32)


def symbol_kinds(phrases: Sequence[str] = ()) -> np.ndarray:
    """int32 [vocab.size + len(phrases)]: the spacing kind of every symbol (see ``_KIND``)."""
    extra = [5 if vocab.phrase_kind(p) == "glued" else 4 for p in phrases]
    return np.concatenate([_KIND, np.asarray(extra, np.int32)]).astype(np.int32)
_TAGS = tuple(t for t in vocab.SPECIALS if t not in ("<pad>", "<eos>"))
# every tag as its characters' symbols: '<' letters '>'
_TAG_PATTERNS = [[vocab.LESS] + [vocab.TOKEN_TO_ID[c] for c in t[1:-1]] + [vocab.GREATER]
                 for t in _TAGS]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizerBridge:
    """Tables between env symbols and a tokenizer's ids (built by ``build_bridge``)."""
    render_ids: np.ndarray     # int32 [2, S, R]: symbol s rendered without / with a leading space
    render_len: np.ndarray     # int32 [2, S]
    symbol_kind: np.ndarray    # int32 [S]: the spacing kind of each symbol (``symbol_kinds``)
    phrases: tuple             # the env's phrases: symbols vocab.size, vocab.size + 1, ...
    words: tuple               # (phrase symbol, its letters' symbols) for lowercase-word phrases
    parse_ids: np.ndarray      # int32 [V, P]: the env symbols of token id v (PAD after)
    parse_len: np.ndarray      # int32 [V]: how many; -1 = unparseable
    prompt_prefix: tuple       # chat pieces (token ids)
    prompt_suffix: tuple
    obs_prefix: tuple
    obs_suffix: tuple
    stop_ids: tuple            # ids that end an action (parse as <eos>)
    end_of_turn: int           # the stop id written after a rendered (oracle) action
    vocab_limit: int           # len(tokenizer): ids the model may produce
    tags: str
    added_tokens: tuple        # tags added to the tokenizer as special tokens

    @property
    def max_render(self) -> int:
        return int(self.render_len.max())

    def row_bound(self, length: int, actions: bool = False) -> int:
        """The most token ids a row of ``length`` symbols renders to: the first symbol without a
        leading space, each later one with a space or glued (a digit after a digit, a letter
        after a letter, punctuation). ``actions``: only the symbols an action can hold (the
        64 symbols and the word phrases its letter runs fuse into)."""
        kind, rl = self.symbol_kind, self.render_len
        allowed = np.ones(len(kind), bool)
        if actions:
            allowed[vocab.size:] = False
            allowed[[w for w, _ in self.words]] = True
        glued = np.isin(kind, (1, 2, 5))
        first = int(rl[0, allowed].max())
        later = int(max(rl[1, allowed].max(), rl[0, allowed & glued].max(initial=0)))
        return first + max(length - 1, 0) * later


# ============================================================================ host: loading
def load_tokenizer(path):
    """``transformers.AutoTokenizer`` of a local directory (no network); one clear error for a
    missing directory or missing / unreadable tokenizer files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files in {path} (looked for "
                                f"{', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:       # transformers raises many kinds; one line naming the dir
        raise ValueError(f"cannot load the tokenizer in {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e


def stop_ids_from(path, tokenizer) -> tuple[int, ...]:
    """The ids that end a generation: ``generation_config.json``'s ``eos_token_id`` (an int or a
    list) when present, else the tokenizer's ``eos_token_id``."""
    ids: list[int] = []
    gen = Path(path) / "generation_config.json"
    if gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen} is not valid JSON: {e}") from e
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    if not ids or not all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids):
        raise ValueError(f"no usable stop ids for the tokenizer in {path} (generation_config.json "
                         f"eos_token_id / tokenizer eos_token_id: {ids or None})")
    return tuple(dict.fromkeys(ids))


# ============================================================================ host: building
def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False)) if text else []


def _chat_pieces(tok, stop_ids) -> tuple[list, list, list, list, int]:
    """(prompt_prefix, prompt_suffix, obs_prefix, obs_suffix, end_of_turn) from the template."""
    if not getattr(tok, "chat_template", None):
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and \
            list(tok.encode("", add_special_tokens=True))[:1] == [tok.bos_token_id] else []
        return bos, [], [], [], stop_ids[0]
    x, y, z = "\x01XXX\x01", "\x01YYY\x01", "\x01ZZZ\x01"

    def chat(msgs):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    one = chat([{"role": "user", "content": x}])
    three = chat([{"role": "user", "content": x}, {"role": "assistant", "content": y},
                  {"role": "user", "content": z}])
    if one.count(x) != 1 or three.count(y) != 1 or three.count(z) != 1:
        raise ValueError("the chat template does not write the message contents verbatim; "
                         "cannot derive its constant pieces")
    pre, post = one.split(x)
    if not three.startswith(pre + x):
        raise ValueError("the chat template writes the first user turn differently in longer "
                         "conversations; cannot derive its constant pieces")
    between = three.split(y)[1].split(z)[0]                 # end of assistant turn + user header
    tail = three.split(z)[1]
    if tail != post:
        raise ValueError(f"the chat template ends a user turn with {tail!r} after an assistant "
                         f"turn but {post!r} after the first; cannot derive its constant pieces")
    end_of_turn, after_stop = stop_ids[0], between
    for sid in stop_ids:                                    # the stop token the template writes
        s = tok.convert_ids_to_tokens(sid)
        if s and between.startswith(s):
            end_of_turn, after_stop = sid, between[len(s):]
            break
    return _encode(tok, pre), _encode(tok, post), _encode(tok, after_stop), _encode(tok, post), \
        end_of_turn


def _symbol_text(s: int, phrases: Sequence[str] = ()) -> str:
    return vocab.TOKENS[s] if s < vocab.size else phrases[s - vocab.size]


def _parse_text(text: str) -> list[int] | None:
    """Env symbols of one token's text (whitespace dropped); None when unparseable."""
    try:
        return vocab.encode(text)
    except ValueError:
        return None


def _add_special_tokens(tok, tokens: list[str]) -> None:
    """Add ``tokens`` as special tokens, keeping the tokenizer's other extra special tokens
    (the keyword's name differs between transformers 4 and 5)."""
    import inspect
    params = inspect.signature(tok.add_special_tokens).parameters
    kw = next(({k: False} for k in ("replace_extra_special_tokens",
                                     "replace_additional_special_tokens") if k in params), {})
    tok.add_special_tokens({"additional_special_tokens": list(tokens)}, **kw)


def build_bridge(tokenizer, stop_ids: Sequence[int] | None = None, tags: str = "special",
                 max_symbols_per_token: int = 16, phrases: Sequence[str] = ()) -> TokenizerBridge:
    """Build the tables for ``tokenizer`` (mutated: with ``tags="special"`` the env tags it
    lacks are added as special tokens). ``stop_ids`` default to the tokenizer's EOS.
    ``phrases``: the words of an env that writes natural-language text (``Env.phrases``,
    symbols ``vocab.size + i``), rendered like any symbol."""
    phrases = tuple(phrases)
    bad = [p for p in phrases if not (isinstance(p, str) and p and p.strip() == p)]
    if bad:
        raise ValueError(f"phrases must be non-empty strings without surrounding whitespace, "
                         f"got {bad[0]!r}")
    if tags not in TAG_MODES:
        raise ValueError(f"tags={tags!r} is not one of {TAG_MODES}")
    tok = tokenizer
    added: list[str] = []
    if tags == "special":
        vocab_map = tok.get_vocab()
        missing = [t for t in _TAGS if t not in vocab_map]
        if missing:
            _add_special_tokens(tok, missing)
            added = missing
    if stop_ids is None:
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pass stop_ids")
        stop_ids = (tok.eos_token_id,)
    stop_ids = tuple(int(i) for i in stop_ids)
    v = len(tok)
    if any(not 0 <= i < v for i in stop_ids):
        raise ValueError(f"stop ids {stop_ids} are outside the tokenizer's {v} ids")
    pp, ps, op, os_, eot = _chat_pieces(tok, stop_ids)

    # render tables
    enc = {}
    n_sym = vocab.size + len(phrases)
    for sp in (0, 1):
        for s in range(n_sym):
            if s == vocab.PAD:
                ids = []
            elif s == vocab.EOS:
                ids = [eot]
            else:
                ids = _encode(tok, (" " if sp else "") + _symbol_text(s, phrases))
            enc[sp, s] = ids
    r = max(len(x) for x in enc.values())
    render_ids = np.full((2, n_sym, r), FILL, np.int32)
    render_len = np.zeros((2, n_sym), np.int32)
    for (sp, s), ids in enc.items():
        render_ids[sp, s, :len(ids)] = ids
        render_len[sp, s] = len(ids)

    # parse table
    p = max_symbols_per_token
    parse_ids = np.full((v, p), vocab.PAD, np.int32)
    parse_len = np.full((v,), -1, np.int32)
    special = set(tok.all_special_ids)
    for i in range(v):
        if i in stop_ids:
            parse_ids[i, 0], parse_len[i] = vocab.EOS, 1
            continue
        text = tok.convert_ids_to_tokens(i)
        if i in special and text not in vocab.TOKEN_TO_ID:
            continue                                   # chat / control tokens: unparseable
        syms = _parse_text(tok.decode([i]))
        if syms is None or len(syms) > p or vocab.PAD in syms:
            continue
        parse_ids[i, :len(syms)] = syms
        parse_len[i] = len(syms)
    words = tuple((vocab.size + i, tuple(vocab.TOKEN_TO_ID[c] for c in p))
                  for i, p in enumerate(phrases) if all(c in vocab.LETTERS for c in p))
    return TokenizerBridge(render_ids, render_len, symbol_kinds(phrases), phrases, words,
                           parse_ids, parse_len, tuple(pp), tuple(ps),
                           tuple(op), tuple(os_), stop_ids, int(eot), v, tags, tuple(added))


def init_new_rows(table: np.ndarray, old_rows: int, new_rows: int) -> np.ndarray:
    """An embedding / unembedding table ([V, D] rows) with rows ``[old_rows, new_rows)`` set to
    the mean of rows ``[0, old_rows)`` (a new token starts as the average token: its logit is
    the average logit, and its embedding sits inside the distribution the model knows); the
    table grows when ``new_rows > len(table)``."""
    table = np.asarray(table)
    out = np.zeros((max(new_rows, table.shape[0]),) + table.shape[1:], table.dtype)
    out[:table.shape[0]] = table
    mean = table[:old_rows].astype(np.float32).mean(0)
    out[old_rows:new_rows] = mean.astype(table.dtype)
    return out


# ============================================================================ jit: render / parse
def _space_flags(kinds: np.ndarray, row: jax.Array, n: jax.Array) -> jax.Array:
    """1 where ``vocab.decode`` writes a space before position i (``kinds``: ``symbol_kinds``)."""
    kind = jnp.asarray(kinds)[row]
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), kind[:-1]])
    glued = ((kind == prev) & ((kind == 1) | (kind == 2))) | (kind == 5)
    pos = jnp.arange(row.shape[0])
    return ((pos > 0) & ~glued & (pos < n)).astype(jnp.int32)


def _fuse_runs(syms: jax.Array, n: jax.Array, patterns, whole_letter_runs: bool = False):
    """Replace each run of the first ``n`` symbols that spells a pattern by the pattern's symbol
    (``patterns``: (symbol, its symbols) pairs; ``whole_letter_runs``: only runs of letters with
    no letter before or after): ([M] symbols, PAD after; count)."""
    m = syms.shape[0]
    pos = jnp.arange(m)
    start = jnp.full((m,), -1, jnp.int32)
    skip = jnp.zeros((m + 1,), jnp.int32)
    is_letter = (syms >= vocab.LETTER_A) & (syms < vocab.LETTER_A + 26) & (pos < n)
    before = jnp.concatenate([jnp.zeros((1,), bool), is_letter[:-1]])
    for sym, pat in patterns:
        k = len(pat)
        if k > m:
            continue
        ok = pos + k <= n
        if whole_letter_runs:
            after = jnp.concatenate([is_letter[k:], jnp.zeros((k,), bool)])
            ok = ok & is_letter & ~before & ~after
        for j, s in enumerate(pat):
            ok = ok & (jnp.roll(syms, -j) == s)
        start = jnp.where(ok, sym, start)
        skip = skip.at[jnp.where(ok, pos + 1, m)].add(1, mode="drop")
        skip = skip.at[jnp.where(ok, pos + k, m)].add(-1, mode="drop")
    covered = jnp.cumsum(skip[:m]) > 0
    val = jnp.where(start >= 0, start, syms)
    keep = ~covered & (pos < n)
    dest = jnp.where(keep, jnp.cumsum(keep) - 1, m)
    out = jnp.full((m,), vocab.PAD, jnp.int32).at[dest].set(val, mode="drop")
    return out, keep.sum().astype(jnp.int32)


def fuse_words(bridge: TokenizerBridge, row: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replace each whole run of letters that spells a word phrase of the env (``bridge.words``,
    e.g. a name in an action ``<search> g i n a``) by that phrase's symbol, so that it renders
    as the tokenizer writes the word: ([L] symbols, PAD after; count)."""
    return _fuse_runs(row, n, bridge.words, whole_letter_runs=True)


def render_symbols(bridge: TokenizerBridge, row: jax.Array, n: jax.Array, out_len: int):
    """Token ids of the first ``n`` symbols of ``row`` (int32 [L]): (ids [out_len] filled with
    -1, count). ``out_len`` must be at least ``bridge.row_bound(L)``. Letter runs that spell a
    word phrase render as that phrase (``fuse_words``)."""
    row = jnp.clip(row.astype(jnp.int32), 0, bridge.render_len.shape[1] - 1)
    if bridge.words:
        row, n = fuse_words(bridge, row, n)
    sp = _space_flags(bridge.symbol_kind, row, n)
    ids = jnp.asarray(bridge.render_ids)[sp, row]                   # [L, R]
    lens = jnp.where(jnp.arange(row.shape[0]) < n, jnp.asarray(bridge.render_len)[sp, row], 0)
    return _scatter_runs(ids, lens, out_len, FILL)


def _scatter_runs(vals: jax.Array, lens: jax.Array, out_len: int, fill: int):
    """Concatenate the first ``lens[i]`` entries of each row ``vals[i]`` into [out_len]."""
    offs = jnp.cumsum(lens) - lens
    j = jnp.arange(vals.shape[1])[None]
    dest = jnp.where(j < lens[:, None], offs[:, None] + j, out_len)
    out = jnp.full((out_len,), fill, jnp.int32).at[dest.reshape(-1)].set(
        vals.reshape(-1).astype(jnp.int32), mode="drop")
    return out, lens.sum()


def _place(parts: Sequence[tuple], out_len: int) -> jax.Array:
    """Concatenate (ids, count) pieces (constants given as tuples) into [out_len], -1 after."""
    out = jnp.full((out_len,), FILL, jnp.int32)
    at = jnp.int32(0)
    for piece in parts:
        if isinstance(piece, tuple) and all(isinstance(x, (int, np.integer)) for x in piece):
            if not piece:
                continue
            ids, n = jnp.asarray(piece, jnp.int32), len(piece)
        else:
            ids, n = piece
        if ids.shape[0] == 0:
            continue
        k = jnp.arange(ids.shape[0])
        out = out.at[jnp.where(k < n, at + k, out_len)].set(ids, mode="drop")
        at = at + n
    return out


def fuse_text_tags(syms: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replace each run ``< name >`` of symbols that spells an env tag by the tag symbol:
    ([M] symbols, PAD after; count)."""
    return _fuse_runs(syms, n, [(vocab.TOKEN_TO_ID[t], p) for t, p in zip(_TAGS, _TAG_PATTERNS)])


def parse_action(bridge: TokenizerBridge, ids: jax.Array, out_len: int) -> jax.Array:
    """A generated action (int32 [A], -1 after its real ids) → the env's action row [out_len]
    (symbols, ``<pad>`` after). An unparseable token, or more symbols than the row holds,
    gives ``<err> <eos>`` (a format error in every env)."""
    valid = jnp.cumprod(ids >= 0).astype(bool)
    safe = jnp.clip(ids, 0, bridge.parse_len.shape[0] - 1)
    plen = jnp.where(valid, jnp.asarray(bridge.parse_len)[safe], 0)
    bad = (plen < 0).any()
    syms, n = _scatter_runs(jnp.asarray(bridge.parse_ids)[safe], jnp.maximum(plen, 0),
                            ids.shape[0] * bridge.parse_ids.shape[1], vocab.PAD)
    syms, n = fuse_text_tags(syms, n)
    # the env reads up to the first <eos>: what follows a stop id is not part of the action
    pos = jnp.arange(syms.shape[0])
    is_eos = (syms == vocab.EOS) & (pos < n)
    n = jnp.where(is_eos.any(), jnp.argmax(is_eos) + 1, n)
    bad = bad | (n > out_len)
    if syms.shape[0] < out_len:
        syms = jnp.pad(syms, (0, out_len - syms.shape[0]), constant_values=vocab.PAD)
    row = jnp.where(jnp.arange(out_len) < n, syms[:out_len], vocab.PAD)
    err = jnp.full((out_len,), vocab.PAD, jnp.int32).at[0].set(vocab.ERR)
    if out_len > 1:
        err = err.at[1].set(vocab.EOS)
    return jnp.where(bad, err, row).astype(jnp.int32)


# ============================================================================ the bridged env
def _row_length(row: jax.Array) -> jax.Array:
    return jnp.cumprod(row != vocab.PAD).sum().astype(jnp.int32)


class BridgedEnv(Env):
    """``env`` in the tokenizer's ids (see the module docstring). The prompt: int32
    [prompt_len]; observations: int32 [obs_len] (the chat pieces around the rendered
    observation, -1 after); actions: int32 [action_len] model ids, -1 after (the rollout stops
    a turn at any of ``stop_ids``)."""

    fill_id = FILL
    fill_ends_action = False

    def __init__(self, env: Env, bridge: TokenizerBridge, action_tokens: int | None = None,
                 tokenizer: Any = None):
        phrases = tuple(getattr(env, "phrases", ()))
        if phrases != bridge.phrases:
            raise ValueError(f"env {env.name!r} writes {len(phrases)} phrases but the bridge was "
                             f"built with {len(bridge.phrases)}: build_bridge(..., "
                             f"phrases=env.phrases)")
        self.env, self.bridge = env, bridge
        self.tokenizer = tokenizer            # optional: for readable episode text (logs)
        self.name = env.name
        self.max_turns = env.max_turns
        self.format_penalty = env.format_penalty
        self.stop_ids = bridge.stop_ids
        self._render_len = bridge.row_bound(env.obs_len)
        # observations after the prompt may be shorter than it (``Env.step_obs_len``)
        self._obs_render_len = bridge.row_bound(min(env.obs_len, env.step_obs_len or env.obs_len))
        # the prompt (system / user header ... assistant header) and each observation (user
        # turn) have their own row lengths
        self.prompt_len = len(bridge.prompt_prefix) + len(bridge.prompt_suffix) + self._render_len
        self.obs_len = len(bridge.obs_prefix) + len(bridge.obs_suffix) + self._obs_render_len
        need = bridge.row_bound(env.action_len - 1, actions=True) + 1
        if action_tokens is None:
            action_tokens = need
        if isinstance(action_tokens, bool) or not isinstance(action_tokens, int) or action_tokens < 2:
            raise ValueError(f"action_tokens must be an int >= 2, got {action_tokens!r}")
        self.action_len = action_tokens

    @property
    def unwrapped(self) -> Env:
        return self.env

    @property
    def max_episode_tokens(self) -> int:
        return self.prompt_len + self.max_turns * (self.action_len + self.obs_len)

    def _render_obs(self, row, prefix, suffix, length, render_len):
        ids, n = render_symbols(self.bridge, row, _row_length(row), render_len)
        return _place([prefix, (ids, n), suffix], length)

    def reset(self, key):
        """The task prompt as int32 [prompt_len] (not obs_len) ids, -1 after."""
        state, ts = self.env.reset(key)
        obs = self._render_obs(ts.observation, self.bridge.prompt_prefix, self.bridge.prompt_suffix,
                               self.prompt_len, self._render_len)
        return state, ts.replace(observation=obs)

    def env_action(self, action):
        """The env's symbol row for a generated action (model ids, -1 after)."""
        return parse_action(self.bridge, jnp.asarray(action, jnp.int32), self.env.action_len)

    def step(self, state, action):
        state, ts = self.env.step(state, self.env_action(action))
        obs = self._render_obs(ts.observation, self.bridge.obs_prefix, self.bridge.obs_suffix,
                               self.obs_len, self._obs_render_len)
        return state, ts.replace(observation=obs)

    def render_action(self, action_symbols):
        """An env action row (symbols up to ``<eos>``) in model ids: its rendering, then the
        end-of-turn stop id, -1 after (what a demonstration looks like to the model)."""
        row = jnp.asarray(action_symbols, jnp.int32)
        body = jnp.cumprod((row != vocab.PAD) & (row != vocab.EOS)).sum().astype(jnp.int32)
        ids, n = render_symbols(self.bridge, row, body, self.bridge.row_bound(row.shape[0],
                                                                              actions=True))
        return _place([(ids, n), (self.bridge.end_of_turn,)], self.action_len)

    def oracle_action(self, state, key):
        return self.render_action(self.env.oracle_action(state, key))

    def render(self, state) -> str:
        return self.env.render(state)


# ============================================================================ host checks
def check_canonical(env: BridgedEnv, tokenizer, episodes: int = 32, seed: int = 0) -> dict:
    """Fraction of rendered observations and oracle actions (``episodes`` oracle episodes) whose
    ids equal ``tokenizer.encode`` of their text, and a first example of a difference."""
    inner, b = env.env, env.bridge
    keys = jax.random.split(jax.random.PRNGKey(seed), episodes)
    state, ts = jax.vmap(inner.reset)(keys)
    rows = [np.asarray(ts.observation)]
    acts = []
    step = jax.jit(jax.vmap(inner.step))
    oracle = jax.jit(jax.vmap(inner.oracle_action))
    for t in range(inner.max_turns):
        a = oracle(state, jax.random.split(jax.random.PRNGKey(seed + 1 + t), episodes))
        acts.append(np.asarray(a))
        state, ts = step(state, a)
        rows.append(np.asarray(ts.observation))
    rend = jax.jit(jax.vmap(lambda r: render_symbols(b, r, _row_length(r), env._render_len)))
    total = same = 0
    example = None
    for kind, batch in [("observation", np.concatenate(rows)), ("action", np.concatenate(acts))]:
        if kind == "action":
            batch = np.where(np.cumsum(batch == vocab.EOS, 1) - (batch == vocab.EOS) > 0,
                             vocab.PAD, batch)
            batch = np.where(batch == vocab.EOS, vocab.PAD, batch)
        ids, n = rend(jnp.asarray(batch))
        ids, n = np.asarray(ids), np.asarray(n)
        for row, r_ids, r_n in zip(batch, ids, n):
            text = vocab.decode(row, phrases=b.phrases)
            want = _encode(tokenizer, text)
            total += 1
            if list(r_ids[:r_n]) == want:
                same += 1
            elif example is None:
                example = (kind, text, list(r_ids[:r_n]), want)
    return {"checked": total, "canonical_fraction": same / max(total, 1), "example": example}


def warn_if_not_canonical(env: BridgedEnv, tokenizer, **kw) -> dict:
    rep = check_canonical(env, tokenizer, **kw)
    if rep["canonical_fraction"] < 1.0:
        kind, text, ours, theirs = rep["example"]
        warnings.warn(
            f"tokenizer bridge: {1 - rep['canonical_fraction']:.0%} of {rep['checked']} rendered "
            f"{env.name} texts differ from the tokenizer's own encoding (e.g. {kind} {text!r}: "
            f"rendered {ours}, tokenizer.encode {theirs}); the model sees the rendered ids, which "
            f"decode to the same text", stacklevel=2)
    return rep


def oracle_texts(env: Env, episodes: int = 64, seed: int = 0) -> list[str]:
    """Texts of ``episodes`` oracle episodes of a symbol env (prompts, actions, observations,
    ``vocab.decode``-d): a corpus to train a tokenizer on."""
    keys = jax.random.split(jax.random.PRNGKey(seed), episodes)
    state, ts = jax.vmap(env.reset)(keys)
    ph = tuple(getattr(env, "phrases", ()))
    out = [vocab.decode(r, phrases=ph) for r in np.asarray(ts.observation)]
    step, oracle = jax.jit(jax.vmap(env.step)), jax.jit(jax.vmap(env.oracle_action))
    for t in range(env.max_turns):
        active = ~np.asarray(state.done)
        a = oracle(state, jax.random.split(jax.random.fold_in(keys[0], t), episodes))
        state, ts = step(state, a)
        out += [vocab.decode(r, phrases=ph) for r, on in zip(np.asarray(a), active) if on]
        out += [vocab.decode(r, phrases=ph) for r, on in zip(np.asarray(ts.observation), active)
                if on]
    return out
