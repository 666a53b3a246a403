"""The tokenizer bridge: every env in a real (locally trained) tokenizer's ids, inside jit."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import tokenizer_bridge as tb
from envs import vocab
from models.tokenizer_training import train_tokenizer
from rl_agents.rollout import oracle_policy, run_episodes

ENV_NAMES = ("guess_number", "kv_search", "calculator", "maze", "wordle", "keychain", "bandit")


@pytest.fixture(scope="module")
def corpus():
    texts = []
    for name in ENV_NAMES:
        texts += tb.oracle_texts(envs.make(name), episodes=16)
    return texts


@pytest.fixture(scope="module")
def canonical_tok(corpus):
    return train_tokenizer(corpus, 400, pretokenize="symbols")


@pytest.fixture(scope="module")
def merging_tok(corpus):
    return train_tokenizer(corpus, 500, pretokenize="words")


def _encode(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def _ids(row):
    row = np.asarray(row)
    return [int(i) for i in row[row >= 0]]


@pytest.mark.parametrize("name", ENV_NAMES)
def test_rendered_texts_equal_the_tokenizers_encoding_when_canonical(canonical_tok, name):
    """With a tokenizer canonical for symbol-by-symbol text, every rendered observation and
    oracle action equals ``tokenizer.encode`` of its text (special-token tags included)."""
    import copy
    tok = copy.deepcopy(canonical_tok)
    env = tb.BridgedEnv(envs.make(name), tb.build_bridge(tok, None))
    rep = tb.check_canonical(env, tok, episodes=16)
    assert rep["checked"] > 16 and rep["canonical_fraction"] == 1.0, rep["example"]


def _own_encodings_parse(tok, inner, env, turns: int = 3) -> int:
    """Every oracle action, encoded by the tokenizer itself (+ the stop id), parses to the env's
    action row; returns how many encodings were shorter than their symbol count (merges)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 32)
    state, _ = jax.vmap(inner.reset)(keys)
    parse = jax.jit(env.env_action)
    n_merged = 0
    for t in range(turns):
        acts = np.asarray(jax.vmap(inner.oracle_action)(state, keys))
        for a in acts:
            body = a[: list(a).index(vocab.EOS)]
            ids = _encode(tok, vocab.decode(body)) + [env.bridge.end_of_turn]
            n_merged += len(ids) - 1 < len(body)
            row = np.full(env.action_len, -1, np.int32)
            row[: len(ids)] = ids
            np.testing.assert_array_equal(np.asarray(parse(jnp.asarray(row))), a)
        state, _ = jax.vmap(inner.step)(state, jnp.asarray(acts))
    return n_merged


def test_a_merging_tokenizer_warns_and_its_own_encodings_still_parse(merging_tok):
    """GPT-2-style pre-tokenization merges digit runs ("12" one token): the bridge warns that
    its renderings differ, and the tokenizer's own encoding of every oracle action (what a model
    trained on canonical text would write) parses to the env's action row exactly."""
    import copy
    tok = copy.deepcopy(merging_tok)
    inner = envs.make("calculator")
    env = tb.BridgedEnv(inner, tb.build_bridge(tok, None))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = tb.warn_if_not_canonical(env, tok, episodes=16)
    assert rep["canonical_fraction"] < 1.0
    assert any("differ from the tokenizer's own encoding" in str(x.message) for x in w)
    assert _own_encodings_parse(tok, inner, env) > 0     # the test saw merged tokens


