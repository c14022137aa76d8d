"""Named tokenizers ("clip", "siglip", "bert-base-uncased", "t5", "hub:ORG/NAME", e.g.
RoBERTa's "hub:FacebookAI/roberta-base") read
from an offline Hugging Face hub cache laid out here, against transformers' tokenizers
loaded from the same files; the check of a config's vocabulary against its tokenizer."""
import json
import os
import pickle
import random
import shutil

import pytest

from _hub import clip_bpe, lay_out, roberta_folder
from mmjax.config.loading import CONFIG_DIR, load_config
from mmjax.config.schema import check_vocabulary
from mmjax.data.tokenizers import build_tokenizer
from mmjax.errors import ConfigError

WORDS = ("a an the small large tiny huge red blue green yellow purple orange black white "
         "circle square triangle cross star above below left right of on in under behind "
         "photo picture image drawing painting with and next to near standing sitting "
         "running dog dogs cat cats bird horse man woman child people street table kitchen "
         "beach mountain river city building car bus train bicycle tree flower grass sky "
         "water snow winter summer holding looking playing eating wearing two three four "
         "café naïve über straße crème brûlée jalapeño 猫 一只 小狗 写真 日本 东京 "
         "don't it's we're they'll I'm Photo Red Circle Dog London Paris, beach. "
         "cats! (left) 2024 10 3.5 #tag @home").split()
MAX_LEN = 16
CAPTIONS = [
    "A red circle above a blue square.",
    "Hello, World! It's a photo (with \"quotes\"), commas; and... dots?!",
    "café naïve über STRASSE straße Crème Brûlée",
    "一只猫 在 写真 里，小狗！",
    "emoji 🐱🚀 next to ✓ and ☃",
    "  leading and trailing   runs\t\tof tabs\nand new lines  ",
    "3 cats, 12 dogs: 2024-01-01 @ 10:30 #tag",
    "",
    " ".join(WORDS * 2),  # longer than MAX_LEN: truncated
]


def _corpus(n=2000, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _clip_files(root, transformers):
    """A small BPE in CLIP's layout (byte alphabet, the same with "</w>", merges,
    <|startoftext|>, <|endoftext|> last): one folder as transformers saves it
    (tokenizer.json), one with vocab.json + merges.txt."""
    vocab, merges = clip_bpe(_corpus(), 1200, collapse_whitespace=True)

    transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(root / "clip_json")
    (root / "clip_vocab").mkdir()
    _write_json(root / "clip_vocab" / "vocab.json", vocab)
    (root / "clip_vocab" / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _write_json(root / "clip_vocab" / "tokenizer_config.json",
                {"tokenizer_class": "CLIPTokenizer"})


def _sentencepiece_files(root, transformers):
    """A small unigram SentencePiece model with T5's special pieces (pad 0, EOS 1,
    unk 2, no BOS): SigLIP's folder as transformers saves it; T5 with spiece.model
    only (the original t5-base layout) and as transformers saves it (tokenizer.json)."""
    import sentencepiece as spm

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "sp"), vocab_size=400,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, num_threads=1, minloglevel=2)
    model = str(root / "sp.model")
    transformers.SiglipTokenizer(vocab_file=model).save_pretrained(root / "siglip")
    (root / "t5_spiece").mkdir()
    shutil.copy(model, root / "t5_spiece" / "spiece.model")
    _write_json(root / "t5_spiece" / "tokenizer_config.json", {"model_max_length": 512})
    transformers.T5Tokenizer.from_pretrained(root / "t5_spiece").save_pretrained(
        root / "t5_json")


