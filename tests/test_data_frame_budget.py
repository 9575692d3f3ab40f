"""Video frames adapt to the token budget (32 SigLIP frames = 6,272 tokens > the 6,144 context)."""
import io

import numpy as np
from PIL import Image

from instit_jax import processing
from instit_jax.chat_template import IMAGE_TOKEN
from instit_jax.data.pipeline import PipelineConfig, SampleProcessor, fit_frames
from instit_jax.data.records import parse_sample, sample_features
from instit_jax.tokenizer import train_tiny_tokenizer


def test_fit_frames_rule():
    def count(n):
        return 196 * n  # Qwen2 recipe: SigLIP 27x27 pooled to 14x14, no newline tokens

    assert fit_frames(32, 100, 20, 6144, 8, count) == 30  # 30 * 196 + 100 = 5980 <= 6144 < 31 * 196 + 100
    assert fit_frames(32, 200, 20, 8192, 8, count) == 32  # fits: unchanged
    assert fit_frames(32, 5000, 20, 6144, 8, count) == 8  # long chat: keep 8 frames, truncate the text
    assert fit_frames(32, 5000, 20, 1000, 8, count) == 5  # visual span itself limits: 20 + 5 * 196 <= 1000
    assert fit_frames(32, 5000, 900, 1000, 8, count) == 0  # nothing fits after the prefix


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_video_sample_keeps_uniform_frames_that_fit():
    conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat happens to [1]?"},
            {"from": "gpt", "value": "It rolls to the left."}]
    tok = train_tiny_tokenizer(["What happens to [1]? It rolls to the left. USER: ASSISTANT:"], vocab_size=80)
    rec = parse_sample(sample_features("v1", "video", conv, [_jpeg(i) for i in range(12)], source="vid.json"))
    image = processing.ImageProcessorConfig(tile_size=28)
    # 28-pixel frames, patch 14 -> 2x2 patches, stride-2 pooling -> 1 token per frame; budget 8 frames + text.
    base = dict(batch_size=1, image=image, num_tiles=0, num_frames=12, video_pool_stride=2)
    full = SampleProcessor(tok, PipelineConfig(max_length=512, **base))(rec)
    text = len(full["input_ids"]) - 12
    cfg = PipelineConfig(max_length=text + 8, min_video_frames=4, **base)
    out = SampleProcessor(tok, cfg)(rec)
    assert len(out["frames"]) == 8 and len(out["input_ids"]) == text + 8  # no text truncated
    assert out["plans"][0].count == 8 and int((out["input_ids"] == tok.token_to_id(IMAGE_TOKEN)).sum()) == 8
    # the 8 kept frames are the uniform choice over all 12 (first and last included), not the first 8
    picks = processing.preprocess_video([np.asarray(Image.open(io.BytesIO(_jpeg(i))).convert("RGB"))
                                         for i in (0, 11)], image).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out["frames"][[0, -1]], picks)
    image_id = tok.token_to_id(IMAGE_TOKEN)
    assert list(full["input_ids"][full["input_ids"] != image_id]) == list(out["input_ids"][out["input_ids"] != image_id])
