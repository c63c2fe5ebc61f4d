"""The decoder: shapes, families, and a pipeline split equal to the whole model."""

from __future__ import annotations

import torch

from charllm.modelcat import get
from charllm.train.data import SyntheticTokens
from charllm.train.model import Transformer, loss_fn, padded_vocab, split_layers


def _build(name: str, seq: int = 32, **kw: object) -> Transformer:
    shape = get(name)
    with torch.device("meta"):
        m = Transformer(shape, seq, **kw)  # type: ignore[arg-type]
    m.to_empty(device="cpu")
    m.init_weights(7)
    return m


def test_families_forward_shapes_and_initial_loss() -> None:
    for name in ("tiny", "tiny-llama", "tiny-moe"):
        m = _build(name)
        data = SyntheticTokens(512, 32, 2, seed=1)
        x, y = data.micro_batch(0)
        logits = m(x)
        assert logits.shape == (2, 32, padded_vocab(512))
        loss = loss_fn(logits, y)
        assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5  # near uniform at init


def test_pipeline_split_equals_whole_model() -> None:
    whole = _build("tiny-llama")
    shape = get("tiny-llama")
    parts = []
    for s, layers in enumerate(split_layers(shape.n_layers, 2)):
        with torch.device("meta"):
            part = Transformer(shape, 32, layers, first=s == 0, last=s == 1)
        part.to_empty(device="cpu")
        part.init_weights(7)
        parts.append(part)
    x, _ = SyntheticTokens(512, 32, 2, seed=3).micro_batch(0)
    torch.testing.assert_close(parts[1](parts[0](x)), whole(x))


def test_recompute_gives_the_same_gradients() -> None:
    x, y = SyntheticTokens(512, 32, 2, seed=5).micro_batch(0)
    grads = []
    for rc in (False, True):
        m = _build("tiny", recompute=rc)
        loss_fn(m(x), y).backward()
        grads.append(m.layers["0"].ff.fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_split_layers() -> None:
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in split_layers(96, 16)] == [6] * 16


def test_synthetic_data_is_deterministic_and_learnable() -> None:
    a = SyntheticTokens(512, 16, 2, seed=9, dp_rank=1)
    b = SyntheticTokens(512, 16, 2, seed=9, dp_rank=1)
    c = SyntheticTokens(512, 16, 2, seed=9, dp_rank=0)
    torch.testing.assert_close(a.micro_batch(3)[0], b.micro_batch(3)[0])
    assert not torch.equal(a.micro_batch(0)[0], c.micro_batch(0)[0])
    x, y = a.micro_batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    xb, _yb = a.batch(step=1, n_micro=2)
    assert xb.shape == (4, 16)
