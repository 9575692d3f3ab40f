"""The real trainer teaches a tiny random-init LLaVA to read the image: colour of one square from pixels.

A guard for the visual pathway as a whole (contract-7 batches -> the train step with the model and
optimizer groups of configs/tiny_synthetic.py -> forward): the answer is only in the pixels, so accuracy
far above chance (1/8) with real pixels, and near chance with the pixels zeroed, show that gradients reach
the tower and projector and that the decoder learnt to use what they give.
"""
import numpy as np
import pytest

COLOURS = np.array([[220, 40, 40], [40, 180, 60], [50, 80, 220], [230, 210, 40], [160, 60, 200],
                    [240, 140, 30], [240, 120, 180], [60, 200, 200]], np.float32)
SIDE, PATCH, VOCAB, IMAGE_ID = 56, 14, 64, 63
NVIS = (SIDE // PATCH) ** 2
Q_TOKENS = [3, 4, 5]  # "what colour is it" in a made-up vocabulary; answers are tokens 10..17


def make_batch(rng: np.random.Generator, batch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Contract-7 arrays: [BOS, image x16, question, answer] with the loss on the answer only."""
    t = 1 + NVIS + len(Q_TOKENS) + 1
    px = np.full((batch, 1, SIDE, SIDE, 3), 170, np.float32)
    colour = rng.integers(0, len(COLOURS), batch)
    for b in range(batch):
        y, x = rng.integers(0, SIDE - 16, 2)
        px[b, 0, y:y + 16, x:x + 16] = COLOURS[colour[b]]
    ids = np.array([[1] + [IMAGE_ID] * NVIS + Q_TOKENS + [10 + c] for c in colour], np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    loss_mask = np.zeros((batch, t), np.float32)
    loss_mask[:, t - 2] = 1.0  # the last question token predicts the answer
    visual_index = np.full((batch, t), -1, np.int32)
    visual_index[:, 1:1 + NVIS] = np.arange(NVIS)
    arrays = {"input_ids": ids, "attention_mask": np.ones((batch, t), np.int32), "targets": targets,
              "loss_mask": loss_mask, "visual_index": visual_index,
              "pixel_values": (px / 255.0 - 0.48) / 0.27}
    return arrays, colour


class Batches:
    """An endless per-host batch iterator with the get/set_state the trainer checkpoints."""

    def __init__(self, batch: int, seed: int = 0):
        self.batch, self.seed, self.i = batch, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return make_batch(np.random.default_rng([self.seed, self.i]), self.batch)[0]

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def accuracy(model, arrays: dict[str, np.ndarray], colour: np.ndarray) -> float:
    import jax.numpy as jnp

    from instit_jax.models.llm import positions_from_mask

    e = model.embed_inputs(jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["pixel_values"]), None,
                           jnp.asarray(arrays["visual_index"]))
    mask = jnp.asarray(arrays["attention_mask"])
    logits, _ = model.language_model(e, positions_from_mask(mask), mask)
    pred = np.asarray(logits[:, -2, 10:10 + len(COLOURS)].argmax(-1))
    return float((pred == colour).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import jax

    from configs.tiny_synthetic import get_config
    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    c = get_config()
    c.model.text.vocab_size = VOCAB
    c.model.image_token_id = IMAGE_ID
    c.model.image_aspect_ratio = "single"
    c.data.kind = "random"  # batches come from train_iter; this only skips the Grain source checks
    c.data.max_tokens = 1 + NVIS + len(Q_TOKENS) + 1
    c.data.max_tiles = 1
    c.data.videos_per_batch = False
    c.train.global_batch_size = 16
    c.train.total_steps = 160
    c.train.checkpoint_every = 160
    c.train.log_every = 40
    c.optim.warmup_ratio = 0.05
    c.freeze.frozen_vision_layers = 0
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    result = train(c, str(tmp_path_factory.mktemp("learns_pixels")), train_iter=Batches(16), mesh=mesh)
    return result.model()


def test_reads_the_colour_from_pixels(trained):
    arrays, colour = make_batch(np.random.default_rng(12345), 64)
    acc = accuracy(trained, arrays, colour)
    assert acc >= 0.8, f"held-out accuracy {acc:.2f} (chance 0.125): the model does not read the image"
    blind = dict(arrays, pixel_values=np.zeros_like(arrays["pixel_values"]))
    assert accuracy(trained, blind, colour) <= 0.4, "answers survive zeroed pixels: not read from the image"
