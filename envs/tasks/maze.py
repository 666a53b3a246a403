"""Maze: grid navigation with partial text observations (LMRL-Gym style).

Task. Every episode draws a new ``size x size`` maze (always solvable), a start cell and a
different goal cell. The agent never sees the map: the prompt and every observation give only
its own position ``r , c`` (row 0 is the north edge, column 0 the west edge) and the letters of
the neighbouring cells that are blocked (a wall or outside the grid), in the fixed order
``n e s w``; the prompt also gives the goal position. Two generators: ``"random"`` (default;
each cell is a wall with probability ``wall_density``, then a random monotone staircase path
from start to goal is carved open, so a path of length <= 2 (size - 1) always exists) and
``"perfect"`` (odd ``size``; rooms on even coordinates joined by a random spanning tree,
randomized Kruskal with union-find relabelling under ``lax.fori_loop``; exactly one path).

Commands. One direction letter, then ``<eos>``: ``n`` (row - 1), ``s`` (row + 1), ``e``
(column + 1), ``w`` (column - 1). Anything else is a format error: ``<obs> <err>``, reward
``-format_penalty``, position unchanged.

Observations. ``<obs> r , c WALLS`` after a legal move; ``<obs> <no> r , c WALLS`` after an
illegal move (into a wall or off the grid; the agent stays where it was, LMRL-Gym convention);
``<obs> <goal> r , c`` when the goal is reached.

Rewards. +1 on reaching the goal (terminated, success); ``-illegal_penalty`` (default 1, as in
LMRL-Gym) for an illegal move; the ``max_illegal``-th illegal move (default 2; 0 = never)
ends the episode as a failure (terminated, not success); ``-step_cost`` (default 0.01) for
any other legal move. Truncation after ``max_turns`` turns (default: twice the bound on the
shortest path: 4 (size - 1) for ``"random"``, 2 (open cells - 1) = 4 (rooms - 1) for
``"perfect"``). An episode's return is at most 1 and at least
``-illegal_penalty * max_illegal - max_turns * max(step_cost, format_penalty)`` (-3.6 at the
defaults).

Oracle. ``reset`` computes the BFS distance-to-goal field by iterated relaxation
(``d <- min(d, 1 + min of the 4 neighbours' d)`` over open cells, ``size**2`` rounds under
``lax.fori_loop``) and stores it in the state; the oracle moves to a neighbour whose
distance is one less (random tie-break), i.e. along a shortest path.

Speed. ``reset`` also packs the walls (1 bit a cell) and the distance field into int32 words
kept in the state (``MazeEnv.tables``, ``token_ops.pack_table``); ``step`` reads them by
shifts and small select chains, never by a gather, and builds the observation row as one
elementwise function of the position (``_observation_row``), so that under ``vmap`` XLA:CPU
emits vectorized loops over the batch (``benchmarks/env_throughput.py``).

Example episode (3 x 3 map ``.#. / ... / #..``, start 0 , 0, goal 2 , 2; decoded text, where
``new`` = walls to the north, east and west)::

    <task> maze 0 , 0 new <goal> 2 , 2
    e <eos>        <obs> <no> 0 , 0 new     (into a wall: -1, stays at 0 , 0)
    s <eos>        <obs> 1 , 0 sw           (-0.01)
    e <eos>        <obs> 1 , 1 n
    s <eos>        <obs> 2 , 1 sw
    e <eos>        <obs> <goal> 2 , 2       (+1, terminated, success)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import token_ops, vocab
from envs.base import Env, TimeStep, finish_step

# Direction order used everywhere (actions, wall letters, oracle): n, e, s, w.
DIR_LETTERS = ("n", "e", "s", "w")
DIR_TOKENS = np.array([vocab.TOKEN_TO_ID[c] for c in DIR_LETTERS], np.int32)
DIR_DELTAS = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], np.int32)
_MAZE_WORD = [vocab.TOKEN_TO_ID[c] for c in "maze"]
GENERATORS = ("random", "perfect")


@struct.dataclass
class MazeState:
    key: jax.Array          # PRNG key of the episode
    turn: jax.Array         # int32 [], turns taken
    done: jax.Array         # bool []
    terminated: jax.Array   # bool []
    truncated: jax.Array    # bool []
    walls: jax.Array        # bool [size, size], True = wall
    pos: jax.Array          # int32 [2], (row, col) of the agent
    goal: jax.Array         # int32 [2]
    start: jax.Array        # int32 [2]
    dist: jax.Array         # int32 [size, size], BFS distance to the goal (size**2 = unreachable)
    n_illegal: jax.Array    # int32 [], illegal moves so far
    wall_words: jax.Array   # int32 [ceil(size**2 / 31)], walls packed 1 bit a cell (pack_table)
    dist_words: jax.Array   # int32 [...], dist packed dist_bits a cell (pack_table)


def bfs_distance(walls: jax.Array, goal: jax.Array) -> jax.Array:
    """Shortest-path distance (4-neighbour moves through open cells) from every cell to ``goal``.

    Iterated relaxation d <- min(d, 1 + min_{4 nbrs} d) restricted to open cells, size**2 rounds
    (enough for any path); walls and unreachable cells keep the value size**2.
    """
    h, w = walls.shape
    big = jnp.int32(h * w)
    d0 = jnp.full((h, w), big, jnp.int32).at[goal[0], goal[1]].set(0)
    open_ = ~walls

    def relax(_, d):
        p = jnp.pad(d, 1, constant_values=big)
        nb = jnp.minimum(jnp.minimum(p[:-2, 1:-1], p[2:, 1:-1]), jnp.minimum(p[1:-1, :-2], p[1:-1, 2:]))
        return jnp.where(open_, jnp.minimum(d, jnp.minimum(nb + 1, big)), big)

    return jax.lax.fori_loop(0, h * w, relax, d0)


class MazeEnv(Env):
    """Grid navigation with partial observations; see the module docstring."""

    name = "maze"

    def __init__(self, size: int = 5, wall_density: float = 0.3, generator: str = "random",
                 max_turns: int | None = None, illegal_penalty: float = 1.0, max_illegal: int = 2,
                 step_cost: float = 0.01, format_penalty: float = 0.1):
        if not isinstance(size, (int, np.integer)) or not 3 <= size <= 10:
            raise ValueError(f"size must be an int in [3, 10] (single-digit coordinates), got {size!r}")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if generator == "perfect" and size % 2 == 0:
            raise ValueError(f"size must be odd for generator='perfect', got {size!r}")
        if not 0.0 <= float(wall_density) <= 0.9:
            raise ValueError(f"wall_density must be in [0, 0.9], got {wall_density!r}")
        if not isinstance(max_illegal, (int, np.integer)) or max_illegal < 0:
            raise ValueError(f"max_illegal must be an int >= 0 (0 = unlimited), got {max_illegal!r}")
        for knob, val in (("illegal_penalty", illegal_penalty), ("step_cost", step_cost),
                          ("format_penalty", format_penalty)):
            if not 0.0 <= float(val) <= 10.0:
                raise ValueError(f"{knob} must be in [0, 10], got {val!r}")
        self.size = int(size)
        self.wall_density = float(wall_density)
        self.generator = generator
        if generator == "random":
            self.path_bound = 2 * (self.size - 1)
        else:
            rooms = ((self.size + 1) // 2) ** 2
            self.path_bound = 2 * rooms - 2          # open cells - 1 of a perfect maze
        if max_turns is None:
            max_turns = 2 * self.path_bound
        if not isinstance(max_turns, (int, np.integer)) or max_turns < 1:
            raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
        self.max_turns = int(max_turns)
        self.illegal_penalty = float(illegal_penalty)
        self.max_illegal = int(max_illegal)
        self.step_cost = float(step_cost)
        self.format_penalty = float(format_penalty)
        self.obs_len = 16       # prompt: <task> m a z e r , c n e s w <goal> r , c = 16 at most
        self.action_len = 4
        self.dist_bits = (self.size * self.size).bit_length()   # dist <= size**2

    # ------------------------------------------------------------------ generation
    def _generate_random(self, key):
        s = self.size
        n = s * s
        m = 2 * (s - 1)
        bits = jax.random.bits(key, (n + 2 + m,), jnp.uint32)   # one draw: cheap to compile
        walls = (bits[:n] >> 8).reshape(s, s).astype(jnp.float32) * (1.0 / (1 << 24)) < self.wall_density
        si = (bits[n] % n).astype(jnp.int32)
        gi = ((si + 1 + (bits[n + 1] % (n - 1)).astype(jnp.int32)) % n).astype(jnp.int32)
        start = jnp.stack([si // s, si % s]).astype(jnp.int32)
        goal = jnp.stack([gi // s, gi % s]).astype(jnp.int32)
        # carve a random monotone (staircase) path start -> goal: |dr| vertical and |dc|
        # horizontal unit steps (and m - |dr| - |dc| no-ops) in a random order
        diff = goal - start
        adr, adc = jnp.abs(diff[0]), jnp.abs(diff[1])
        slot = jnp.argsort(bits[n + 2:])                          # a random permutation of m
        vert = slot < adr
        horiz = (slot >= adr) & (slot < adr + adc)
        steps = (vert[:, None] * jnp.array([1, 0]) * jnp.sign(diff[0])
                 + horiz[:, None] * jnp.array([0, 1]) * jnp.sign(diff[1])).astype(jnp.int32)
        path = start[None, :] + jnp.cumsum(steps, axis=0)
        walls = walls.at[path[:, 0], path[:, 1]].set(False)
        walls = walls.at[start[0], start[1]].set(False)
        return walls, start, goal

    def _generate_perfect(self, key):
        s = self.size
        r = (s + 1) // 2
        # edges between rooms: horizontal (i,j)-(i,j+1) then vertical (i,j)-(i+1,j)
        edges = ([(i * r + j, i * r + j + 1) for i in range(r) for j in range(r - 1)]
                 + [(i * r + j, (i + 1) * r + j) for i in range(r - 1) for j in range(r)])
        edges = jnp.array(edges, jnp.int32)
        n_edges = edges.shape[0]
        bits = jax.random.bits(key, (n_edges + 2,), jnp.uint32)
        order = jnp.argsort(bits[:n_edges])                        # random edge order (Kruskal)
        rooms_rc = 2 * jnp.stack([jnp.arange(r * r) // r, jnp.arange(r * r) % r], axis=1)
        walls = jnp.ones((s, s), bool).at[rooms_rc[:, 0], rooms_rc[:, 1]].set(False)

        def add_edge(t, carry):
            comp, walls = carry
            a, b = edges[order[t], 0], edges[order[t], 1]
            ca, cb = comp[a], comp[b]
            join = ca != cb
            comp = jnp.where(join & (comp == cb), ca, comp)
            mid = (rooms_rc[a] + rooms_rc[b]) // 2
            walls = walls.at[mid[0], mid[1]].set(jnp.where(join, False, walls[mid[0], mid[1]]))
            return comp, walls

        _, walls = jax.lax.fori_loop(0, n_edges, add_edge, (jnp.arange(r * r), walls))
        n = r * r
        si = (bits[n_edges] % n).astype(jnp.int32)
        gi = ((si + 1 + (bits[n_edges + 1] % (n - 1)).astype(jnp.int32)) % n).astype(jnp.int32)
        return walls, rooms_rc[si].astype(jnp.int32), rooms_rc[gi].astype(jnp.int32)

    # ------------------------------------------------------------------ observations
    def _blocked(self, walls, pos):
        """bool [4]: neighbour in direction n, e, s, w is a wall or outside the grid."""
        padded = jnp.pad(walls, 1, constant_values=True)
        nb = pos[None, :] + DIR_DELTAS + 1
        return padded[nb[:, 0], nb[:, 1]]

    def _position_tokens(self, pos):
        return jnp.array([vocab.DIGIT_0, vocab.COMMA, vocab.DIGIT_0], jnp.int32) + jnp.stack(
            [pos[0], 0, pos[1]]).astype(jnp.int32)

    def _observation(self, walls, pos, bumped, at_goal):
        toks = jnp.concatenate([
            jnp.array([vocab.OBS, vocab.NO, vocab.GOAL], jnp.int32),
            self._position_tokens(pos), jnp.asarray(DIR_TOKENS)])
        keep = jnp.concatenate([
            jnp.array([True]), jnp.stack([bumped, at_goal]), jnp.ones(3, bool),
            self._blocked(walls, pos) & ~at_goal])
        return token_ops.pad_row(token_ops.pack_left(toks, keep), self.obs_len)

    def _observation_row(self, fmt_ok, illegal, at_goal, r, c, codes):
        """``_observation`` (pack_left of <obs> <no>? <goal>? r , c n? e? s? w?, padded; or
        <obs> <err> after a malformed action) in closed form, from per-env scalars: token j is
        the same elementwise function of j for every position (q = j - [a flag is shown], the
        k-th wall letter decoded from the 3-bit ``codes`` by a shift), so under vmap the row is
        one vectorized loop, not a per-position switch."""
        j = jnp.arange(self.obs_len, dtype=jnp.int32)
        flagged = illegal | at_goal
        q = j - flagged.astype(jnp.int32)
        code = (codes >> (3 * jnp.clip(q - 4, 0, 3))) & 7
        letter = jnp.full(j.shape, vocab.PAD, jnp.int32)
        for k in range(4):
            letter = jnp.where(code == k + 1, int(DIR_TOKENS[k]), letter)
        tok = jnp.where(q == 1, vocab.DIGIT_0 + r,
                        jnp.where(q == 2, vocab.COMMA,
                                  jnp.where(q == 3, vocab.DIGIT_0 + c,
                                            jnp.where((q >= 4) & (q < 8), letter, vocab.PAD))))
        flag = jnp.where(illegal, vocab.NO, vocab.GOAL)
        tok = jnp.where((j == 1) & flagged, flag, tok)
        tok = jnp.where(fmt_ok, tok, jnp.where(j == 1, vocab.ERR, vocab.PAD))
        return jnp.where(j == 0, vocab.OBS, tok).astype(jnp.int32)

    def _prompt(self, walls, pos, goal):
        toks = jnp.concatenate([
            jnp.array([vocab.TASK] + _MAZE_WORD, jnp.int32), self._position_tokens(pos),
            jnp.asarray(DIR_TOKENS), jnp.array([vocab.GOAL], jnp.int32), self._position_tokens(goal)])
        keep = jnp.concatenate([jnp.ones(8, bool), self._blocked(walls, pos), jnp.ones(4, bool)])
        return token_ops.pad_row(token_ops.pack_left(toks, keep), self.obs_len)

    def _info(self, success, format_error, illegal, distance):
        return {"success": jnp.asarray(success, bool), "format_error": jnp.asarray(format_error, bool),
                "illegal_move": jnp.asarray(illegal, bool), "distance": jnp.asarray(distance, jnp.int32)}

    # ------------------------------------------------------------------ API
    def tables(self, walls, dist):
        """(wall_words, dist_words): the grid's walls and distance field packed into int32 words
        (``token_ops.pack_table``, cell k = r * size + c), which ``step`` reads by shifts and
        small select chains instead of gathers (a gather keeps XLA:CPU's loop over the batch
        scalar)."""
        return (token_ops.pack_table(jnp.asarray(walls).reshape(-1), 1),
                token_ops.pack_table(jnp.asarray(dist).reshape(-1), self.dist_bits))

    def reset(self, key: jax.Array) -> tuple[MazeState, TimeStep]:
        key, k_gen = jax.random.split(key)
        if self.generator == "random":
            walls, start, goal = self._generate_random(k_gen)
        else:
            walls, start, goal = self._generate_perfect(k_gen)
        dist = bfs_distance(walls, goal)
        wall_words, dist_words = self.tables(walls, dist)
        state = MazeState(key=key, turn=jnp.int32(0), done=jnp.bool_(False),
                          terminated=jnp.bool_(False), truncated=jnp.bool_(False), walls=walls,
                          pos=start, goal=goal, start=start, dist=dist, n_illegal=jnp.int32(0),
                          wall_words=wall_words, dist_words=dist_words)
        ts = TimeStep(observation=self._prompt(walls, start, goal), reward=jnp.float32(0.0),
                      terminated=jnp.bool_(False), truncated=jnp.bool_(False),
                      info=self._info(False, False, False, dist[start[0], start[1]]))
        return state, ts

    def _blocked_cell(self, state: MazeState, r, c):
        """The cell (r, c) is a wall or off the grid: a shift of the packed wall words."""
        inside = (r >= 0) & (r < self.size) & (c >= 0) & (c < self.size)
        k = jnp.where(inside, r * self.size + c, -1)
        return token_ops.packed_take(state.wall_words, k, 1, fill=1) == 1

    def _distance(self, state: MazeState, r, c):
        """dist[r, c] for an inside cell, from the packed distance words."""
        return token_ops.packed_take(state.dist_words, r * self.size + c, self.dist_bits)

    def _blocked_at(self, state: MazeState, r, c) -> list:
        """Four bools: the neighbour of (r, c) in direction n, e, s, w is a wall or off the grid
        (= ``_blocked``, written as four look-ups for scalar r, c; kept apart, not stacked:
        under vmap a stack of per-env values is a transposed array)."""
        return [self._blocked_cell(state, r + dr, c + dc) for dr, dc in DIR_DELTAS.tolist()]

    def step(self, state: MazeState, action: jax.Array) -> tuple[MazeState, TimeStep]:
        action = token_ops.action_row(action, self.action_len)
        # Two stages, each computed once per env and stored in one packed int32
        # (token_ops.materialize_small) for the dozen outputs that read them.
        # 1. the move: d = index of action[0] among n, e, s, w (0 if none, as argmax), the
        #    target cell, whether it is blocked (a wall or off the grid) and the new position
        a0 = action[0]
        d = jnp.int32(0)
        for i in reversed(range(4)):
            d = jnp.where(a0 == int(DIR_TOKENS[i]), i, d)
        is_dir = (a0 == int(DIR_TOKENS[0])) | (a0 == int(DIR_TOKENS[1])) | \
                 (a0 == int(DIR_TOKENS[2])) | (a0 == int(DIR_TOKENS[3]))
        fmt_ok = (token_ops.action_length(action) == 1) & is_dir
        r = state.pos[0] + jnp.where(d == 0, -1, jnp.where(d == 2, 1, 0))
        c = state.pos[1] + jnp.where(d == 1, 1, jnp.where(d == 3, -1, 0))
        blocked = self._blocked_cell(state, r, c)
        moved = fmt_ok & ~blocked
        coord = (self.size - 1).bit_length()
        fmt_ok, illegal, new_r, new_c = token_ops.materialize_small(
            [(fmt_ok, 1), (fmt_ok & blocked, 1), (jnp.where(moved, r, state.pos[0]), coord),
             (jnp.where(moved, c, state.pos[1]), coord)])
        new_pos = jnp.stack([new_r, new_c])
        # 2. what the info and observation read at the new position: the distance to the goal,
        #    whether it is the goal, and the wall letters (none at the goal) left-packed, as
        #    codes 1..4 for n, e, s, w (0: none); see _observation for the packed row
        at_goal = fmt_ok & ~illegal & (new_r == state.goal[0]) & (new_c == state.goal[1])
        # wall letters (none at the goal) left-packed as 3-bit codes 1..4 (n, e, s, w) in one int
        codes, count = jnp.int32(0), jnp.int32(0)
        for k, b in enumerate(self._blocked_at(state, new_r, new_c)):
            b = b & ~at_goal
            codes = codes | jnp.where(b, (k + 1) << (3 * count), 0)
            count = count + b.astype(jnp.int32)
        at_goal, distance, codes = token_ops.materialize_small(
            [(at_goal, 1), (self._distance(state, new_r, new_c), self.dist_bits), (codes, 12)])
        obs = self._observation_row(fmt_ok, illegal, at_goal, new_r, new_c, codes)
        n_illegal = state.n_illegal + illegal.astype(jnp.int32)
        failed = illegal & (self.max_illegal > 0) & (n_illegal >= self.max_illegal)
        reward = jnp.where(~fmt_ok, -self.format_penalty,
                           jnp.where(at_goal, 1.0, jnp.where(illegal, -self.illegal_penalty, -self.step_cost)))
        return finish_step(self, state, terminated=at_goal | failed, observation=obs, reward=reward,
                           info=self._info(at_goal, ~fmt_ok, illegal, distance),
                           idle_info=self._info(False, False, False,
                                                self._distance(state, state.pos[0], state.pos[1])),
                           pos=new_pos, n_illegal=n_illegal)

    def oracle_action(self, state: MazeState, key: jax.Array) -> jax.Array:
        """Move to a neighbour one step closer to the goal (BFS field); random tie-break."""
        padded = jnp.pad(state.dist, 1, constant_values=self.size * self.size)
        nb = state.pos[None, :] + jnp.asarray(DIR_DELTAS) + 1
        nb_dist = padded[nb[:, 0], nb[:, 1]]
        good = (nb_dist == state.dist[state.pos[0], state.pos[1]] - 1) & ~self._blocked(state.walls, state.pos)
        score = good.astype(jnp.float32) + 0.5 * jax.random.uniform(key, (4,))
        tok = jnp.asarray(DIR_TOKENS)[jnp.argmax(score)]
        return token_ops.make_row([tok, vocab.EOS], self.action_len)

    def render(self, state: MazeState) -> str:
        walls = np.asarray(state.walls)
        pos, goal = tuple(int(x) for x in np.asarray(state.pos)), tuple(int(x) for x in np.asarray(state.goal))
        rows = []
        for r in range(walls.shape[0]):
            row = ""
            for c in range(walls.shape[1]):
                row += "A" if (r, c) == pos else "G" if (r, c) == goal else "#" if walls[r, c] else "."
            rows.append(row)
        return (f"maze {self.size}x{self.size} pos=({pos[0]},{pos[1]}) goal=({goal[0]},{goal[1]}) "
                f"turn={int(state.turn)} illegal={int(state.n_illegal)} "
                f"shortest={int(np.asarray(state.dist)[pos])} map=" + "/".join(rows))

    def __repr__(self) -> str:
        return (f"MazeEnv(size={self.size}, generator={self.generator!r}, wall_density={self.wall_density}, "
                f"max_turns={self.max_turns}, max_illegal={self.max_illegal})")
