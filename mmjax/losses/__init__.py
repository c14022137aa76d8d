"""Training objectives: contrastive (softmax, sigmoid), captioning, BLIP-2, MLM and VQA.

All functions take arrays, compute in float32 and return float32 scalars.
Under `jax.set_mesh(mesh)` with the batch dim sharded over `("data",
"fsdp")` they compute the loss of the global batch with exact gradients.
"""
from mmjax.losses.blip2 import blip2_itc_loss, blip2_itm_triples, itm_loss
from mmjax.losses.captioning import caption_loss, next_token_loss
from mmjax.losses.one_tower import mask_tokens, masked_lm_loss, vqa_loss, vqa_targets
from mmjax.losses.contrastive import (softmax_contrastive_loss,
                                      sigmoid_contrastive_loss)

__all__ = [
    "softmax_contrastive_loss",
    "sigmoid_contrastive_loss",
    "caption_loss",
    "next_token_loss",
    "blip2_itc_loss",
    "blip2_itm_triples",
    "itm_loss",
    "mask_tokens",
    "masked_lm_loss",
    "vqa_targets",
    "vqa_loss",
]