def _bert_files(root, transformers):
    """A small WordPiece vocab.txt (BERT's special tokens first), alone and as
    transformers saves it (tokenizer.json)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(
        vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False))
    vocab = tok.get_vocab()
    (root / "bert_vocab").mkdir()
    (root / "bert_vocab" / "vocab.txt").write_text(
        "".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    _write_json(root / "bert_vocab" / "tokenizer_config.json",
                {"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    transformers.BertTokenizer.from_pretrained(root / "bert_vocab").save_pretrained(
        root / "bert_json")


def _roberta_files(root):
    """RoBERTa's hub layout (`_hub.roberta_folder`: tokenizer.json, vocab.json +
    merges.txt, `<mask>` last), and its vocab.json + merges.txt alone with a
    tokenizer_config.json naming RobertaTokenizer."""
    folder = roberta_folder(root)
    (root / "roberta_vocab").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / name, root / "roberta_vocab" / name)
    _write_json(root / "roberta_vocab" / "tokenizer_config.json",
                {"tokenizer_class": "RobertaTokenizer"})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Folders of tokenizer files made here (nothing is downloaded), by name."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tokenizer_files")
    _clip_files(root, transformers)
    _sentencepiece_files(root, transformers)
    _bert_files(root, transformers)
    _roberta_files(root)
    return {p.name: str(p) for p in root.iterdir() if p.is_dir()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE with downloads off; returns `put(repo_id,
    folder)`, which lays `folder`'s files out as the cached snapshot of `repo_id`
    (models--ORG--NAME/snapshots/<commit>/, refs/main) and returns its folder."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))

    def put(repo_id, folder):
        return lay_out(cache, repo_id, folder)
    put.cache = str(cache)
    return put


# spec, repository id in the cache, source folder, transformers class, its BOS attribute
CASES = [
    ("clip", "openai/clip-vit-base-patch32", "clip_json", "CLIPTokenizer", "bos_token_id"),
    ("hub:someone/clip-vocab-merges", "someone/clip-vocab-merges", "clip_vocab",
     "CLIPTokenizer", "bos_token_id"),
    ("siglip", "google/siglip-base-patch16-224", "siglip", "SiglipTokenizer", None),
    ("bert-base-uncased", "google-bert/bert-base-uncased", "bert_json", "BertTokenizer",
     "cls_token_id"),
    ("hub:someone/bert-vocab-txt", "someone/bert-vocab-txt", "bert_vocab", "BertTokenizer",
     "cls_token_id"),
    ("t5", "google-t5/t5-base", "t5_json", "T5Tokenizer", None),
    ("t5", "t5-base", "t5_spiece", "T5Tokenizer", None),  # the old name, spiece.model only
    ("hub:FacebookAI/roberta-base", "FacebookAI/roberta-base", "roberta", "RobertaTokenizer",
     "bos_token_id"),  # clap_base's
    ("hub:someone/roberta-vocab-merges", "someone/roberta-vocab-merges", "roberta_vocab",
     "RobertaTokenizer", "bos_token_id"),
]


@pytest.mark.parametrize("spec, repo_id, source, ref_class, bos_attr", CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_named_tokenizer_ids_equal_transformers(spec, repo_id, source, ref_class, bos_attr,
                                                sources, hub_cache):
    """mmjax's tokenizer, resolved from the cache, gives transformers' ids for the same
    files: BOS? + content + EOS, padded with transformers' pad id; a text too long
    keeps EOS last after the reference's content cut to fit."""
    transformers = pytest.importorskip("transformers")
    snapshot = hub_cache(repo_id, sources[source])
    ref = getattr(transformers, ref_class).from_pretrained(snapshot)
    tok = build_tokenizer(spec, MAX_LEN)
    assert tok.vocab_size == len(ref)
    assert tok.pad_id == ref.pad_token_id
    assert tok.bos_id == (getattr(ref, bos_attr) if bos_attr else None)
    ids = tok(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), MAX_LEN)
    n_truncated = 0
    for text, row in zip(CAPTIONS, ids.tolist()):
        full = ref(text)["input_ids"]  # BOS? + content + EOS, untruncated
        assert full[-1] == tok.eos_id, text
        if len(full) <= MAX_LEN:
            assert row == full + [tok.pad_id] * (MAX_LEN - len(full)), text
            if ref.unk_token_id not in full[:-1]:  # (SentencePiece decodes unknowns " ⁇ ")
                assert tok.decode(row) == ref.decode(full, skip_special_tokens=True), text
        else:
            n_truncated += 1
            assert row == full[:MAX_LEN - 1] + [full[-1]], text
    assert n_truncated >= 1
    # (byte-level BPEs have no unknown characters)
    if ref_class not in ("CLIPTokenizer", "RobertaTokenizer"):
        assert any(ref.unk_token_id in ref(t)["input_ids"] for t in CAPTIONS)
    assert (pickle.loads(pickle.dumps(tok))(CAPTIONS) == ids).all()  # data loader workers


