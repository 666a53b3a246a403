"""Tests of envs.tasks.maze.MazeEnv: generation, BFS field, oracle, semantics, robustness."""
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import vocab
from envs.tasks.maze import MazeEnv, MazeState, bfs_distance
from tests.envs.helpers import act, keys, text


_CACHE = {}


def get(**kw):
    """(env, jit(vmap(reset)), jit(vmap(step)), jit(step)) per knob setting, shared across tests."""
    k = tuple(sorted(kw.items()))
    if k not in _CACHE:
        env = MazeEnv(**kw)
        _CACHE[k] = (env, jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step)), jax.jit(env.step))
    return _CACHE[k]


def numpy_bfs(walls, goal):
    """Reference: queue BFS from the goal; unreachable / wall cells = size**2."""
    h, w = walls.shape
    dist = np.full((h, w), h * w, np.int64)
    dist[goal] = 0
    q = deque([goal])
    while q:
        r, c = q.popleft()
        for dr, dc in ((-1, 0), (1, 0), (0, 1), (0, -1)):
            nr, nc = r + dr, c + dc
            if 0 <= nr < h and 0 <= nc < w and not walls[nr, nc] and dist[nr, nc] > dist[r, c] + 1:
                dist[nr, nc] = dist[r, c] + 1
                q.append((nr, nc))
    return dist


def run_oracle(env, n, seed=0):
    """jit(vmap) over n episodes, lax.scan over turns; returns (solved, turns, start distances)."""
    def episode(key):
        k_reset, k_act = jax.random.split(key)
        state, ts0 = env.reset(k_reset)

        def body(carry, k):
            state, solved = carry
            state, ts = env.step(state, env.oracle_action(state, k))
            return (state, solved | ts.info["success"]), ts.reward

        (state, solved), rewards = jax.lax.scan(body, (state, jnp.bool_(False)),
                                                jax.random.split(k_act, env.max_turns))
        return solved, state.turn, ts0.info["distance"], rewards.sum()

    return jax.jit(jax.vmap(episode))(jax.random.split(jax.random.PRNGKey(seed), n))


@pytest.mark.parametrize("generator", ["random", "perfect"])
def test_oracle_solves_on_shortest_path(generator):
    env = MazeEnv(generator=generator)
    solved, turns, dist0, ret = run_oracle(env, 1000, seed=1)
    assert float(solved.mean()) >= 0.99
    assert bool(solved.all())
    np.testing.assert_array_equal(np.asarray(turns), np.asarray(dist0))   # shortest path, no detour
    assert int(dist0.max()) <= env.path_bound
    np.testing.assert_allclose(np.asarray(ret), 1.0 - env.step_cost * (np.asarray(dist0) - 1), atol=1e-5)


@pytest.mark.parametrize("generator,size", [("random", 5), ("perfect", 5), ("random", 8), ("perfect", 7)])
def test_generated_mazes_solvable_and_bfs_matches_numpy(generator, size):
    env, reset, _, _ = get(size=size, generator=generator)
    states, _ = reset(keys(1024, 2))
    walls, dist = np.asarray(states.walls), np.asarray(states.dist)
    for i in range(200):
        start, goal = tuple(np.asarray(states.start[i])), tuple(np.asarray(states.goal[i]))
        assert start != goal
        assert not walls[i][start] and not walls[i][goal]
        ref = numpy_bfs(walls[i], goal)
        np.testing.assert_array_equal(dist[i], ref)
        assert ref[start] < size * size                      # solvable
        if generator == "random":
            assert ref[start] <= 2 * (size - 1)
        else:
            r = (size + 1) // 2
            n_open = int((~walls[i]).sum())
            assert n_open == 2 * r * r - 1                   # rooms + spanning-tree passages
            assert (ref < size * size).sum() == n_open        # connected
            assert not walls[i][::2, ::2].any() and walls[i][1::2, 1::2].all()
    if generator == "random":
        assert 0.1 < walls.mean() < 0.35


def test_wall_density_knob():
    s, _ = get(wall_density=0.0)[1](keys(1024, 0))
    assert not np.asarray(s.walls).any()
    s, _ = get(wall_density=0.8)[1](keys(1024, 0))
    assert np.asarray(s.walls).mean() > 0.5
    assert (np.asarray(s.dist)[np.arange(1024), np.asarray(s.start)[:, 0], np.asarray(s.start)[:, 1]] <= 8).all()


def test_bfs_distance_random_grids():
    rng = np.random.default_rng(0)
    walls = rng.random((64, 6, 6)) < 0.4
    goals = rng.integers(0, 6, (64, 2))
    walls[np.arange(64), goals[:, 0], goals[:, 1]] = False
    walls[0] = False                                            # edge cases: empty grid,
    walls[1] = True                                             # all walls but the goal
    walls[1, goals[1, 0], goals[1, 1]] = False
    dist = np.asarray(jax.jit(jax.vmap(bfs_distance))(jnp.asarray(walls), jnp.asarray(goals)))
    for i in range(64):
        np.testing.assert_array_equal(dist[i], numpy_bfs(walls[i], tuple(goals[i])))


