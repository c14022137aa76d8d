"""Train state creation (already sharded) and the jitted train step.

State is a plain dict: `{"step": int32, "params", "opt_state", "rng": uint32[2]}`.
It is created with `jax.eval_shape(init)` -> shardings from the logical
rules -> `jax.jit(init, out_shardings=...)`, so no device ever holds a full
replicated copy of a sharded parameter. The step is jitted with in/out
shardings and the state is donated.

With `model.image.patch_dropout` and `unmasked_tuning_steps` (FLIP's unmasked
tuning) a Trainer has two step functions: the run's, and for the last steps one of
the same model with patch dropout off (`Trainer.unmasked`, `unmasked_start`). Both
take and return the same state, so the loop switches between them by step count
alone and a run resumed in the tail runs the tail's.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.data.decode import normalize_on_device
from mmjax.errors import ConfigError
from mmjax.models.ops.policy import KernelPolicy, kernel_policy
from mmjax.train import sharding as shd
from mmjax.families import compute_losses, get_family
from mmjax.train import init_sources
from mmjax.train.optimizer import (cast_frozen, clamp_params, frozen_dtype,
                                   frozen_labels)
from mmjax.train import trees


class Trainer:
    """Holds the model, optimizer, mesh and the compiled functions of one run."""

    def __init__(self, config: Any, model: nn.Module, tx: optax.GradientTransformation,
                 schedule: Callable, mesh: jax.sharding.Mesh):
        self.config, self.model, self.tx, self.schedule, self.mesh = config, model, tx, schedule, mesh
        self.objectives = dict(config.objectives)
        self.family = get_family(config)
        self.media = self.family.media(config.model)
        self.policy = KernelPolicy(
            platform=mesh.devices.flat[0].platform,
            grad_reduce_dtype=str(config.optim.get("grad_reduce_dtype", "float32")),
            gather_weights=shd.mesh_choice(config.mesh, "fsdp_weights",
                                           shd.FSDP_WEIGHTS) == "gather_once")
        # XLA options of the compiled steps (on TPU: FSDP's ring one way or two ways).
        self.compiler_options = shd.compiler_options(
            mesh, shd.mesh_choice(config.mesh, "fsdp_ring", shd.FSDP_RINGS))
        # Scalars kept in a range after every update (CLIP's logit scale, BLIP-2's temperature).
        self.param_bounds = model.param_bounds() if hasattr(model, "param_bounds") else {}
        self.freeze = list(config.optim.get("freeze") or [])
        frozen_dtype(config.optim)  # a bad config.optim.frozen_dtype fails here, named
        images, text = self.family.sample_inputs(config)

        def init(rng):
            # Frozen weights may be stored in a smaller dtype (config.optim.frozen_dtype).
            params = cast_frozen(nn.meta.unbox(model.init(rng, images, text)["params"]),
                                 config.optim)
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": tx.init(params),
                    "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}
        self._init = init

        with self.context():
            boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images, text))["params"]
            param_sh = shd.state_shardings(boxed, mesh)
            # The key is made inside the traced function: nothing here may run on a
            # device eagerly (the mesh may hold compile-only accelerator devices).
            abstract = jax.eval_shape(lambda: init(jax.random.key(0)))
            repl = shd.replicated(mesh)
            opt_sh = shd.follow_params(abstract["opt_state"], abstract["params"], param_sh, mesh)
        self.state_sharding = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract, self.state_sharding)
        self.batch_sharding = shd.batch_sharding(mesh)
        # FLIP's unmasked tuning: steps from `unmasked_from` on (the last
        # `unmasked_tuning_steps`) run a second step function, of the same model with
        # the tower's patch dropout off: the same parameters, so the state carries on.
        self.unmasked_from = unmasked_start(config)
        self.unmasked_model = (model.clone(image={**dict(model.image), "patch_dropout": 0.0})
                               if self.unmasked_from is not None else None)
        self._steps, self._grad_fns, self._init_fn = {}, {}, None

    def context(self):
        """Mesh, logical rules and kernel policy active while tracing (losses read the
        mesh; matmuls are lowered for the platform of the mesh's devices, not the
        host's, so a TPU step compiled on a CPU host gets the TPU path)."""
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(shd.logical_rules_context())
        stack.enter_context(kernel_policy(self.policy))
        return stack

    def init_state(self, seed: int) -> dict:
        """Fresh state: random init, then the `config.init` sources."""
        if self._init_fn is None:  # one compile per trainer, whatever the seed
            self._init_fn = jax.jit(self._init, out_shardings=self.state_sharding)
        with self.context():
            state = self._init_fn(jax.random.key(seed))
        state["params"] = clamp_params(init_sources.apply_init(state["params"], self.config),
                                       self.param_bounds)
        return state

    def referenced_keys(self) -> set:
        """Parameter paths left out of checkpoints (frozen, from `config.init`)."""
        return init_sources.referenced_keys(self.abstract_state["params"], self.config)

    def checkpoint_view(self, state: dict) -> dict:
        """What a checkpoint stores of `state` (see `init_sources`)."""
        return init_sources.strip_referenced(state, self.referenced_keys())

    def restore(self, ckpt: Any, step: Any = None,
                reset_stream: bool = False) -> tuple[dict, Any, int]:
        """`(state, data_state, step)` from `ckpt`; parameters the checkpoint
        references instead of storing are reloaded from their sources
        (`reset_stream`: see `Checkpointer.restore`)."""
        refs = self.referenced_keys()
        abstract = init_sources.strip_referenced(self.abstract_state, refs)
        restored, data_state, step = ckpt.restore(step, abstract, reset_stream=reset_stream)
        if refs:
            # Only the referenced sources are loaded, into the abstract tree's
            # shardings; no random init and no optimizer state is built.
            sourced = init_sources.apply_init(self.abstract_state["params"], self.config,
                                              only=refs)
            params = init_sources.merge_params(sourced, restored["params"])
            left = [k for k, v in trees.flat(params).items()
                    if isinstance(v, jax.ShapeDtypeStruct)]
            if left:
                raise RuntimeError(f"restore: parameters neither in the checkpoint nor in a "
                                   f"config.init source: {left[:4]}")
            restored = dict(restored, params=params)
        return restored, data_state, step

    # ------------------------------------------------------------------
    def unmasked(self, step: int) -> bool:
        """Whether the step that takes the state from `step` to `step + 1` is one of the
        unmasked tail (`unmasked_tuning_steps`; always False without patch dropout)."""
        return self.unmasked_from is not None and int(step) >= self.unmasked_from

    def _loss_and_grads(self, params, batch, rng, unmasked=False):
        # Gradients only for trained parameters: frozen ones (optim.freeze)
        # are closed over, so no backward work or memory goes to them.
        labels = trees.flat(frozen_labels(params, self.freeze))
        model = self.unmasked_model if unmasked else self.model

        def fn(p, b, key):
            flat = trees.flat(p)
            frozen = {k: v for k, v in flat.items() if labels[k] == "frozen"}
            trained = {k: v for k, v in flat.items() if labels[k] != "frozen"}

            def loss_fn(t):
                full = trees.nested({**frozen, **t})
                return compute_losses(model, full, b, self.objectives, key, self.family)
            out, g = jax.value_and_grad(loss_fn, has_aux=True)(trained)
            g = {**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **g}
            return out, trees.nested(g)
        accum = int(self.config.optim.get("accum_steps", 1) or 1)
        if accum == 1:
            (loss, metrics), grads = fn(params, batch, rng)
            return loss, metrics, grads
        # Micro-batches: each takes an equal slice of every device's rows, so
        # no data moves between devices. Contrastive negatives come from the
        # micro-batch.
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]

        def split(x):
            b = x.shape[0]
            if b % (shards * accum):
                raise ConfigError(f"config.batch_size={b} must be divisible by data x fsdp x "
                                  f"optim.accum_steps = {shards * accum}.")
            x = x.reshape((shards, accum, b // (shards * accum)) + x.shape[1:])
            x = jnp.swapaxes(x, 0, 1).reshape((accum, b // accum) + x.shape[3:])
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(self.mesh, P(None, shd.BATCH_AXES)))
        micro = jax.tree.map(split, batch)

        def run(mb, i):
            # Each micro-batch draws its own randomness (ITM negatives).
            (loss, metrics), grads = fn(params, mb, jax.random.fold_in(rng, i))
            return loss, metrics, grads

        def body(acc, xs):
            mb, i = xs
            return jax.tree.map(jnp.add, acc, run(mb, i)), None
        first = run(jax.tree.map(lambda x: x[0], micro), 0)
        rest = (jax.tree.map(lambda x: x[1:], micro), jnp.arange(1, accum))
        total, _ = jax.lax.scan(body, first, rest)
        return jax.tree.map(lambda x: x / accum, total)

    def _prepare(self, state, batch):
        """The batch as the model takes it and this step's random key."""
        batch = dict(batch)
        if batch[self.media].dtype == jnp.uint8:  # pixels (images, video frames)
            d = self.config.data.train
            batch[self.media] = normalize_on_device(batch[self.media], d.mean, d.std)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        return batch, rng

    def _grads(self, state, batch, unmasked=False):
        batch, rng = self._prepare(state, batch)
        return self._loss_and_grads(state["params"], batch, rng, unmasked)

    def _train_step(self, state, batch, unmasked=False):
        batch, rng = self._prepare(state, batch)
        loss, metrics, grads = self._loss_and_grads(state["params"], batch, rng, unmasked)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = clamp_params(params, self.param_bounds)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       lr=self.schedule(state["step"]))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "rng": state["rng"]}
        return new_state, metrics

    def compiled_step(self, unmasked: bool = False):
        """The jitted step (`unmasked`: the unmasked tail's, patch dropout off)."""
        unmasked = self._check_unmasked(unmasked)
        if unmasked not in self._steps:
            self._steps[unmasked] = jax.jit(
                functools.partial(self._train_step, unmasked=unmasked),
                in_shardings=(self.state_sharding, self.batch_sharding),
                out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
                donate_argnums=(0,), compiler_options=self.compiler_options or None)
        return self._steps[unmasked]

    def _check_unmasked(self, unmasked: bool) -> bool:
        if unmasked and self.unmasked_model is None:
            raise ValueError("an unmasked step needs model.image.patch_dropout > 0 and "
                             "unmasked_tuning_steps > 0")
        return bool(unmasked)

    def grads(self, state: dict, batch: dict, unmasked: bool = False
              ) -> tuple[jax.Array, dict, Any]:
        """`(loss, metrics, grads)` that `step` would compute on `batch` at `state`
        (same shardings, micro-batching and random key, so the same patch dropout mask;
        `unmasked`: the unmasked tail's step; `grads` shaped and sharded like the
        parameters, zeros for frozen ones), without updating anything."""
        unmasked = self._check_unmasked(unmasked)
        if unmasked not in self._grad_fns:
            repl = shd.replicated(self.mesh)
            self._grad_fns[unmasked] = jax.jit(
                functools.partial(self._grads, unmasked=unmasked),
                in_shardings=(self.state_sharding, self.batch_sharding),
                out_shardings=(repl, repl, self.state_sharding["params"]),
                compiler_options=self.compiler_options or None)
        with self.context():
            return self._grad_fns[unmasked](state, batch)

    def step(self, state: dict, batch: dict, unmasked: bool = False) -> tuple[dict, dict]:
        """One optimizer step on a global batch (dict of sharded jax.Arrays);
        `unmasked`: the unmasked tail's step (`unmasked(step)` says when)."""
        with self.context():
            return self.compiled_step(unmasked)(state, batch)

    def lower(self, batch_shapes: dict, unmasked: bool = False):
        """AOT-lower the step for `batch_shapes` (name -> ShapeDtypeStruct)."""
        with self.context():
            return self.compiled_step(unmasked).lower(self.abstract_state, batch_shapes)


def patch_dropout(config: Any) -> float:
    """`model.image.patch_dropout` of a config (0 where not set)."""
    return float((config.model.get("image") or {}).get("patch_dropout") or 0.0)


def unmasked_start(config: Any) -> Optional[int]:
    """The first step (the state's step count before it) of the unmasked tail:
    `total_steps - unmasked_tuning_steps`; None without one (no tail, or no patch
    dropout to turn off). Read from the config in use, so a resumed run switches
    at the same step whatever step it resumed from."""
    tail = int(config.get("unmasked_tuning_steps") or 0)
    if not tail or not patch_dropout(config):
        return None
    return int(config.total_steps) - tail


def unmasked_config(config: Any) -> Any:
    """A copy of `config` with the media tower's patch dropout off: the model the
    unmasked tail trains (for its FLOPs)."""
    out = config.copy_and_resolve_references()
    if patch_dropout(out):
        with out.unlocked():
            out.model.image.patch_dropout = 0.0
    return out


def build_trainer(config: Any, devices: Optional[Sequence[jax.Device]] = None,
                  model: Optional[nn.Module] = None) -> Trainer:
    """The one way a `Trainer` is assembled (train, eval, bench, compile): the
    model of `config.model` (or `model`), its optimizer and schedule, and the
    mesh of `config.mesh` over `devices` (default: all), with the global batch
    checked against the mesh (`config.batch_size`)."""
    from mmjax.models import build
    from mmjax.train.optimizer import build_optimizer
    mesh = shd.make_mesh(config.mesh, devices)
    shd.local_batch_size(int(config.batch_size), mesh)  # divisibility, with the config key
    tx, schedule = build_optimizer(config.optim, int(config.total_steps))
    return Trainer(config, build(config.model) if model is None else model, tx, schedule, mesh)
