"""Retrieval evaluation: batched embedding on 1, 2 and 8 devices, and BLIP-2
ITM re-ranking vs a NumPy re-computation from the model's own heads."""
import jax
import numpy as np
import pytest

from mmjax.data.tokenizers import build_tokenizer
from mmjax.evaluate.retrieval import (blip2_rerank_recall, embed_dataset, itc_similarity,
                                      l2_normalize, model_method, retrieval_evaluate,
                                      retrieval_recall)
from mmjax.models import Blip2Stage1, TwoTower

IMAGE, MAX_LEN = 16, 16
VIT = dict(image_size=IMAGE, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
TEXT = dict(vocab_size=259, max_len=MAX_LEN, width=32, depth=1, heads=2, mlp_dim=64)
KS = (1, 5, 10)


def _same(groups, i, j):
    """Images i and j count as one: the same image, or one group (negative: none)."""
    return i == j or (groups is not None and groups[i] >= 0 and groups[i] == groups[j])


def _brute_force(img, txt, t2i, groups=None):
    """Recall@k by sorting the full float64 cosine matrix (LAVIS style); with
    `groups`, the best rank over every caption / image of the query's group."""
    img = np.asarray(img, np.float64)
    txt = np.asarray(txt, np.float64)
    sim = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ \
        (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    n, m = sim.shape
    i2t = [min((np.argsort(-sim[i], kind="stable") == j).argmax()
               for j in range(m) if _same(groups, i, t2i[j])) for i in range(n)]
    t2i_rank = [min((np.argsort(-sim[:, j], kind="stable") == i).argmax()
                    for i in range(n) if _same(groups, i, t2i[j])) for j in range(m)]
    out = {f"i2t_r{k}": np.mean(np.array(i2t) < k) for k in KS}
    out.update({f"t2i_r{k}": np.mean(np.array(t2i_rank) < k) for k in KS})
    return out


def _mesh(n):
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def _data(n_images, captions_per_image, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, IMAGE, IMAGE, 3)).astype(np.float32)
    tok = build_tokenizer("bytes", MAX_LEN)
    words = ["red", "blue", "cat", "dog", "big", "small", "sky", "sea"]
    caps = [" ".join(rng.choice(words, 3)) for _ in range(n_images * captions_per_image)]
    return images, tok(caps)


@pytest.fixture(scope="module")
def two_tower():
    model = TwoTower(image={**VIT, "embed_dim": 16}, text={**TEXT, "embed_dim": 16})
    images, ids = _data(2, 1)
    return model, jax.jit(model.init)(jax.random.key(0), images, ids)


def test_embed_and_recall_same_on_1_2_8_devices(two_tower):
    model, variables = two_tower
    images, ids = _data(21, 2)
    t2i = np.repeat(np.arange(21), 2)
    # Batches of 6 (not a multiple of 8) and a short last one; last batch has padding rows.
    img_batches = [dict(image=images[s:s + 6], valid=np.ones(len(images[s:s + 6]), bool))
                   for s in range(0, 21, 6)]
    img_batches[-1] = dict(image=np.concatenate([images[18:], np.zeros((3, IMAGE, IMAGE, 3),
                                                                       np.float32)]),
                           valid=np.arange(6) < 3)
    txt_batches = [ids[s:s + 10] for s in range(0, 42, 10)]
    expected_img = np.asarray(jax.jit(model_method(model, "encode_image"))(variables, images))
    expected_txt = np.asarray(jax.jit(model_method(model, "encode_text"))(variables, ids))

    results = {}
    for n in (1, 2, 8):
        mesh = None if n == 1 else _mesh(n)
        img = embed_dataset(model_method(model, "encode_image"), img_batches, mesh,
                            variables=variables)
        txt = embed_dataset(model_method(model, "encode_text"), txt_batches, mesh,
                            variables=variables)
        np.testing.assert_allclose(img, expected_img, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(txt, expected_txt, rtol=1e-4, atol=1e-5)
        results[n] = retrieval_recall(l2_normalize(img), l2_normalize(txt), t2i, KS, block=8)
    assert results[1] == results[2] == results[8]
    expected = _brute_force(expected_img, expected_txt, t2i)
    for key, value in expected.items():
        assert results[1][key] == pytest.approx(value), key
    assert 0 < results[1]["t2i_r5"] < 1  # a non-trivial case


def test_embed_dataset_on_mesh_with_closure_fn(two_tower):
    model, variables = two_tower
    images, _ = _data(10, 1, seed=3)
    fn = lambda x: model.apply(variables, x, method="encode_image")  # noqa: E731
    one = embed_dataset(fn, [images[:7], images[7:]])
    eight = embed_dataset(fn, [images[:7], images[7:]], _mesh(8))
    np.testing.assert_allclose(one, eight, rtol=1e-4, atol=1e-5)
    assert one.shape == (10, 16)


def test_retrieval_evaluate_several_captions_per_image(two_tower):
    model, variables = two_tower
    images, ids = _data(12, 3, seed=1)
    text = ids.reshape(12, 3, MAX_LEN)
    batches = [dict(image=images[s:s + 5], text=text[s:s + 5]) for s in range(0, 12, 5)]
    got = retrieval_evaluate(model, variables, batches, mesh=_mesh(2), block=4)
    expected = _brute_force(jax.jit(model_method(model, "encode_image"))(variables, images),
                            jax.jit(model_method(model, "encode_text"))(variables, ids),
                            np.repeat(np.arange(12), 3))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_hits_by_group_vs_brute_force():
    """`groups`: any caption / image of the query's group is a hit (ids < 0:
    alone); blocks smaller than the sets, several captions per image."""
    rng = np.random.default_rng(4)
    n, m = 23, 50
    img = l2_normalize(rng.standard_normal((n, 8)))
    txt = l2_normalize(rng.standard_normal((m, 8)))
    t2i = np.concatenate([np.arange(n), rng.integers(0, n, m - n)]).astype(np.int32)
    groups = rng.integers(0, 6, n) * 1000 + 7  # ids need not be dense
    groups[:4] = -1
    got = retrieval_recall(img, txt, t2i, block=5, groups=groups)
    expected = _brute_force(img, txt, t2i, groups)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    plain = retrieval_recall(img, txt, t2i, block=5)
    # More positives can only raise recall, and here do (the sets are random).
    assert all(got[k] >= plain[k] for k in plain if "_r" in k)
    assert got["i2t_r1"] > plain["i2t_r1"] and got["t2i_r1"] > plain["t2i_r1"]
    # One image per group is the plain metric.
    same = retrieval_recall(img, txt, t2i, block=5, groups=np.arange(n) * 3)
    assert same == plain
    with pytest.raises(ValueError, match="one group per image"):
        retrieval_recall(img, txt, t2i, groups=groups[:-1])


# ----------------------------------------------------------------- BLIP-2 re-ranking


def _reference_rerank(itc, itm, t2i, k, ks, add_itc, groups=None):
    """LAVIS procedure in NumPy: per query, top-k ITC candidates rescored, others -inf."""
    n, m = itc.shape
    i2t_rank, t2i_rank = [], []
    for i in range(n):
        score = np.full(m, -np.inf)
        cand = np.argsort(-itc[i], kind="stable")[:k]  # near-ties at random init
        score[cand] = itm[i, cand] + (itc[i, cand] if add_itc else 0)
        order = np.argsort(-score, kind="stable")
        i2t_rank.append(min((order == j).argmax() for j in range(m)
                            if _same(groups, i, t2i[j])))
    for j in range(m):
        score = np.full(n, -np.inf)
        cand = np.argsort(-itc[:, j], kind="stable")[:k]
        score[cand] = itm[cand, j] + (itc[cand, j] if add_itc else 0)
        order = np.argsort(-score, kind="stable")
        t2i_rank.append(min((order == i).argmax() for i in range(n)
                            if _same(groups, i, t2i[j])))
    out = {f"i2t_r{q}": np.mean(np.array(i2t_rank) < q) for q in ks}
    out.update({f"t2i_r{q}": np.mean(np.array(t2i_rank) < q) for q in ks})
    return out


@pytest.fixture(scope="module")
def blip2_case():
    """A tiny random BLIP-2, 6 images x 2 captions, and every pair's ITM logits."""
    model = Blip2Stage1(image=VIT, qformer=dict(num_queries=4, width=32, depth=2, heads=2,
                                                mlp_dim=64, vocab_size=259, max_len=MAX_LEN),
                        embed_dim=16)
    images, ids = _data(6, 2, seed=2)
    variables = jax.jit(model.init)(jax.random.key(1), images[:2], ids[:2])
    run = lambda method, *args: np.asarray(  # noqa: E731
        jax.jit(model_method(model, method))(variables, *args))
    tokens = run("image_tokens", images)
    itc = itc_similarity(run("encode_image", images), run("encode_text", ids), block=4)
    n, m = itc.shape
    pairs_i, pairs_t = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
    logits = run("itm_logits", tokens[pairs_i], ids[pairs_t]).astype(np.float64)
    return model, variables, tokens, ids, itc, logits.reshape(n, m, 2)


@pytest.mark.parametrize("k,itm_score,add_itc", [(3, "prob", True), (20, "logit", False)])
def test_blip2_rerank_vs_numpy(blip2_case, k, itm_score, add_itc):
    model, variables, tokens, ids, itc, logits = blip2_case
    t2i = np.repeat(np.arange(6), 2)
    if itm_score == "prob":
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        itm = e[..., 1] / e.sum(axis=-1)
    else:
        itm = logits[..., 1]
    ks = (1, 3) if k == 3 else KS
    got = blip2_rerank_recall(model, variables, tokens, ids, itc, t2i, k=k, ks=ks,
                              itm_score=itm_score, add_itc=add_itc, batch_size=8,
                              mesh=_mesh(2))
    expected = _reference_rerank(itc.astype(np.float64), itm, t2i, k, ks, add_itc)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    with pytest.raises(ValueError, match="raise k"):
        blip2_rerank_recall(model, variables, tokens, ids, itc, t2i, k=2, ks=(1, 5))
    # Hits by group: images 0-2 one group, 3 and 4 another, 5 alone.
    groups = np.array([9, 9, 9, 4, 4, -1])
    got = blip2_rerank_recall(model, variables, tokens, ids, itc, t2i, k=k, ks=ks,
                              itm_score=itm_score, add_itc=add_itc, batch_size=8,
                              groups=groups)
    expected = _reference_rerank(itc.astype(np.float64), itm, t2i, k, ks, add_itc, groups)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_json_caption_lists_from_shards(two_tower, tmp_path):
    """`text_format="caption_list"`: each image's JSON list (1 to 3 captions here)
    becomes its caption set; missing rows are padding and are left out."""
    import json
    from mmjax.data.pipeline import build_eval_iterator, default_data_config
    from _shards import make_image, write_tar
    model, variables = two_tower
    rng = np.random.default_rng(3)
    words = ["red", "blue", "cat", "dog", "big", "small", "sky", "sea"]
    caps = [[" ".join(rng.choice(words, 3)) for _ in range(1 + i % 3)] for i in range(10)]
    members = []
    for i, c in enumerate(caps):
        members += [(f"{i:03d}.jpg", make_image(i)),
                    (f"{i:03d}.json", json.dumps({"captions": c}).encode())]
    write_tar(tmp_path / "s.tar", members)
    cfg = default_data_config()
    cfg.update(dict(shards=str(tmp_path / "s.tar"), text_format="caption_list",
                    caption_key="json:captions", num_captions=3, max_len=MAX_LEN,
                    image_size=IMAGE, workers=0))
    batches = list(build_eval_iterator(cfg, 4, process_index=0, process_count=1))
    assert batches[0]["text"].shape == (4, 3, MAX_LEN)
    got = retrieval_evaluate(model, variables, batches, pad_id=0, block=4)
    valid = np.concatenate([b["valid"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[valid]
    tok = build_tokenizer("bytes", MAX_LEN)
    flat = [c for cs in caps for c in cs]
    expected = _brute_force(jax.jit(model_method(model, "encode_image"))(variables, images),
                            jax.jit(model_method(model, "encode_text"))(variables, tok(flat)),
                            np.repeat(np.arange(10), [len(c) for c in caps]))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