def handmade(env, rows, start, goal):
    walls = np.array([[ch == "#" for ch in row] for row in rows])
    dist = jnp.asarray(numpy_bfs(walls, goal), jnp.int32)
    wall_words, dist_words = env.tables(jnp.asarray(walls), dist)
    return MazeState(key=jax.random.PRNGKey(0), turn=jnp.int32(0), done=jnp.bool_(False),
                     terminated=jnp.bool_(False), truncated=jnp.bool_(False), walls=jnp.asarray(walls),
                     pos=jnp.array(start, jnp.int32), goal=jnp.array(goal, jnp.int32),
                     start=jnp.array(start, jnp.int32), dist=dist, n_illegal=jnp.int32(0),
                     wall_words=wall_words, dist_words=dist_words)


def test_handwritten_episode():
    env, _, _, step = get(size=3)
    state = handmade(env, [".#.", "...", "#.."], (0, 0), (2, 2))
    assert text(env._prompt(state.walls, state.pos, state.goal)) == "<task> maze 0 , 0 new <goal> 2 , 2"
    expected = [
        ("e <eos>", "<obs> <no> 0 , 0 new", -1.0, False, False),       # into a wall: stays
        ("s <eos>", "<obs> 1 , 0 sw", -0.01, False, False),
        ("x <eos>", "<obs> <err>", -0.1, False, False),                  # format error
        ("e <eos>", "<obs> 1 , 1 n", -0.01, False, False),
        ("s <eos>", "<obs> 2 , 1 sw", -0.01, False, False),
        ("e <eos>", "<obs> <goal> 2 , 2", 1.0, True, True),
    ]
    for a, obs, r, term, succ in expected:
        state, ts = step(state, act(env, a))
        assert text(ts.observation) == obs, a
        assert float(ts.reward) == pytest.approx(r)
        assert bool(ts.terminated) == term and not bool(ts.truncated)
        assert bool(ts.info["success"]) == succ
        assert bool(ts.info["format_error"]) == (a == "x <eos>")
        assert bool(ts.info["illegal_move"]) == (obs.startswith("<obs> <no>"))
    assert int(state.turn) == 6 and int(state.n_illegal) == 1 and bool(state.done)
    # a done state is a no-op
    state2, ts = step(state, act(env, "n <eos>"))
    assert text(ts.observation) == "<obs>" and float(ts.reward) == 0.0
    assert bool(ts.terminated) and not bool(ts.truncated) and not bool(ts.info["success"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, state2, state)


def test_illegal_moves_terminate_and_truncation():
    env, _, _, step = get(size=3)
    assert env.max_illegal == 2
    state = handmade(env, ["...", "...", "..."], (0, 0), (2, 2))
    state, ts = step(state, act(env, "n <eos>"))
    assert text(ts.observation) == "<obs> <no> 0 , 0 nw" and not bool(ts.terminated)
    state, ts = step(state, act(env, "w <eos>"))
    assert float(ts.reward) == -1.0 and bool(ts.terminated) and not bool(ts.info["success"])
    # unlimited illegal moves, truncation at max_turns
    env, _, _, step = get(size=3, max_illegal=0, max_turns=3)
    state = handmade(env, ["...", "...", "..."], (0, 0), (2, 2))
    for i, a in enumerate(["n <eos>", "n <eos>", "e <eos>"]):
        state, ts = step(state, act(env, a))
        assert not bool(ts.terminated) and bool(ts.truncated) == (i == 2)
    assert text(ts.observation) == "<obs> 0 , 1 n"
    assert bool(state.done) and bool(state.truncated) and not bool(state.terminated)


def adversarial_actions(n, action_len, seed=0):
    rng = np.random.default_rng(seed)
    rand = rng.integers(-5, 80, (n, action_len))
    special = np.array([
        [vocab.PAD] * action_len, [vocab.EOS] * action_len, [vocab.TOKEN_TO_ID["n"]] * action_len,
        [np.iinfo(np.int32).max] * action_len, [np.iinfo(np.int32).min] * action_len,
        [vocab.TOKEN_TO_ID["s"], 999] + [vocab.PAD] * (action_len - 2),
        [-1, vocab.EOS] + [vocab.PAD] * (action_len - 2),
        [vocab.TOKEN_TO_ID["e"] + 64, vocab.EOS] + [vocab.PAD] * (action_len - 2),
    ])
    rand[: len(special)] = special
    return jnp.asarray(rand, jnp.int32)


def test_adversarial_actions_never_break_state():
    env, reset, step, _ = get()
    n = 1024
    states, _ = reset(keys(n, 3))
    acts = adversarial_actions(n, env.action_len)
    new_states, ts = step(states, acts)
    jax.tree_util.tree_map(lambda a, b: (a.shape == b.shape and a.dtype == b.dtype) or pytest.fail("shape"),
                           states, new_states)
    assert np.isfinite(np.asarray(ts.reward)).all()
    assert ts.observation.shape == (n, env.obs_len) and ts.observation.dtype == jnp.int32
    assert ((np.asarray(ts.observation) >= 0) & (np.asarray(ts.observation) < vocab.size)).all()
    fe = np.asarray(ts.info["format_error"])
    assert fe[:8].all()
    valid = (np.asarray(acts)[:, 0][:, None] == np.array([vocab.TOKEN_TO_ID[c] for c in "nesw"])).any(1) & \
        ((np.asarray(acts)[:, 1] == vocab.EOS) | (np.asarray(acts)[:, 1] == vocab.PAD))
    np.testing.assert_array_equal(fe, ~valid)
    np.testing.assert_allclose(np.asarray(ts.reward)[fe], -env.format_penalty)
    np.testing.assert_array_equal(np.asarray(new_states.pos)[fe], np.asarray(states.pos)[fe])
    assert (np.asarray(ts.observation)[fe, :2] == [vocab.OBS, vocab.ERR]).all()
    np.testing.assert_array_equal(np.asarray(new_states.walls), np.asarray(states.walls))


def test_vmap_1024_and_determinism():
    env, reset, step, _ = get()
    s1, t1 = reset(keys(1024, 4))
    s2, t2 = reset(keys(1024, 4))
    jax.tree_util.tree_map(np.testing.assert_array_equal, (s1, t1), (s2, t2))
    assert len({np.asarray(w).tobytes() for w in s1.walls}) > 900      # keys give different mazes
    acts = jnp.tile(act(env, "s <eos>"), (1024, 1))
    a, ta = step(s1, acts)
    b, tb = step(s2, acts)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (a, ta), (b, tb))
    assert ta.observation.shape == (1024, env.obs_len) and ta.reward.shape == (1024,)
    assert int(a.turn.sum()) == 1024