def test_a_sentencepiece_style_tokenizer(corpus):
    """Metaspace (Llama-2 style: '▁' for spaces, a prefix '▁'): the tokenizer's own encodings
    of oracle actions parse, and rendered observations decode to the env's text up to spaces."""
    tok = train_tokenizer(corpus, 400, pretokenize="metaspace")
    inner = envs.make("kv_search")
    env = tb.BridgedEnv(inner, tb.build_bridge(tok, None))
    _own_encodings_parse(tok, inner, env, turns=2)
    state, ts = inner.reset(jax.random.PRNGKey(4))
    _, bts = jax.jit(env.reset)(jax.random.PRNGKey(4))
    ids = _ids(bts.observation)
    n_pre, n_suf = len(env.bridge.prompt_prefix), len(env.bridge.prompt_suffix)
    text = tok.decode(ids[n_pre: len(ids) - n_suf])
    assert text.split() and "".join(text.split()) == "".join(vocab.decode(ts.observation).split())


def test_plain_text_tags_parse_and_render(canonical_tok):
    """tags="text": no tokens are added; tags render as text and text tags written piece by
    piece ('<', 'calc', '>' or '<calc', '>') are fused back into the tag symbol."""
    import copy
    tok = copy.deepcopy(canonical_tok)
    n = len(tok)
    br = tb.build_bridge(tok, None, tags="text")
    assert len(tok) == n and br.added_tokens == () and br.vocab_limit == n
    env = tb.BridgedEnv(envs.make("calculator"), br)
    assert tb.check_canonical(env, tok, episodes=8)["canonical_fraction"] == 1.0
    want = vocab.encode("<calc> 12 + 7 <eos>")
    for pieces in (["<", "calc", ">", " 1", "2", " +", " 7"], ["<calc", "> 12", " +7"]):
        ids = sum((_encode(tok, p) for p in pieces), []) + [br.end_of_turn]
        row = jnp.full((env.action_len,), -1, jnp.int32).at[: len(ids)].set(jnp.asarray(ids))
        got = np.asarray(env.env_action(row))
        assert list(got[: len(want)]) == want and set(got[len(want):]) <= {vocab.PAD}


def test_unparseable_and_overlong_actions_are_format_errors(canonical_tok):
    import copy
    tok = copy.deepcopy(canonical_tok)
    br = tb.build_bridge(tok, None)
    inner = envs.make("calculator")
    env = tb.BridgedEnv(inner, br)
    state, _ = env.reset(jax.random.PRNGKey(0))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    upper = _encode(tok, "Q")
    long_action = _encode(tok, "<answer> " + "1" * inner.action_len)
    cases = {"chat token": [im_start, br.end_of_turn], "uppercase": upper + [br.end_of_turn],
             "too long": long_action + [br.end_of_turn]}
    for what, ids in cases.items():
        assert len(ids) <= env.action_len, what
        row = jnp.full((env.action_len,), -1, jnp.int32).at[: len(ids)].set(jnp.asarray(ids))
        np.testing.assert_array_equal(np.asarray(env.env_action(row))[:2], [vocab.ERR, vocab.EOS])
        _, ts = env.step(state, row)
        assert bool(ts.info["format_error"]), what
        assert float(ts.reward) == pytest.approx(-inner.format_penalty)


def test_every_stop_id_ends_an_action_and_parses_as_eos(canonical_tok):
    import copy
    tok = copy.deepcopy(canonical_tok)
    stops = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    br = tb.build_bridge(tok, stops)
    env = tb.BridgedEnv(envs.make("calculator"), br)
    assert br.end_of_turn == stops[0]          # the one the chat template writes
    for s in stops:
        ids = _encode(tok, "<answer> 5") + [s] + _encode(tok, " 7")
        row = jnp.full((env.action_len,), -1, jnp.int32).at[: len(ids)].set(jnp.asarray(ids))
        got = np.asarray(env.env_action(row))
        assert vocab.decode(got) == "<answer> 5 <eos>"
    from rl_agents.rollout import action_valid_mask
    a = jnp.asarray([[5, stops[1], 7, -1], [5, 6, stops[0], 8]])
    np.testing.assert_array_equal(np.asarray(action_valid_mask(a, stops, -1)),
                                  [[1, 1, 0, 0], [1, 1, 1, 0]])


