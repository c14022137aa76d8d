"""A Hugging Face hub cache laid out locally (nothing downloaded): small tokenizers
in the layouts of the repositories the recipes name (`clip`, `siglip`,
`bert-base-uncased`, Vicuna's `hub:lmsys/...`, RoBERTa's
`hub:FacebookAI/roberta-base`), trained here on caption-like text.

`lay_out(cache, repo_id, folder)` copies a folder as the cached snapshot of a
repository; `recipe_hub_cache(root)` builds every recipe tokenizer's folder and
returns the cache folder (set `HF_HUB_CACHE` to it and `HF_HUB_OFFLINE=1`).
"""
import hashlib
import json
import random
import shutil
from pathlib import Path

WORDS = ("a an the small large big tiny red blue green yellow purple orange grey circle "
         "square triangle cross above below left right to of on in with and next it there "
         "is photo picture drawing background shape shapes colour where how many one two "
         "none what q a: ? . , ! dog cat street people").split()


def corpus(n=2000, seed=0):
    """`n` lines of 3-12 words of `WORDS`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _json(path, obj):
    Path(path).write_text(json.dumps(obj), encoding="utf-8")


def lay_out(cache, repo_id, folder):
    """Lay `folder`'s files out as the cached snapshot of `repo_id` in hub cache
    `cache` (models--ORG--NAME/snapshots/<commit>/, refs/main); returns the folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return str(repo / "snapshots" / commit)


def clip_bpe(texts, vocab_size: int, collapse_whitespace: bool = False):
    """A byte-level BPE trained as CLIP's (lowercased, "</w>" word ends) on `texts` ->
    `(vocab {token: id}, merges [(a, b)])`: the byte alphabet, the same with "</w>",
    the merged tokens, then <|startoftext|> and <|endoftext|> (the last two ids)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    split = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
             r"""[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    norms = [normalizers.NFC()] + ([normalizers.Replace(Regex(r"\s+"), " ")]
                                   if collapse_whitespace else []) + [normalizers.Lowercase()]
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>",
        show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    tokens = alphabet + [a + "</w>" for a in alphabet]
    tokens += [t for t in dict.fromkeys(a + b for a, b in merges) if t not in set(tokens)]
    return {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}, merges


def clip_folder(root):
    """CLIP's layout: a byte-level BPE with "</w>" word ends, vocab.json + merges.txt,
    <|startoftext|> and <|endoftext|> the last two ids."""
    vocab, merges = clip_bpe(corpus(), 700)
    folder = Path(root) / "clip"
    folder.mkdir()
    _json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer"})
    return folder


def bert_folder(root):
    """BERT's layout: a WordPiece vocab.txt, [PAD] [UNK] [CLS] [SEP] [MASK] first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False))
    vocab = tok.get_vocab()
    folder = Path(root) / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)),
                                      encoding="utf-8")
    _json(folder / "tokenizer_config.json",
          {"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    return folder


def roberta_folder(root, name="roberta"):
    """RoBERTa's layout, as the hub repository FacebookAI/roberta-base has it: a
    byte-level BPE (GPT-2's, no word-end suffix, cased) in tokenizer.json (with
    RobertaProcessing `<s> ... </s>`) and as vocab.json + merges.txt, `<s>`=0,
    `<pad>`=1, `</s>`=2, `<unk>`=3 first and `<mask>` last, tokenizer_config.json
    without a `tokenizer_class`. In `root/name`."""
    from tokenizers import (AddedToken, Tokenizer, decoders, models, pre_tokenizers,
                            processors, trainers)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(trainer.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<mask>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0),
                                                      trim_offsets=True, add_prefix_space=False)
    tok.add_special_tokens(specials + [AddedToken("<mask>", lstrip=True)])
    folder = Path(root) / name
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    _json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _json(folder / "tokenizer_config.json", {"model_max_length": 512})
    return folder


def sentencepiece_folder(root, name, **ids):
    """A unigram SentencePiece model (`ids`: its pad/eos/unk/bos ids) in `root/name`
    as spiece.model and tokenizer.model."""
    import sentencepiece as spm
    text = Path(root) / f"{name}.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(Path(root) / name),
                                   vocab_size=200, hard_vocab_limit=False, model_type="unigram",
                                   num_threads=1, minloglevel=2, **ids)
    folder = Path(root) / name
    folder.mkdir()
    for target in ("spiece.model", "tokenizer.model"):
        shutil.copy(Path(root) / f"{name}.model", folder / target)
    return folder


def recipe_hub_cache(root):
    """A hub cache under `root` with the tokenizers the recipes name; returns it."""
    root = Path(root)
    files, cache = root / "files", root / "hub"
    files.mkdir(parents=True)
    lay_out(cache, "openai/clip-vit-base-patch32", clip_folder(files))
    lay_out(cache, "google-bert/bert-base-uncased", bert_folder(files))
    siglip = sentencepiece_folder(files, "siglip", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    _json(siglip / "tokenizer_config.json", {"tokenizer_class": "SiglipTokenizer"})
    lay_out(cache, "google/siglip-base-patch16-224", siglip)
    llama = sentencepiece_folder(files, "llama", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    _json(llama / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>",
                                              "unk_token": "<unk>", "pad_token": "<unk>"})
    _json(llama / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"})
    for repo in ("lmsys/vicuna-7b-v1.1", "lmsys/vicuna-7b-v1.5"):
        lay_out(cache, repo, llama)
    lay_out(cache, "FacebookAI/roberta-base", roberta_folder(files))
    return str(cache)
