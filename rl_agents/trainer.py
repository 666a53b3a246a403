"""The one-program RL iteration (PureJaxRL's shape applied to multi-turn LLM agents).

``Trainer(config, mesh)`` builds a run's components once (env, policy / value / reward models,
optimizers, the algorithm's record from ``rl_agents.algorithms``, the context mode, the
algorithm's extra stage) and exposes jitted pure functions:

    init(key) -> TrainState                      (BC warm start, learned RM, optimizer states)
    update(TrainState) -> (TrainState, metrics)  (one RL iteration, one XLA program)
    evaluate(policy_params, key, episodes=, greedy=) -> (metrics, episodes)

``update`` is five named stages, each a method of explicit inputs and outputs; nothing is kept
on the trainer between them:

    collect     policy params, key -> episodes, row weights     (+ DAPO's dynamic sampling;
                                      ``rollout.mode = "continuous"``: ``collect_continuous``,
                                      the carried slots' turn steps, ``rl_agents.continuous``)
    score       state, episodes    -> learned-RM / PRIME rewards (+ the PRM's online step)
    advantages  state, episodes    -> training batch: reference log-probs, critic values,
                                      shaped rewards (KL-in-reward, overlong penalty), the
                                      algorithm's estimator; or the algorithm's extra stage
                                      (ArCHer's turn critic: ``rl_agents.archer.ArcherStage``)
    correct     state, batch       -> batch with the off-policy correction (``rl.correction``:
                                      TIS / MIS between the trainer's π_old and the sampler's
                                      μ, ``rl_agents.off_policy``; "none" leaves it as is)
    optimize    params, opt state, batch -> params, opt state    (``epochs`` × ``minibatches``
                                      steps of ``rl.policy_loss`` + value loss + KL − entropy)

then the non-finite guard (``rl_agents.nonfinite.skip_nonfinite``): an update with a NaN / inf
optimizer step or non-finite new parameters is skipped whole (only ``key`` and ``step``
advance; ``update/skipped_nonfinite``).

``mismatch/kl``: the k3 estimate of KL(sampler ‖ trainer) on the sampled tokens, mean over
the agent tokens of ρ − 1 − log ρ with ρ = π_train / π_behaviour, read from the first
minibatch step of the update (a uniformly random 1/``minibatches`` of the rows, before any
optimizer step, so both sides hold the same parameters: what remains is the numerical
mismatch between the KV-cached sampler and the trainer's forward pass, e.g. bfloat16
sampling, ``rollout.dtype = "bfloat16"``). With ``rl.correction`` on, π_old is recomputed
over the whole batch and ``mismatch/kl`` is that exact batch-wide value instead.

What varies is composed, not subclassed: the context mode (``config.context.mode``: ``"full"``
= ``FullContext``, ``"supo"`` = ``rl_agents.summarization.SupoContext``) decides how episodes
are sampled, warm-started, cut into training rows and evaluated; the algorithm's ``stage``
(``"archer"``) adds its own state (``TrainState.extra``) and replaces the advantages stage.

``make_train(config)`` returns ``train(key)``: init, then ``lax.scan(update)`` over
``total_updates`` (the whole run as one XLA program); ``experiments/train.py`` calls
``Trainer.update`` from a host loop instead, for logging, eval and checkpoints.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import envs
import models
from envs import vocab
from envs.wrappers import tree_select
from models.sharding import on_mesh, param_shardings_from_logical, put_global
from models import lora as lora_lib
from rl_agents import bc as bc_lib
from rl_agents import continuous as continuous_lib
from rl_agents import dapo, losses, off_policy
from rl_agents import process_rewards as process_lib
from rl_agents import reward_models as rm_lib
from rl_agents.advantages import AdvantageInputs, compute_advantages, per_turn_sum
from rl_agents.algorithms import check_options, get_algorithm
from rl_agents.nonfinite import (NONFINITE_STEP, PRM_NONFINITE_STEP, guarded_step,
                                 nonfinite_metrics, skip_nonfinite)
from rl_agents.rollout import Trajectory, rollout
from rl_agents.sampling import SamplingConfig
from rl_agents.validation import LR_DECAYS


@struct.dataclass
class TrainState:
    params: Any            # {"policy": ..., "value": ...} ("value" only with a critic)
    opt_state: Any
    ref_params: Any        # frozen reference policy (the initial / BC policy) for the KL term and
    #                        PRIME; None when neither is on (``Trainer.keeps_reference``)
    key: jax.Array
    step: jax.Array        # int32 []: updates done
    reward_params: Any = None  # frozen learned RM (config.reward.source == "learned"), else None
    prm: Any = None            # {"params", "opt_state"} of the PRIME implicit PRM, else None
    extra: Any = None          # the algorithm stage's own state (ArCHer: critic optimizer
    #                            state, target critic, replay buffer), else None
    rollout: Any = None        # the episodes in flight (rollout.mode "continuous":
    #                            ``rl_agents.continuous.CarriedRollout``), else None


def model_config(config, env) -> models.ModelConfig:
    m = config.model
    if env.phrases:
        raise ValueError(f"env {env.name!r} is a task in words: it needs a tokenizer, set "
                         f"config.model.hf_checkpoint (the 64-symbol model cannot read it)")
    return models.ModelConfig(
        vocab_size=vocab.size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, max_seq_len=env.max_episode_tokens,
        rope_theta=m.rope_theta, attention_impl=m.attention_impl, dtype=m.dtype,
        param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
        tie_embeddings=m.tie_embeddings)


def bc_logprob_chunk(config, pretrained: bool) -> int:
    """The BC warm start's T-chunk: ``bc.logprob_chunk``, or with -1 (the default) the RL loss's
    ``rl.logprob_chunk`` for a checkpoint's vocabulary and full logits for the 64 symbols."""
    chunk = int(config.bc.get("logprob_chunk", -1))
    if chunk < 0:
        return int(config.rl.get("logprob_chunk", 0)) if pretrained else 0
    return chunk


