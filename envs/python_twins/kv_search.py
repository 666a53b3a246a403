"""Plain-Python twin of ``envs.tasks.kv_search.KvSearchEnv``: the same semantics written the way
a Python env library would (dicts of facts, text in, text out), for cross-checks and speed
comparisons.

    twin = KvSearchTwin.from_state(jax_state, env)      # knobs read from env (or defaults)
    obs_text, reward, terminated, truncated, info = twin.step("<search> a 3 r <eos>")

``step`` takes the action as text, e.g. ``vocab.decode(action_tokens, skip_pad=False)``: the
command is the text before the first ``<eos>`` / ``<pad>``, cut into items by a small lexer (as decode
writes them: a tag, an operator, a number or a word per item). The knowledge base, chain and
per-turn noise draws come from the jitted env's reset state (the noise draws are part of the
hidden state there too).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

# one item per tag, number, word or other character (what decode separates by spaces)
LEXER = re.compile(r"<[a-z]+>|[0-9]+|[a-z]+|\S")


def _code(c: int) -> str:
    return f"{chr(97 + c // 10)}{c % 10}"


class KvSearchTwin:
    def __init__(self, entities: list[str], relations: list[str], facts: dict[tuple[str, str], str],
                 chain: list[str], chain_rels: list[str], noise_flip: list[bool], noise_obj: list[int], *,
                 max_turns: int, search_cost: float = 0.01, format_penalty: float = 0.1,
                 turn: int = 0, hop: int = 0, n_searches: int = 0, terminated: bool = False,
                 truncated: bool = False):
        self.entities = list(entities)          # entity codes, e.g. "a3", in index order
        self.relations = list(relations)        # relation letters
        self.facts = dict(facts)                # (entity, relation) -> entity
        self.chain = list(chain)                # e0 .. ek
        self.chain_rels = list(chain_rels)      # r1 .. rk
        self.noise_flip = list(noise_flip)
        self.noise_obj = list(noise_obj)
        self.max_turns = max_turns
        self.search_cost = search_cost
        self.format_penalty = format_penalty
        self.turn = turn
        self.hop = hop
        self.n_searches = n_searches
        self.terminated = terminated
        self.truncated = truncated

    @classmethod
    def from_state(cls, state: Any, env: Any = None) -> "KvSearchTwin":
        """Build from a single (unbatched) ``KvSearchState`` (jax or numpy leaves)."""
        codes = [_code(int(c)) for c in np.asarray(state.ent_codes)]
        rels = [chr(97 + int(r)) for r in np.asarray(state.rel_letters)]
        table = np.asarray(state.table)
        facts = {(codes[e], rels[r]): codes[int(table[e, r])]
                 for e in range(table.shape[0]) for r in range(table.shape[1]) if table[e, r] >= 0}
        hops = int(np.asarray(state.chain_rels).shape[0])
        knobs = dict(max_turns=2 * hops + 2, search_cost=0.01, format_penalty=0.1)
        if env is not None:
            knobs = {k: getattr(env, k) for k in knobs}
        return cls(codes, rels, facts,
                   [codes[int(c)] for c in np.asarray(state.chain)],
                   [rels[int(r)] for r in np.asarray(state.chain_rels)],
                   [bool(x) for x in np.asarray(state.noise_flip)],
                   [int(x) for x in np.asarray(state.noise_obj)],
                   turn=int(state.turn), hop=int(state.hop), n_searches=int(state.n_searches),
                   terminated=bool(state.terminated), truncated=bool(state.truncated), **knobs)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def prompt(self) -> str:
        return f"<task> {self.chain[0]} {''.join(self.chain_rels)} ?"

    def _info(self, success=False, format_error=False) -> dict:
        return {"success": success, "format_error": format_error,
                "n_searches": self.n_searches, "hop": self.hop}

    @staticmethod
    def _entity(items: list[str]) -> str | None:
        """["a", "3"] -> "a3" (a one-letter word then a one-digit number), else None."""
        if len(items) == 2 and len(items[0]) == 1 and items[0].isalpha() and items[0].islower() \
                and len(items[1]) == 1 and items[1].isdigit():
            return items[0] + items[1]
        return None

    def _search(self, entity: str, relation: str) -> tuple[str | None, bool]:
        """(shown object or None, whether this turn's noise corrupted it)."""
        obj = self.facts.get((entity, relation))
        t = min(self.turn, self.max_turns - 1)
        if obj is not None and self.noise_flip[t]:
            i = self.entities.index(obj)
            obj = self.entities[(i + self.noise_obj[t]) % len(self.entities)]
            return obj, True
        return obj, False

    def step(self, action_text: str):
        if self.done:
            return "<obs>", 0.0, self.terminated, self.truncated, self._info()
        items = LEXER.findall(action_text.split("<eos>")[0].split("<pad>")[0])
        head, rest = (items[0], items[1:]) if items else ("", [])
        if head == "<search>" and len(rest) == 3 and self._entity(rest[:2]) \
                and len(rest[2]) == 1 and rest[2].isalpha() and rest[2].islower():
            entity, relation = self._entity(rest[:2]), rest[2]
            obj, corrupted = self._search(entity, relation)
            if (self.hop < len(self.chain_rels) and entity == self.chain[self.hop]
                    and relation == self.chain_rels[self.hop] and not corrupted):
                self.hop += 1
            self.n_searches += 1
            obs = f"<obs> <result> {obj}" if obj is not None else "<obs> <result> <no>"
            reward, info = -self.search_cost, self._info()
        elif head == "<answer>" and self._entity(rest):
            correct = self._entity(rest) == self.chain[-1]
            self.terminated = True
            obs = "<obs> <yes>" if correct else "<obs> <no>"
            reward, info = (1.0 if correct else 0.0), self._info(success=correct)
        else:
            obs, reward, info = "<obs> <err>", -self.format_penalty, self._info(format_error=True)
        self.turn += 1
        if not self.terminated and self.turn >= self.max_turns:
            self.truncated = True
        return obs, reward, self.terminated, self.truncated, info

    def oracle_command(self) -> str:
        """Search the next chain link, or answer the chain's end once every link is found."""
        if self.hop >= len(self.chain_rels):
            return f"<answer> {self.chain[-1]} <eos>"
        e = self.chain[self.hop]
        return f"<search> {e[0]} {e[1]} {self.chain_rels[self.hop]} <eos>"
