"""The scale-aware MAE: shapes, channels, gradients, nodata in the loss, scale input."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightly.models import utils

from catchment_mae.config import TrainConfig
from catchment_mae.errors import ConfigError
from catchment_mae.model import build_model, patch_index
from tests.conftest import TINY


def _model(in_chans: int = 1, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TrainConfig.from_dict({**TINY, **kw}), in_chans=in_chans)


def _batch(b: int = 3, c: int = 1, s: int = 32, k: int | None = None):
    """Images, validity and scale vectors (the extents, then made-up facts of
    the raster for a model whose scale vector has ``k`` values)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, c, s, s, generator=g)
    valid = torch.ones(b, 1, s, s)
    scale = torch.log(torch.tensor([[50.0, 80.0], [400.0, 400.0], [3000.0, 900.0]]))[:b]
    k = 3 + 3 * c if k is None else k
    if k > 2:
        scale = torch.cat([scale, torch.randn(b, k - 2, generator=g)], dim=1)
    return images, valid, scale


def test_patchify__matches_explicit_slicing():
    images = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).reshape(2, 2, 8, 8)
    patches = utils.patchify(images, 4)  # (N, L, p*p*C), channel last
    assert patches.shape == (2, 4, 32)
    for n in range(2):
        for i, (y, x) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            block = images[n, :, y : y + 4, x : x + 4]  # (C, p, p)
            expected = block.permute(1, 2, 0).reshape(-1)
            assert torch.equal(patches[n, i], expected)


def test_patch_index__drops_the_class_token_offset():
    assert patch_index(torch.tensor([[1, 5, 16]])).tolist() == [[0, 4, 15]]


@pytest.mark.parametrize("in_chans", [1, 3, 5])
def test_model__any_channel_count(in_chans):
    model = _model(in_chans)
    images, valid, scale = _batch(c=in_chans)
    loss, pred, idx_mask = model(images, valid, scale)
    assert pred.shape == (3, idx_mask.shape[1], 8 * 8 * in_chans)
    assert idx_mask.shape[1] == 12  # 75 % of 16 patches
    assert torch.isfinite(loss) and loss > 0
    assert model.embed(images, scale, valid).shape == (3, 32)
    # The patch embedding sees the bands and the validity; the head predicts bands.
    assert model.vit.patch_embed.proj.in_channels == in_chans + 1
    assert model.encoder.scale_embed.mlp[0].in_features == 3 + 3 * in_chans


def test_model__every_parameter_gets_a_gradient():
    model = _model(2)
    images, valid, scale = _batch(c=2)
    loss, _, _ = model(images, valid, scale)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"No gradient for {name}"
            assert torch.isfinite(p.grad).all(), f"Non-finite gradient for {name}"
    assert any(
        n.startswith("encoder.scale_embed")
        for n, p in model.named_parameters()
        if p.grad is not None
    )


def test_model__scale_and_validity_change_the_embedding():
    model = _model().eval()
    images, valid, scale = _batch()
    with torch.no_grad():
        a = model.embed(images, scale, valid)
        b = model.embed(images, scale + 1.0, valid)
        c = model.embed(images, scale.clone(), valid)
        outline = valid.clone()
        outline[:, :, :8] = 0.0
        d = model.embed(images, scale, outline)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-3
    assert (a - d).abs().max() > 1e-3  # the encoder sees where data lies
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="pass valid"):
        model.embed(images, scale)


def test_model__patches_without_data_change_nothing_and_are_masked_last():
    """Whatever lies under a patch without data (here: values, as a file's
    nodata could hold), no other token sees it; masking keeps patches with
    data before any without."""
    model = _model().eval()
    images, valid, scale = _batch()
    valid[:, :, :, 24:] = 0.0  # the right column of patches has no data
    other = images.clone()
    other[:, :, :, 24:] = 50.0
    with torch.no_grad():
        a = model.forward_encoder(images, scale, None, valid)
        b = model.forward_encoder(other, scale, None, valid)
    data = [i for i in range(1, 17) if (i - 1) % 4 != 3]  # tokens of patches with data
    torch.testing.assert_close(a[:, [0, *data]], b[:, [0, *data]])
    plain = _model(drop_empty_patches=False).eval()
    with torch.no_grad():
        c = plain.forward_encoder(images, scale, None, valid)
        d = plain.forward_encoder(other, scale, None, valid)
    assert (c[:, 0] - d[:, 0]).abs().max() > 1e-3  # without it, the class token sees
    torch.manual_seed(0)
    idx_keep, idx_mask = model.random_masking(3, images.device, valid)
    assert idx_keep.shape == (3, 5) and idx_mask.shape == (3, 12)  # 1 + 25 % of 16
    assert (idx_keep[:, 0] == 0).all()
    empty = {4, 8, 12, 16}  # token numbers of the right column
    assert not empty & set(idx_keep[:, 1:].flatten().tolist())


