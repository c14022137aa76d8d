"""BLIP-2 stage-1 objectives: ITC (max over queries), ITM triples and loss.

ITC follows LAVIS `blip2_qformer.py`: sim_i2t[i, j] = max_q <q_iq, t_j>,
sim_t2i = sim_i2tᵀ, cross-entropy with label smoothing 0.1 in both
directions. Unlike LAVIS (which gathers features without gradient), the
sharded path here gives the exact gradient of the global loss.

ITM negatives are drawn without gradient from the softmax of each global
similarity row with the positive removed; `jax.random` is partitionable, so
the draws do not depend on how the similarity is sharded.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.losses import _mesh
from mmjax.losses.contrastive import _soft_ce_sum


def _max_sim(query_feats, text_feat):
    """`[b, Q, D]` x `[B, D]` -> `[b, B]`: best-matching query per pair."""
    return jnp.max(jnp.einsum("iqd,jd->iqj", query_feats, text_feat), axis=1)


def blip2_itc_loss(query_feats, text_feat, temp, *, label_smoothing=0.1,
                   axis_names=("data", "fsdp")):
    """BLIP-2 image-text contrastive loss.

    Args:
      query_feats: `[B, Q, D]` normalized Q-Former query outputs (projected).
      text_feat: `[B, D]` normalized text [CLS] features.
      temp: scalar temperature; logits are sim / temp. Gets gradients.
      label_smoothing: eps of the smoothed targets over the B classes.
      axis_names: mesh axes the batch dim is sharded over. When active (size
        product > 1) each device computes its rows `[b, B]` of sim_i2t against
        gathered text features, and its text rows of sim_t2i come from an
        all-to-all of those blocks (no gather of the query features).

    Returns:
      `(loss, sim_i2t)`: loss is a float32 scalar ½(CE_ls(i->t) +
      CE_ls(t->i)) over the global batch; sim_i2t is the `[B, B]` float32
      similarity, UNSCALED (not divided by temp) and without gradient, for
      ITM negative mining (pass `temp` to `blip2_itm_triples` to reproduce
      LAVIS's sampling weights). Sharded, it comes back sharded by rows.
    """
    if (query_feats.ndim != 3 or text_feat.ndim != 2
            or query_feats.shape[0] != text_feat.shape[0]
            or query_feats.shape[2] != text_feat.shape[1]):
        raise ValueError(
            f"blip2_itc_loss: expected query_feats [B, Q, D] and text_feat "
            f"[B, D], got {query_feats.shape} and {text_feat.shape}.")
    query_feats = query_feats.astype(jnp.float32)
    text_feat = text_feat.astype(jnp.float32)
    temp = jnp.asarray(temp, jnp.float32)
    batch = text_feat.shape[0]
    axes = _mesh.active_batch_axes(axis_names)
    if not axes:
        sim = _max_sim(query_feats, text_feat)  # [B, B]
        labels = jnp.arange(batch)
        total = (_soft_ce_sum(sim / temp, labels, label_smoothing)
                 + _soft_ce_sum(sim.T / temp, labels, label_smoothing))
        return total / (2 * batch), jax.lax.stop_gradient(sim)

    _mesh.check_divisible(batch, axes, "blip2_itc_loss")

    def local(qf_l, tf_l, temp):
        b = tf_l.shape[0]
        tf_all = jax.lax.all_gather(tf_l, axes, tiled=True)  # [B, D]
        sim_rows = _max_sim(qf_l, tf_all)  # [b, B]: my images vs all texts
        # Column block k of my rows goes to device k; I receive every image's
        # scores for my texts: [B, b] -> transpose -> sim_t2i rows [b, B].
        sim_cols = jax.lax.all_to_all(sim_rows, axes, split_axis=1,
                                      concat_axis=0, tiled=True)
        labels = jax.lax.axis_index(axes) * b + jnp.arange(b)
        total = (_soft_ce_sum(sim_rows / temp, labels, label_smoothing)
                 + _soft_ce_sum(sim_cols.T / temp, labels, label_smoothing))
        loss = jax.lax.psum(total, axes) / (2 * batch)
        return loss, jax.lax.stop_gradient(sim_rows)

    with jax.named_scope("blip2_itc_loss"):  # names its collectives in the HLO
        return jax.shard_map(
            local, in_specs=(P(axes), P(axes), P()), out_specs=(P(), P(axes)),
            axis_names=frozenset(axes))(query_feats, text_feat, temp)


def blip2_itm_triples(sim_i2t, rng, temp=None, exclude=None):
    """Image/text index triples for ITM with hard negatives (no gradient).

    Args:
      sim_i2t: `[B, B]` image-to-text similarity (as returned by
        `blip2_itc_loss`), B >= 2.
      rng: PRNG key; the result is a deterministic function of it.
      temp: optional temperature; the sampling logits are sim_i2t / temp
        (LAVIS samples from the temperature-scaled similarity).
      exclude: optional bool `[B, B]`: pairs that are not negatives either (e.g.
        two samples of one class: in-batch false negatives); a row left with no
        candidate falls back to every other sample.

    Returns:
      dict of int32 `[3B]` arrays `image_index`, `text_index`, `labels`, in the
      order [positives (i, i) ×B, (negative image for text j, j) ×B,
      (i, negative text for image i) ×B], labels [1]·B + [0]·2B. The negative
      image for text j is drawn from softmax(sim_i2t[:, j]) and the negative
      text for image i from softmax(sim_i2t[i]), each with the positive
      removed (probability exactly 0; LAVIS uses -10000 before the softmax).
    """
    if sim_i2t.ndim != 2 or sim_i2t.shape[0] != sim_i2t.shape[1] or sim_i2t.shape[0] < 2:
        raise ValueError(
            f"blip2_itm_triples: expected a square [B, B] similarity with "
            f"B >= 2, got {sim_i2t.shape}.")
    batch = sim_i2t.shape[0]
    logits = jax.lax.stop_gradient(sim_i2t).astype(jnp.float32)
    if temp is not None:
        logits = logits / jax.lax.stop_gradient(jnp.asarray(temp, jnp.float32))
    logits = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, logits)
    image_logits = text_logits = logits
    if exclude is not None:
        masked = jnp.where(exclude, -jnp.inf, logits)
        image_logits = jnp.where(jnp.isfinite(masked).any(0)[None, :], masked, logits)
        text_logits = jnp.where(jnp.isfinite(masked).any(1)[:, None], masked, logits)
    key_img, key_txt = jax.random.split(rng)
    neg_image = jax.random.categorical(key_img, image_logits.T, axis=-1)  # per text
    neg_text = jax.random.categorical(key_txt, text_logits, axis=-1)      # per image
    ar = jnp.arange(batch, dtype=jnp.int32)
    return {
        "image_index": jnp.concatenate([ar, neg_image.astype(jnp.int32), ar]),
        "text_index": jnp.concatenate([ar, ar, neg_text.astype(jnp.int32)]),
        "labels": jnp.concatenate([jnp.ones(batch, jnp.int32),
                                   jnp.zeros(2 * batch, jnp.int32)]),
    }


def itm_loss(logits, labels):
    """Image-text matching cross-entropy.

    Args:
      logits: `[N, 2]` match/no-match scores (already averaged over queries
        by the model); class 1 = match.
      labels: int `[N]` in {0, 1}.

    Returns:
      Scalar float32 mean CE over the N pairs.
    """
    if logits.ndim != 2 or logits.shape[-1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"itm_loss: expected logits [N, 2] and labels [N], got "
            f"{logits.shape} and {labels.shape}.")
    logits = logits.astype(jnp.float32)
    return _soft_ce_sum(logits, labels.astype(jnp.int32), 0.0) / logits.shape[0]