def make_env(config):
    return envs.make(config.env.name, **dict(config.env.kwargs))


def sequence_values(value_model, params, tokens, valid) -> jax.Array:
    """V(s_t) for the state *before* token t: the value head read at position t−1 (0 at t=0)."""
    v = value_model.apply({"params": params}, tokens, segment_ids=valid.astype(jnp.int32))
    return jnp.concatenate([jnp.zeros_like(v[:, :1]), v[:, :-1]], axis=1)


def kl_reward_penalty(behaviour_logp, ref_logp, mask, coef: float, kind: str) -> jax.Array:
    """−β·kl_t on the agent tokens (0 elsewhere), kl_t = ``losses.kl_estimate`` of the sampled
    token's behaviour vs reference log-prob: KL-in-reward's per-token penalty."""
    kl = losses.kl_estimate(behaviour_logp, ref_logp, kind)
    return jnp.where(mask, -coef * kl, 0.0)


# ============================================================================================
# Context modes: how episodes are sampled, warm-started, cut into rows and evaluated
# ============================================================================================
class FullContext:
    """``config.context.mode = "full"`` (or no ``context``): each episode is one training row
    of its whole token stream (``rl_agents.rollout``)."""

    name = "full"

    def __init__(self, trainer: "Trainer"):
        self.rows_per_episode = 1

    def sample(self, tr: "Trainer", params, key, *, num_groups: int, group_size: int,
               eval_mode: bool = False, sampling: SamplingConfig | None = None) -> Trajectory:
        return rollout(tr.env, tr.sampler, tr.sampler_params(params), key, num_groups=num_groups,
                       group_size=group_size, sampling=sampling or tr.sampling,
                       shard_rows=(lambda tree: tree) if eval_mode else tr.shard_rows)

    def warm_start(self, tr: "Trainer", policy_params, key, *, verbose: bool = False):
        params, _ = bc_lib.warm_start(tr.env, tr.policy, policy_params, key, tr.config.bc,
                                      verbose=verbose, adapters_only=tr.lora is not None,
                                      logprob_chunk=bc_logprob_chunk(tr.config,
                                                                     tr.pretrained is not None))
        return params

    def batch(self, tr: "Trainer", state: TrainState, traj: Trajectory, row_weight) -> dict:
        """The training rows: reference log-probs, shaped rewards, critic values and the
        estimator's advantages."""
        ref_logp = tr.reference_logprobs(state, traj)
        mask = traj.loss_mask
        rewards, turn_rewards, episode_return = tr.shaped_rewards(traj, ref_logp)
        values = jnp.zeros(traj.tokens.shape, jnp.float32)
        if tr.value_model is not None:
            values = sequence_values(tr.value_model, state.params["value"], traj.tokens,
                                     traj.valid)
            values = jnp.where(mask, values, 0.0)
        inputs = AdvantageInputs(
            rewards=rewards, values=values, loss_mask=mask, turn_ids=traj.turn_ids,
            turn_end=traj.turn_end, group_ids=traj.group_ids, turn_rewards=turn_rewards,
            turn_valid=traj.turn_valid, turn_obs_hash=traj.turn_obs_hash,
            episode_return=episode_return)
        adv, returns = compute_advantages(tr.algorithm.estimator, inputs,
                                          **dict(tr.config.rl.advantage_kwargs))
        batch = dict(tokens=traj.tokens, valid=traj.valid,
                     loss_mask=mask & (row_weight[:, None] > 0), old_logp=traj.behaviour_logp,
                     advantages=adv, returns=returns, old_values=values)
        if ref_logp is not None:
            batch["ref_logp"] = ref_logp
        return batch

    def metrics(self, traj, prefix: str) -> dict:
        return {}


def _context(tr: "Trainer"):
    context = tr.config.get("context", None)
    mode = "full" if context is None else context.get("mode", "full")
    if mode == "full":
        return FullContext(tr)
    if mode == "supo":
        from rl_agents.summarization import SupoContext
        return SupoContext(tr)
    raise ValueError(f"config.context.mode={mode!r} is not one of ['full', 'supo']")


def _stage(tr: "Trainer"):
    name = tr.algorithm.stage
    if name is None:
        return None
    if name == "archer":
        from rl_agents.archer import ArcherStage
        return ArcherStage(tr)
    raise ValueError(f"algorithm {tr.algorithm.name!r} names an unknown stage {name!r}")


