"""The decoupled-attention math (core/attention.py) against a hand-written softmax reference."""
from __future__ import annotations

import pytest
import torch

from ipadapter_nodes.core.attention import (
    EMBEDS_SCALING_MODES,
    ImageAttentionTerm,
    attention,
    decoupled_attention,
    fit_batch,
    image_attention,
    select_chunks,
)

HEADS, HEAD_DIM = 2, 4
C = HEADS * HEAD_DIM


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out; query [B,h,L,d], key/value [B,T,h*d] -> [B,L,h*d]."""
    b, h, _, d = query.shape
    k = key.view(b, -1, h, d).transpose(1, 2).double()
    v = value.view(b, -1, h, d).transpose(1, 2).double()
    scores = query.double() @ k.transpose(-1, -2) / d ** 0.5
    out = scores.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(b, -1, h * d)


def make(batch: int = 2, queries: int = 6, tokens: int = 4, seed: int = 0, channels: int = C):
    g = torch.Generator().manual_seed(seed)
    heads = channels // HEAD_DIM
    query = torch.randn(batch, heads, queries, HEAD_DIM, generator=g)
    key = torch.randn(batch, tokens, channels, generator=g)
    value = torch.randn(batch, tokens, channels, generator=g)
    return query, key, value


def test_attention_matches_softmax_reference():
    query, key, value = make()
    assert torch.allclose(attention(query, key, value).double(), reference_attention(query, key, value), atol=1e-6)


def test_v_only_multiplies_the_output_by_the_weight():
    query, key, value = make()
    out = image_attention(query, ImageAttentionTerm(key, value, 0.7))
    assert torch.allclose(out.double(), 0.7 * reference_attention(query, key, value), atol=1e-6)


def test_k_plus_v_scales_keys_and_values():
    query, key, value = make()
    out = image_attention(query, ImageAttentionTerm(key, value, 1.5, "K+V"))
    expected = reference_attention(query, 1.5 * key, 1.5 * value)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    # and that is not the same as V only: the weight also sharpens the softmax
    v_only = image_attention(query, ImageAttentionTerm(key, value, 1.5))
    assert (out - v_only).abs().max() > 1e-2


def test_c_penalty_scales_by_width_over_1280():
    query, key, value = make(channels=32)  # penalty 32/1280
    weight = 2.0
    penalty = key.shape[-1] / 1280.0
    out = image_attention(query, ImageAttentionTerm(key, value, weight, "K+V w/ C penalty"))
    expected = reference_attention(query, weight * penalty * key, weight * penalty * value)
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_k_mean_v_keeps_the_centred_values_and_scales_the_mean_per_image():
    query, key, value = make(tokens=8)
    weight, per_image = 3.0, 4
    out = image_attention(query, ImageAttentionTerm(key, value, weight, "K+mean(V) w/ C penalty", per_image))
    w = weight * C / 1280.0
    images = value.view(2, 2, per_image, C)
    mean = images.mean(dim=2, keepdim=True).expand_as(images).reshape(2, 8, C)
    expected = reference_attention(query, w * key, (value - mean) + w * mean)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    # the mean is per image, not over all 8 tokens
    overall = value.mean(dim=1, keepdim=True)
    wrong = reference_attention(query, w * key, (value - overall) + w * overall)
    assert (out.double() - wrong).abs().max() > 1e-3


def test_several_images_share_one_softmax_over_all_tokens():
    query, key, value = make(tokens=8)
    out = image_attention(query, ImageAttentionTerm(key, value, 1.0))
    separate = (reference_attention(query, key[:, :4], value[:, :4])
                + reference_attention(query, key[:, 4:], value[:, 4:]))
    assert torch.allclose(out.double(), reference_attention(query, key, value), atol=1e-6)
    assert (out.double() - separate).abs().max() > 1e-2


def test_zero_weight_returns_the_text_output_itself():
    query, key, value = make()
    text = torch.randn(2, 6, C)
    out = decoupled_attention(text, query, [ImageAttentionTerm(key, value, 0.0, mode) for mode in EMBEDS_SCALING_MODES])
    assert out is text


def test_two_adapters_add_up():
    query, key, value = make(seed=1)
    _, key2, value2 = make(seed=2)
    text = torch.randn(2, 6, C)
    terms = [ImageAttentionTerm(key, value, 0.5), ImageAttentionTerm(key2, value2, 2.0)]
    out = decoupled_attention(text, query, terms)
    expected = (text.double() + 0.5 * reference_attention(query, key, value)
                + 2.0 * reference_attention(query, key2, value2))
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_keys_and_values_are_cast_to_the_query_dtype():
    query, key, value = make()
    out = image_attention(query.double(), ImageAttentionTerm(key.float(), value.float(), 1.0))
    assert out.dtype == torch.float64
    assert torch.allclose(out, reference_attention(query, key, value), atol=1e-12)


def test_per_item_weights_weigh_each_batch_item():
    query, key, value = make()
    weights = torch.tensor([0.5, 2.0])
    out = image_attention(query, ImageAttentionTerm(key, value, weights))
    ref = reference_attention(query, key, value)
    assert torch.allclose(out[0].double(), 0.5 * ref[0], atol=1e-6)
    assert torch.allclose(out[1].double(), 2.0 * ref[1], atol=1e-6)


def test_unknown_scaling_mode_is_refused_with_the_list():
    query, key, value = make()
    with pytest.raises(ValueError, match="K\\+V w/ C penalty"):
        image_attention(query, ImageAttentionTerm(key, value, 1.0, "K only"))


def test_select_chunks_follows_cond_or_uncond_order():
    cond = torch.full((1, 3, C), 1.0)
    uncond = torch.full((1, 3, C), -1.0)
    batch = select_chunks(cond, uncond, [1, 0], 4)
    assert batch.shape == (4, 3, C)
    assert batch[:2].eq(-1).all() and batch[2:].eq(1).all()
    assert select_chunks(cond, uncond, [0], 2).eq(1).all()


def test_unfolded_rows_follow_the_latents_and_repeat_the_last():
    rows = torch.arange(2.0).view(2, 1, 1).expand(2, 3, C)
    assert fit_batch(rows, 3)[:, 0, 0].tolist() == [0.0, 1.0, 1.0]
    assert fit_batch(rows, 1)[:, 0, 0].tolist() == [0.0]


def test_select_chunks_refuses_a_batch_that_does_not_split():
    cond = torch.zeros(1, 3, C)
    with pytest.raises(ValueError, match="does not split"):
        select_chunks(cond, cond, [1, 0], 3)


@pytest.mark.parametrize("mode", EMBEDS_SCALING_MODES)
def test_rows_of_weight_zero_get_nothing_added_exactly(mode):
    query, key, value = make(batch=3, seed=4)
    text = torch.randn(3, 6, C, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(3, 6, 1, generator=torch.Generator().manual_seed(6))
    weight = torch.tensor([0.0, 0.6, 1.3])
    out = decoupled_attention(text, query, [ImageAttentionTerm(key, value, weight, mode, mask=mask)])
    assert torch.equal(out[0], text[0])  # not "almost": the row is never computed
    for row in (1, 2):
        term = ImageAttentionTerm(key[row:row + 1], value[row:row + 1], float(weight[row]), mode,
                                  mask=mask[row:row + 1])
        alone = image_attention(query[row:row + 1], term)
        assert torch.allclose(out[row], text[row] + alone[0], atol=1e-6)
