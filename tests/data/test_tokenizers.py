"""Tokenizers: byte round trip, truncation, and parity with sentencepiece / transformers."""
import pickle
import random

import numpy as np
import pytest

from mmjax.data.tokenizers import ByteTokenizer, build_tokenizer

WORDS = ("a small large red blue green yellow purple orange circle square triangle "
         "cross above below left right of the photo picture with and next to").split()


def _sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _expected_row(content, bos, eos, pad, max_len):
    """Reference layout written independently: BOS? + content[:room] + EOS + pad."""
    head = [] if bos is None else [bos]
    room = max_len - len(head) - 1
    row = head + list(content)[:room] + [eos]
    return row + [pad] * (max_len - len(row))


# ---- bytes -----------------------------------------------------------------

def test_byte_tokenizer_layout_and_round_trip():
    tok = build_tokenizer("bytes", 32)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    texts = ["a red circle", "", "naïve café ✓", "x" * 5]
    ids = tok(texts)
    assert ids.dtype == np.int32 and ids.shape == (4, 32)
    for text, row in zip(texts, ids):
        content = [b + 3 for b in text.encode("utf-8")]
        assert row.tolist() == _expected_row(content, 1, 2, 0, 32)
        assert tok.decode(row) == text
    assert ids.max() < tok.vocab_size


def test_byte_tokenizer_truncation_keeps_eos():
    tok = build_tokenizer("bytes", 6)
    row = tok(["abcdefghij"])[0]
    assert row.tolist() == [1, ord("a") + 3, ord("b") + 3, ord("c") + 3, ord("d") + 3, 2]
    assert tok.decode(row) == "abcd"
    # Exactly filling the row: no pad, EOS last.
    assert tok(["abcd"])[0].tolist() == row.tolist()
    # A cut inside a multi-byte character decodes without raising.
    assert tok.decode(build_tokenizer("bytes", 4)(["é✓"])[0]).startswith("é")


def test_decode_stops_at_eos():
    tok = build_tokenizer("bytes", 16)
    row = tok(["hi"])[0].tolist()
    row[5] = ord("z") + 3  # garbage after EOS must be ignored
    assert tok.decode(row) == "hi"


def test_bad_specs():
    with pytest.raises(ValueError, match="accepted forms"):
        build_tokenizer("wordpiece:/x", 8)
    with pytest.raises(FileNotFoundError, match="/no/such/model.model"):
        build_tokenizer("sentencepiece:/no/such/model.model", 8)
    with pytest.raises(ValueError, match="max_len"):
        build_tokenizer("bytes", 1)


# ---- sentencepiece ---------------------------------------------------------

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_sentences(400)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "m"), vocab_size=60,
        model_type="bpe", character_coverage=1.0, num_threads=1,
        minloglevel=2, pad_id=3)
    return str(d / "m.model")


def test_sentencepiece_matches_processor(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer(f"sentencepiece:{sp_model}", 12)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), 3)
    assert tok.vocab_size == sp.get_piece_size() == 60
    texts = _sentences(20, seed=1)
    ids = tok(texts)
    assert ids.shape == (20, 12) and ids.dtype == np.int32
    n_truncated = 0
    for text, row in zip(texts, ids):
        content = sp.encode(text, out_type=int)
        n_truncated += len(content) > 10
        assert row.tolist() == _expected_row(content, sp.bos_id(), sp.eos_id(), 3, 12)
        if len(content) <= 10:
            assert tok.decode(row) == text
    assert n_truncated > 0  # the truncation path was exercised
    # Data loader workers receive the tokenizer pickled.
    assert np.array_equal(pickle.loads(pickle.dumps(tok))(texts), ids)


# ---- Hugging Face tokenizer.json -------------------------------------------

def _train_bpe_json(path, post_processor, specials, pad=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_sentences(300), trainer=trainer)
    tok.post_processor = post_processor(tok)
    if pad is not None:
        tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
    tok.save(str(path))
    return str(path)


def _check_against_transformers(path, max_len, expect_pad):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=path)
    tok = build_tokenizer(f"hf:{path}", max_len)
    assert tok.pad_id == expect_pad
    texts = _sentences(16, seed=2) + ["a red circle", ""]
    ids = tok(texts)
    assert ids.shape == (len(texts), max_len) and ids.dtype == np.int32
    n_truncated = 0
    for text, row in zip(texts, ids):
        full = ref(text, add_special_tokens=True)["input_ids"]  # BOS? + content + EOS
        if len(full) <= max_len:
            assert row.tolist() == full + [expect_pad] * (max_len - len(full))
            assert tok.decode(row) == ref.decode(full, skip_special_tokens=True)
        else:  # truncated: reference content cut, EOS kept last
            n_truncated += 1
            assert row.tolist() == full[:max_len - 1] + [full[-1]]
            assert row[-1] == tok.eos_id
    assert n_truncated > 0
    assert np.array_equal(pickle.loads(pickle.dumps(tok))(texts), ids)


def test_hf_clip_style_bpe_matches_transformers(tmp_path):
    from tokenizers import processors

    sot, eot = "<|startoftext|>", "<|endoftext|>"
    path = _train_bpe_json(
        tmp_path / "tokenizer.json",
        lambda t: processors.RobertaProcessing((eot, t.token_to_id(eot)),
                                               (sot, t.token_to_id(sot))),
        [sot, eot])
    tok = build_tokenizer(f"hf:{path}", 10)
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(path)
    assert tok.bos_id == raw.token_to_id(sot) and tok.eos_id == raw.token_to_id(eot)
    assert tok.vocab_size == raw.get_vocab_size()
    # No pad token in the file: pad = EOS, as Hugging Face CLIP does.
    _check_against_transformers(path, 10, expect_pad=tok.eos_id)


def test_hf_template_with_pad_token_matches_transformers(tmp_path):
    from tokenizers import processors

    path = _train_bpe_json(
        tmp_path / "tokenizer.json",
        lambda t: processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", t.token_to_id("<s>")),
                                                  ("</s>", t.token_to_id("</s>"))]),
        ["<s>", "</s>", "<pad>"], pad="<pad>")
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(path)
    tok = build_tokenizer(f"hf:{path}", 9)
    assert (tok.bos_id, tok.eos_id) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"))
    _check_against_transformers(path, 9, expect_pad=raw.token_to_id("<pad>"))


def test_hf_eos_only_template(tmp_path):
    from tokenizers import processors

    path = _train_bpe_json(
        tmp_path / "tokenizer.json",
        lambda t: processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", t.token_to_id("</s>"))]),
        ["</s>"])
    tok = build_tokenizer(f"hf:{path}", 8)
    assert tok.bos_id is None
    _check_against_transformers(path, 8, expect_pad=tok.eos_id)
