"""The compiled path never makes mnn fail: no writable cache folder, a cache that cannot be written, odd dtypes."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import mnn
from mnn import jit
from mnn.layers import GELU, LayerNorm, ReLU, Softmax

PACKAGE = Path(mnn.__file__).parent

# Runs in a copy of mnn where numba finds no folder to cache in; prints "ok" when the
# compiled path gave what the numpy path gives, and how many warnings were shown.
SCRIPT = textwrap.dedent("""
    import warnings
    import numpy as np
    import mnn
    from mnn import jit
    from mnn.layers import LayerNorm, ReLU
    assert mnn.__file__.startswith({root!r}), mnn.__file__
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)

    def run():
        relu, norm = ReLU(), LayerNorm(8)
        y = relu.forward(x)
        dx = relu.backward(dy)
        z = norm.forward(x)
        dz = norm.backward(dy)
        return y, dx, z, dz, norm.grads["weight"].copy()

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert jit.enabled()
        compiled = run()
        compiled_again = run()
    assert jit.enabled(), "the compiled path was switched off instead of compiling without a cache"
    jit.set_enabled(False)
    reference = run()
    for a, b, c in zip(compiled, compiled_again, reference):
        assert np.array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=2e-6, atol=2e-6)
    print("ok", len(shown), *(str(w.message) for w in shown), sep="\\n")
""")


def _unwritable_copy(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of mnn where neither ``__pycache__`` beside the sources nor the user's cache folder can be made.

    Works as root too (where permissions do not bite): every ``__pycache__`` is a file,
    and the user cache folder lies below a file.
    """
    root = tmp_path / "site-packages"
    shutil.copytree(PACKAGE, root / "mnn", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [root / "mnn", *(p for p in (root / "mnn").rglob("*") if p.is_dir())]:
        (folder / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "MNN_", "PYTHON"))}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1", HOME=str(blocker),
               XDG_CACHE_HOME=str(blocker / "cache"))
    return root, env


def test_no_writable_cache_folder_compiles_without_a_cache_and_warns_once(tmp_path):
    root, env = _unwritable_copy(tmp_path)
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(root))], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:2] == ["ok", "1"], result.stdout
    assert "NUMBA_CACHE_DIR" in lines[2] and "cannot cache" in lines[2], lines[2]


def test_a_cache_that_cannot_be_written_falls_back_to_compiling_without_it(monkeypatch):
    numba_caching = pytest.importorskip("numba.core.caching")

    def disk_full(self, sig, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(numba_caching.Cache, "save_overload", disk_full)
    monkeypatch.setattr(numba_caching.Cache, "load_overload", lambda self, sig, context: None)
    monkeypatch.setattr(jit, "_cache_warned", False, raising=False)

    @jit.kernel
    def _add_one(x, y):
        for i in range(x.size):
            y[i] = x[i] + 1.0

    x = np.arange(5, dtype=np.float64)
    y = np.empty_like(x)
    previous = jit.set_enabled(True)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            _add_one(x, y)
            _add_one(x.astype(np.float32), y.astype(np.float32))  # a second signature: no second warning
    finally:
        jit.set_enabled(previous)
    assert np.array_equal(y, x + 1.0)
    assert len(shown) == 1 and "No space left on device" in str(shown[0].message), [str(w.message) for w in shown]


ODD_DTYPE_CASES = [(ReLU, np.float16), (ReLU, np.complex64), (GELU, np.float16), (GELU, np.complex64),
                   (Softmax, np.float16), (Softmax, np.complex64), (lambda: LayerNorm(4, dtype=np.float16), np.float16)]


@pytest.mark.parametrize("make, dtype", ODD_DTYPE_CASES,
                         ids=["ReLU-float16", "ReLU-complex64", "GELU-float16", "GELU-complex64", "Softmax-float16",
                              "Softmax-complex64", "LayerNorm-float16"])
def test_dtypes_the_kernels_do_not_take_run_on_the_numpy_path(make, dtype):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(dtype)
    layer = make()
    previous = jit.set_enabled(False)
    try:
        expected = layer.forward(x)
        expected_dx = layer.backward(np.ones_like(x))
    finally:
        jit.set_enabled(True)
    try:
        got = layer.forward(x)
        got_dx = layer.backward(np.ones_like(x))
    finally:
        jit.set_enabled(previous)
    assert np.array_equal(got, expected) and np.array_equal(got_dx, expected_dx)


def _float32_kernel_cases():
    from mnn.layers import gelu, normalization, softmax  # noqa: PLC0415
    from mnn.optim import adam, sgd  # noqa: PLC0415

    f = np.float32
    v, rows = np.ones(64, f), np.ones((4, 16), f)
    return {
        "layernorm forward": (normalization._layernorm_forward_kernel, {"reassoc"},
                              (rows, v[:16], v[:16], rows.copy(), rows.copy(), v[:4].copy(), f(1), f(1e-5), f(1))),
        "layernorm backward": (normalization._layernorm_backward_kernel, {"reassoc"},
                               (rows, rows, v[:4], v[:16], v[:16].copy(), v[:16].copy(), rows.copy(), f(1))),
        "softmax backward": (softmax._softmax_backward_kernel, {"reassoc"}, (rows, rows, rows.copy(), f(0))),
        "gelu forward": (gelu._gelu_float32_kernel, {"contract"}, (v, v.copy(), v.copy())),
        "gelu backward": (gelu._gelu_backward_kernel, False, (v, v, v, v.copy(), f(1), f(1), f(1))),
        "adam": (adam._adam_kernel, False,
                 (v.copy(), v, v.copy(), v.copy(), f(1), f(0), f(.9), f(.99), f(.01), f(1e-8), f(1), f(1), f(1e-38))),
        "sgd": (sgd._sgd_kernel, False, (v.copy(), v, v.copy(), f(1), f(.9), f(0), f(1), False, False, f(1e-38))),
    }


@pytest.mark.parametrize("name", list(_float32_kernel_cases()))
def test_float32_loops_compute_in_float32(name):
    """No float64 arithmetic in a transformer or optimizer loop given float32 arrays. A literal ``0`` that
    started LayerNorm's and the softmax backward's sums made them float64 (numba types float32 * int64 as
    float64): twice the vector instructions, with conversions, for no accuracy the layers promise."""
    import numba  # noqa: PLC0415

    kernel, fastmath, args = _float32_kernel_cases()[name]
    compiled = numba.njit(cache=False, nogil=True, error_model="numpy", fastmath=fastmath)(kernel.__wrapped__)
    compiled(*args)
    (ir,) = compiled.inspect_llvm().values()
    assert "fpext float" not in ir and not re.search(r"\bf(add|sub|mul|div) [a-z ]*double", ir), name
