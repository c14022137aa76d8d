"""Objectives of the one-tower family: masked language modelling and VQA as
classification (ViLT, VLMo). ITM reuses `mmjax.losses.blip2` (triples and loss),
ITC the sharded softmax loss.

The masking is drawn with `jax.random` on device; threefry is partitionable
(`jax_threefry_partitionable`), so the masked positions of a sharded batch are
the ones a single device draws.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from mmjax.losses.xent import smoothed_cross_entropy


def mask_tokens(text: jax.Array, rng: jax.Array, *, mask_id: int, vocab_size: int,
                special_ids: Sequence[int], prob: float = 0.15
                ) -> tuple[jax.Array, jax.Array]:
    """BERT's masking of text ids for masked language modelling.

    Each token that is not special (`special_ids`: pad, [CLS]/BOS, [SEP]/EOS) is
    chosen with probability `prob`; a chosen token becomes `mask_id` (80%), a
    uniformly random id in `[0, vocab_size)` (10%), or stays (10%).

    Args:
      text: int `[B, L]`.
      rng: PRNG key; the result is a deterministic function of it.
    Returns:
      `(masked [B, L] int32, chosen [B, L] bool)`; the targets are `text` where
      `chosen`.
    """
    text = text.astype(jnp.int32)
    k_pick, k_how, k_rand = jax.random.split(rng, 3)
    maskable = ~jnp.isin(text, jnp.asarray(tuple(special_ids), jnp.int32))
    chosen = maskable & (jax.random.uniform(k_pick, text.shape) < prob)
    how = jax.random.uniform(k_how, text.shape)
    random_ids = jax.random.randint(k_rand, text.shape, 0, vocab_size, jnp.int32)
    masked = jnp.where(chosen & (how < 0.8), mask_id,
                       jnp.where(chosen & (how < 0.9), random_ids, text))
    return masked, chosen


def masked_lm_loss(logits: jax.Array, targets: jax.Array, chosen: jax.Array) -> jax.Array:
    """Mean cross-entropy over the chosen (masked) positions of the global batch.

    Args:
      logits: `[B, L, V]` (computed in float32).
      targets: int `[B, L]`, the unmasked ids.
      chosen: bool `[B, L]`, the positions `mask_tokens` chose.
    Returns: scalar float32 (0 when nothing is chosen), as `torch.nn.CrossEntropyLoss`
      with label -100 on the other positions.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or chosen.shape != targets.shape:
        raise ValueError(f"masked_lm_loss: expected logits [B, L, V], targets and chosen "
                         f"[B, L], got {logits.shape}, {targets.shape}, {chosen.shape}.")
    w = chosen.astype(jnp.float32)
    loss = smoothed_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1.0)


def vqa_targets(answer_ids: jax.Array, answer_scores: jax.Array, num_answers: int
                ) -> jax.Array:
    """Soft VQA targets `[..., A]` from answer ids `[..., K]` (-1 = none) and their
    scores `[..., K]` (VQAv2: min(1, humans who gave it / 3))."""
    hot = jax.nn.one_hot(answer_ids, num_answers, dtype=jnp.float32)  # -1 -> all zeros
    return jnp.einsum("...ka,...k->...a", hot, answer_scores.astype(jnp.float32))


def vqa_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """ViLT's VQA loss: binary cross-entropy of every answer logit against its soft
    score, summed over answers, averaged over the questions with `weights` 1.

    Args:
      logits: `[N, A]`; targets: `[N, A]` in [0, 1]; weights: `[N]` 0/1 (0 = no
        question in this row, e.g. a sample with fewer questions).
    Returns: scalar float32; equals `F.binary_cross_entropy_with_logits(logits,
      targets) * A` (ViLT, BAN) when every weight is 1.
    """
    if logits.shape != targets.shape or weights.shape != logits.shape[:1]:
        raise ValueError(f"vqa_loss: expected logits and targets [N, A] and weights [N], got "
                         f"{logits.shape}, {targets.shape}, {weights.shape}.")
    x, z = logits.astype(jnp.float32), targets.astype(jnp.float32)
    bce = jnp.maximum(x, 0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))
    w = weights.astype(jnp.float32)
    return jnp.sum(bce.sum(-1) * w) / jnp.maximum(jnp.sum(w), 1.0)