def test_decoded_trajectory_equals_the_chat_template_rendering(canonical_tok):
    """An oracle rollout of the bridged env, decoded, is exactly ``apply_chat_template`` of the
    conversation (prompt as the user, each action as the assistant, each observation as the
    user, then the generation prompt): the chat pieces come from the template itself."""
    import copy
    tok = copy.deepcopy(canonical_tok)
    inner = envs.make("kv_search")
    env = tb.BridgedEnv(inner, tb.build_bridge(tok, None))
    traj = jax.jit(lambda k: run_episodes(env, oracle_policy(env), k, num_groups=4))(
        jax.random.PRNGKey(1))
    keys = jax.random.split(jax.random.split(jax.random.PRNGKey(1))[0], 4)
    for b in range(4):
        state, ts = inner.reset(keys[b])
        msgs = [{"role": "user", "content": vocab.decode(ts.observation)}]
        n = int(traj.episode_length[b])
        toks = np.asarray(traj.tokens[b])[np.asarray(traj.valid[b])]
        mask = np.asarray(traj.loss_mask[b])[np.asarray(traj.valid[b])]
        turn_ids = np.asarray(traj.turn_ids[b])[np.asarray(traj.valid[b])]
        for k in range(n):
            act = toks[(turn_ids == k) & mask]
            assert act[-1] == env.bridge.end_of_turn
            msgs.append({"role": "assistant", "content": tok.decode(act[:-1])})
            sym = env.env_action(jnp.asarray(np.concatenate(
                [act, np.full(env.action_len - len(act), -1)]).astype(np.int32)))
            state, ts = inner.step(state, sym)
            msgs.append({"role": "user", "content": vocab.decode(ts.observation)})
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tok.decode(toks) == want
        assert bool(traj.success[b])


def test_chat_pieces_without_a_template(canonical_tok):
    import copy
    tok = copy.deepcopy(canonical_tok)
    tok.chat_template = None
    br = tb.build_bridge(tok, None)
    assert br.obs_prefix == () and br.obs_suffix == ()
    env = tb.BridgedEnv(envs.make("guess_number"), br)
    _, ts = env.reset(jax.random.PRNGKey(0))
    inner_state, inner_ts = envs.make("guess_number").reset(jax.random.PRNGKey(0))
    assert _ids(ts.observation) == list(br.prompt_prefix) + _encode(
        tok, vocab.decode(inner_ts.observation))


def test_bad_tokenizer_dirs_give_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tb.load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tb.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        tb.load_tokenizer(tmp_path)


def test_stop_ids_from_generation_config(tmp_path, canonical_tok):
    import json
    tok = canonical_tok
    assert tb.stop_ids_from(tmp_path, tok) == (tok.eos_token_id,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 2]}))
    assert tb.stop_ids_from(tmp_path, tok) == (2, 0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10 ** 7}))
    with pytest.raises(ValueError, match="no usable stop ids"):
        tb.stop_ids_from(tmp_path, tok)


def test_new_rows_start_at_the_mean():
    t = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = tb.init_new_rows(t, 3, 6)
    assert out.shape == (6, 3)
    np.testing.assert_array_equal(out[:3], t[:3])
    np.testing.assert_allclose(out[3:], np.broadcast_to(t[:3].mean(0), (3, 3)))


# ----------------------------------------------------------------------------- tasks in words
WORD_ENVS = ("word_problems", "kb_qa")


@pytest.fixture(scope="module")
def words_tok():
    """A tokenizer trained like a real one on text in words (Qwen2's pre-tokenizer: words
    merge, digits stay single)."""
    texts = []
    for name in WORD_ENVS:
        env = envs.make(name)
        texts += tb.oracle_texts(env, episodes=32) + [" ".join(env.phrases)] * 4
    return train_tokenizer(texts, 400, pretokenize="qwen2")


