"""The ``mmjax shards`` command: webdataset shards from a folder of images and a
captions file, or from the built-in synthetic dataset (`mmjax.data.writer`
does the writing).

It writes into a new or empty folder only; ``--overwrite`` first removes the
files an earlier run wrote there (``NAME-NNNNNN.tar``, ``.tar.tmp``,
``sizes.json``) and keeps every other file. A captions file is read through
before anything is written; images that do not decode are reported and left out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from mmjax.data.writer import check_captions_file, shards_from_folder, writer_files
from mmjax.errors import UserError


class _ArgError(UserError):
    """A `mmjax shards` usage error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _ArgError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmjax shards", description=(
        "Write webdataset tar shards, from a folder of images and a captions "
        "file (CSV or JSONL), or from the built-in synthetic dataset."))
    p.add_argument("--images", help="folder the captions file's image paths are relative to")
    p.add_argument("--captions", help="CSV (file/image, caption[, label]) or JSONL file")
    p.add_argument("--synthetic", action="store_true", help="write the built-in synthetic dataset")
    p.add_argument("--split", default="train", help="synthetic split (train or test)")
    p.add_argument("--num-samples", type=int, default=10_000, help="synthetic samples")
    p.add_argument("--image-size", type=int, default=64, help="synthetic image side")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed")
    p.add_argument("--export-images", action="store_true",
                   help="with --synthetic: write the samples as PNG files (NNNNNN.png) and "
                        "captions.txt into --out instead of shards, e.g. to try mmjax "
                        "generate --image")
    p.add_argument("--out", required=True,
                   help="output folder for the shards; must be empty or new, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out: first remove the shards an earlier run "
                        "wrote there (NAME-NNNNNN.tar, their unfinished .tar.tmp files and "
                        "sizes.json); every other file is kept")
    p.add_argument("--prefix", default=None,
                   help="shard name prefix (default: shard, or the split)")
    p.add_argument("--max-count", type=int, default=10_000, help="most samples per shard")
    p.add_argument("--max-size-mb", type=float, default=1024.0, help="most MB per shard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _prepare_out(out_dir: str, overwrite: bool) -> None:
    """Refuses a non-empty ``--out`` (earlier shards would stay beside the new
    ones), unless ``overwrite``: then removes the files the writer makes."""
    if not os.path.isdir(out_dir):
        return  # new (made by the writer), or not a folder (the writer says so)
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not overwrite:
        shards = writer_files(out_dir)
        what = (f"{len(shards)} shard files, e.g. {shards[0]}" if shards
                else f"{len(entries)} entries, e.g. {entries[0]}")
        raise _ArgError(f"--out {out_dir} is not empty ({what}); pass --overwrite to "
                        "replace the shards there (other files are kept), or choose a new "
                        "folder")
    for name in writer_files(out_dir):
        os.remove(os.path.join(out_dir, name))


def _export_images(args) -> int:
    """`--synthetic --export-images`: PNG files and their captions, one per line."""
    from PIL import Image

    from mmjax.data.synthetic import make_sample
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise _ArgError(f"--out {args.out} is not empty; choose a new folder or pass "
                        "--overwrite (files of the same names are replaced)")
    os.makedirs(args.out, exist_ok=True)
    lines = []
    for i in range(args.num_samples):
        s = make_sample(i, args.split, args.image_size, args.seed)
        name = f"{i:06d}.png"
        Image.fromarray(s["image"]).save(os.path.join(args.out, name))
        lines.append(f"{name}\t{s['caption']}")
    with open(os.path.join(args.out, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.num_samples} synthetic {args.split} images and captions.txt to "
          f"{args.out}", file=sys.stderr)
    return 0


def shards_command(argv: list[str]) -> int:
    """Runs ``mmjax shards`` with ``argv`` (without the subcommand); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        if args.max_count < 1 or args.max_size_mb <= 0:
            raise _ArgError("--max-count and --max-size-mb must be positive")
        max_bytes = int(args.max_size_mb * 1024 * 1024)
        if args.synthetic:
            if args.images or args.captions:
                raise _ArgError("--synthetic cannot be combined with --images/--captions")
            if args.num_samples < 1:
                raise _ArgError("--num-samples must be positive")
            from mmjax.data.synthetic import write_synthetic_shards

            if args.export_images:
                return _export_images(args)
            _prepare_out(args.out, args.overwrite)
            start = time.perf_counter()
            shards = write_synthetic_shards(
                args.out, split=args.split, num_samples=args.num_samples,
                image_size=args.image_size, samples_per_shard=args.max_count,
                seed=args.seed, prefix=args.prefix)
            print(f"wrote {args.num_samples} synthetic {args.split} samples into "
                  f"{len(shards)} shards in {args.out} "
                  f"({time.perf_counter() - start:.1f}s)", file=sys.stderr)
            return 0
        if not args.images or not args.captions:
            raise _ArgError("give --images DIR and --captions FILE, or --synthetic")
        if not os.path.isdir(args.images):
            raise _ArgError(f"--images {args.images!r} is not a readable folder")
        if not os.path.isfile(args.captions) or not os.access(args.captions, os.R_OK):
            raise _ArgError(f"--captions {args.captions!r} is not a readable file")
        check_captions_file(args.captions)  # a bad file: an error, nothing written or removed
        _prepare_out(args.out, args.overwrite)
        report = shards_from_folder(args.images, args.captions, args.out,
                                    max_count=args.max_count, max_bytes=max_bytes,
                                    prefix=args.prefix or "shard", progress=not args.quiet,
                                    check=False)
        if report.written == 0:
            raise _ArgError(f"no sample written from {args.captions!r}: "
                            f"{report.summary()}")
        if args.quiet:
            print(report.summary(), file=sys.stderr)
        return 0
    except _ArgError as e:
        print(f"mmjax shards: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"mmjax shards: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