# ============================================================================================
# The trainer
# ============================================================================================
class Trainer:
    """A run's components and its jitted ``init`` / ``update`` / ``evaluate`` (module docstring).
    Build it with ``make_trainer(config, mesh)``."""

    def __init__(self, config, mesh: jax.sharding.Mesh | None = None, *,
                 checkpoint_weights: bool = True):
        self.config = config
        self.mesh = mesh
        self.env = make_env(config)
        self.algorithm = get_algorithm(config.rl.algorithm)
        check_options(config)
        self.pretrained = None
        if config.model.get("hf_checkpoint", ""):
            from rl_agents.pretrained import load_pretrained
            self.pretrained = load_pretrained(config.model, self.env, weights=checkpoint_weights)
            self.env = self.pretrained.env                # the task in the tokenizer's ids
            self.model_cfg = self.pretrained.model_cfg
        else:
            self.model_cfg = model_config(config, self.env)
        self.lora = lora_settings(config)              # (rank, alpha, targets) or None
        self.policy = models.PolicyModel(self.model_cfg)
        if self.lora is not None:                      # adapters on the projections (qwix)
            self.policy = lora_lib.apply_lora(self.policy, *self.lora)
        self.value_model = models.ValueModel(self.model_cfg) if self.algorithm.critic else None
        # the sampler: the policy at rollout.dtype (bfloat16 sampling of a float32 policy)
        self.sampler_dtype = models.config.dtype_name(config.rollout.get("dtype", "float32"),
                                                      "dtype")
        self.sampler = self.policy
        if self.sampler_dtype != self.model_cfg.dtype:
            self.sampler = models.PolicyModel(self.model_cfg.replace(dtype=self.sampler_dtype))
            if self.lora is not None:
                self.sampler = lora_lib.apply_lora(self.sampler, *self.lora)
        rl = config.rl
        self.correction = rl.get("correction", "none")
        off_policy.check_correction(self.correction, rl.get("correction_cap", 2.0))
        self.policy_objective = losses.make_policy_loss(
            rl.get("policy_loss", self.algorithm.policy_loss), eps_low=rl.eps_low,
            eps_high=rl.eps_high, dual_clip=rl.dual_clip if rl.dual_clip > 0 else None,
            agg=rl.agg)
        r = config.rollout
        self.num_groups, self.group_size = r.num_groups, r.group_size
        self.num_episodes = r.num_groups * r.group_size
        self.sampling = SamplingConfig(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        self.context = _context(self)
        self.continuous = continuous_lib.settings_from_config(config)   # None: "sync"
        if self.continuous is not None and (self.algorithm.dynamic_sampling or self.algorithm.stage
                                            or self.context.name != "full"):
            raise ValueError(f"config.rollout.mode='continuous' is not supported with "
                             f"config.rl.algorithm={self.algorithm.name!r} / context.mode="
                             f"{self.context.name!r} (plain-context algorithms without dynamic "
                             f"sampling or an extra stage)")
        self.batch_size = self.num_episodes * self.context.rows_per_episode   # training rows
        if self.batch_size % rl.minibatches:
            raise ValueError(f"config.rl.minibatches={rl.minibatches} does not divide the batch "
                             f"{self.batch_size} (num_groups*group_size)")
        o = config.optim
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(o.grad_clip),
            optax.adamw(lr_schedule(o, config.total_updates * rl.epochs * rl.minibatches),
                        b1=0.9, b2=0.99, weight_decay=o.weight_decay))
        if self.lora is not None:   # the policy's base weights are frozen: no moments, no step
            self.optimizer = optax.multi_transform(
                {"train": self.optimizer, "frozen": optax.set_to_zero()}, _lora_labels)
        # Reward source and process rewards (config.reward; absent = env reward only).
        rw = config.get("reward", None)
        self.reward_source = "env" if rw is None else rw.source
        if self.reward_source not in ("env", "learned"):
            raise ValueError(f"config.reward.source={self.reward_source!r} is not one of "
                             f"['env', 'learned']")
        self.rm_model = None
        if self.reward_source == "learned":
            ckpt = str(rw.get("rm_checkpoint", "") or "")
            self.rm_model = models.RewardModel(
                rm_lib.load_reward_model_config(ckpt) if ckpt else self.model_cfg)
        self.process_cfg = rw.process if (rw is not None and "process" in rw
                                          and rw.process.enabled) else None
        self.prm_optimizer = None
        if self.process_cfg is not None:
            process_lib.process_kwargs(self.process_cfg)        # validates the keys early
            self.prm_optimizer = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                                             optax.adam(self.process_cfg.lr))
        self.stage = _stage(self)
        self.rm_metrics: dict = {}        # the learned RM's held-out accuracy, set by init
        # traced with the mesh as context: the Pallas kernels run per shard (models.attention)
        self.evaluate = jax.jit(on_mesh(self._evaluate, mesh),
                                static_argnames=("episodes", "greedy"))
        self.sample_groups = jax.jit(on_mesh(self._sample_groups, mesh),
                                     static_argnames=("num_groups", "group_size"))
        if mesh is None:
            self.state_shardings = None
            self.update = jax.jit(self.step, donate_argnums=0)
        else:
            self.state_shardings = self._state_shardings()
            self.update = jax.jit(on_mesh(self.step, mesh), donate_argnums=0,
                                  in_shardings=(self.state_shardings,),
                                  out_shardings=(self.state_shardings, NamedSharding(mesh, P())))

    # ---------------------------------------------------------------- sharding
    def _boxed_params(self, key):
        """Params with their ``nn.Partitioned`` logical-axis boxes (for sharding specs)."""
        tokens = jnp.zeros((1, 8), jnp.int32)
        k_pol, k_val = jax.random.split(key)
        out = {"policy": self.policy.init(k_pol, tokens)["params"]}
        if self.value_model is not None:
            out["value"] = self.value_model.init(k_val, tokens)["params"]
        return out

    def _state_shardings(self):
        """NamedShardings of the TrainState: params and optimizer moments by the models'
        logical-axis rules (``models.LOGICAL_AXIS_RULES``), scalars and keys replicated."""
        boxed = jax.eval_shape(self._boxed_params, jax.random.PRNGKey(0))
        boxed_opt = jax.eval_shape(self.optimizer.init, boxed)
        unboxed = nn.meta.unbox(boxed)
        unboxed_opt = nn.meta.unbox(boxed_opt)
        rules = models.LOGICAL_AXIS_RULES
        param_sh = param_shardings_from_logical(nn.get_partition_spec(boxed), self.mesh, rules,
                                                shapes=unboxed)
        opt_sh = param_shardings_from_logical(nn.get_partition_spec(boxed_opt), self.mesh, rules,
                                              shapes=unboxed_opt)
        rep = NamedSharding(self.mesh, P())
        extras = {}
        if self.rm_model is not None:     # the RM is small and frozen: replicated
            abstract_rm = jax.eval_shape(lambda k: models.init_params(self.rm_model, k),
                                         jax.random.PRNGKey(0))
            extras["reward_params"] = jax.tree.map(lambda _: rep, abstract_rm)
        if self.prm_optimizer is not None:  # the PRM is a policy copy: policy's shardings
            boxed_prm_opt = jax.eval_shape(self.prm_optimizer.init, boxed["policy"])
            prm_opt_sh = param_shardings_from_logical(
                nn.get_partition_spec(boxed_prm_opt), self.mesh, rules,
                shapes=nn.meta.unbox(boxed_prm_opt))
            extras["prm"] = {"params": param_sh["policy"], "opt_state": prm_opt_sh}
        state = TrainState(params=param_sh, opt_state=opt_sh,
                           ref_params=(None if not self.keeps_reference else
                                       lora_lib.adapters(param_sh["policy"]) if self.lora
                                       else param_sh["policy"]),
                           key=rep, step=rep, **extras)
        if self.stage is not None:
            opt_sh, extra_sh = self.stage.shardings(self, boxed)
            state = state.replace(opt_state=opt_sh, extra=extra_sh)
        if self.continuous is not None:   # the carried slots: rows over the data axes
            abstract = jax.eval_shape(lambda: continuous_lib.init_carried(
                self.env, self.sampler, self.continuous, self.group_size))
            rows = NamedSharding(self.mesh, P(("data", "fsdp")))
            slots = abstract.turn.shape[0]
            sh = jax.tree.map(lambda x: rows if x.ndim >= 1 and x.shape[0] == slots else rep,
                              abstract)
            cache_rows = NamedSharding(self.mesh, P(None, ("data", "fsdp")))
            sh = sh.replace(cache=sh.cache.replace(k=cache_rows, v=cache_rows))
            state = state.replace(rollout=sh)
        return state

    def shard_rows(self, tree):
        """Constrain batch-leading leaves to the ("data", "fsdp") axes of the mesh."""
        if self.mesh is None:
            return tree
        sh = NamedSharding(self.mesh, P(("data", "fsdp")))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sh), tree)

    def _new_state(self, params, ref, key, extras) -> TrainState:
        """The state around fresh ``params``: optimizer state (the stage's, which may train a
        part of the params itself, with its extra state), reward extras, step 0."""
        if self.stage is None:
            opt_state, extra = self.optimizer.init(params), None
        else:
            opt_state, extra = self.stage.init(self, params)
        carried = None
        if self.continuous is not None:
            carried = continuous_lib.init_carried(self.env, self.sampler, self.continuous,
                                                  self.group_size)
        return TrainState(params=params, opt_state=opt_state, ref_params=ref, key=key,
                          step=jnp.zeros((), jnp.int32), extra=extra, rollout=carried, **extras)

    def fresh_state(self, key) -> TrainState:
        """A state without the BC warm start (same structure as ``init``'s)."""
        k_init, k_state = jax.random.split(key)
        params = self.init_params(k_init)
        return self._new_state(params, self._reference(params), k_state,
                               self._reward_extras(key, params["policy"], train_rm=False))

    @property
    def keeps_reference(self) -> bool:
        """Whether the state holds a frozen reference policy: only a KL term (``rl.kl_coef`` >
        0) or PRIME reads one, so without them no copy of the policy is kept."""
        return self.config.rl.kl_coef > 0 or self.process_cfg is not None

    def _reference(self, params):
        """A copy of the policy (own buffers: the update donates params), or None. With LoRA,
        a copy of the adapters only: the reference shares the frozen base weights."""
        if not self.keeps_reference:
            return None
        if self.lora is not None:
            return jax.tree.map(jnp.copy, lora_lib.adapters(params["policy"]))
        return jax.tree.map(jnp.copy, params["policy"])

    def reference_policy(self, state: TrainState):
        """The frozen reference policy's params (with LoRA: the state's base weights and the
        reference adapters)."""
        if self.lora is not None:
            return lora_lib.with_adapters(state.params["policy"], state.ref_params)
        return state.ref_params

    def _reward_extras(self, key, policy, *, train_rm: bool, verbose: bool = False) -> dict:
        """TrainState fields of the reward config: the learned RM's params (trained here on
        oracle-vs-perturbed preference pairs, trunk from the (BC) policy, or loaded from
        ``reward.rm_checkpoint``; random when ``train_rm`` is False: structure only) and the
        PRIME PRM (a copy of the initial / BC ``policy``) with its optimizer state."""
        out = {}
        k_rm = jax.random.fold_in(key, 7919)     # own stream: other keys unchanged
        if self.rm_model is not None:
            if train_rm:
                rm_model, rm_params, self.rm_metrics = rm_lib.reward_model_from_config(
                    self.config.reward, self.env, self.model_cfg, k_rm, init_trunk=policy,
                    verbose=verbose)
                if rm_model.cfg != self.rm_model.cfg:
                    raise ValueError(f"reward model config {rm_model.cfg} != {self.rm_model.cfg}")
            else:
                rm_params = rm_lib.init_reward_params(self.rm_model, k_rm)
            out["reward_params"] = rm_params
        if self.prm_optimizer is not None:
            prm = jax.tree.map(jnp.copy, policy)
            out["prm"] = {"params": prm, "opt_state": self.prm_optimizer.init(prm)}
        return out

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs (with shardings under a mesh) of the TrainState, for restoring."""
        abstract = jax.eval_shape(self.fresh_state, jax.random.PRNGKey(0))
        if self.state_shardings is None:
            return abstract
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, self.state_shardings)

    def place(self, state: TrainState) -> TrainState:
        """``state`` on ``state_shardings`` (global arrays in a multi-process job, built by each
        process from its own identical copy: ``models.sharding.put_global``)."""
        if self.state_shardings is None:
            return state
        return put_global(state, self.state_shardings)

    # ---------------------------------------------------------------- init / BC warm start
    def init_params(self, key) -> dict:
        """Policy params (random, or the HF checkpoint's: ``config.model.hf_checkpoint``) and
        the critic's (its trunk a copy of the policy's, head zero)."""
        k_pol, k_val = jax.random.split(key)
        if self.pretrained is not None:
            params = {"policy": jax.tree.map(jnp.array, self.pretrained.params)}
            if self.lora is not None:
                params["policy"] = lora_lib.add_adapters(self.policy, params["policy"], k_pol)
        else:
            params = {"policy": models.init_params(self.policy, k_pol)}
        if self.value_model is not None:
            value = models.init_params(self.value_model, k_val)
            params["value"] = models.init_value_from_policy(self.policy_weights(params["policy"]),
                                                            value)
        return params

    def sampler_params(self, policy_params):
        """The policy's params as the sampler reads them: floating leaves cast to
        ``rollout.dtype`` (unchanged when it is the model's own dtype)."""
        if self.sampler is self.policy:
            return policy_params
        dt = jnp.dtype(self.sampler_dtype)
        return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating)
                            else x, policy_params)

    def policy_weights(self, policy_params) -> dict:
        """Plain ``PolicyModel`` params of the policy (LoRA adapters merged: ``models.lora``),
        for export and for the critic's trunk."""
        if self.lora is not None:
            return lora_lib.merge(policy_params, self.lora[0], self.lora[1])
        return policy_params

    def init(self, key, *, verbose: bool = False) -> TrainState:
        """Fresh params, the context's BC warm start on oracle demos (``config.bc.episodes > 0``),
        critic trunk from the (BC) policy, learned RM / PRM, optimizer and stage states."""
        if self.pretrained is not None and not self.pretrained.has_weights:
            raise ValueError(f"config.model.hf_checkpoint: the trainer was built without the "
                             f"weights of {self.pretrained.path}; it can restore a trained state, "
                             f"not start one")
        k_init, k_bc, k_state = jax.random.split(key, 3)
        params = self.init_params(k_init)
        if self.config.bc.episodes > 0:
            params["policy"] = self.context.warm_start(self, params["policy"], k_bc,
                                                       verbose=verbose)
            if self.value_model is not None:
                params["value"] = models.init_value_from_policy(
                    self.policy_weights(params["policy"]), params["value"])
        extras = self._reward_extras(key, params["policy"], train_rm=True, verbose=verbose)
        return self.place(self._new_state(params, self._reference(params), k_state, extras))

    # ================================================================ stage 1: collect
    def collect(self, policy_params, key) -> tuple[Any, jax.Array, dict]:
        """``(episodes, row weights [B], metrics)`` for one update. With dynamic sampling
        (``dapo.dynamic_sampling``): ``round(num_groups · oversample)`` groups are sampled and
        the groups with 0 < #successes < G kept (filler groups weighted 0 if too few)."""
        if not self.algorithm.dynamic_sampling:
            traj = self._sample_groups(policy_params, key, num_groups=self.num_groups,
                                       group_size=self.group_size)
            return traj, jnp.ones((self.num_episodes,), jnp.float32), {}
        traj = self._sample_groups(policy_params, key, num_groups=self.oversampled_groups(),
                                   group_size=self.group_size)
        return dapo.dynamic_sampling(traj, self.num_groups, self.group_size)

    def collect_continuous(self, policy_params, carried, key, version):
        """Continuous mode's collect: turn steps over the carried slots until ``num_groups``
        groups have completed (``rl_agents.continuous``) → ``(episodes, row weights, metrics,
        carried)``; weight 0 for buffer rows not filled."""
        carried, traj, row_weight, metrics = continuous_lib.continue_rollout(
            self.env, self.sampler, self.sampler_params(policy_params), self.sampling, carried,
            key, version, self.continuous, group_size=self.group_size, capacity=self.num_groups)
        return traj, row_weight, metrics, carried

    def oversampled_groups(self) -> int:
        """Groups sampled per update by dynamic sampling: max(num_groups,
        round(num_groups · config.rl.oversample))."""
        return max(self.num_groups, int(round(self.num_groups * self.config.rl.oversample)))

    def _sample_groups(self, params, key, *, num_groups: int, group_size: int):
        """``num_groups × group_size`` sampled episodes, rows sharded over the data axes."""
        return self.context.sample(self, params, key, num_groups=num_groups,
                                   group_size=group_size)

    def logprobs(self, policy_params, tokens, valid):
        """``(logp, entropy)``, float32 ``[B,T]`` aligned with ``tokens``: entry t is
        log π(tokens[t] | tokens[<t]) and the entropy of that tempered distribution (logits /
        temperature at position t−1); entry 0 = 0. With ``config.rl.logprob_chunk`` = c > 0 the
        [B,T,V] logits are never built (``losses.chunked_logprobs_and_entropy`` over T-chunks of
        c positions, rematerialised in the backward pass); c = 0 computes the full logits."""
        t = self.sampling.temperature
        seg = valid.astype(jnp.int32)
        chunk = self.config.rl.get("logprob_chunk", 0)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"config.rl.logprob_chunk={chunk!r} must be an int >= 0 "
                             f"(0: full logits)")
        if chunk > 0:
            hidden, unembed = models.policy_hidden(self.policy, policy_params, tokens,
                                                   segment_ids=seg)
            return losses.chunked_logprobs_and_entropy(hidden, unembed, tokens, t, chunk)
        logits = self.policy.apply({"params": policy_params}, tokens, segment_ids=seg) / t
        ent = losses.entropy_from_logits(logits)
        ent = jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent[:, :-1]], axis=1)
        return losses.sequence_logprobs(logits, tokens), ent

    # ================================================================ stage 2: score
    def score(self, state: TrainState, traj: Trajectory, row_weight):
        """``(traj, prm, metrics)``: with ``reward.source == "learned"`` the RM's episode score
        replaces the env reward (rewards / turn_rewards / episode_return); with
        ``reward.process.enabled`` the PRIME PRM takes its online step on the success labels and
        its (Clip / Delta shaped) process rewards are added at every granularity."""
        metrics, prm = {}, state.prm
        if self.rm_model is not None:
            traj = rm_lib.relabel_with_learned_reward(self.rm_model, state.reward_params, traj)
            metrics["rollout/learned_return"] = traj.episode_return.mean()
        if self.process_cfg is not None:
            ref_logp, _ = self.logprobs(self.reference_policy(state), traj.tokens, traj.valid)
            traj, prm, pm = process_lib.apply_process_rewards(
                traj, self.policy, prm, ref_logp, row_weight, optimizer=self.prm_optimizer,
                temperature=self.sampling.temperature,
                **process_lib.process_kwargs(self.process_cfg))
            metrics.update(pm)
        return traj, prm, metrics

    def shaped_rewards(self, traj: Trajectory, ref_logp):
        """``(rewards [B,T], turn_rewards [B,K], episode_return [B])``: the trajectory's rewards
        with the run's reward shaping folded in at every granularity, so that every estimator
        sees it whichever of the three it reads:

        * DAPO's soft overlong penalty (``rl.overlong_cache_len`` > 0) on the episode's
          agent-token count: on the last turn's turn-end token, the last turn, the episode;
        * KL-in-reward (``rl.kl_in_reward`` with ``rl.kl_coef`` = β > 0): −β·kl_t on each agent
          token (``kl_reward_penalty``: kl_t of the sampled token vs the reference policy),
          its sum over each turn's agent tokens on the turn, its sum over the episode on the
          return. The group-relative estimators (GRPO, Dr. GRPO, RLOO, DAPO, GiGPO's episode
          and step terms) therefore normalise the KL-penalised outcome.
        """
        rl = self.config.rl
        rewards, turn_rewards = traj.rewards, traj.turn_rewards
        episode_return = traj.episode_return
        mask = traj.loss_mask
        k = turn_rewards.shape[1]
        if rl.overlong_cache_len > 0:
            budget = self.env.max_turns * self.env.action_len
            pen = dapo.overlong_penalty(mask.sum(-1), budget, rl.overlong_cache_len)
            last_turn = traj.episode_length - 1
            rewards = rewards + pen[:, None] * (traj.turn_end & (traj.turn_ids == last_turn[:, None]))
            turn_rewards = turn_rewards + pen[:, None] * (
                jnp.arange(k)[None] == last_turn[:, None])
            episode_return = episode_return + pen
        if rl.kl_coef > 0 and rl.kl_in_reward:
            kl_pen = kl_reward_penalty(traj.behaviour_logp, ref_logp, mask, rl.kl_coef,
                                       rl.kl_kind)
            rewards = rewards + kl_pen
            turn_rewards = turn_rewards + per_turn_sum(kl_pen, mask, traj.turn_ids, k)
            episode_return = episode_return + kl_pen.sum(-1)
        return rewards, turn_rewards, episode_return

    # ================================================================ stage 3: advantages
    def reference_logprobs(self, state: TrainState, traj):
        """log π_ref of the sampled tokens ``[B,T]`` when a KL term is on (``rl.kl_coef`` > 0),
        else None."""
        if self.config.rl.kl_coef > 0:
            return self.logprobs(self.reference_policy(state), traj.tokens, traj.valid)[0]
        return None

    def advantages(self, state: TrainState, traj, row_weight) -> dict:
        """The training batch (rows of the context mode) with the algorithm's advantages."""
        return self.context.batch(self, state, traj, row_weight)

    def correct(self, state: TrainState, batch: dict):
        """Off-policy correction of the batch (``rl.correction``, ``rl_agents.off_policy``):
        with a correction on, π_old is recomputed by the trainer at the update's starting
        parameters and replaces the behaviour log-probs in the ratio, and the advantages are
        weighted (TIS) or masked (MIS) by π_old/μ. ``(batch, metrics)``; metrics hold the exact
        ``mismatch/kl`` over the whole batch."""
        if self.correction == "none":
            return batch, {}
        trainer_logp = self.logprobs(state.params["policy"], batch["tokens"], batch["valid"])[0]
        adv, mask, metrics = off_policy.correct(
            trainer_logp, batch["old_logp"], batch["advantages"], batch["loss_mask"],
            kind=self.correction, cap=float(self.config.rl.get("correction_cap", 2.0)))
        return {**batch, "old_logp": trainer_logp, "advantages": adv, "loss_mask": mask}, metrics

    # ================================================================ stage 4: optimize
    def policy_loss(self, policy_params, mb):
        """``rl.policy_loss`` (PPO-clip by default) − entropy bonus (+ KL loss):
        ``(total, metrics)``."""
        rl = self.config.rl
        if self.lora is not None:       # gradients reach the adapters only
            policy_params = lora_lib.freeze_base(policy_params)
        logp, ent = self.logprobs(policy_params, mb["tokens"], mb["valid"])
        mask = mb["loss_mask"]
        pg, pg_metrics = self.policy_objective(logp, mb["old_logp"], mb["advantages"], mask,
                                               max_len=mb["tokens"].shape[1])
        total = pg
        metrics = {"loss/policy": pg, **{f"policy/{k}": v for k, v in pg_metrics.items()}}
        # ent[:, t]: entropy of the distribution that produced token t (see _logprobs)
        ent_mean = losses.aggregate(ent, mask, "token-mean")
        metrics["policy/entropy"] = ent_mean
        if rl.entropy_coef > 0:
            total = total - rl.entropy_coef * ent_mean
        if "ref_logp" in mb:
            kl = losses.kl_loss(logp, mb["ref_logp"], mask, rl.kl_kind, "token-mean")
            metrics["policy/kl_ref"] = kl
            if not rl.kl_in_reward:
                total = total + rl.kl_coef * kl
        return total, metrics

    def loss_fn(self, params, mb):
        """``policy_loss`` + value loss (with a critic)."""
        rl = self.config.rl
        total, metrics = self.policy_loss(params["policy"], mb)
        mask = mb["loss_mask"]
        if self.value_model is not None:
            v = sequence_values(self.value_model, params["value"], mb["tokens"], mb["valid"])
            vl = losses.value_loss(v, mb["old_values"], mb["returns"], mask,
                                   clip_eps=rl.value_clip if rl.value_clip > 0 else None)
            metrics["loss/value"] = vl
            total = total + rl.value_coef * vl
        metrics["loss"] = total
        return total, metrics

    def optimize(self, loss_fn, params, opt_state, batch: dict, key):
        """``minibatch_epochs`` of ``loss_fn`` with this run's optimizer, ``config.rl.epochs`` /
        ``minibatches`` / ``target_kl`` and batch size."""
        rl = self.config.rl
        return minibatch_epochs(loss_fn, self.optimizer, params, opt_state, batch, key,
                                epochs=rl.epochs, minibatches=rl.minibatches,
                                batch_size=self.batch_size, target_kl=float(rl.get("target_kl", 0.0)))

    def step(self, state: TrainState):
        """One RL iteration, pure (``update`` is its jit): collect → score → advantages (or the
        algorithm's stage) → correct → optimize → non-finite guard → ``(state, metrics)``."""
        if self.stage is None:
            key, k_roll, k_perm = jax.random.split(state.key, 3)
        else:
            key, k_roll, k_perm, k_stage = jax.random.split(state.key, 4)
        carried = state.rollout
        if self.continuous is None:
            env_traj, row_weight, collect_metrics = self.collect(state.params["policy"], k_roll)
        else:
            env_traj, row_weight, collect_metrics, carried = self.collect_continuous(
                state.params["policy"], state.rollout, k_roll, state.step)
        traj, prm, reward_metrics = self.score(state, env_traj, row_weight)
        if self.stage is None:
            batch, correction_metrics = self.correct(state, self.advantages(state, traj,
                                                                            row_weight))
            params, opt_state, metrics = self.optimize(self.loss_fn, state.params,
                                                       state.opt_state, batch, k_perm)
            extra, stage_bad, stage_finite, stage_metrics = state.extra, 0.0, (), {}
        else:
            out = self.stage.advantages(self, state, traj, row_weight, k_stage)
            stage_batch, correction_metrics = self.correct(state, out.batch)
            policy, opt_state, metrics = self.optimize(self.stage.loss_fn, state.params["policy"],
                                                       state.opt_state, stage_batch, k_perm)
            params = {**state.params, "policy": policy, **out.params}
            extra, stage_bad, stage_finite, stage_metrics = (out.extra, out.bad_steps,
                                                             out.check_finite, out.metrics)
        bad_steps = (metrics.pop(NONFINITE_STEP).sum() + stage_bad
                     + reward_metrics.get(PRM_NONFINITE_STEP, 0.0))
        skip, (params, opt_state, prm, extra) = skip_nonfinite(
            bad_steps, new=(params, opt_state, prm, extra),
            old=(state.params, state.opt_state, state.prm, state.extra), also=stage_finite)
        # sampler vs trainer: the first minibatch step runs at the sampling parameters
        mismatch = metrics["policy/approx_kl"][0, 0]
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["mismatch/kl"] = mismatch
        metrics.update(correction_metrics)       # the exact batch-wide mismatch/kl when computed
        metrics.update(stage_metrics)
        metrics.update(episode_metrics(env_traj, "rollout", row_weight if self.continuous
                                       else None))    # env returns, not the learned ones
        metrics.update(self.context.metrics(env_traj, "rollout"))
        metrics.update(reward_metrics)
        metrics["rollout/kept_fraction"] = row_weight.mean()
        metrics.update(nonfinite_metrics(skip, bad_steps))
        metrics.update(collect_metrics)
        new_state = state.replace(params=params, opt_state=opt_state, key=key, step=state.step + 1,
                                  prm=prm, extra=extra, rollout=carried)
        return new_state, metrics

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, policy_params, key, *, episodes: int, greedy: bool = True):
        sampling = SamplingConfig(greedy=True) if greedy else self.sampling
        traj = self.context.sample(self, policy_params, key, num_groups=episodes, group_size=1,
                                   eval_mode=True, sampling=sampling)
        return {**episode_metrics(traj, "eval"), **self.context.metrics(traj, "eval")}, traj