def test_missing_files_are_one_line_naming_the_repository_and_the_fetch_command(
        hub_cache, tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        build_tokenizer("clip", MAX_LEN)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("tokenizer 'clip'", "openai/clip-vit-base-patch32", "tokenizer.json",
                 "vocab.json + merges.txt", hub_cache.cache, "HF_HUB_OFFLINE",
                 "snapshot_download('openai/clip-vit-base-patch32'"):
        assert part in msg, (part, msg)
    # Both names of T5 were looked for.
    with pytest.raises(ConfigError, match=r"google-t5/t5-base .* \(nor under t5-base\)"):
        build_tokenizer("t5", MAX_LEN)
    # A cached snapshot without tokenizer files (e.g. only the weights were fetched).
    (tmp_path / "weights").mkdir()
    _write_json(tmp_path / "weights" / "config.json", {})
    hub_cache("someone/weights-only", tmp_path / "weights")
    with pytest.raises(ConfigError, match=r"someone/weights-only \(tokenizer\.json or "):
        build_tokenizer("hub:someone/weights-only", MAX_LEN)
    # Without HF_HUB_CACHE the cache is HF_HOME/hub.
    monkeypatch.delenv("HF_HUB_CACHE")
    with pytest.raises(ConfigError, match=os.path.join(str(tmp_path / "hf_home"), "hub")):
        build_tokenizer("siglip", MAX_LEN)
    with pytest.raises(ConfigError, match=r"expected hub:ORG/NAME"):
        build_tokenizer("hub:no-org", MAX_LEN)


def test_vocabulary_mismatch_fails_before_the_workdir_is_touched(sources, hub_cache, tmp_path):
    """A named tokenizer larger than the model's text vocabulary stops `train` before it
    builds, compiles or writes anything; disagreeing pad/EOS ids too; None is filled in."""
    from mmjax.train.loop import train

    hub_cache("openai/clip-vit-base-patch32", sources["clip_json"])
    tok = build_tokenizer("clip", 32)
    clip = "data.train.tokenizer=clip"
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(load_config("clip_tiny:tiny", [clip]), str(run))
    assert (f"tokenizer='clip' has {tok.vocab_size} tokens but the model's vocab_size is 259; "
            f"raise config.model.text.vocab_size to {tok.vocab_size}") in str(e.value)
    assert not run.exists()

    vocab = f"model.text.vocab_size={tok.vocab_size}"
    with pytest.raises(ConfigError, match=rf"config\.model\.text\.pad_id=0 but "
                                          rf".*tokenizer='clip' pads with id {tok.pad_id}"):
        check_vocabulary(load_config("clip_tiny:tiny", [clip, vocab]))
    with pytest.raises(ConfigError, match=rf"config\.model\.text\.eos_id=2 but .*tokenizer="
                                          rf"'clip' ends every text with id {tok.eos_id}"):
        check_vocabulary(load_config("clip_tiny:tiny", [clip, vocab, f"model.text.pad_id="
                                                                      f"{tok.pad_id}"]))
    config = load_config("clip_tiny:tiny", [clip, "model.text.vocab_size=None",
                                            "model.text.pad_id=None",
                                            f"model.text.eos_id={tok.eos_id}"])
    check_vocabulary(config)
    assert (config.model.text.vocab_size, config.model.text.pad_id) == (tok.vocab_size,
                                                                        tok.pad_id)


def test_recipes_pass_the_check():
    """Every recipe at :tiny agrees with its own tokenizer (a named one from the
    session's hub cache: vocabulary size and ids follow it), and every recipe on the
    byte tokenizer (259 ids, pad 0, EOS 2) at full size too: the checks leave them
    unchanged."""
    checked = 0
    for name in sorted(os.listdir(CONFIG_DIR)):
        for arg in ("", ":tiny"):
            config = load_config(os.path.join(CONFIG_DIR, name) + arg)
            if arg or config.data.train.tokenizer == "bytes":
                before = config.model.to_dict()
                check_vocabulary(config)
                assert config.model.to_dict() == before, name + arg
                checked += 1
    assert checked > len(os.listdir(CONFIG_DIR)) >= 15  # every :tiny and the byte recipes


def test_vision_lm_refuses_a_tokenizer_that_pads_with_eos(sources, hub_cache):
    """CLIP's tokenizer pads with its EOS: a VisionLM (padding found by id) would hide
    every turn's EOS, so the config is refused at load time; Vicuna's (pad <unk>) passes."""
    hub_cache("openai/clip-vit-base-patch32", sources["clip_json"])
    tok = build_tokenizer("clip", 32)
    assert tok.pad_id == tok.eos_id
    config = load_config("llava:cpu,tiny", ["data.train.tokenizer=clip",
                                            "model.lm.vocab_size=None", "model.pad_id=None"])
    with pytest.raises(ConfigError, match=rf"tokenizer='clip' pads with its EOS id "
                                          rf"{tok.eos_id}; the vision_lm family"):
        check_vocabulary(config)
    check_vocabulary(load_config("llava:cpu,tiny", []))
