"""`Family`: what the trainer, bench, compile, evaluators and `:tiny` know of a model family.

A family (CLIP/SigLIP two-tower, CoCa, BLIP-2 stage 1, VisionLM, ...) is one
object that owns:
  - the objectives it offers and how their losses are formed (`losses`);
  - its inputs: the media the tower reads (`media`), dummy inputs for init
    (`sample_inputs`) and the shapes of a global batch (`batch_spec`);
  - its FLOP formula (`train_flops`) and its `:tiny` shrink (`shrink`);
  - the evaluators that apply (`evaluators`) and its captioner, if any.
Nothing outside `mmjax/families/` branches on a family name or model class.

The media tower (image ViT, audio AST, video ViT, ...) is chosen by
`model.image.kind` (`mmjax.models.towers`); a tower class says which media it
reads (`modality`), its per-example input (`example_input`), its forward
FLOPs (`forward_flops`) and its `:tiny` sizes (`tiny`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models import towers


def plain(cfg: Any) -> dict:
    """ConfigDict / FrozenDict / dict -> dict (shallow)."""
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


class Family:
    """Base class; subclasses set the class attributes and override what differs."""
    name: str = ""                        # config `model.name`
    objectives: tuple[str, ...] = ()      # names valid in `config.objectives`
    evaluators: tuple[str, ...] = ()      # `config.evals` sections that apply
    text_section: str = "text"            # model section whose vocabulary the tokenizer feeds
    optional_batch_keys: tuple[str, ...] = ()  # step inputs some data has (VisionLM: loss_mask)
    itm_rerank: bool = False              # retrieval re-ranks with `itm_logits(image_tokens, text)`
    # The step takes any number of media tokens (it pools them or attends over them),
    # so the tower may drop patches in training (`model.image.patch_dropout`).
    patch_dropout: bool = False

    # --- the media tower -------------------------------------------------------------
    def tower(self, model_cfg: Mapping) -> type:
        """The class of the media tower (`model.image.kind`, default "vit")."""
        return towers.tower_class(plain(plain(model_cfg).get("image")).get("kind"))

    def media(self, model_cfg: Mapping) -> str:
        """The tower's modality: its batch key and the media the data pipeline decodes
        for it ("image", "audio", "video", or a registered one)."""
        return self.tower(model_cfg).modality

    # --- inputs -------------------------------------------------------------------------
    def media_example(self, config: Any) -> tuple[tuple[int, ...], Any]:
        """`(shape, dtype)` of one example of the media input as the pipeline emits it."""
        return self.tower(config.model).example_input(plain(config.model.get("image")),
                                                      config.data.train)

    def sample_inputs(self, config: Any, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        """Dummy `(media [b, ...] float32, text [b, L] int32)` for `model.init`."""
        shape, _ = self.media_example(config)
        length = int(config.data.train.max_len)
        return (jnp.zeros((batch,) + tuple(shape), jnp.float32),
                jnp.zeros((batch, length), jnp.int32))

    def batch_spec(self, config: Any, batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """`{field: (shape, dtype)}` of a global training batch of `batch` rows."""
        shape, dtype = self.media_example(config)
        return {self.media(config.model): ((batch,) + tuple(shape), dtype),
                "text": ((batch, int(config.data.train.max_len)), np.int32)}

    def batch_keys(self, config: Any) -> tuple[str, ...]:
        """The fields of a data batch that the train step reads (`batch_spec`'s, plus
        `optional_batch_keys` where the data has them; `label` etc. stay on the host)."""
        return tuple(self.batch_spec(config, 1)) + self.optional_batch_keys

    def data_overrides(self, config: Any) -> dict:
        """`data.train` keys the family fills from the model config for every data
        iterator (training and evaluation), e.g. the answer vocabulary of VQA data."""
        return {}

    def data_config(self, config: Any, **overrides) -> Any:
        """`config.data.train` as the family's data iterators read it: a copy with
        `data_overrides` and `overrides` applied."""
        import ml_collections
        data = ml_collections.ConfigDict(config.data.train.to_dict())
        data.update({**self.data_overrides(config), **overrides})
        return data

    def model_inputs(self, model: Any, batch: Mapping[str, jax.Array]) -> tuple:
        """The positional arguments of `model.apply` for a batch."""
        return batch[self.media({"image": model.image})], batch["text"]

    def apply(self, model: Any, params: Any, *args, rng: jax.Array, **kwargs):
        """`model.apply` for training: towers with random augmentation on device
        (e.g. AST's SpecAugment) draw from the "augment" rng, derived from `rng`."""
        return model.apply({"params": params}, *args,
                           rngs={"augment": jax.random.fold_in(rng, 0x6175)}, **kwargs)

    # --- objectives ---------------------------------------------------------------------
    def check_objectives(self, model: Any, objectives: Mapping[str, float]) -> None:
        """Raise a ConfigError naming `config.objectives.X` if X does not apply."""
        if not objectives:
            raise ConfigError(f"config.objectives is empty; choose from {self.objectives}.")
        for name in objectives:
            if name not in self.objectives:
                raise ConfigError(f"config.objectives.{name}: not an objective of "
                                  f"{type(model).__name__}; choose from {self.objectives}.")

    def check_config(self, config: Any) -> None:
        """Family-specific cross-key checks (`mmjax.config.schema.check_config` runs
        them with the rest, before anything is built); ConfigError naming the keys."""

    def losses(self, model: Any, params: Any, batch: Mapping[str, jax.Array],
               objectives: Mapping[str, float], rng: jax.Array
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """`(terms, extra)`: unweighted loss per objective and head scalars to log."""
        raise NotImplementedError

    def pad_id(self, model: Any) -> int:
        return int(dict(model.text).get("pad_id", 0))

    def vocab_size(self, model_cfg: Mapping) -> int:
        """Vocabulary size the tokenizer's ids must fit."""
        return int(plain(model_cfg)[self.text_section]["vocab_size"])

    # --- cost ---------------------------------------------------------------------------
    def media_flops(self, model_cfg: Mapping, **overrides) -> float:
        """Forward FLOPs of the media tower per example."""
        cfg = {**plain(plain(model_cfg).get("image")), **overrides}
        cfg.pop("kind", None)
        return self.tower(model_cfg).forward_flops(cfg)

    def train_flops(self, model_cfg: Mapping, batch: int, text_len: int,
                    frozen: tuple = ()) -> float:
        """Model FLOPs of one training step over a global batch (`mmjax.train.mfu`)."""
        raise NotImplementedError

    def step_flops(self, config: Any, batch: int) -> float:
        """`train_flops` of a whole config: its `data.train.max_len` text tokens and
        `optim.freeze` prefixes (a family whose step depends on more of the config,
        e.g. its objectives, reads it here)."""
        return self.train_flops(config.model.to_dict(), batch, int(config.data.train.max_len),
                                tuple(config.optim.get("freeze") or ()))

    # --- :tiny --------------------------------------------------------------------------
    def shrink(self, c: Any) -> None:
        """Family-specific part of the `:tiny` shrink (sizes of the family's own sections,
        which evaluators run). The generic part is `mmjax.config.defaults.make_tiny`."""

    # --- evaluation ---------------------------------------------------------------------
    def captioner(self, model: Any, variables: Any, beam_size: int
                  ) -> Optional[Callable[[np.ndarray, Any, int], list[str]]]:
        """`fn(media [B, ...], tokenizer, max_len) -> B captions`, or None if the family
        cannot caption."""
        return None

    def grounding(self, model: Any) -> Any:
        """The `mmjax.evaluate.grounding.GroundingSpec` of the family's grounding maps (a
        score of a media-text pair and where media tokens are tapped), or None."""
        return None

    def answerer(self, model: Any, variables: Any) -> Optional[Callable[..., list[str]]]:
        """`fn(media [N, ...], prompts (N id lists), tokenizer, max_new_tokens, width=None,
        chunk=64) -> N answers` (greedy), or None if the family does not answer
        questions (VQA evaluation, `mmjax generate --prompt`)."""
        return None


def step_captioner(make_logits_fn: Callable, model: Any, variables: Any, beam_size: int
                   ) -> Callable[[np.ndarray, Any, int], list[str]]:
    """A captioner from a caption step function maker of `mmjax.families.captioning`
    (`coca_logits_fn`, `blip2_itg_logits_fn`): greedy or beam search."""
    from mmjax.families import captioning

    def run(media, tokenizer, max_len):
        return captioning.generate_captions(make_logits_fn(model, variables, media), len(media),
                                            tokenizer, max_len, beam_size=beam_size)
    return run