def lora_settings(config):
    """``(rank, alpha, targets)`` of ``config.model.lora`` (rank 0 or absent: None)."""
    lc = config.model.get("lora", None)
    if lc is None or int(lc.rank) == 0:
        return None
    targets = tuple(t.strip() for t in str(lc.targets).split(",") if t.strip())
    lora_lib.check_lora(int(lc.rank), float(lc.alpha), targets)
    return int(lc.rank), float(lc.alpha), targets


def _lora_labels(params):
    """optax labels: the policy's base weights "frozen", its adapters and everything else
    (the critic) "train"."""
    def label(tree, policy):
        mask = lora_lib.adapter_mask(tree)
        return jax.tree.map(lambda a: "train" if (a or not policy) else "frozen", mask)
    return {k: label(v, k == "policy") for k, v in params.items()}


def lr_schedule(optim, total_steps: int):
    """The policy learning rate per optimizer step from ``config.optim``.

    Linear warm-up 0 → ``lr`` over ``warmup_steps`` steps (none if 0: the first step already
    uses ``lr``), then ``decay``: "constant" keeps ``lr``; "cosine" / "linear" go from ``lr`` to
    ``lr · final_lr_fraction`` over the remaining ``total_steps − warmup_steps`` steps
    (``total_steps = total_updates · epochs · minibatches``, every optimizer step of the run) and
    stay there. Returns a float when the rate is constant, else an optax schedule.
    """
    decay = optim.get("decay", "constant")
    if decay not in LR_DECAYS:
        raise ValueError(f"config.optim.decay = {decay!r} is not one of {list(LR_DECAYS)}")
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    if decay == "constant":
        return optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    end = lr * float(optim.get("final_lr_fraction", 0.0))
    steps = max(int(total_steps) - warmup, 1)
    tail = (optax.cosine_decay_schedule(lr, steps, alpha=end / lr) if decay == "cosine"
            else optax.linear_schedule(lr, end, steps))
    if warmup == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), tail], [warmup])


