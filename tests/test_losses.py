"""Models.losses.head_cross_entropy against a float64 numpy oracle: value, dL/dh and dL/dW (trainable or frozen)."""
import numpy as np
import pytest


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
def test_value_and_gradients_match_numpy(jt, weight_trainable):
    from Models.losses import head_cross_entropy
    rng = np.random.default_rng(0)
    m, d, V = 37, 16, 1001
    h = rng.standard_normal((m, d)).astype(np.float32)
    w = (rng.standard_normal((V, d)) * 0.5).astype(np.float32)
    t = rng.integers(0, V, m)
    t[:3] = [0, V - 1, 5]  # first and last vocabulary ids
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


def test_large_logits_are_stable(jt):
    from Models.losses import head_cross_entropy
    h = jt.array(np.array([[100.0, -100.0], [0.0, 300.0]], np.float32))
    w = jt.array(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)).stop_grad()
    loss = head_cross_entropy(h, w, jt.array(np.array([0, 1], np.int32)))
    want, want_dh, _ = _oracle(h.numpy(), w.numpy(), np.array([0, 1]))
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jt.grad(loss, h).numpy(), want_dh, atol=1e-6)
