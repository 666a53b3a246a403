"""KeyChain: follow a chain of keys hidden among distractors (long-horizon, long-context).

Task (after LoongRL's KeyChain). A hidden table maps ``chain_len`` distinct keys (codes of
``key_len`` letters, default 2) to records: the record of key ``k_i`` holds the next key
``k_{i+1}`` hidden among ``n_distractors`` decoy codes (default 6) at a random slot, and the
record of the last key holds the goal value (``value_len`` digits, default 3). The prompt
gives the start key ``k_0``; the final answer is the value behind the end of the chain.
Records are long (22 tokens at the defaults), so an oracle episode of ``chain_len + 1`` turns
(``episode_tokens_needed`` = 211 tokens at the defaults) overflows a short context window.
At every step the only thing the agent needs to continue is the last key (or the value) it
read, so a policy that writes ``<summary> KEY`` can go on after its context is reset to
[task prompt + summary], while a policy without summarization fails once the context is
shorter than the episode.

Commands. ``<search> KEY <eos>`` (``key_len`` letters) looks a key up;
``<answer> VALUE <eos>`` (``value_len`` digits) ends the episode. Anything else is a format
error: ``<obs> <err>``, reward ``-format_penalty``, the turn is used.

Observations. A chain key's record: ``<obs>`` then ``n_distractors + 1`` slots, each a marker
and a code; the marker is ``<result>`` before the true next key and ``<sep>`` before a decoy
(decoys are never chain keys). The last key's record: ``<obs> <goal> VALUE``. A key not in the
table: ``<obs> <no>`` (reward 0, the turn is used). After an answer: ``<obs> <yes>`` if it is
right, ``<obs> <no>`` if not.

Rewards. 1 for the exact value (terminated, success), 0 for a wrong answer (terminated) and
for every lookup; ``-format_penalty`` for a malformed turn. Truncation after ``max_turns``
(default ``2 * chain_len + 2``). The state keeps ``progress``, the number of keys whose
record has been revealed (bookkeeping for the oracle, which searches ``k_progress`` and then
answers).

Example episode (``chain_len = 2``, ``n_distractors = 2``)::

    <task> keychain <result> qm
    <search> qm <eos>      <obs> <sep> xa <result> bt <sep> kf
    <search> kf <eos>      <obs> <no>                         (a decoy)
    <search> bt <eos>      <obs> <goal> 471
    <answer> 471 <eos>     <obs> <yes>                        (+1, terminated, success)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import token_ops, vocab
from envs.base import Env, TimeStep, finish_step

N_LETTERS = 26
_KEYCHAIN_WORD = [vocab.TOKEN_TO_ID[c] for c in "keychain"]


@struct.dataclass
class KeychainState:
    key: jax.Array          # PRNG key of the episode
    turn: jax.Array         # int32 []
    done: jax.Array         # bool []
    terminated: jax.Array   # bool []
    truncated: jax.Array    # bool []
    chain: jax.Array        # int32 [chain_len, key_len], letter indices of k_0 .. k_{n-1}
    value: jax.Array        # int32 [value_len], digits of the goal value
    records: jax.Array      # int32 [chain_len, obs_len], the observation behind each chain key
    progress: jax.Array     # int32 [], records revealed so far (0 .. chain_len)


class KeychainEnv(Env):
    """Key-chain following with distractors; see the module docstring."""

    name = "keychain"

    def __init__(self, chain_len: int = 6, key_len: int = 2, n_distractors: int = 6, value_len: int = 3,
                 max_turns: int | None = None, format_penalty: float = 0.1):
        if not isinstance(key_len, (int, np.integer)) or not 1 <= key_len <= 3:
            raise ValueError(f"key_len must be an int in [1, 3], got {key_len!r}")
        n_codes = N_LETTERS ** int(key_len)
        if not isinstance(chain_len, (int, np.integer)) or not 1 <= chain_len <= n_codes // 2:
            raise ValueError(f"chain_len must be an int in [1, {n_codes // 2}] for key_len={key_len}, "
                             f"got {chain_len!r}")
        if not isinstance(n_distractors, (int, np.integer)) or not 0 <= n_distractors <= 64:
            raise ValueError(f"n_distractors must be an int in [0, 64], got {n_distractors!r}")
        if not isinstance(value_len, (int, np.integer)) or not 1 <= value_len <= 8:
            raise ValueError(f"value_len must be an int in [1, 8], got {value_len!r}")
        if max_turns is None:
            max_turns = 2 * int(chain_len) + 2
        if not isinstance(max_turns, (int, np.integer)) or max_turns < 1:
            raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
        if not 0.0 <= float(format_penalty) <= 10.0:
            raise ValueError(f"format_penalty must be in [0, 10], got {format_penalty!r}")
        self.chain_len = int(chain_len)
        self.key_len = int(key_len)
        self.n_codes = n_codes
        self.n_distractors = int(n_distractors)
        self.value_len = int(value_len)
        self.max_turns = int(max_turns)
        self.format_penalty = float(format_penalty)
        prompt_len = 2 + len(_KEYCHAIN_WORD) + self.key_len
        record_len = 1 + (self.n_distractors + 1) * (self.key_len + 1)
        self.obs_len = max(prompt_len, record_len, 2 + self.value_len)
        self.action_len = 2 + max(self.key_len, self.value_len)

    @property
    def episode_tokens_needed(self) -> int:
        """Tokens of a full oracle episode: prompt + (chain_len searches + 1 answer) turns."""
        return self.obs_len + (self.chain_len + 1) * (self.action_len + self.obs_len)

    # ------------------------------------------------------------------ generation
    def _code_letters(self, code: jax.Array) -> jax.Array:
        """Code in [0, 26**key_len) -> letter indices [..., key_len], most significant first."""
        powers = N_LETTERS ** jnp.arange(self.key_len - 1, -1, -1)
        return ((code[..., None] // powers) % N_LETTERS).astype(jnp.int32)

    def reset(self, key: jax.Array) -> tuple[KeychainState, TimeStep]:
        key, k_gen = jax.random.split(key)
        n, nd = self.chain_len, self.n_distractors
        nd1 = max(nd, 1)
        # one draw of random bits for everything (cheap to compile); x % m has bias < m / 2**32
        bits = jax.random.bits(k_gen, (3 * n + n * nd1 + self.value_len,), jnp.uint32)
        draw, perm, slot_bits = bits[:n], bits[n:2 * n], bits[2 * n:3 * n]
        dis_bits, val_bits = bits[3 * n:3 * n + n * nd1], bits[3 * n + n * nd1:]
        # n distinct codes: sorted draws r_(i) in [0, M - n] plus i are strictly increasing; shuffled
        r = jnp.sort((draw % jnp.uint32(self.n_codes - n + 1)).astype(jnp.int32))
        chain_codes = (r + jnp.arange(n))[jnp.argsort(perm)]
        dis = (dis_bits % jnp.uint32(self.n_codes)).astype(jnp.int32).reshape(n, nd1)

        def shift(_, d):  # move a decoy off the chain: after n shifts it is on no chain key
            return jnp.where(jnp.any(d[..., None] == chain_codes, axis=-1), (d + 1) % self.n_codes, d)

        dis = jax.lax.fori_loop(0, n, shift, dis)
        real_slot = (slot_bits % jnp.uint32(nd + 1)).astype(jnp.int32)
        value = (val_bits % jnp.uint32(10)).astype(jnp.int32)
        slots = jnp.arange(nd + 1)
        next_codes = jnp.roll(chain_codes, -1)

        def record(i):
            codes = jnp.where(slots == real_slot[i], next_codes[i],
                              dis[i, jnp.clip(slots - (slots > real_slot[i]), 0, max(nd, 1) - 1)])
            markers = jnp.where(slots == real_slot[i], vocab.RESULT, vocab.SEP)
            body = jnp.concatenate([markers[:, None], self._code_letters(codes) + vocab.LETTER_A], axis=1)
            chain_row = token_ops.make_row([vocab.OBS, body.reshape(-1)], self.obs_len)
            goal_row = token_ops.make_row([vocab.OBS, vocab.GOAL, value + vocab.DIGIT_0], self.obs_len)
            return jnp.where(i == n - 1, goal_row, chain_row)

        records = jax.vmap(record)(jnp.arange(n))
        chain = self._code_letters(chain_codes)
        state = KeychainState(key=key, turn=jnp.int32(0), done=jnp.bool_(False), terminated=jnp.bool_(False),
                              truncated=jnp.bool_(False), chain=chain, value=value, records=records,
                              progress=jnp.int32(0))
        prompt = token_ops.make_row([vocab.TASK, jnp.array(_KEYCHAIN_WORD), vocab.RESULT,
                                     chain[0] + vocab.LETTER_A], self.obs_len)
        ts = TimeStep(observation=prompt, reward=jnp.float32(0.0), terminated=jnp.bool_(False),
                      truncated=jnp.bool_(False), info=self._info(False, False, 0, False))
        return state, ts

    def _info(self, success, format_error, progress, found):
        return {"success": jnp.asarray(success, bool), "format_error": jnp.asarray(format_error, bool),
                "progress": jnp.asarray(progress, jnp.int32), "found": jnp.asarray(found, bool)}

    def step(self, state: KeychainState, action: jax.Array) -> tuple[KeychainState, TimeStep]:
        action = token_ops.action_row(action, self.action_len)
        length = token_ops.action_length(action)
        letters = token_ops.letter_index(action[1:1 + self.key_len])     # -1 if not a letter
        digits = token_ops.digit_value(action[1:1 + self.value_len])     # -1 if not a digit
        is_search = ((action[0] == vocab.SEARCH) & (length == 1 + self.key_len)
                     & jnp.all((letters >= 0) & (letters < N_LETTERS)))
        is_answer = ((action[0] == vocab.ANSWER) & (length == 1 + self.value_len)
                     & jnp.all((digits >= 0) & (digits < 10)))
        fmt_ok = is_search | is_answer
        hit = jnp.all(state.chain == letters[None, :], axis=1)            # [chain_len]
        found = is_search & hit.any()
        idx = jnp.argmax(hit)
        correct = is_answer & jnp.all(digits == state.value)
        progress = jnp.where(found, jnp.maximum(state.progress, idx + 1), state.progress).astype(jnp.int32)
        reward = jnp.where(~fmt_ok, -self.format_penalty, jnp.where(correct, 1.0, 0.0))
        obs = jnp.where(found, state.records[idx], token_ops.make_row([vocab.OBS, vocab.NO], self.obs_len))
        obs = jnp.where(correct, token_ops.make_row([vocab.OBS, vocab.YES], self.obs_len), obs)
        obs = jnp.where(fmt_ok, obs, token_ops.make_row([vocab.OBS, vocab.ERR], self.obs_len))
        return finish_step(self, state, terminated=is_answer, observation=obs, reward=reward,
                           info=self._info(correct, ~fmt_ok, progress, found),
                           idle_info=self._info(False, False, state.progress, False),
                           progress=progress)

    def oracle_action(self, state: KeychainState, key: jax.Array) -> jax.Array:
        """``<search> k_progress`` until the goal record is revealed, then ``<answer> value``."""
        del key
        k = state.chain[jnp.clip(state.progress, 0, self.chain_len - 1)]
        search = token_ops.make_row([vocab.SEARCH, k + vocab.LETTER_A, vocab.EOS], self.action_len)
        answer = token_ops.make_row([vocab.ANSWER, state.value + vocab.DIGIT_0, vocab.EOS], self.action_len)
        return jnp.where(state.progress >= self.chain_len, answer, search)

    def render(self, state: KeychainState) -> str:
        keys = ["".join(vocab.LETTERS[int(c)] for c in row) for row in np.asarray(state.chain)]
        value = "".join(str(int(d)) for d in np.asarray(state.value))
        return (f"keychain {' -> '.join(keys)} -> {value} progress={int(state.progress)}/{self.chain_len} "
                f"turn={int(state.turn)}/{self.max_turns}")

    def __repr__(self) -> str:
        return (f"KeychainEnv(chain_len={self.chain_len}, key_len={self.key_len}, "
                f"n_distractors={self.n_distractors}, value_len={self.value_len}, max_turns={self.max_turns})")
