"""Audio Spectrogram Transformer (AST, Gong et al. 2021) audio encoder.

`AST(...)(x) -> (pooled [B, E] or [B, D], tokens [B, 2 + N, D])`, the tower
contract of `mmjax.models.towers` (`model.image.kind = "ast"`).

The input is chosen by its rank:

  x [B, S] float32   waveform of `num_samples = round(sample_rate * clip_seconds)`
                     samples: `spectrogram` turns it into the normalized log-mel
                     below, on device;
  x [B, T, F]        a spectrogram already normalized, `T = frames`,
                     `F = n_mels` (what Hugging Face `ASTModel` takes as
                     `input_values`).

Front end (`spectrogram`): `mmjax.models.audio.log_mel` with the fields
below, padded with zeros (before normalization, as `ASTFeatureExtractor`) or
cut to `max_length` frames when that is set, then `(x - spec_mean) / (2 *
spec_std)` (AST's normalization; the defaults are AST's AudioSet statistics).
The defaults (16 kHz, 25 ms Hann window in a 512-point FFT, 10 ms hop, 128 HTK
mel bins without area normalization, natural log) approximate the Kaldi fbank
that AST checkpoints were trained on; they are not bit-equal to it (Kaldi
adds dithering, pre-emphasis, DC removal, a symmetric window and no
centering), so an imported checkpoint sees slightly different features than
in its own training.

SpecAugment: with `spec_augment` set (keyword arguments of
`mmjax.models.audio.spec_augment`, e.g. `dict(time_masks=2, time_width=20,
freq_masks=2, freq_width=8)`), a waveform input is masked when the call has an
"augment" rng (`apply(..., rngs={"augment": key})`, what the train step
passes); evaluation passes none and sees the clean spectrogram.

Transformer: overlapping `patch_size`² patches of the [F, T] spectrogram
with strides (`frequency_stride`, `time_stride`), one matmul (the math of
AST's strided Conv2d), frequency-major token order; a class and a
distillation token first, learned position embeddings, pre-norm
`layers.Block`s, a final LayerNorm over all tokens. `pool`: "cls_dist" (mean
of the two tokens, `ASTModel`'s pooler output), "cls", "gap" (mean of the
patch tokens) or "none" (pooled = None). `embed_dim` adds a projection of the
pooled vector, as in `ViT`.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models import audio
from mmjax.models.flops import layer_flops
from mmjax.models.layers import (Block, Dense, Norm, PositionEmbedding, boundary, constrain,
                                 default_kernel_init, drop_patches, kept_patches, logical,
                                 normal_init, stacked)
from mmjax.models.ops.matmul import broadcast_param, matmul_2d

AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AST's AudioSet fbank statistics
POOLS = ("cls_dist", "cls", "gap", "none")


def _windows(x, axis: int, size: int, stride: int, count: int):
    """`count` windows of `size` along `axis` with `stride`, as a new axis after
    `axis` holding the window index and `axis + 1` the offset inside the window
    (static strided slices; no gather)."""
    parts = []
    for i in range(size):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(i, i + stride * (count - 1) + 1, stride)
        parts.append(x[tuple(idx)])
    return jnp.stack(parts, axis=axis + 1)


class AST(nn.Module):
    """Audio Spectrogram Transformer (see the module docstring).

    Fields:
      sample_rate: waveform sample rate in Hz (`data.train.sample_rate` must match).
      clip_seconds: clip length in seconds: waveforms have `num_samples =
        round(sample_rate * clip_seconds)` samples (`data.train.clip_seconds` must match).
      n_fft: FFT size in samples (n_fft // 2 + 1 frequency bins per frame).
      hop_length: samples between frames (160 = 10 ms at 16 kHz).
      win_length: Hann window length in samples, centred in the n_fft frame
        (None = n_fft; at most n_fft).
      n_mels: mel bins F: the spectrogram's frequency axis (at least patch_size).
      f_min: lowest frequency of the mel filterbank in Hz.
      f_max: highest frequency of the mel filterbank in Hz (None = sample_rate / 2).
      mel_scale: "htk" or "slaney" mel scale.
      mel_norm: None (filter peaks at 1, HTK / Kaldi) or "slaney" (each filter
        scaled by 2 / its bandwidth in Hz).
      center: pad n_fft // 2 samples at both ends of the waveform, so frame t is
        centred at t * hop_length (changes the number of frames).
      pad_mode: padding of `center`: "reflect" or "constant" (zeros).
      log: "ln" (natural log floored at float32 eps, the Kaldi fbank of AST),
        "db" (10 log10, floored at each clip's peak - top_db) or "none" (mel power).
      top_db: floor of `log="db"` in dB below each clip's peak (None = no floor);
        unused by "ln" and "none".
      spec_norm: normalization of the log-mel of a waveform (a spectrogram input is
        taken as normalized): "fixed" = `(x - spec_mean) / (2 * spec_std)` (AST's);
        "example" = each clip by its own mean and standard deviation over frames and
        mel bins, `(x - mean) / (2 * std)`, which removes the recording level.
      spec_mean, spec_std: the numbers of `spec_norm="fixed"`: AST's AudioSet
        statistics by default; None in a training config = measured on the first
        clips of `data.train.shards` when the run starts and saved in its config
        (`mmjax.config.audio_stats`).
      max_length: frames the Transformer takes (the log-mel is zero-padded or cut
        to it); None = the frames of a clip.
      patch_size: patch side in mel bins and in frames (square patches).
      frequency_stride: stride between patches along frequency, in mel bins
        (patches overlap when below patch_size).
      time_stride: stride between patches along time, in frames (patches
        overlap when below patch_size).
      width: token width D.
      depth: number of Transformer blocks.
      heads: attention heads; must divide width.
      mlp_dim: MLP hidden width; None = 4 * width.
      act: MLP activation: "gelu", "gelu_tanh", "quick_gelu", "relu", "silu" or
        "swiglu".
      norm_eps: epsilon of every LayerNorm (1e-12, as Hugging Face AST).
      pool: "cls_dist" (mean of the class and distillation tokens), "cls", "gap"
        (mean of the patch tokens) or "none" (pooled = None).
      embed_dim: size E of a linear projection of the pooled vector; None for no
        projection (pooled is `[B, width]`).
      proj_bias: bias of the output projection.
      scan: run the blocks as one `nn.scan` (params `layers` with a leading depth
        axis, else `layers_0..`): the same numbers, compile time flat in depth.
      remat: `jax.checkpoint` policy per block: "none", "full", "dots",
        "dots_no_batch" or "save_everything".
      attention: attention implementation: "xla", "cudnn" (GPU), "splash" (TPU) or
        None (the platform's best).
      dtype: compute dtype (params stay float32; the log-mel is float32); in a
        model config, `model.dtype` unless this section sets it.
      spec_augment: keyword arguments of `mmjax.models.audio.spec_augment`
        (time_masks, time_width, freq_masks, freq_width, fill), applied to
        waveform inputs in training only (calls with an "augment" rng); None = off.
      patch_dropout: fraction of the spectrogram patches dropped in training (FLIP), in
        [0, 1): each clip keeps its own random max(1, round(N (1 - patch_dropout)))
        patches after the position embeddings, the class and distillation tokens
        always (`layers.drop_patches`); calls with an "augment" rng only. 0 = off.
    """
    sample_rate: int = 16000
    clip_seconds: float = 10.0
    n_fft: int = 512
    hop_length: int = 160
    win_length: Optional[int] = 400
    n_mels: int = 128
    f_min: float = 0.0
    f_max: Optional[float] = None
    mel_scale: str = "htk"
    mel_norm: Optional[str] = None
    center: bool = True
    pad_mode: str = "reflect"
    log: str = "ln"
    top_db: Optional[float] = 80.0
    spec_norm: str = "fixed"
    spec_mean: Optional[float] = AST_MEAN
    spec_std: Optional[float] = AST_STD
    max_length: Optional[int] = None
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None
    act: str = "gelu"
    norm_eps: float = 1e-12
    pool: str = "cls_dist"
    embed_dim: Optional[int] = None
    proj_bias: bool = False
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32
    spec_augment: Optional[dict] = None
    patch_dropout: float = 0.0

    # Tower protocol (mmjax.models.towers): the media it reads and its costs.
    modality = "audio"

    @staticmethod
    def example_input(cfg: dict, data: Any) -> tuple[tuple[int, ...], Any]:
        """One example as the pipeline emits it: `([num_samples], float32)` from
        `data.train.sample_rate` x `clip_seconds` (the tower's: `data_keys`)."""
        return (int(round(float(data.sample_rate) * float(data.clip_seconds))),), np.float32

    @staticmethod
    def data_keys(cfg: dict) -> dict:
        """The `data.train` keys this tower's input fixes: `sample_rate`, `clip_seconds`."""
        m = AST(**cfg)
        return {"sample_rate": int(m.sample_rate), "clip_seconds": float(m.clip_seconds)}

    @staticmethod
    def forward_flops(cfg: dict) -> float:
        """Forward FLOPs per clip in a training step: mel filterbank, patch embedding,
        Transformer over the patches `patch_dropout` keeps, projection
        (`mmjax.models.flops` rules; the FFT is not counted)."""
        m = AST(**{k: v for k, v in cfg.items() if k != "dtype"})
        gf, gt = m.grid
        n, w, p = gf * gt, m.width, m.patch_size
        f = 2 * m.frames * (m.n_fft // 2 + 1) * m.n_mels + 2 * n * p * p * w
        f += m.depth * layer_flops(kept_patches(n, m.patch_dropout) + 2, w, m.mlp_dim or 4 * w, gated=m.act == "swiglu")
        return f + (2 * w * m.embed_dim if m.embed_dim else 0)

    @staticmethod
    def num_tokens(cfg: dict) -> int:
        """N of the `tokens [B, N, D]` output in a training step: the class and
        distillation tokens and the patches of the frequency x time grid (those
        `patch_dropout` keeps; evaluation returns every one)."""
        m = AST(**cfg)
        gf, gt = m.grid
        return 2 + kept_patches(gf * gt, m.patch_dropout)

    @staticmethod
    def prefix_tokens(cfg: dict) -> int:
        """How many of the `tokens` come before the patches: the class and distillation
        tokens."""
        return 2

    @staticmethod
    def token_width(cfg: dict) -> int:
        """D of the `tokens [B, N, D]` output: `width`."""
        return int(AST(**cfg).width)

    @staticmethod
    def tiny(cfg: dict) -> dict:
        """Field updates of the `:tiny` shrink (1 s at 16 kHz, 32 mel bins, 12 patches)."""
        out = dict(sample_rate=16000, clip_seconds=1.0, n_mels=32, patch_size=16,
                   frequency_stride=16, time_stride=16, width=64, depth=2, heads=4, mlp_dim=128)
        return dict(out, embed_dim=32) if cfg.get("embed_dim") else out

    @property
    def num_samples(self) -> int:
        """Waveform length the tower takes: `round(sample_rate * clip_seconds)`."""
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def frames(self) -> int:
        """Spectrogram frames the Transformer takes (`max_length` or a clip's frames)."""
        if self.max_length is not None:
            return int(self.max_length)
        return audio.num_frames(self.num_samples, self.n_fft, self.hop_length, self.center)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (frequency, time)."""
        p = self.patch_size
        if self.n_mels < p or self.frames < p:
            raise ConfigError(f"AST needs at least patch_size={p} mel bins and frames, got "
                              f"n_mels={self.n_mels}, frames={self.frames} (config keys "
                              "`n_mels`, `clip_seconds` / `max_length`, `patch_size`).")
        return ((self.n_mels - p) // self.frequency_stride + 1,
                (self.frames - p) // self.time_stride + 1)

    def spectrogram(self, waveform):
        """Normalized log-mel of `waveform [B, num_samples]` -> `[B, frames, n_mels]`
        float32 (no parameters: `model.apply({}, wave, method="spectrogram")`)."""
        if waveform.ndim != 2 or waveform.shape[1] != self.num_samples:
            raise ConfigError(f"AST expects waveforms [B, {self.num_samples}] "
                              f"(config keys `sample_rate` x `clip_seconds`), got "
                              f"{tuple(waveform.shape)}.")
        spec = audio.log_mel(waveform, sample_rate=self.sample_rate, n_fft=self.n_fft,
                             hop_length=self.hop_length, win_length=self.win_length,
                             n_mels=self.n_mels, f_min=self.f_min, f_max=self.f_max,
                             mel_scale=self.mel_scale, mel_norm=self.mel_norm,
                             center=self.center, pad_mode=self.pad_mode, log=self.log,
                             top_db=self.top_db)
        t = spec.shape[1]
        if t < self.frames:
            spec = jnp.pad(spec, ((0, 0), (0, self.frames - t), (0, 0)))
        spec = spec[:, :self.frames]
        if self.spec_norm == "example":
            mean = jnp.mean(spec, axis=(1, 2), keepdims=True)
            std = jnp.sqrt(jnp.var(spec, axis=(1, 2), keepdims=True) + 1e-6)
            return (spec - mean) / (2.0 * std)
        if self.spec_norm != "fixed":
            raise ConfigError(f"Unknown spec_norm {self.spec_norm!r} (config key `spec_norm`); "
                              "choose 'fixed' or 'example'.")
        if self.spec_mean is None or self.spec_std is None:
            raise ConfigError("spec_mean / spec_std are None: a training run measures them on "
                              "its data when it starts; set both numbers to use the tower "
                              "elsewhere (config keys `spec_mean`, `spec_std`).")
        return (spec - self.spec_mean) / (2.0 * self.spec_std)

    @nn.compact
    def __call__(self, x):
        if self.pool not in POOLS:
            raise ConfigError(f"Unknown pool {self.pool!r} (config key `pool`); choose one of "
                              f"{POOLS}.")
        if x.ndim == 2:
            x = self.spectrogram(x)
            if self.spec_augment and self.has_rng("augment"):  # training only
                x = audio.spec_augment(x, self.make_rng("augment"), **dict(self.spec_augment))
        elif x.ndim != 3 or x.shape[1:] != (self.frames, self.n_mels):
            raise ConfigError(f"AST takes waveforms [B, {self.num_samples}] or spectrograms "
                              f"[B, {self.frames}, {self.n_mels}] (config keys `clip_seconds`, "
                              f"`max_length`, `n_mels`), got {tuple(x.shape)}.")
        b, p = x.shape[0], self.patch_size
        gf, gt = self.grid
        # [B, T, F] -> [B, F, T] -> patches [B, gf, gt, p (freq), p (time)]: the
        # math of AST's Conv2d(kernel p, stride (frequency_stride, time_stride)).
        x = jnp.swapaxes(x.astype(self.dtype), 1, 2)
        x = _windows(x, 1, p, self.frequency_stride, gf)          # [B, gf, p, T]
        x = _windows(x, 3, p, self.time_stride, gt)               # [B, gf, p, gt, p]
        patches = x.transpose(0, 1, 3, 2, 4).reshape(b, gf * gt, p * p)
        kernel = self.param("patch_kernel", logical(default_kernel_init, (None, None, "embed")),
                            (p, p, self.width))
        bias = self.param("patch_bias", logical(nn.initializers.zeros, ("embed",)), (self.width,))
        x = matmul_2d(patches, kernel.reshape(p * p, self.width), 1, bias, self.dtype)

        special = [broadcast_param(self.param(name, logical(normal_init(0.02), ("embed",)),
                                              (self.width,)), (b, 1, self.width), self.dtype)
                   for name in ("cls", "dist")]
        x = jnp.concatenate(special + [x], axis=1)
        x = PositionEmbedding("learned", name="posemb")(x)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        x = drop_patches(self, x, self.patch_dropout, prefix=2)  # training only

        encoder = stacked(Block, self.depth, scan=self.scan, remat=self.remat, name="layers",
                          num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                          act=self.act, norm_eps=self.norm_eps,
                          implementation=self.attention, dtype=self.dtype)
        x = encoder(x, (None, None, None))
        x = boundary(Norm(eps=self.norm_eps, dtype=self.dtype, name="ln_post")(x))

        if self.pool == "none":
            return None, x
        if self.pool == "cls_dist":
            pooled = (x[:, 0] + x[:, 1]) / 2
        elif self.pool == "cls":
            pooled = x[:, 0]
        else:
            pooled = x[:, 2:].mean(axis=1)
        pooled = boundary(pooled)
        if self.embed_dim is not None:
            pooled = boundary(Dense(self.embed_dim, ("embed", "proj"), use_bias=self.proj_bias,
                                    dtype=self.dtype, name="proj")(pooled))
        return pooled, x
