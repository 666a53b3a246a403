"""Plain-Python twin of ``envs.tasks.maze.MazeEnv``: the same semantics written the way a
Python env library would (lists of strings, text in, text out), for cross-checks and speed
comparisons.

    twin = MazeTwin.from_state(jax_state, env)      # knobs read from env (or defaults)
    obs_text, reward, terminated, truncated, info = twin.step("n <eos>")

``step`` takes the action as text, e.g. ``vocab.decode(action_tokens, skip_pad=False)``: the
command is the text before the first ``<eos>`` / ``<pad>``. The distance field used for
``info["distance"]`` is recomputed here by a queue-based BFS (independent of the jitted
iterated relaxation).
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

MOVES = {"n": (-1, 0), "e": (0, 1), "s": (1, 0), "w": (0, -1)}
ORDER = "nesw"


class MazeTwin:
    def __init__(self, grid: list[str], pos: tuple[int, int], goal: tuple[int, int], *, max_turns: int,
                 illegal_penalty: float = 1.0, max_illegal: int = 2, step_cost: float = 0.01,
                 format_penalty: float = 0.1, turn: int = 0, n_illegal: int = 0,
                 terminated: bool = False, truncated: bool = False):
        self.grid = list(grid)                      # rows of "#" (wall) / "." (open)
        self.size = len(grid)
        self.pos = tuple(pos)
        self.goal = tuple(goal)
        self.max_turns = max_turns
        self.illegal_penalty = illegal_penalty
        self.max_illegal = max_illegal
        self.step_cost = step_cost
        self.format_penalty = format_penalty
        self.turn = turn
        self.n_illegal = n_illegal
        self.terminated = terminated
        self.truncated = truncated
        self.distance = self._bfs()

    @classmethod
    def from_state(cls, state: Any, env: Any = None) -> "MazeTwin":
        """Build from a (single, unbatched) ``MazeState``; knobs from ``env`` if given, else the
        ``MazeEnv`` defaults (random generator: max_turns = 4 (size - 1))."""
        walls = np.asarray(state.walls)
        size = walls.shape[0]
        grid = ["".join("#" if w else "." for w in row) for row in walls.tolist()]
        knobs = dict(max_turns=4 * (size - 1), illegal_penalty=1.0, max_illegal=2, step_cost=0.01,
                     format_penalty=0.1)
        if env is not None:
            knobs = {k: getattr(env, k) for k in knobs}
        pos = tuple(int(x) for x in np.asarray(state.pos))
        goal = tuple(int(x) for x in np.asarray(state.goal))
        return cls(grid, pos, goal,
                   turn=int(state.turn), n_illegal=int(state.n_illegal), terminated=bool(state.terminated),
                   truncated=bool(state.truncated), **knobs)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def _is_open(self, r: int, c: int) -> bool:
        return 0 <= r < self.size and 0 <= c < self.size and self.grid[r][c] == "."

    def _bfs(self) -> dict[tuple[int, int], int]:
        dist = {self.goal: 0}
        queue = deque([self.goal])
        while queue:
            r, c = queue.popleft()
            for dr, dc in MOVES.values():
                nxt = (r + dr, c + dc)
                if self._is_open(*nxt) and nxt not in dist:
                    dist[nxt] = dist[(r, c)] + 1
                    queue.append(nxt)
        return dist

    def _walls_text(self) -> str:
        r, c = self.pos
        return " ".join(d for d in ORDER if not self._is_open(r + MOVES[d][0], c + MOVES[d][1]))

    def _where(self) -> str:
        text = f"{self.pos[0]} , {self.pos[1]}"
        walls = self._walls_text()
        return f"{text} {walls}" if walls else text

    def prompt(self) -> str:
        return f"<task> maze {self._where()} <goal> {self.goal[0]} , {self.goal[1]}"

    def _info(self, success=False, format_error=False, illegal=False) -> dict:
        return {"success": success, "format_error": format_error, "illegal_move": illegal,
                "distance": self.distance.get(self.pos, self.size * self.size)}

    def step(self, action_text: str):
        if self.done:
            return "<obs>", 0.0, self.terminated, self.truncated, self._info()
        command = action_text.split("<eos>")[0].split("<pad>")[0].strip()
        self.turn += 1
        if command not in MOVES:
            obs, reward, info = "<obs> <err>", -self.format_penalty, self._info(format_error=True)
        else:
            dr, dc = MOVES[command]
            nxt = (self.pos[0] + dr, self.pos[1] + dc)
            if not self._is_open(*nxt):
                self.n_illegal += 1
                if self.max_illegal > 0 and self.n_illegal >= self.max_illegal:
                    self.terminated = True
                obs, reward, info = f"<obs> <no> {self._where()}", -self.illegal_penalty, self._info(illegal=True)
            else:
                self.pos = nxt
                if nxt == self.goal:
                    self.terminated = True
                    obs, reward, info = f"<obs> <goal> {nxt[0]} , {nxt[1]}", 1.0, self._info(success=True)
                else:
                    obs, reward, info = f"<obs> {self._where()}", -self.step_cost, self._info()
        if not self.terminated and self.turn >= self.max_turns:
            self.truncated = True
        return obs, reward, self.terminated, self.truncated, info

    def oracle_command(self) -> str:
        """A move along a shortest path (first in n, e, s, w order)."""
        here = self.distance[self.pos]
        for d in ORDER:
            nxt = (self.pos[0] + MOVES[d][0], self.pos[1] + MOVES[d][1])
            if self.distance.get(nxt, -1) == here - 1:
                return d
        raise ValueError(f"no shortest-path move from {self.pos} (goal {self.goal})")
