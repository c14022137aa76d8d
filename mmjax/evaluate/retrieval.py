"""Image-text retrieval: batched embedding, blockwise recall@k, ITM re-ranking (BLIP-2,
one-tower models).

Typical use (several captions per image, `text_to_image[m]` = image of caption m):

    enc_img = model_method(model, "encode_image")
    img = embed_dataset(enc_img, image_batches, mesh, variables=variables)   # [N, E]
    txt = embed_dataset(model_method(model, "encode_text"), text_batches, mesh,
                        variables=variables)                                  # [M, E]
    recall = retrieval_recall(l2n(img), l2n(txt), text_to_image)

The similarity is computed one block of rows at a time on device, so the full
`[N, M]` matrix is never held; only ranks come back to the host.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import MissingFieldError
from mmjax.evaluate.metrics import recall_at_k
from mmjax.models.jitted import model_method, per_model

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dim is split over, when present


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Host-side `x / ||x||` in float32."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _auto(mesh: Mesh) -> Mesh:
    """The same mesh with Auto axis types: the models place activations with
    logical constraints (GSPMD propagation), which Explicit axes reject."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _batch_axes(mesh: Optional[Mesh]) -> tuple[str, ...]:
    if mesh is None:
        return ()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"the evaluation mesh has axes {mesh.axis_names}; it needs a 'data' "
                         "axis to split the batch over.")
    return axes


