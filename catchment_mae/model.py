"""The scale-aware MAE: a timm ViT wrapped by lightly, a scale MLP, lightly's decoder.

Encoder: ``timm.create_model(vit_model_name, pretrained=False, ...)`` wrapped by
lightly's ``MaskedVisionTransformerTIMM``. ``scale_embed`` maps the scale vector of
the original raster (``log(H + eps), log(W + eps)``, and with ``scale_stats`` its
valid share and each band's level and spread; :mod:`catchment_mae.preprocess`),
standardised by the training data's centre and spread, to the embedding width;
it is added to every patch token after the positional embedding, so the encoder
knows the raster's scale. With ``valid_channel`` the patch embedding also sees
where the raster has data (``2 * valid - 1``), so a catchment's outline is part
of what it encodes; the decoder predicts the image channels only.

Decoder: the MAE decoder built from lightly's ``MaskedVisionTransformerDecoderTIMM``
with ``decoder_embed`` and the prediction head kept outside, as lightly's
``examples/pytorch/mae.py`` does. ``MAEDecoderTIMM`` (the name the product
specifies) warns that it goes away in lightly 1.7.0; this is its replacement
and builds the same network, so no deprecation warning reaches users.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightly.models import utils
from lightly.models.modules import (
    MaskedVisionTransformerDecoderTIMM,
    MaskedVisionTransformerTIMM,
)
from torch import Tensor, nn

from catchment_mae.config import POOLS, TrainConfig, model_files
from catchment_mae.errors import ConfigError, ModelLoadError

# The timm modules whose models are VisionTransformers: the one rule for what
# cmae can wrap (the CLI's, a config's and the web form's vit_model_name).
VIT_MODULES = ("vision_transformer", "deit")


def vit_problem(name: str) -> str | None:
    """Why ``name`` cannot be cmae's ViT (a message), or None when it can."""
    import timm

    if not timm.is_model(name):
        return f"unknown timm model {name!r} (see timm.list_models('vit_*'))"
    if name not in timm.list_models(module=VIT_MODULES):
        return (
            f"{name}: cmae needs a timm VisionTransformer (e.g. vit_small_patch16_224)"
        )
    return None


def build_vit(cfg: TrainConfig, in_chans: int) -> nn.Module:
    """Creates the timm ViT named by ``cfg.vit_model_name`` (never downloads)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    size = cfg.preprocess.image_size
    kwargs: dict[str, Any] = dict(
        pretrained=False, img_size=size, in_chans=in_chans, num_classes=0
    )
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    problem = vit_problem(cfg.vit_model_name)
    if problem is not None:
        raise ConfigError(f"vit_model_name: {problem}", key="vit_model_name")
    try:
        vit = timm.create_model(cfg.vit_model_name, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(
            f"vit_model_name: cannot build {cfg.vit_model_name} ({e}); cmae needs a "
            "timm VisionTransformer"
        ) from e
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(
            f"vit_model_name: {cfg.vit_model_name} is a {type(vit).__name__}; cmae "
            "needs a timm VisionTransformer"
        )
    if vit.cls_token is None or vit.num_prefix_tokens != 1:
        raise ConfigError(
            f"vit_model_name: {cfg.vit_model_name} must have exactly one class token "
            f"and no register tokens (has {vit.num_prefix_tokens} prefix tokens)"
        )
    if getattr(vit, "dynamic_img_size", False):
        raise ConfigError(f"vit_model_name: {cfg.vit_model_name} uses dynamic_img_size")
    patch = int(vit.patch_embed.patch_size[0])
    if size % patch:
        raise ConfigError(
            f"image_size {size} is not a multiple of the patch size "
            f"{patch} of {cfg.vit_model_name}",
            key="image_size",
        )
    return vit


def patch_size_of(cfg: TrainConfig) -> int:
    """The patch size the config's ViT will have (the auto model's, a named
    model's own, or the config's override), without building its weights."""
    from catchment_mae.config import AUTO
    from catchment_mae.defaults import SMALL_VIT

    if cfg.patch_size is not None:
        return cfg.patch_size
    if cfg.vit_model_name == AUTO:
        return int(SMALL_VIT["patch_size"])
    import timm

    problem = vit_problem(cfg.vit_model_name)
    if problem is not None:
        raise ConfigError(f"vit_model_name: {problem}", key="vit_model_name")
    with torch.device("meta"):  # shapes only: no memory, no time
        vit = timm.create_model(cfg.vit_model_name, pretrained=False, num_classes=0)
    return int(vit.patch_embed.patch_size[0])


class ScaleEmbed(nn.Module):
    """MLP from the scale vector, standardised, to the embedding width.

    Args:
        embed_dim: width of the patch tokens.
        hidden_dim: width of the hidden layer.
        scale_dim: length of the scale vector.
        shift, spread: its centre and spread (the training data's); None: 0 and
            1. They come from the config, not the weights (buffers that are not
            saved), so weights of models without them load as they are.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int = 64,
        scale_dim: int = 2,
        shift: list[float] | None = None,
        spread: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(scale_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, embed_dim),
        )
        zeros, ones = [0.0] * scale_dim, [1.0] * scale_dim
        self.register_buffer("shift", torch.tensor(shift or zeros), persistent=False)
        self.register_buffer("spread", torch.tensor(spread or ones), persistent=False)

    def standardise(self, scale: Tensor) -> Tensor:
        """(batch_size, scale_dim): the scale vector centred and spread to ~1."""
        return (scale - self.shift) / self.spread

    def forward(self, scale: Tensor) -> Tensor:
        """(batch_size, scale_dim) -> (batch_size, embed_dim)."""
        out: Tensor = self.mlp(self.standardise(scale))
        return out


