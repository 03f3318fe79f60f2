"""pixel_shuffle in InternVL's v2 order (hand-built example + InternVL's own view/permute code)
and the Adapter (mlp1): shapes, reference math, 40B parameter count.
Run: python -m pytest -q tests/models/test_adapter.py"""

import pytest
import torch
import torch.nn.functional as F

from sage.config import SageConfig
from sage.models.adapter import Adapter, pixel_shuffle


def internvl_pixel_shuffle_v2(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVLChatModel.pixel_shuffle with ps_version='v2', copied step by step."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor**2)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_hand_built_2x2_blocks():
    # 4 x 4 grid, 1 channel, value = 10 * row + col; each output token concatenates its 2 x 2
    # block as [top-left, top-right, bottom-left, bottom-right], tokens in raster order.
    x = torch.tensor([[0., 1., 2., 3.],
                      [10., 11., 12., 13.],
                      [20., 21., 22., 23.],
                      [30., 31., 32., 33.]]).reshape(1, 4, 4, 1)
    expected = torch.tensor([[[0., 1., 10., 11.], [2., 3., 12., 13.]],
                             [[20., 21., 30., 31.], [22., 23., 32., 33.]]]).reshape(1, 2, 2, 4)
    assert torch.equal(pixel_shuffle(x, 0.5), expected)


def test_pixel_shuffle_two_channels_keeps_features_whole():
    # 2 x 2 grid, 2 channels: token (r, c) = [100r + 10c, 100r + 10c + 1]; one output token
    # = TL(0, 1), TR(10, 11), BL(100, 101), BR(110, 111). F.pixel_unshuffle would instead give
    # channel-major order (0, 10, 100, 110, 1, 11, 101, 111).
    x = torch.tensor([[[0., 1.], [10., 11.]], [[100., 101.], [110., 111.]]]).reshape(1, 2, 2, 2)
    expected = torch.tensor([0., 1., 10., 11., 100., 101., 110., 111.]).reshape(1, 1, 1, 8)
    assert torch.equal(pixel_shuffle(x, 0.5), expected)
    unshuffled = F.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (1, 1, 1, 8)
    assert not torch.equal(unshuffled, expected)


def test_pixel_shuffle_matches_internvl_code_and_40b_shapes(gen):
    x = torch.randn(2, 16, 16, 3200, generator=gen)  # one 448 tile of InternViT-6B, no CLS
    y = pixel_shuffle(x, 0.5)
    assert y.shape == (2, 8, 8, 12800)
    assert torch.equal(y, internvl_pixel_shuffle_v2(x, 0.5))
    x = torch.randn(3, 6, 6, 5, generator=gen)
    assert torch.equal(pixel_shuffle(x, 0.5), internvl_pixel_shuffle_v2(x, 0.5))


def test_pixel_shuffle_rejects_bad_grid():
    with pytest.raises(ValueError, match="pixel_shuffle"):
        pixel_shuffle(torch.zeros(1, 5, 5, 2), 0.5)


def test_adapter_matches_reference(gen):
    ad = Adapter(16, 8, norm_eps=1e-5)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 3, 16, generator=gen)
    n = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True)
                                                    + 1e-5) * ad.norm.weight + ad.norm.bias
    h = n @ ad.fc1.weight.T + ad.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
    ref = h @ ad.fc2.weight.T + ad.fc2.bias
    with torch.no_grad():
        out = ad(x)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_adapter_init_and_names():
    ad = Adapter(16, 8)
    torch.manual_seed(0)
    ad.init_weights()
    assert set(ad.state_dict()) == {"norm.weight", "norm.bias", "fc1.weight", "fc1.bias",
                                    "fc2.weight", "fc2.bias"}  # published mlp1.0 / .1 / .3
    assert torch.equal(ad.norm.weight, torch.ones(16)) and torch.equal(ad.fc2.bias, torch.zeros(8))
    assert 0.01 < float(ad.fc1.weight.detach().std()) < 0.03


def test_adapter_40b_parameter_count_on_meta():
    cfg = SageConfig.preset("internvl2-40b")
    with torch.device("meta"):
        ad = Adapter(cfg.adapter_in_dim, cfg.llm.dim, norm_eps=cfg.adapter_norm_eps)
    # LayerNorm 2*12800 + fc1 12800*7168 + 7168 + fc2 7168*7168 + 7168
    assert sum(p.numel() for p in ad.parameters()) == 25_600 + 91_757_568 + 51_387_392
    assert sum(p.numel() for p in ad.parameters()) == 143_170_560
    x = torch.empty(1, 256, 12800, device="meta")
    assert ad(x).shape == (1, 256, 7168)