class BatchRunner:
    """Applies a jitted `fn` to host batches of any size, on one device or a mesh.

    Each batch is padded to a fixed row count (the largest seen so far, at
    least `rows`, rounded up to a multiple of the mesh's batch-axis size), so
    one compilation serves every batch including a short last one; give
    `rows` when a short batch may come first. With a mesh the
    batch rows are split over its "data" (and "fsdp") axes and `variables` are
    replicated onto the mesh unless they are already laid out over it. An
    Explicit-typed mesh is used as its Auto-typed twin. Outputs come back as
    NumPy arrays with the padding rows removed.
    """

    def __init__(self, fn: Callable, mesh: Optional[Mesh] = None, variables: Any = None,
                 rows: int = 0):
        mesh = self.mesh = None if mesh is None else _auto(mesh)
        self.axes = _batch_axes(mesh)
        self.multiple = math.prod(mesh.shape[a] for a in self.axes) if mesh else 1
        if mesh is not None and any(d.process_index != jax.process_index()
                                    for d in mesh.devices.flat):
            raise ValueError("evaluation meshes must hold only this process's devices (build "
                             "them from jax.local_devices()); each process evaluates its own "
                             "batches and the results are combined on the host.")
        self.has_variables = variables is not None
        self.variables = self._place(variables) if self.has_variables else None
        self.jitted = jax.jit(fn)
        self.rows = -(-int(rows) // self.multiple) * self.multiple

    def _place(self, tree):
        if self.mesh is None:
            return tree
        devices = set(self.mesh.devices.flat)
        replicated = NamedSharding(self.mesh, P())

        def put(a):
            sharding = getattr(a, "sharding", None)
            if (isinstance(sharding, NamedSharding) and sharding.device_set == devices
                    and sharding.mesh.axis_names == self.mesh.axis_names):
                # Already laid out on these devices (e.g. FSDP-sharded train state):
                # keep the layout, only re-express it on the Auto-typed mesh.
                return jax.device_put(a, NamedSharding(self.mesh, sharding.spec))
            return jax.device_put(a, replicated)
        return jax.tree.map(put, tree)

    def _put(self, x: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(x)
        spec = P(self.axes if len(self.axes) > 1 else self.axes[0])
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def __call__(self, *inputs: np.ndarray):
        """`fn([variables,] *inputs)` on inputs sharing a leading dim b -> outputs `[b, ...]`."""
        inputs = [np.asarray(x) for x in inputs]
        b = inputs[0].shape[0]
        if any(x.shape[0] != b for x in inputs):
            raise ValueError(f"inputs of one batch have different leading sizes "
                             f"{[x.shape[0] for x in inputs]}.")
        self.rows = max(self.rows, -(-b // self.multiple) * self.multiple)
        padded = [np.concatenate([x, np.zeros((self.rows - b,) + x.shape[1:], x.dtype)])
                  if self.rows > b else x for x in inputs]
        args = [self._put(x) for x in padded]
        out = self.jitted(self.variables, *args) if self.has_variables else self.jitted(*args)
        return jax.tree.map(lambda o: np.asarray(o)[:b], out)


def _select(batch, key: Optional[str]):
    """(input array, valid mask or None) of one batch (a dict or a bare array)."""
    if isinstance(batch, dict):
        if key not in batch:
            raise MissingFieldError(f"batch has no {key!r} field (fields: {sorted(batch)}); pass "
                                    "key=... naming the input to embed.")
        valid = batch.get("valid")
        return np.asarray(batch[key]), None if valid is None else np.asarray(valid, bool)
    return np.asarray(batch), None


def embed_dataset(fn: Callable, batches: Iterable, mesh: Optional[Mesh] = None, *,
                  variables: Any = None, key: str = "image") -> np.ndarray:
    """Runs `fn` over every batch and concatenates the results on the host.

    Args:
      fn: `fn(x [b, ...]) -> [b, ...]`, or `fn(variables, x)` when `variables`
        is given (pass them this way, not in a closure, so they are jit
        arguments rather than constants baked into the program). Jitted here.
      batches: iterable of arrays `[b, ...]`, or of dicts holding `key` and
        optionally "valid" `[b]` bool (rows with False are dropped).
      mesh: optional `jax.sharding.Mesh` with a "data" axis; the batch is
        split over it. Batches of any size are padded internally.
      variables: the model variables (optional, see `fn`).
      key: the dict field to embed.

    Returns:
      NumPy `[N, ...]`: the outputs of all valid rows, in order.
    """
    runner = BatchRunner(fn, mesh, variables)
    outs = []
    for batch in batches:
        x, valid = _select(batch, key)
        out = runner(x)
        outs.append(out if valid is None else out[valid])
    if not outs:
        raise ValueError("embed_dataset: the data yielded no batches.")
    return np.concatenate(outs)


# ---------------------------------------------------------------- recall


def similarity(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Image-text scores `[n, m]`: `image [n, E] . text [m, E]`, or for
    multi-query image embeddings `[n, Q, E]` (BLIP-2) the max over queries."""
    if image_emb.ndim == 3:
        return jnp.einsum("nqe,me->nqm", image_emb, text_emb).max(axis=1)
    return image_emb @ text_emb.T


@jax.jit
def _image_block_ranks(image_blk, image_groups, text_emb, text_groups):
    """Rank of each image's best-scored positive (a caption of its group) among all M texts."""
    s = similarity(image_blk, text_emb)                                  # [b, M]
    own = text_groups[None, :] == image_groups[:, None]
    best = jnp.max(jnp.where(own, s, -jnp.inf), axis=1)
    return jnp.sum(s > best[:, None], axis=1)


@jax.jit
def _text_block_ranks(text_blk, text_groups, image_emb, image_groups):
    """Rank of each caption's best-scored positive (an image of its group) among all N images."""
    s = similarity(image_emb, text_blk).T                                # [b, N]
    own = image_groups[None, :] == text_groups[:, None]
    best = jnp.max(jnp.where(own, s, -jnp.inf), axis=1)
    return jnp.sum(s > best[:, None], axis=1)


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(start + block, n)


def _pad_rows(x: np.ndarray, rows: int, value=0) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.full((rows - x.shape[0],) + x.shape[1:], value, x.dtype)])


def _check_text_to_image(text_to_image, n_images: int, n_texts: int) -> np.ndarray:
    t2i = np.asarray(text_to_image).astype(np.int32)
    if t2i.shape != (n_texts,):
        raise ValueError(f"text_to_image must be [M] = [{n_texts}] (the image index of each "
                         f"text), got shape {t2i.shape}.")
    if n_texts and (t2i.min() < 0 or t2i.max() >= n_images):
        raise ValueError(f"text_to_image values must lie in [0, {n_images}), found "
                         f"{t2i.min()}..{t2i.max()}.")
    orphans = np.flatnonzero(np.bincount(t2i, minlength=n_images) == 0)
    if orphans.size:
        raise ValueError(f"images {orphans[:5].tolist()} have no caption in text_to_image; "
                         "every image needs at least one.")
    return t2i


def _recall_dict(i2t_ranks, t2i_ranks, ks) -> dict:
    out = {}
    for k, v in recall_at_k(i2t_ranks, ks).items():
        out[f"i2t_r{k}"] = v
    for k, v in recall_at_k(t2i_ranks, ks).items():
        out[f"t2i_r{k}"] = v
    out["n_images"], out["n_texts"] = int(len(i2t_ranks)), int(len(t2i_ranks))
    return out


def retrieval_ranks(image_emb, text_emb, text_to_image, block: int = 1024, groups=None):
    """Per-query ranks of image->text and text->image retrieval.

    Args:
      image_emb: `[N, E]` (or `[N, Q, E]`, scored by the max over queries),
        normalized if cosine similarity is wanted.
      text_emb: `[M, E]`.
      text_to_image: int `[M]`: the image each text describes.
      block: rows scored per step; device memory is O(block * max(N, M)).
      groups: optional int `[N]`: images of one group show the same content
        (duplicates, one scene: `evals.retrieval.group_key`), so any caption of
        any image of the query's group is a hit for it, and any image of a
        caption's group a hit for the caption, as COCO counts any of an image's
        captions. None: every image its own group; a negative id: that image
        alone.

    Returns:
      `(i2t [N], t2i [M])` int arrays: for each image the number of texts
      scored strictly above its best positive caption; for each text the number
      of images scored strictly above its best positive image (ties favour the
      correct one).
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    n, m = image_emb.shape[0], text_emb.shape[0]
    t2i = _check_text_to_image(text_to_image, n, m)
    groups = dense_groups(groups, n)
    text_groups = groups[t2i]
    img_dev, txt_dev = jnp.asarray(image_emb), jnp.asarray(text_emb)
    groups_dev, text_groups_dev = jnp.asarray(groups), jnp.asarray(text_groups)
    # Every block is padded to `block` rows so both loops compile once; padding
    # rows carry group -1, which no real row has.
    blk = max(1, min(block, n))
    i2t = []
    for s, e in _blocks(n, blk):
        ranks = _image_block_ranks(jnp.asarray(_pad_rows(image_emb[s:e], blk)),
                                   jnp.asarray(_pad_rows(groups[s:e], blk, -1)),
                                   txt_dev, text_groups_dev)
        i2t.append(np.asarray(ranks)[:e - s])
    blk = max(1, min(block, m))
    t2i_ranks = []
    for s, e in _blocks(m, blk):
        ranks = _text_block_ranks(jnp.asarray(_pad_rows(text_emb[s:e], blk)),
                                  jnp.asarray(_pad_rows(text_groups[s:e], blk, -1)),
                                  img_dev, groups_dev)
        t2i_ranks.append(np.asarray(ranks)[:e - s])
    return np.concatenate(i2t), np.concatenate(t2i_ranks)


def dense_groups(groups, n_images: int) -> np.ndarray:
    """Group ids int `[N]` (or None) -> dense int32 ids in [0, G) `[N]`:
    `arange(N)` for None; a negative id (a sample without the group field) is
    a group of its own."""
    if groups is None:
        return np.arange(n_images, dtype=np.int32)
    groups = np.asarray(groups).astype(np.int64)
    if groups.shape != (n_images,):
        raise ValueError(f"groups must be [N] = [{n_images}] (one group per image), got shape "
                         f"{groups.shape}.")
    alone = groups < 0
    if alone.any():
        groups = groups.copy()
        groups[alone] = groups.max(initial=0) + 1 + np.arange(int(alone.sum()))
    return np.unique(groups, return_inverse=True)[1].reshape(-1).astype(np.int32)


def retrieval_recall(image_emb, text_emb, text_to_image, ks: Sequence[int] = (1, 5, 10),
                     block: int = 1024, groups=None) -> dict:
    """Recall@k both ways with several captions per image.

    An image->text query is a hit at k when ANY of its captions (of its group's
    images, with `groups`) is among the k best-scored texts; a text->image query
    when its image (one of its group) is among the k best images. Arguments as
    in `retrieval_ranks`.

    Returns:
      dict(i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, n_images,
      n_texts) (keys follow `ks`), recalls as fractions in [0, 1].
    """
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, block, groups)
    return _recall_dict(i2t, t2i, ks)


def retrieval_embeddings(model: Any, variables: Any, batches: Iterable,
                         mesh: Optional[Mesh] = None, pad_id: Optional[int] = None,
                         key: str = "image", inputs: bool = False,
                         groups: bool = False) -> tuple:
    """Image and caption embeddings of the valid rows of `batches`.

    Arguments as in `retrieval_evaluate`; `key` is the batch field the model's
    `encode_image` reads ("image", "audio", "video"). Whole batches are embedded (one
    compiled shape; invalid rows are dropped afterwards).

    Returns:
      `(image_emb [N, E] or [N, Q, E], text_emb [M, E], text_to_image int32
      [M])`, float32 and not normalized, rows in batch order; N = M = 0 (arrays
      of shape `[0]`) when the data holds no valid row. With `inputs`, also what
      ITM re-ranking reads (`blip2_rerank_recall`): the model's `image_tokens`
      `[N, S, D]` and the caption ids `[M, L]`. With `groups`, last the images'
      int32 `[N]` "group" field (the data's `group_key`; MissingFieldError when
      the batches carry none).
    """
    run_img = BatchRunner(model_method(model, "encode_image"), mesh, variables)
    run_txt = BatchRunner(model_method(model, "encode_text"), mesh, run_img.variables)
    run_tok = (BatchRunner(model_method(model, "image_tokens"), mesh, run_img.variables)
               if inputs else None)
    imgs, txts, owners, n = [], [], [], 0
    tokens, ids, group_ids = [], [], []
    for batch in batches:
        images, valid = _select(batch, key)
        if groups and (not isinstance(batch, dict) or "group" not in batch):
            raise MissingFieldError("retrieval by group needs a 'group' field in every batch "
                                    "(set the data's group_key).")
        text = np.asarray(batch["text"])
        valid = np.ones(len(images), bool) if valid is None else valid
        if not valid.any():
            continue
        if text.ndim == 2:
            text = text[:, None]
        b, c = text.shape[:2]
        imgs.append(np.asarray(run_img(images), np.float32)[valid])
        flat = text.reshape(b * c, -1)
        keep = np.repeat(valid, c)
        if pad_id is not None:
            keep &= (flat != pad_id).any(-1)
        txts.append(np.asarray(run_txt(flat), np.float32)[keep])
        if inputs:
            tokens.append(np.asarray(run_tok(images))[valid])
            ids.append(flat[keep])
        if groups:
            group_ids.append(np.asarray(batch["group"], np.int32)[valid])
        owner = np.full(b, -1, np.int32)
        owner[valid] = np.arange(n, n + int(valid.sum()), dtype=np.int32)
        owners.append(np.repeat(owner, c)[keep])
        n += int(valid.sum())
    none = np.zeros((0,), np.int32)
    if not imgs:
        empty = np.zeros((0,), np.float32)
        out = (empty, empty, none) + ((empty, none) if inputs else ())
        return out + (none,) if groups else out
    out = (np.concatenate(imgs), np.concatenate(txts), np.concatenate(owners))
    if inputs:
        out += (np.concatenate(tokens), np.concatenate(ids))
    return out + (np.concatenate(group_ids),) if groups else out


def retrieval_evaluate(model: Any, variables: Any, batches: Iterable,
                       mesh: Optional[Mesh] = None, ks: Sequence[int] = (1, 5, 10),
                       block: int = 1024, pad_id: Optional[int] = None) -> dict:
    """Embeds an image-caption set and returns `retrieval_recall`'s dict.

    Args:
      model, variables: a model with `encode_image` and `encode_text`
        (TwoTower, CoCa, Blip2Stage1).
      batches: dicts with "image" `[b, H, W, 3]` f32, "text" int `[b, L]` (one
        caption per image) or `[b, C, L]` (C captions per image), optional
        "valid" `[b]` bool.
      mesh: optional mesh with a "data" axis for the batch.
      pad_id: with `[b, C, L]` text, caption rows made only of `pad_id` are
        missing captions (images with fewer than C) and are left out.
    """
    img, txt, text_to_image = retrieval_embeddings(model, variables, batches, mesh, pad_id)
    if not len(img):
        raise ValueError("retrieval_evaluate: the data yielded no valid samples.")
    return retrieval_recall(l2_normalize(img), l2_normalize(txt), text_to_image, ks, block)


# ---------------------------------------------------------------- BLIP-2 re-ranking


def itc_similarity(image_emb, text_emb, block: int = 1024) -> np.ndarray:
    """Full host matrix `[N, M]` of `similarity` (max over queries for `[N, Q, E]`),
    computed in blocks of image rows. Needed as the candidate source of
    `blip2_rerank_recall`; for plain recall use `retrieval_recall`, which
    never materializes it."""
    image_emb = np.asarray(image_emb, np.float32)
    txt = jnp.asarray(np.asarray(text_emb, np.float32))
    n = image_emb.shape[0]
    blk = max(1, min(block, n))
    sim = jax.jit(similarity)
    rows = [np.asarray(sim(jnp.asarray(_pad_rows(image_emb[s:e], blk)), txt))[:e - s]
            for s, e in _blocks(n, blk)]
    return np.concatenate(rows)


@per_model(maxsize=16)
def _itm_score_fn(model: Any, kind: str) -> Callable:
    itm = model_method(model, "itm_logits")

    def score(variables, image_tokens, text):
        logits = itm(variables, image_tokens, text).astype(jnp.float32)
        return jax.nn.softmax(logits, axis=-1)[:, 1] if kind == "prob" else logits[:, 1]
    return score


def _reranked_ranks(cand, cand_scores, is_positive):
    """Rank of the best positive among re-scored candidates; k when none is a candidate."""
    k = cand.shape[1]
    best = np.max(np.where(is_positive, cand_scores, -np.inf), axis=1)
    ranks = np.sum(cand_scores > best[:, None], axis=1)
    return np.where(np.isfinite(best), ranks, k)


def blip2_rerank_recall(model: Any, variables: Any, image_tokens, text_ids, itc_sim,
                        text_to_image, k: int = 128, ks: Sequence[int] = (1, 5, 10),
                        itm_score: str = "prob", add_itc: bool = True,
                        batch_size: int = 64, mesh: Optional[Mesh] = None,
                        groups=None) -> dict:
    """BLIP-2 retrieval: ITC top-k candidates re-ranked by the ITM head.

    For each image the k texts with the highest ITC similarity, and for each
    text the k best images, are scored by `itm_logits`; candidates are ordered
    by the ITM score (plus the ITC similarity when `add_itc`, as LAVIS does).
    Texts outside an image's candidates rank below all of them, so recall@K
    is exact for K <= k. Each distinct (image, text) pair is scored once.

    Args:
      model, variables: a `Blip2Stage1` and its variables.
      image_tokens: `[N, S, Dv]` frozen ViT features (`model.image_tokens`).
      text_ids: int `[M, L]` caption ids.
      itc_sim: `[N, M]` ITC similarities (`itc_similarity` of the normalized
        `encode_image` `[N, Q, E]` and `encode_text` `[M, E]` outputs).
      text_to_image: int `[M]`.
      k: candidates per query.
      itm_score: "prob" (softmax match probability) or "logit" (the match
        logit, what LAVIS's BLIP-2 `compute_itm` returns).
      batch_size: pairs per ITM call; mesh: optional mesh with a "data" axis.
      groups: optional int `[N]`, hits by group as in `retrieval_ranks`.

    Returns:
      the `retrieval_recall` dict.
    """
    if itm_score not in ("prob", "logit"):
        raise ValueError(f"itm_score must be 'prob' or 'logit', got {itm_score!r}.")
    itc_sim = np.asarray(itc_sim, np.float32)
    image_tokens = np.asarray(image_tokens)
    n, m = itc_sim.shape
    text_ids = np.asarray(text_ids)
    if text_ids.shape[0] != m:
        raise ValueError(f"text_ids has {text_ids.shape[0]} rows but itc_sim has {m} columns.")
    t2i = _check_text_to_image(text_to_image, n, m)
    groups = dense_groups(groups, n)
    if k < 1 or max(ks) > k:
        raise ValueError(f"recall@{max(ks)} needs at least that many re-ranked candidates; "
                         f"raise k (now {k}) or lower ks.")
    ki, kt = min(k, m), min(k, n)  # all candidates when fewer than k exist
    # Candidates, best ITC first: [N, ki] texts per image, [M, kt] images per text.
    i2t_cand = np.argsort(-itc_sim, axis=1, kind="stable")[:, :ki]
    t2i_cand = np.argsort(-itc_sim.T, axis=1, kind="stable")[:, :kt]
    pair_img = np.concatenate([np.repeat(np.arange(n), ki), t2i_cand.reshape(-1)])
    pair_txt = np.concatenate([i2t_cand.reshape(-1), np.repeat(np.arange(m), kt)])
    unique, inverse = np.unique(pair_img.astype(np.int64) * m + pair_txt, return_inverse=True)
    runner = BatchRunner(_itm_score_fn(model, itm_score), mesh, variables)
    scores = np.concatenate([
        runner(image_tokens[unique[s:e] // m], text_ids[unique[s:e] % m])
        for s, e in _blocks(len(unique), batch_size)])[inverse.reshape(-1)]
    if add_itc:
        scores = scores + itc_sim[pair_img, pair_txt]
    i2t_scores, t2i_scores = scores[:n * ki].reshape(n, ki), scores[n * ki:].reshape(m, kt)
    i2t = _reranked_ranks(i2t_cand, i2t_scores, groups[t2i[i2t_cand]] == groups[:, None])
    t2i_ranks = _reranked_ranks(t2i_cand, t2i_scores, groups[t2i_cand] == groups[t2i][:, None])
    return _recall_dict(i2t, t2i_ranks, ks)
