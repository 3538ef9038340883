"""Running the Triton kernels without a GPU: ``TRITON_INTERPRET=1`` and CPU tensors.

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*, i.e. when
``moekit.kernels.triton`` is first imported, so it must be set before that import
(the tests and ``bench/gpu.py --smoke`` do). Interpreted kernels run on CPU
tensors with numpy, one program at a time: slow, but the same code and masks.
"""

from __future__ import annotations

from contextlib import contextmanager


def interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function) was built for the interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def _needs_index_fix() -> bool:
    import numpy
    import triton

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 7) and numpy.lib.NumpyVersion(numpy.__version__) >= "2.4.0"


@contextmanager
def numpy_compat():
    """Make triton < 3.7's interpreter work with numpy >= 2.4 while the block runs.

    With numpy 2.4, ``int()`` of a one-element array raises, and the 3.6 interpreter
    does exactly that for a runtime loop bound (``for k in range(0, K, BLOCK_K)``).
    Fixed upstream in 3.7 (triton-lang/triton#9171); this applies the same one-line
    fix to the interpreter for the duration of the block, and nothing otherwise.
    """
    if not _needs_index_fix():
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = original