def test_model__scale_vector_is_standardised_by_the_config():
    k = 6
    model = _model(scale_mean=[1.0] * k, scale_std=[2.0] * k).eval()
    plain = _model().eval()  # the same weights (seed), centre 0 and spread 1
    images, valid, scale = _batch(k=k)
    with torch.no_grad():
        a = model.embed(images, scale, valid)
        b = plain.embed(images, (scale - 1.0) / 2.0, valid)
    torch.testing.assert_close(a, b)
    # The centre and spread come from the config, not the weights.
    assert not any("shift" in key or "spread" in key for key in model.state_dict())


def test_embedder__pools_and_the_scale_vector_it_was_given():
    from catchment_mae.model import Embedder

    k = 6
    model = _model(scale_mean=[0.5] * k, scale_std=[4.0] * k).eval()
    images, valid, scale = _batch(k=k)
    valid[0, :, :16] = 0.0  # the top half of the first raster is nodata
    with torch.no_grad():
        cls = Embedder(model.encoder, "cls")(images, scale, valid)
        mean = Embedder(model.encoder, "mean", with_scale=True)(images, scale, valid)
        tokens = model.forward_encoder(images, scale, None, valid)
    torch.testing.assert_close(cls, tokens[:, 0])
    assert mean.shape == (3, 32 + k)
    torch.testing.assert_close(mean[:, 32:], (scale - 0.5) / 4.0)
    # Patches without data count for nothing in the mean.
    torch.testing.assert_close(mean[0, :32], tokens[0, 1 + 8 :].mean(dim=0))


def test_model__format_1_config_builds_the_model_it_trained():
    cfg = TrainConfig.from_dict({**TINY, "format_version": 1})
    spec = cfg.preprocess
    assert (spec.scale_stats, cfg.valid_channel, spec.trim, cfg.pool) == (
        False, False, False, "cls",
    )  # fmt: skip
    model = build_model(cfg, in_chans=1).eval()
    assert model.vit.patch_embed.proj.in_channels == 1
    images, valid, scale = _batch(k=2)
    with torch.no_grad():
        assert model.embed(images, scale).shape == (3, 32)


def test_model__nodata_pixels_count_for_nothing():
    model = _model().eval()
    images, valid, scale = _batch()
    valid[:, :, :, :16] = 0.0  # left half is nodata
    changed = images.clone()
    changed[:, :, :, :16] = 1e4  # whatever sits under nodata
    torch.manual_seed(3)
    idx_keep, idx_mask = model.random_masking(3, images.device)
    with torch.no_grad():
        pred = model.forward_decoder(
            model.forward_encoder(images, scale, idx_keep, valid), idx_keep, idx_mask
        )
        loss_a = model.forward_loss(images, valid, pred, idx_mask)
        loss_b = model.forward_loss(changed, valid, pred, idx_mask)
        all_invalid = model.forward_loss(
            images, torch.zeros_like(valid), pred, idx_mask
        )
    assert torch.isfinite(loss_a) and loss_a > 0
    assert loss_a == pytest.approx(loss_b.item(), rel=1e-6)
    assert all_invalid.item() == 0.0


def test_model__loss_is_weighted_mean_of_masked_patches():
    model = _model().eval()
    images, valid, scale = _batch(b=1)
    idx_mask = torch.tensor([[1, 2]])  # patches 0 and 1
    target = utils.get_at_index(utils.patchify(images, 8), idx_mask - 1)
    pred = target + 1.0  # error 1 everywhere
    valid[:, :, :8, :8] = 0.5  # patch 0 counts half
    loss = model.forward_loss(images, valid, pred, idx_mask)
    assert loss.item() == pytest.approx(1.0)
    pred2 = target.clone()
    pred2[:, 0] += 2.0  # error 4 on the half-weighted patch, 0 on the other
    loss2 = model.forward_loss(images, valid, pred2, idx_mask)
    assert loss2.item() == pytest.approx(4.0 * 0.5 / 1.5)


def test_model__norm_pix_loss_runs_and_differs():
    images, valid, scale = _batch()
    a = _model(norm_pix_loss=False)
    b = _model(norm_pix_loss=True)
    torch.manual_seed(0)
    la, _, _ = a(images * 10, valid, scale)
    torch.manual_seed(0)
    lb, _, _ = b(images * 10, valid, scale)
    assert torch.isfinite(lb) and not torch.isclose(la, lb)


def test_build_model__no_deprecation_warning_and_bad_names():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lightly's MAEDecoderTIMM would warn here
        _model()
    with pytest.raises(ConfigError, match="unknown timm model 'vit_nope'"):
        _model(vit_model_name="vit_nope")
    with pytest.raises(ConfigError, match="resnet18.*needs a timm VisionTransformer"):
        _model(vit_model_name="resnet18")