def minibatch_epochs(loss_fn, optimizer, params, opt_state, batch: dict, key, *, epochs: int,
                     minibatches: int, batch_size: int, target_kl: float = 0.0):
    """``epochs`` passes over ``batch`` (rows shuffled per epoch, split into ``minibatches``), one
    optimizer step per minibatch, as nested ``lax.scan``s. Returns (params, opt_state, metrics
    stacked [epochs, minibatches]).

    A step whose loss or gradient global norm is not finite (NaN / inf) is skipped: parameters
    and optimizer state stay as they were (the optimizer's step count too), later steps go on;
    ``update/nonfinite_step`` = 1 on such steps (``NONFINITE_STEP``).

    A minibatch without a loss token (``loss_mask`` all False: the unfilled rows of a continuous
    buffer, filler groups) is skipped too: its gradient is zero, and an AdamW step on a zero
    gradient would still move the parameters along the moment estimates and decay them.
    ``update/empty_step_frac`` is the fraction of the update's steps skipped so.

    ``target_kl`` > 0 adds PPO's KL early stopping (Stable-Baselines3 ``target_kl``): once a
    minibatch's ``policy/approx_kl`` (KL(π_old‖π) of the current parameters, measured before
    its step) exceeds 1.5·target_kl, that step and every later step of this update are skipped
    (parameters and optimizer state kept); ``policy/kl_stopped`` = 1 on skipped steps.
    """
    if target_kl < 0:
        raise ValueError(f"target_kl must be >= 0 (0: off), got {target_kl!r}")

    def epoch(carry, ekey):
        perm = jax.random.permutation(ekey, batch_size)
        shuffled = jax.tree.map(lambda x: x[perm].reshape((minibatches, -1) + x.shape[1:]), batch)

        def minibatch(carry, mb):
            params, opt_state, stopped = carry
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            empty = ~jnp.any(mb["loss_mask"]) if "loss_mask" in mb else None
            new_params, new_opt, grad_norm, bad = guarded_step(optimizer, params, opt_state,
                                                               loss, grads, empty=empty)
            metrics["grad_norm"] = grad_norm
            metrics[NONFINITE_STEP] = bad.astype(jnp.float32)
            if empty is not None:
                metrics["update/empty_step_frac"] = empty.astype(jnp.float32)
            if target_kl > 0:
                stopped = stopped | (metrics["policy/approx_kl"] > 1.5 * target_kl)
                new_params, new_opt = tree_select(stopped, (params, opt_state),
                                                  (new_params, new_opt))
                metrics["policy/kl_stopped"] = stopped.astype(jnp.float32)
            return (new_params, new_opt, stopped), metrics

        return jax.lax.scan(minibatch, carry, shuffled)

    (params, opt_state, _), metrics = jax.lax.scan(
        epoch, (params, opt_state, jnp.zeros((), bool)), jax.random.split(key, epochs))
    return params, opt_state, metrics


