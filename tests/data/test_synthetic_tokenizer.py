"""`tokenizer="synthetic"`: the word-level BPE of the built-in captions that mmjax ships
(`mmjax/data/assets/synthetic_bpe.json`) is what `mmjax tokenizer` makes from them."""
import json

import numpy as np

from mmjax.commands.tokenizer import train_bpe
from mmjax.data import synthetic
from mmjax.data.tokenizers import SYNTHETIC_BPE, build_tokenizer


def test_shipped_bpe_is_the_one_trained_on_the_built_in_captions(tmp_path):
    # one_tower_tiny's training set: 20,000 samples at 32 pixels (captions depend on both).
    captions = (synthetic.make_sample(i, "train", 32)["caption"] for i in range(20000))
    out = str(tmp_path / "tokenizer.json")
    train_bpe(captions, out, vocab_size=600)
    made, shipped = json.load(open(out)), json.load(open(SYNTHETIC_BPE))
    assert made["model"]["vocab"] == shipped["model"]["vocab"]
    assert made["model"]["merges"] == shipped["model"]["merges"]
    assert made["post_processor"] == shipped["post_processor"]


def test_every_caption_word_is_one_token_and_text_round_trips():
    tok = build_tokenizer("synthetic", 24)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (377, 0, 1, 2)
    captions = [synthetic.make_sample(i, "test", 32)["caption"] for i in range(300)]
    ids = tok(captions)
    lengths = (ids != tok.pad_id).sum(1)
    # BOS + one token per word + EOS: the built-in captions' words are all in the BPE.
    assert np.array_equal(lengths, [len(c.split()) + 2 for c in captions])
    assert [tok.decode(r) for r in ids] == captions
    # Text outside the captions still encodes (byte fallback) and round-trips.
    other = "wie viele Formen? \u00fcber 3 \u2603"
    wide = build_tokenizer("synthetic", 64)
    assert wide.decode(wide([other])[0]) == other
