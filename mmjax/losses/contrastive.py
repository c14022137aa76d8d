"""Contrastive image-text losses: CLIP softmax and SigLIP sigmoid.

Both take L2-normalized embeddings `zimg`, `ztxt` of shape `[B, D]` whose
batch dim is sharded over the mesh axes `("data", "fsdp")`, and return the
loss of the GLOBAL batch as a float32 scalar, with exact gradients.

Distributed modes (chosen from the ambient mesh set by `jax.set_mesh`):
- softmax: each device scores its local rows `[b, D]` against all-gathered
  columns `[B, D]` (memory O(b*B)). The all-gather is differentiated by
  autodiff (its transpose is a reduce-scatter), so gradients are those of the
  single-device loss.
- sigmoid: a ring. Each device keeps its image block; text blocks travel
  around the batch axes with `ppermute`, one `[b, b]` logit block per step. A
  custom VJP runs the ring again in the backward pass, recomputing each block
  and sending the text-block gradient along with the block, so per-device
  memory is O(b*b + b*D) in forward and backward for any number of devices.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.losses import _mesh
from mmjax.losses.xent import smoothed_cross_entropy


def _soft_ce_sum(logits, labels, label_smoothing):
    """Sum over rows of CE with smoothed one-hot targets; logits `[n, C]` f32."""
    return jnp.sum(smoothed_cross_entropy(logits, labels, label_smoothing))


def _check_pair(zimg, ztxt, name):
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(
            f"{name}: expected zimg and ztxt of equal shape [B, D], got "
            f"{zimg.shape} and {ztxt.shape}; check the model's embedding outputs.")


# ---------------------------------------------------------------------------
# Softmax (CLIP)
# ---------------------------------------------------------------------------


def softmax_contrastive_loss(zimg, ztxt, scale, *, label_smoothing=0.0,
                             axis_names=("data", "fsdp")):
    """CLIP loss: mean of image->text and text->image cross-entropies.

    Args:
      zimg: `[B, D]` L2-normalized image embeddings (global batch B).
      ztxt: `[B, D]` L2-normalized text embeddings; pair i is (zimg[i], ztxt[i]).
      scale: scalar logit multiplier (already exponentiated); gets gradients.
      label_smoothing: eps of the smoothed one-hot targets over the B classes.
      axis_names: mesh axes the batch dim is sharded over. When the current
        mesh has them with size product > 1, the loss runs in `shard_map`
        with local rows against gathered columns; pass `()` to force the
        plain computation (left to the compiler's partitioner).

    Returns:
      Scalar float32: ½(CE(i->t) + CE(t->i)) averaged over the global batch.
    """
    _check_pair(zimg, ztxt, "softmax_contrastive_loss")
    zimg = zimg.astype(jnp.float32)
    ztxt = ztxt.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    batch = zimg.shape[0]
    axes = _mesh.active_batch_axes(axis_names)
    if not axes:
        logits = scale * zimg @ ztxt.T
        labels = jnp.arange(batch)
        total = (_soft_ce_sum(logits, labels, label_smoothing)
                 + _soft_ce_sum(logits.T, labels, label_smoothing))
        return total / (2 * batch)

    _mesh.check_divisible(batch, axes, "softmax_contrastive_loss")

    def local(zimg_l, ztxt_l, scale):
        b = zimg_l.shape[0]
        zimg_all = jax.lax.all_gather(zimg_l, axes, tiled=True)  # [B, D]
        ztxt_all = jax.lax.all_gather(ztxt_l, axes, tiled=True)  # [B, D]
        labels = jax.lax.axis_index(axes) * b + jnp.arange(b)
        i2t = scale * zimg_l @ ztxt_all.T  # [b, B]
        t2i = scale * ztxt_l @ zimg_all.T  # [b, B]
        total = (_soft_ce_sum(i2t, labels, label_smoothing)
                 + _soft_ce_sum(t2i, labels, label_smoothing))
        return jax.lax.psum(total, axes) / (2 * batch)

    with jax.named_scope("softmax_contrastive_loss"):  # names its collectives in the HLO
        return jax.shard_map(
            local, in_specs=(P(axes), P(axes), P()), out_specs=P(),
            axis_names=frozenset(axes))(zimg, ztxt, scale)


# ---------------------------------------------------------------------------
# Sigmoid (SigLIP)
# ---------------------------------------------------------------------------


def _sigmoid_block(zimg, ztxt, scale, bias, positives):
    """Loss sum and dloss/dlogits `[b, b]` of one block of logits.

    `positives` says whether the block is on the diagonal (labels 2I - 1) or
    off it (all labels -1).
    """
    logits = scale * (zimg @ ztxt.T) + bias
    if positives:
        labels = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
    else:
        labels = -1.0
    z = labels * logits
    loss = -jnp.sum(jax.nn.log_sigmoid(z))
    dlogits = -labels * jax.nn.sigmoid(-z)
    return loss, dlogits


def _ring_perm(n):
    return [(i, (i + 1) % n) for i in range(n)]


def _make_ring_loss(axes, n):
    """Per-device ring loss sum (before the cross-device psum), custom VJP."""
    perm = _ring_perm(n)

    def forward(zimg, ztxt, scale, bias):
        loss0, _ = _sigmoid_block(zimg, ztxt, scale, bias, True)

        def step(_, carry):
            txt, loss = carry
            txt = jax.lax.ppermute(txt, axes, perm)
            block, _ = _sigmoid_block(zimg, txt, scale, bias, False)
            return txt, loss + block

        _, loss = jax.lax.fori_loop(1, n, step, (ztxt, loss0))
        return loss

    @jax.custom_vjp
    def ring_loss(zimg, ztxt, scale, bias):
        return forward(zimg, ztxt, scale, bias)

    def ring_fwd(zimg, ztxt, scale, bias):
        # Only the O(b*D) inputs are saved; every block is recomputed.
        return forward(zimg, ztxt, scale, bias), (zimg, ztxt, scale, bias)

    def ring_bwd(res, g):
        zimg, ztxt, scale, bias = res

        def grads(txt, positives):
            _, dlogits = _sigmoid_block(zimg, txt, scale, bias, positives)
            dlogits = g * dlogits
            dtxt_unscaled = dlogits.T @ zimg  # [b, D]
            # d scale = Σ dlogits ⊙ (zimg·txtᵀ) = Σ (dlogitsᵀ·zimg) ⊙ txt: no
            # second [b, b] buffer is kept alive for it.
            return (scale * (dlogits @ txt),       # d zimg
                    scale * dtxt_unscaled,         # d txt (this block)
                    jnp.sum(dtxt_unscaled * txt),  # d scale
                    jnp.sum(dlogits))              # d bias

        dimg, dtxt, dscale, dbias = grads(ztxt, True)

        def step(_, carry):
            txt, dtxt, dimg, dscale, dbias = carry
            # The text block and its gradient so far travel together, so each
            # device adds its contribution to the block it currently holds.
            txt, dtxt = jax.lax.ppermute((txt, dtxt), axes, perm)
            gi, gt, gs, gb = grads(txt, False)
            return txt, dtxt + gt, dimg + gi, dscale + gs, dbias + gb

        _, dtxt, dimg, dscale, dbias = jax.lax.fori_loop(
            1, n, step, (ztxt, dtxt, dimg, dscale, dbias))
        # After n-1 hops device i holds block i+1's gradient: one more hop home.
        dtxt = jax.lax.ppermute(dtxt, axes, perm)
        return dimg, dtxt, dscale, dbias

    ring_loss.defvjp(ring_fwd, ring_bwd)
    return ring_loss


def sigmoid_contrastive_loss(zimg, ztxt, scale, bias, *,
                             axis_names=("data", "fsdp")):
    """SigLIP loss: -Σ log σ(labels ⊙ (scale·zimg·ztxtᵀ + bias)) / B.

    Args:
      zimg: `[B, D]` L2-normalized image embeddings (global batch B).
      ztxt: `[B, D]` L2-normalized text embeddings; pair i is (zimg[i], ztxt[i]).
      scale: scalar logit multiplier (already exponentiated); gets gradients.
      bias: scalar logit bias; gets gradients.
      axis_names: mesh axes the batch dim is sharded over. When the current
        mesh has them with size product > 1, the loss runs as a ring in
        `shard_map` with per-device memory O(b²) (b = B / shards) in forward
        and backward; pass `()` to force the plain `[B, B]` computation.

    Returns:
      Scalar float32; labels are +1 on the diagonal, -1 elsewhere, the sum
      runs over all B×B pairs and is divided by the global batch B.
    """
    _check_pair(zimg, ztxt, "sigmoid_contrastive_loss")
    zimg = zimg.astype(jnp.float32)
    ztxt = ztxt.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    bias = jnp.asarray(bias, jnp.float32)
    batch = zimg.shape[0]
    axes = _mesh.active_batch_axes(axis_names)
    if not axes:
        loss, _ = _sigmoid_block(zimg, ztxt, scale, bias, True)
        return loss / batch

    n = _mesh.check_divisible(batch, axes, "sigmoid_contrastive_loss")
    ring_loss = _make_ring_loss(axes, n)

    def local(zimg_l, ztxt_l, scale, bias):
        # Make the scalars device-varying so the custom VJP's per-device
        # gradients for them are summed over devices by the transpose.
        scale = jax.lax.pcast(scale, axes, to="varying")
        bias = jax.lax.pcast(bias, axes, to="varying")
        return jax.lax.psum(ring_loss(zimg_l, ztxt_l, scale, bias), axes) / batch

    with jax.named_scope("sigmoid_contrastive_loss"):  # names its collectives in the HLO
        return jax.shard_map(
            local, in_specs=(P(axes), P(axes), P(), P()), out_specs=P(),
            axis_names=frozenset(axes))(zimg, ztxt, scale, bias)
