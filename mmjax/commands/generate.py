"""`mmjax generate`: a run answers a question about an image, or captions it.

    mmjax generate --workdir DIR --image photo.jpg --prompt "colour of the big shape?"
    mmjax generate --workdir DIR --image photo.jpg            # no prompt: a caption
    mmjax generate ... --max-new-tokens 64                    # longer answers (default 32)

The run's config (`DIR/config.json`) gives the model, tokenizer and image
preprocessing (center crop, the config's mean/std); its latest (or `--step`)
checkpoint gives the trained weights and its `init` sources the frozen ones.
The prompt uses the training dialog template (`mmjax.data.dialog`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from mmjax.commands.util import error_text, fail, user_errors


def generate_answer(workdir: str, image_path: str, prompt: Optional[str] = None,
                    step: Optional[int] = None, max_new_tokens: int = 32) -> str:
    """The model's answer to `prompt` about one image file (its family's `answerer`),
    or its caption when `prompt` is empty (its family's `captioner`)."""
    from mmjax.data.decode import decode_and_crop, normalize
    from mmjax.data.dialog import encode_prompt
    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.evaluate.runner import EvalError
    from mmjax.families import get_family
    from mmjax.models import build
    from mmjax.train.init_sources import restore_run_params

    config, params, _ = restore_run_params(workdir, step)
    model, family = build(config.model), get_family(config)
    variables = {"params": params}
    run = (family.answerer(model, variables) if prompt
           else family.captioner(model, variables, beam_size=1))
    if run is None or family.media(config.model) != "image":
        what = "answer questions" if prompt else "caption"
        raise EvalError(f"{workdir}: model {config.model.name!r} does not {what} about "
                        "images; `mmjax generate` needs a VisionLM run (configs/llava.py, "
                        "configs/blip2_stage2.py)" + (", or a one-tower VQA run "
                                                      "(configs/one_tower_tiny.py:vqa)"
                                                      if prompt else ", CoCa or BLIP-2") + ".")
    d = config.data.train
    try:
        with open(image_path, "rb") as f:
            data = f.read()
        image, _ = decode_and_crop(data, int(d.image_size), None, augment="center",
                                   max_pixels=d.get("max_pixels"))
    except OSError as e:
        raise EvalError(f"--image {image_path}: cannot read it as an image ({e})") from None
    images = normalize(image[None], d.mean, d.std)
    tokenizer = build_tokenizer(d.tokenizer, int(d.max_len))
    if not prompt:
        return run(images, tokenizer, max_new_tokens)[0]
    ids = encode_prompt(tokenizer, prompt, config.model.get("image_token_id"),
                        d.get("dialog_template", "qa"))
    return run(images, [ids], tokenizer, max_new_tokens, chunk=1)[0]


def generate_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmjax generate",
                                description="Answer a question about an image (VisionLM runs) "
                                            "or caption it (VisionLM, CoCa, BLIP-2); one-tower "
                                            "VQA runs answer from their answer vocabulary.")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="a VisionLM training run (configs/llava.py, configs/blip2_stage2.py)")
    p.add_argument("--image", required=True, metavar="PATH", help="image file (jpg, png, webp, ...)")
    p.add_argument("--prompt", default="",
                   help="question, laid out with the run's dialog template; empty = caption")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="checkpoint step to use; default the latest")
    p.add_argument("--max-new-tokens", type=int, default=32, dest="max_new_tokens", metavar="N",
                   help="most tokens to generate (default 32)")
    args = p.parse_args(argv)
    try:
        answer = generate_answer(args.workdir, args.image, args.prompt, args.step,
                                 args.max_new_tokens)
    except user_errors() as e:
        return fail(error_text(e))
    print(answer)
    sys.stdout.flush()
    return 0