@pytest.mark.parametrize("name", WORD_ENVS)
def test_words_render_as_the_tokenizer_writes_them(words_tok, name):
    """Every rendered prompt, observation and oracle action of a task in words equals
    ``tokenizer.encode`` of its text (phrases one by one; a name spelled by an action's letters
    renders as the word), and a word is one token, not its letters."""
    import copy
    tok = copy.deepcopy(words_tok)
    inner = envs.make(name)
    env = tb.BridgedEnv(inner, tb.build_bridge(tok, None, phrases=inner.phrases))
    rep = tb.check_canonical(env, tok, episodes=16)
    assert rep["checked"] > 16 and rep["canonical_fraction"] == 1.0, rep["example"]
    state, ts = env.reset(jax.random.PRNGKey(0))
    text = vocab.decode(inner.reset(jax.random.PRNGKey(0))[1].observation, phrases=inner.phrases)
    assert text in tok.decode(_ids(ts.observation))
    a = _ids(env.oracle_action(state, None))
    if name == "kb_qa":                       # <search> NAME <stop>: three ids
        assert len(a) == 3 and tok.decode(a[1:2]).strip() in envs.tasks.kb_qa.NAMES
    # the rows are sized by the bridge's bound, never cut
    assert env.obs_len < env.prompt_len and len(_ids(ts.observation)) <= env.prompt_len


def test_fuse_words_whole_runs_only(words_tok):
    import copy
    tok = copy.deepcopy(words_tok)
    inner = envs.make("kb_qa")
    br = tb.build_bridge(tok, None, phrases=inner.phrases)
    gina = vocab.size + inner.phrases.index("gina")

    def fused(text):
        row = np.asarray(vocab.pad_to(vocab.encode(text), 10), np.int32)
        out, n = tb.fuse_words(br, jnp.asarray(row), jnp.int32(len(vocab.encode(text))))
        return [int(x) for x in np.asarray(out)[:int(n)]]

    assert fused("<search> gina") == [vocab.SEARCH, gina]
    assert fused("<search> ginab") == vocab.encode("<search> ginab")        # not a whole run
    assert fused("<search> agina") == vocab.encode("<search> agina")
    assert fused("gina 3 gina") == [gina, vocab.DIGIT_0 + 3, gina]


def test_row_bound_holds_for_random_rows(words_tok):
    """``row_bound`` never undercounts: random rows of any symbols and phrases render to at most
    the bound (so no rendered row is cut), and decode to the row's text."""
    import copy
    tok = copy.deepcopy(words_tok)
    inner = envs.make("word_problems")
    br = tb.build_bridge(tok, None, phrases=inner.phrases)
    rng = np.random.default_rng(0)
    n_sym = vocab.size + len(inner.phrases)
    rows = rng.integers(2, n_sym, size=(256, 12)).astype(np.int32)
    big = 12 * br.max_render
    ids, n = jax.jit(jax.vmap(lambda r: tb.render_symbols(br, r, jnp.int32(12), big)))(rows)
    assert int(np.asarray(n).max()) <= br.row_bound(12)
    for r, i, k in zip(rows[:32], np.asarray(ids), np.asarray(n)):
        assert tok.decode([int(x) for x in i[:k]]) == vocab.decode(r, phrases=inner.phrases)


def test_a_bridge_without_the_envs_phrases_is_refused(words_tok):
    import copy
    tok = copy.deepcopy(words_tok)
    with pytest.raises(ValueError, match="writes 19 phrases but the bridge was built with 0"):
        tb.BridgedEnv(envs.make("kb_qa"), tb.build_bridge(tok, None))
    with pytest.raises(ValueError, match="phrases must be non-empty strings"):
        tb.build_bridge(tok, None, phrases=(" ann",))


def test_qwen2_pretokenizer_keeps_words_and_splits_digits(words_tok):
    toks = words_tok.tokenize("Ann has 12 apples. How many apples does Ann have now?")
    assert "Ġapples" in toks and "Ġmany" in toks
    assert "1" in toks and "2" in toks and not {"12", "Ġ12", "Ġ1"} & set(toks)