def episode_metrics(traj: Trajectory, prefix: str, weight=None) -> dict:
    """Episode means (over the rows with ``weight`` > 0 when given)."""
    if weight is None:
        mean = jnp.mean
    else:
        w = (weight > 0).astype(jnp.float32)
        mean = lambda x: (x * w).sum() / jnp.maximum(w.sum(), 1.0)
    return {
        f"{prefix}/success_rate": mean(traj.success),
        f"{prefix}/return": mean(traj.episode_return),
        f"{prefix}/turns": mean(traj.episode_length),
        f"{prefix}/agent_tokens": mean(traj.loss_mask.sum(-1)),
        f"{prefix}/format_error_rate": mean(traj.turn_format_error.sum(-1)
                                            / jnp.maximum(traj.episode_length, 1)),
        f"{prefix}/truncated": mean(traj.truncated),
    }


def make_trainer(config, mesh: jax.sharding.Mesh | None = None, *,
                 checkpoint_weights: bool = True) -> Trainer:
    """The ``Trainer`` of ``config`` (any algorithm, any context mode) on ``mesh`` (None: one
    device, no shardings). ``checkpoint_weights=False``: a ``model.hf_checkpoint``'s weights are
    not read (the trainer restores a trained state; ``init`` refuses)."""
    return Trainer(config, mesh, checkpoint_weights=checkpoint_weights)


def make_update(config, mesh: jax.sharding.Mesh | None = None):
    """``(init, update)``: the pure functions of a run. ``init(key) -> TrainState`` (warm start
    included), ``update(state) -> (state, metrics)`` (jitted, donates ``state``)."""
    trainer = make_trainer(config, mesh)
    return trainer.init, trainer.update


def make_train(config):
    """PureJaxRL shape: ``train(key) -> (final state, metrics stacked over updates)``, for every
    registered algorithm and context mode.

    The warm start (BC, learned RM) runs first (its own jitted steps); the ``total_updates`` RL
    updates are one ``lax.scan`` of the trainer's update inside one jit, exactly the update
    ``experiments.train`` runs. ``train.trainer`` is the ``Trainer``.
    """
    trainer = make_trainer(config)

    @jax.jit
    def run(state):
        return jax.lax.scan(lambda s, _: trainer.step(s), state, None,
                            length=config.total_updates)

    def train(key):
        return run(trainer.init(key))

    train.trainer = trainer
    return train
