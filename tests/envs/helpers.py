"""Helpers shared by the env tests: action encoding, adversarial action rows, and mixed
oracle / adversarial episodes run as one jit(vmap) + lax.scan program per env."""
import jax
import jax.numpy as jnp
import numpy as np

from envs import vocab


def act(env, text):
    return jnp.asarray(vocab.pad_to(vocab.encode(text), env.action_len), jnp.int32)


def adversarial_np(rng, n, turns, length):
    """[n, turns, length] int32 rows: random ids in [-5, 80), no EOS, int32 extremes, all PAD.

    Made with NumPy outside the jitted program (random call sites are costly to compile).
    """
    rand = rng.integers(-5, 80, (n, turns, length))
    no_eos = rng.integers(2, 64, (n, turns, length))
    extremes = np.where(rng.random((n, turns, length)) < 0.5, np.iinfo(np.int32).max,
                        np.iinfo(np.int32).min)
    kind = rng.integers(0, 4, (n, turns, 1))
    return np.select([kind == 0, kind == 1, kind == 2], [rand, no_eos, extremes], 0).astype(np.int32)


_MIXED = {}


def run_mixed(env, n, turns, seed, adv=None, p_oracle=0.3):
    """n episodes (jit(vmap) + scan): each turn the oracle's action or an adversarial row.

    Returns (final states, (timesteps, states after each step)), all [n, ...] NumPy.
    """
    rng = np.random.default_rng(seed)
    adv = adversarial_np(rng, n, turns, env.action_len) if adv is None else adv
    use_oracle = rng.random((n, turns)) < p_oracle
    if env not in _MIXED:                   # one compiled program per env

        def episode(key, adv, use_oracle):
            s0, _ = env.reset(key)

            def body(s, x):
                a = jnp.where(x[1], env.oracle_action(s, key), x[0])
                s2, ts = env.step(s, a)
                return s2, (ts, s2)
            return jax.lax.scan(body, s0, (adv, use_oracle))
        _MIXED[env] = jax.jit(jax.vmap(episode))
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return jax.device_get(_MIXED[env](keys, adv, use_oracle))


def keys(n, seed):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def text(tokens):
    return vocab.decode(np.asarray(tokens))
