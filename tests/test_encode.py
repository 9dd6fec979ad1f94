"""Buckets, image preparation, prompt encoding and truncation."""

import numpy as np
import pytest
import torch

from framepack_turbo.pipeline import encode
from framepack_turbo.pipeline.encode import BUCKETS_640, buckets, nearest_bucket


def test_640_buckets_are_framepacks():
    assert len(BUCKETS_640) == 14
    assert buckets(640) == list(BUCKETS_640)
    assert BUCKETS_640[0] == (416, 960) and BUCKETS_640[-1] == (960, 416)


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (480, 640, (544, 704)),  # |480*704 - 640*544| = 10240 is the smallest
        (512, 512, (640, 608)),  # tie with (608, 640): the later bucket wins, as in FramePack
        (1080, 1920, (480, 832)),  # |1080*832 - 1920*480| = 23040
        (1920, 1080, (832, 480)),
        (400, 1000, (416, 960)),  # wider than any bucket: the widest
    ],
)
def test_nearest_bucket_hand_cases(h, w, expected):
    assert nearest_bucket(h, w, 640) == expected


@pytest.mark.parametrize("resolution", [128, 256, 320, 960])
def test_scaled_buckets_divide_by_16(resolution):
    for bh, bw in buckets(resolution):
        assert bh % 16 == 0 and bw % 16 == 0


def test_resize_and_center_crop():
    img = np.zeros((200, 300, 3), np.uint8)
    img[:, 150:] = 255  # right half white
    out = encode.resize_and_center_crop(img, 96, 160)
    assert out.shape == (96, 160, 3)
    assert out[:, :70].max() < 20 and out[:, 90:].min() > 235


def test_crop_start_is_the_template_head(tiny_bundle):
    tok = tiny_bundle.tokenizer
    crop = encode.template_crop_start(tok)
    head = tok(encode.PROMPT_TEMPLATE.split("{}")[0]).input_ids
    full = tok(encode.PROMPT_TEMPLATE.format("a cat")).input_ids
    assert crop == len(head) and full[:crop] == head


def test_prompt_embeddings_shapes(tiny_bundle):
    b = tiny_bundle
    p = encode.encode_prompt("a cat", b.tokenizer, b.text_encoder, b.tokenizer_2, b.text_encoder_2)
    assert p.llama.shape[0] == 1 and p.llama.shape[2] == b.text_encoder.config.hidden_size
    assert p.llama.shape[1] <= encode.MAX_PROMPT_TOKENS
    assert p.mask.shape == p.llama.shape[:2] and bool(p.mask.all())
    assert p.clip_pooled.shape == (1, b.text_encoder_2.config.hidden_size)
    assert p.truncations == ()
    neg = encode.PromptEmbeddings.zeros_like(p)
    assert torch.count_nonzero(neg.llama) == 0 and neg.llama.shape == p.llama.shape


def test_long_prompt_is_truncated_and_says_so(tiny_bundle):
    b = tiny_bundle
    long_prompt = "a cat walks " * 40  # 480 characters: over 256 char-level tokens and 77 CLIP tokens
    p = encode.encode_prompt(long_prompt, b.tokenizer, b.text_encoder, b.tokenizer_2, b.text_encoder_2)
    assert p.llama.shape[1] == encode.MAX_PROMPT_TOKENS
    assert any("LLaMA" in line and "256" in line for line in p.truncations)
    assert any("CLIP" in line and "77" in line for line in p.truncations)


def test_image_embeddings(tiny_bundle):
    b = tiny_bundle
    img = np.full((96, 160, 3), 128, np.uint8)
    emb = encode.encode_image(img, b.feature_extractor, b.image_encoder)
    assert emb.shape[0] == 1 and emb.shape[2] == b.image_encoder.config.hidden_size
