"""Token cross-entropy for captioning (CoCa) and BLIP-2 ITG.

Plain `jnp`: with the batch dim sharded, the compiler's partitioner turns
the two sums into global reductions, so the mean is over the real tokens of
the GLOBAL batch.
"""
import jax.numpy as jnp

from mmjax.losses.xent import smoothed_cross_entropy


def caption_loss(logits, targets, mask, label_smoothing=0.0):
    """Mean token cross-entropy over non-padding positions.

    Args:
      logits: `[B, L, V]` (any float dtype; computed in float32).
      targets: int `[B, L]` token ids in `[0, V)`.
      mask: `[B, L]` bool or 0/1; positions with 0 are excluded.
      label_smoothing: eps; targets are (1-eps)·onehot + eps/V (as optax's
        `softmax_cross_entropy` with a smoothed one-hot).

    Returns:
      Scalar float32: Σ(loss·mask) / Σmask over the whole batch (0 when the
      mask is empty).
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"caption_loss: expected logits [B, L, V] and targets [B, L], got "
            f"{logits.shape} and {targets.shape}.")
    if mask.shape != targets.shape:
        raise ValueError(
            f"caption_loss: mask shape {mask.shape} must equal targets shape "
            f"{targets.shape}.")
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    token_loss = smoothed_cross_entropy(logits, targets, label_smoothing)
    # max(., 1) keeps an all-padding batch at 0 instead of NaN.
    return jnp.sum(token_loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(logits, tokens, pad_id, label_smoothing=0.0, eos_id=None):
    """Shifted LM loss: `logits[:, :-1]` predict `tokens[:, 1:]`, pads ignored.

    Args:
      logits: `[B, L, V]` decoder outputs for the input `tokens`.
      tokens: int `[B, L]` the decoder's input ids (with BOS first).
      pad_id: id of padding (from the tokenizer); targets equal to it get no loss.
      label_smoothing: as in `caption_loss`.
      eos_id: the tokenizer's EOS id; where it equals `pad_id` (a tokenizer that
        pads with EOS, e.g. CLIP's) the first EOS of a row is still a target, so
        the model learns to stop (as `mmjax.models.text.real_tokens`).

    Returns:
      Scalar float32 mean over the non-pad target tokens of the batch.
    """
    targets = tokens[:, 1:]
    mask = targets != pad_id
    if eos_id is not None and eos_id == pad_id:  # up to and including the first EOS
        is_eos = targets == eos_id
        mask = jnp.cumsum(is_eos, axis=-1) - is_eos == 0
    return caption_loss(logits[:, :-1], targets, mask, label_smoothing=label_smoothing)
