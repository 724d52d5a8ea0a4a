"""Models.losses.head_cross_entropy against a float64 numpy oracle: value, dL/dh and dL/dW (trainable or frozen),
on the chunked CPU kernels (one chunk, many chunks with a ragged last one) and on the Jittor-ops fallback."""
import numpy as np
import pytest


@pytest.fixture(params=["one chunk", "chunks of 64", "chunks of 40", "jittor ops"])
def head_path(request, jt, monkeypatch):
    from Models import kernel_config, losses
    if request.param == "jittor ops":
        with kernel_config.override(fused_head=False):
            yield request.param
        return
    if not losses._fused_available(jt.zeros(1), jt.zeros(1)):
        if jt.flags.use_cuda:
            pytest.skip("the chunked head kernels are CPU-only")
        pytest.fail("the chunked head kernels do not apply on this CPU build (g++ and oneDNN expected)")
    if request.param != "one chunk":
        monkeypatch.setattr(losses, "HEAD_CHUNK", int(request.param.split()[-1]))
    yield request.param


def _oracle(h, w, t):
    z = h.astype(np.float64) @ w.astype(np.float64).T
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    m = len(t)
    loss = -np.log(p[np.arange(m), t]).mean()
    G = p.copy()
    G[np.arange(m), t] -= 1.0
    G /= m
    return loss, G @ w.astype(np.float64), G.T @ h.astype(np.float64)


@pytest.mark.parametrize("weight_trainable", [False, True])
def test_value_and_gradients_match_numpy(jt, head_path, weight_trainable):
    from Models.losses import head_cross_entropy
    rng = np.random.default_rng(0)
    m, d, V = 37, 16, 1001
    h = rng.standard_normal((m, d)).astype(np.float32)
    w = (rng.standard_normal((V, d)) * 0.5).astype(np.float32)
    t = rng.integers(0, V, m)
    t[:6] = [0, V - 1, 5, 39, 40, 5]  # first and last vocabulary ids, both sides of a chunk boundary, a repeat
    hv, wv = jt.array(h), jt.array(w)
    if not weight_trainable:
        wv.stop_grad()
    scale = jt.array(np.float32(1.7))  # a non-unit upstream gradient
    loss = head_cross_entropy(hv, wv, jt.array(t.astype(np.int32)))
    want_loss, want_dh, want_dw = _oracle(h, w, t)
    np.testing.assert_allclose(loss.item(), want_loss, rtol=1e-5)
    if weight_trainable:
        dh, dw = jt.grad(loss * scale, [hv, wv])
        np.testing.assert_allclose(dw.numpy(), 1.7 * want_dw, rtol=1e-4, atol=1e-6)
    else:
        dh = jt.grad(loss * scale, hv)
    np.testing.assert_allclose(dh.numpy(), 1.7 * want_dh, rtol=1e-4, atol=1e-6)


def test_large_logits_are_stable(jt, head_path):
    from Models.losses import head_cross_entropy
    h = jt.array(np.array([[100.0, -100.0], [0.0, 300.0]], np.float32))
    w = jt.array(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)).stop_grad()
    loss = head_cross_entropy(h, w, jt.array(np.array([0, 1], np.int32)))
    want, want_dh, _ = _oracle(h.numpy(), w.numpy(), np.array([0, 1]))
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jt.grad(loss, h).numpy(), want_dh, atol=1e-6)


def test_loss_without_gradient(jt, head_path):
    """Under no_grad (validation) the frozen head's loss is the same, with no gradient work."""
    from Models.losses import head_cross_entropy
    rng = np.random.default_rng(1)
    h = rng.standard_normal((9, 8)).astype(np.float32)
    w = rng.standard_normal((300, 8)).astype(np.float32)
    t = rng.integers(0, 300, 9)
    with jt.no_grad():
        loss = head_cross_entropy(jt.array(h), jt.array(w).stop_grad(), jt.array(t.astype(np.int32)))
    np.testing.assert_allclose(loss.item(), _oracle(h, w, t)[0], rtol=1e-5)