def patch_index(idx: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Token indices -> patch indices.

    lightly's token indices count the class token at 0; patchified targets have no
    class token, so token ``i`` is patch ``i - 1`` (lightly's MAE example).
    """
    return idx - num_prefix_tokens


class ScaleAwareEncoder(nn.Module):
    """The timm ViT (wrapped by lightly) plus ``scale_embed``: the part that embeds.

    Args:
        vit: a timm VisionTransformer (one class token, fixed image size); with
            ``valid_channel`` its input has one channel more than the images.
        scale_hidden_dim: hidden width of ``scale_embed``.
        scale_dim, scale_mean, scale_std: the scale vector (see ScaleEmbed).
        valid_channel: the validity joins the images as one more channel.
        drop_empty: patches without a valid pixel take no part in attention
            (:meth:`attention_mask`).
    """

    def __init__(
        self,
        vit: nn.Module,
        scale_hidden_dim: int = 64,
        scale_dim: int = 2,
        scale_mean: list[float] | None = None,
        scale_std: list[float] | None = None,
        valid_channel: bool = False,
        drop_empty: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        # MAE drops masked tokens before the encoder, so the encoder's own mask
        # token is never used; freezing it keeps "every trainable parameter gets a
        # gradient" true (the decoder has its own mask token).
        self.backbone.mask_token.requires_grad_(False)
        self.scale_embed = ScaleEmbed(
            self.embed_dim, scale_hidden_dim, scale_dim, scale_mean, scale_std
        )
        self.valid_channel = valid_channel
        self.drop_empty = drop_empty

    @property
    def vit(self) -> nn.Module:
        return self.backbone.vit

    def forward(
        self,
        images: Tensor,
        scale: Tensor,
        idx_keep: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Encodes images with their scale.

        Args:
            images: (batch_size, channels, image_size, image_size).
            scale: (batch_size, scale_dim), the scale vector.
            idx_keep: (batch_size, num_keep) token indices to encode (0 = class);
                None encodes every token.
            valid: (batch_size, 1, image_size, image_size) valid share per pixel;
                needed with ``valid_channel``.

        Returns:
            (batch_size, num_tokens, embed_dim) after the final norm.
        """
        backbone, vit = self.backbone, self.backbone.vit
        if (self.valid_channel or self.drop_empty) and valid is None:
            raise ValueError("this encoder sees the validity: pass valid")
        if self.valid_channel:
            images = torch.cat([images, 2.0 * valid.to(images.dtype) - 1.0], dim=1)
        tokens = backbone.images_to_tokens(images)  # [B, L, D]
        tokens = self.add_scale_embed(tokens, scale)
        tokens = backbone.prepend_prefix_tokens(tokens)  # [B, 1 + L, D]
        tokens = backbone.add_pos_embed(tokens)
        if idx_keep is not None:
            tokens = utils.get_at_index(tokens, idx_keep)  # [B, K, D]
        tokens = vit.norm_pre(tokens)
        mask = self.attention_mask(valid, idx_keep) if self.drop_empty else None
        for block in vit.blocks:
            tokens = block(tokens, attn_mask=mask)
        out: Tensor = vit.norm(tokens)
        return out

    def empty_patches(self, valid: Tensor) -> Tensor:
        """(batch_size, num_patches) bool: the patches without a valid pixel."""
        share = nn.functional.avg_pool2d(valid.float(), self.patch_size).flatten(1)
        return share <= 0

    def attention_mask(self, valid: Tensor, idx_keep: Tensor | None) -> Tensor:
        """A boolean attention mask, (batch_size, 1, 1, num_tokens), True where
        a token may be attended to (SDPA's meaning): no token attends to a patch
        without data, so the nodata around a catchment's outline (however much
        there is) changes none of its tokens."""
        empty = self.empty_patches(valid)
        keys = torch.cat([torch.zeros_like(empty[:, :1]), empty], dim=1)  # class: 0
        if idx_keep is not None:
            keys = torch.gather(keys, 1, idx_keep)
        return ~keys[:, None, None, :]

    def add_scale_embed(self, tokens: Tensor, scale: Tensor) -> Tensor:
        """Adds ``scale_embed(scale)`` to every patch token.

        Called before the class token is prepended, so the class token stays as it
        is; adding before or after the positional embedding is the same sum.

        Args:
            tokens: (batch_size, num_patches, embed_dim) patch tokens.
            scale: (batch_size, scale_dim).
        """
        return tokens + self.scale_embed(scale.to(tokens.dtype))[:, None, :]


class ScaleAwareMAE(nn.Module):
    """Masked autoencoder whose encoder sees the raster's original scale.

    Args:
        vit: a timm VisionTransformer (one class token, fixed image size).
        in_chans: image channels; the prediction head predicts all of them.
        decoder_dim, decoder_depth, decoder_num_heads: the MAE decoder.
        mask_ratio: fraction of patch tokens hidden from the encoder.
        norm_pix_loss: normalise each target patch by its valid mean and std.
        scale_hidden_dim: hidden width of ``scale_embed``.
        scale_dim, scale_mean, scale_std, valid_channel, drop_empty: see
            ScaleAwareEncoder; with drop_empty, masking keeps patches with data
            before any without (:meth:`random_masking`).
    """

    def __init__(
        self,
        vit: nn.Module,
        in_chans: int,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_num_heads: int = 8,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        scale_hidden_dim: int = 64,
        scale_dim: int = 2,
        scale_mean: list[float] | None = None,
        scale_std: list[float] | None = None,
        valid_channel: bool = False,
        drop_empty: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if decoder_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_dim {decoder_dim} must be a multiple of decoder_num_heads "
                f"{decoder_num_heads}"
            )
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.encoder = ScaleAwareEncoder(
            vit, scale_hidden_dim, scale_dim, scale_mean, scale_std, valid_channel,
            drop_empty,
        )  # fmt: skip
        self.patch_size = self.encoder.patch_size
        self.embed_dim = self.encoder.embed_dim
        self.sequence_length = self.encoder.backbone.sequence_length
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            embed_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
        )
        # Predicts every channel of a patch: never a hard-coded 3.
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size**2 * in_chans)

    @property
    def vit(self) -> nn.Module:
        return self.encoder.vit

    def forward_encoder(
        self,
        images: Tensor,
        scale: Tensor,
        idx_keep: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """(batch_size, num_kept_tokens, embed_dim); see ScaleAwareEncoder."""
        out: Tensor = self.encoder(images, scale, idx_keep, valid)
        return out

    def embed(
        self, images: Tensor, scale: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """The class token after the final norm, (batch_size, embed_dim): the
        original tool's embedding."""
        return self.forward_encoder(images, scale, None, valid)[:, 0]

    # ------------------------------------------------------------------ decoder
    def forward_decoder(
        self, x_encoded: Tensor, idx_keep: Tensor, idx_mask: Tensor
    ) -> Tensor:
        """Predicts the pixels of the masked patches.

        Returns:
            (batch_size, num_masked, patch_size**2 * in_chans).
        """
        batch_size = x_encoded.shape[0]
        x_decode = self.decoder_embed(x_encoded)
        x_masked = utils.repeat_token(
            self.decoder.mask_token, (batch_size, self.sequence_length)
        )
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder(x_masked)  # adds the sin-cos pos embed, decodes
        x_pred = utils.get_at_index(x_decoded, idx_mask)
        out: Tensor = self.prediction_head(x_pred)
        return out

    # --------------------------------------------------------------------- loss
    def forward_loss(
        self, images: Tensor, valid: Tensor, pred: Tensor, idx_mask: Tensor
    ) -> Tensor:
        """MSE on the masked patches, weighted by each pixel's valid fraction.

        Nodata pixels count for nothing; a patch that is all nodata adds nothing.

        Args:
            images: (batch_size, in_chans, S, S) normalised input.
            valid: (batch_size, 1, S, S) valid fraction per pixel in [0, 1].
            pred: (batch_size, num_masked, patch_size**2 * in_chans).
            idx_mask: (batch_size, num_masked) masked token indices.
        """
        p = self.patch_size
        patches = utils.patchify(images, p)  # [B, L, p*p*C], channel last
        weights = utils.patchify(valid, p)  # [B, L, p*p]
        idx = patch_index(idx_mask, self.vit.num_prefix_tokens)
        target = utils.get_at_index(patches, idx)  # [B, M, p*p*C]
        w = utils.get_at_index(weights, idx)[..., None]  # [B, M, p*p, 1]
        b, m, _ = target.shape
        c = self.in_chans
        target = target.float().view(b, m, p * p, c)  # channel last (patchify)
        if self.norm_pix_loss:
            n = w.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6) * c
            mean = (w * target).sum(dim=(2, 3), keepdim=True) / n
            var = (w * (target - mean) ** 2).sum(dim=(2, 3), keepdim=True) / n
            target = (target - mean) / (var + 1e-6).sqrt()
        err = (pred.float().view(b, m, p * p, c) - target) ** 2
        return (err * w).sum() / (w.sum() * c).clamp_min(1e-6)

    def random_masking(
        self, batch_size: int, device: torch.device, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(idx_keep, idx_mask); the class token is always kept (lightly's
        ``random_token_mask``). With ``drop_empty`` and ``valid``, patches with
        data are kept before any without: the encoder's quarter of a narrow
        catchment's patches is not spent on the nodata around it (in the
        preview of an elongated one, most kept patches were empty)."""
        if not (self.encoder.drop_empty and valid is not None):
            return utils.random_token_mask(
                size=(batch_size, self.sequence_length),
                mask_ratio=self.mask_ratio,
                device=device,
            )
        noise = torch.rand(batch_size, self.sequence_length, device=device)
        noise[:, 0] = -1.0  # the class token
        noise[:, 1:] += self.encoder.empty_patches(valid).to(noise.dtype)
        num_keep = max(1, int((self.sequence_length - 1) * (1 - self.mask_ratio)) + 1)
        indices = torch.argsort(noise, dim=1)
        return indices[:, :num_keep], indices[:, num_keep:]

    def forward(
        self, images: Tensor, valid: Tensor, scale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One MAE step: returns (loss, pred, idx_mask)."""
        idx_keep, idx_mask = self.random_masking(images.shape[0], images.device, valid)
        x_encoded = self.forward_encoder(images, scale, idx_keep, valid)
        pred = self.forward_decoder(x_encoded, idx_keep, idx_mask)
        loss = self.forward_loss(images, valid, pred, idx_mask)
        return loss, pred, idx_mask


def build_model(cfg: TrainConfig, in_chans: int | None = None) -> ScaleAwareMAE:
    """The one place a model is built from a config."""
    spec = cfg.preprocess
    chans = in_chans if in_chans is not None else spec.in_chans
    if chans is None:
        raise ConfigError("in_chans is not set (and was not taken from the data)")
    if spec.image_size is None:
        raise ConfigError("image_size is not set (it is chosen when a run starts)")
    channels = chans + int(bool(spec.slope_channel))  # None: not chosen, none
    vit = build_vit(cfg, channels + int(cfg.valid_channel))
    return ScaleAwareMAE(
        vit,
        in_chans=channels,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        scale_hidden_dim=cfg.scale_hidden_dim,
        scale_dim=cfg.merged({"in_chans": chans}).scale_dim,
        scale_mean=cfg.scale_mean,
        scale_std=cfg.scale_std,
        valid_channel=cfg.valid_channel,
        drop_empty=cfg.drop_empty_patches,
    )


def training_memory(cfg: TrainConfig, in_chans: int = 1) -> tuple[int, int, int]:
    """At least what training ``cfg`` holds in memory, in bytes; its parameters;
    its tokens a sample. ``cfg``'s model shape must be chosen
    (:func:`catchment_mae.defaults.shape_updates`).

    Weights, gradients and AdamW's two moments: 16 bytes a parameter, counted on
    the meta device (no memory, no time). Activations kept for the backward
    pass: per block ``s b h (34 + 5 a s / h)`` bytes in 16 bits (Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer Models"),
    twice that in fp32, for the encoder's visible tokens and the decoder's
    whole sequence."""
    with torch.device("meta"):
        model = build_model(cfg, in_chans)
    params = sum(p.numel() for p in model.parameters())
    vit = model.encoder.backbone.vit
    tokens = model.sequence_length
    visible = round((tokens - 1) * (1 - cfg.mask_ratio)) + 1
    bytes_per_value = 2 if cfg.precision != "fp32" else 4

    def activations(s: int, h: int, a: int, layers: int) -> float:
        per_block = s * cfg.batch_size * h * (34 + 5 * a * s / h) / 2
        return layers * per_block * bytes_per_value

    heads, dec = vit.blocks[0].attn.num_heads, cfg.decoder_num_heads
    encoder = activations(visible, vit.embed_dim, heads, len(vit.blocks))
    decoder = activations(tokens, cfg.decoder_dim, dec, cfg.decoder_depth)
    return int(16 * params + encoder + decoder), params, tokens - 1


class Embedder(nn.Module):
    """The encoder alone, ``image, scale -> embedding``: what ``cmae export`` traces.

    No masking and no decoder. ``pool="cls"``: the class token after the final
    norm, as the original tool returned. ``pool="mean"``: the patch tokens averaged
    with weights equal to each patch's valid fraction. Both read ``valid``
    (batch_size, 1, S, S), 1 = valid pixel, where they need it (mean, or an
    encoder that sees the validity). With ``with_scale``, the standardised scale
    vector follows the pooled tokens: the facts the encoder was given (extent,
    valid share, levels and spreads) stay in the embedding as they were, next to
    what it learned from the pixels (in an exploratory run on the real-terrain
    benchmark, a probe read mean elevation from the class token alone with R²
    0.997 untrained and 0.89 trained: the MAE's loss on per-raster shapes gives
    the tokens no reason to keep it).

    Args:
        encoder: the trained ScaleAwareEncoder.
        pool: "cls" or "mean".
        with_scale: append the standardised scale vector.
    """

    def __init__(
        self, encoder: ScaleAwareEncoder, pool: str = "cls", with_scale: bool = False
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.encoder = encoder
        self.pool = pool
        self.with_scale = with_scale

    @property
    def needs_valid(self) -> bool:
        """Whether ``valid`` is an input."""
        enc = self.encoder
        return self.pool == "mean" or enc.valid_channel or enc.drop_empty

    def forward(
        self, image: Tensor, scale: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """(batch_size, embed_dim [+ scale_dim]) float32."""
        if self.needs_valid and valid is None:
            raise ValueError("this encoder needs the valid input")
        tokens = self.encoder(image, scale, None, valid)  # [B, 1 + L, D]
        if self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            p = self.encoder.patch_size
            weights = nn.functional.avg_pool2d(valid, p).flatten(1)  # [B, L]
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
            pooled = (tokens[:, 1:] * weights[:, :, None]).sum(dim=1)
        if not self.with_scale:
            return pooled
        facts = self.encoder.scale_embed.standardise(scale.to(pooled.dtype))
        return torch.cat([pooled, facts], dim=1)


def embedder(
    model: ScaleAwareMAE, cfg: TrainConfig, pool: str | None = None
) -> Embedder:
    """The embedding a trained model gives: ``pool`` (default: the config's),
    followed by the scale vector where the model was given its facts."""
    with_scale = cfg.preprocess.scale_stats
    return Embedder(model.encoder, pool or cfg.pool, with_scale=with_scale).eval()


def load_model(
    weights_path: str | os.PathLike[str],
    config_path: str | os.PathLike[str] | None = None,
) -> tuple[ScaleAwareMAE, TrainConfig]:
    """Loads ``NAME.pth`` with the ``NAME.json`` beside it (the original tool's
    pair; ``config_path`` where the server opened it itself).

    Raises:
        ModelLoadError: a missing or unreadable file, a config that does not
            match, or weights that do not fit the config.
    """
    path, cfg_path = model_files(weights_path, config_path)
    from catchment_mae.checkpoint import read_torch_file

    state = read_torch_file(path, ModelLoadError)
    cfg = TrainConfig.from_json(cfg_path)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise ModelLoadError(f"{path}: not a cmae weights file (no 'model' state dict)")
    if cfg.preprocess.in_chans is None:
        raise ModelLoadError(f"{cfg_path}: in_chans is not set")
    model = build_model(cfg)
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(weights, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as e:  # size mismatches
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ModelLoadError(
            f"{path}: weights do not fit {cfg_path.name}: {first[0].strip()}"
        ) from e
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not fit {cfg_path.name}: "
            f"{len(missing)} missing key(s) (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    return model.eval(), cfg