def test_render_and_repr():
    env, reset, _, _ = get(generator="perfect", size=7)
    states, ts = reset(keys(1024, 5))
    state = jax.tree_util.tree_map(lambda x: x[0], states)
    line = env.render(state)
    assert "\n" not in line and line.count("/") == 6 and "A" in line and "G" in line
    assert text(ts.observation[0]).startswith("<task> maze")
    assert "perfect" in repr(env)


@pytest.mark.parametrize("kwargs,name", [
    (dict(size=2), "size"), (dict(size=11), "size"), (dict(generator="dfs"), "generator"),
    (dict(generator="perfect", size=6), "size"), (dict(wall_density=1.5), "wall_density"),
    (dict(max_turns=0), "max_turns"), (dict(max_illegal=-1), "max_illegal"),
    (dict(illegal_penalty=-1.0), "illegal_penalty"), (dict(step_cost=-0.5), "step_cost"),
])
def test_bad_knobs_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MazeEnv(**kwargs)


def test_defaults_small():
    env = MazeEnv()
    assert env.obs_len <= 24 and env.action_len <= 12 and env.max_turns == 16
    state = handmade(env, ["....."] * 5, (0, 0), (4, 4))
    with pytest.raises(ValueError, match="action"):
        env.step(state, jnp.zeros(5, jnp.int32))


@pytest.mark.parametrize("size", [3, 5, 10])
def test_packed_tables_equal_the_grids(size):
    """step reads walls and distances from the packed words of the state (pack_table): for
    random mazes every cell's packed entries equal the grids, cells off the grid read as
    blocked, and the neighbour look-up equals the padded-grid gather (_blocked)."""
    env = MazeEnv(size=size)
    n = 64
    states, _ = jax.jit(jax.vmap(env.reset))(keys(n, seed=size))
    rc = [(r, c) for r in range(-1, size + 1) for c in range(-1, size + 1)]
    rows = jnp.asarray([r for r, _ in rc]); cols = jnp.asarray([c for _, c in rc])

    def cells(s):
        blocked = jax.vmap(lambda r, c: env._blocked_cell(s, r, c))(rows, cols)
        inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        dist = jax.vmap(lambda r, c: env._distance(s, r, c))(jnp.clip(rows, 0, size - 1),
                                                           jnp.clip(cols, 0, size - 1))
        nbrs = jax.vmap(lambda r, c: jnp.stack(env._blocked_at(s, r, c)))(jnp.clip(rows, 0, size - 1),
                                                              jnp.clip(cols, 0, size - 1))
        gathered = jax.vmap(lambda r, c: env._blocked(s.walls, jnp.stack([r, c])))(
            jnp.clip(rows, 0, size - 1), jnp.clip(cols, 0, size - 1))
        return blocked, inside, dist, nbrs, gathered

    blocked, inside, dist, nbrs, gathered = jax.device_get(jax.jit(jax.vmap(cells))(states))
    walls, dists = np.asarray(states.walls), np.asarray(states.dist)
    for i in range(n):
        for k, (r, c) in enumerate(rc):
            if 0 <= r < size and 0 <= c < size:
                assert blocked[i, k] == walls[i, r, c]
                assert dist[i, k] == dists[i, r, c]
            else:
                assert blocked[i, k] and not inside[i, k]
    np.testing.assert_array_equal(nbrs, gathered)
    assert walls.any() and (dists < size * size).any()
