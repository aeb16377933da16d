"""Centered finite differences for the gradient tests (float64 throughout)."""
import numpy as np


def numeric_grad(f, x, eps=1e-6, idx=None):
    """d f() / d x by centered differences, perturbing x in place; idx limits the entries checked."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size) if idx is None else idx:
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return grad


def rel_error(a, b):
    """||a - b|| / (||a|| + ||b||): 0 for equal arrays, 1 for opposite ones."""
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


def check(f_out, x, analytic, rng, tol=1e-7, idx=None):
    """Compare analytic (the gradient of sum(f_out() * dout)) with finite differences.

    f_out() recomputes the forward output from x; dout is a fixed random upstream gradient.
    Returns the relative error and asserts it is below tol.
    """
    dout = rng.standard_normal(np.shape(f_out()))
    num = numeric_grad(lambda: float(np.sum(f_out() * dout)), x, idx=idx)
    ana = analytic(dout)
    if idx is not None:
        mask = np.zeros(x.size, bool)
        mask[list(idx)] = True
        num, ana = num.reshape(-1)[mask], ana.reshape(-1)[mask]
    err = rel_error(ana, num)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
    return err


def sample(grad, rng, k=12):
    """k entries: half the largest |grad| (zero rows of masked capsules say little), half random."""
    flat = np.abs(grad.reshape(-1))
    top = np.argsort(-flat)[:k // 2]
    rest = rng.choice(flat.size, min(flat.size, k), replace=False)
    return np.unique(np.concatenate([top, rest]))


def parameter_errors(loss, params, grads, rng) -> dict[str, float]:
    """Relative error of each parameter array's analytic gradient (grads) against centered
    differences of loss() on sampled entries, every array of params perturbed in place."""
    errors = {}
    for name, p in params.items():
        idx = sample(grads[name], rng)
        num = numeric_grad(loss, p, eps=1e-5, idx=idx).reshape(-1)[idx]
        errors[name] = rel_error(grads[name].reshape(-1)[idx], num)
    return errors
