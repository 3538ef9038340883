"""Importing moekit's Triton kernels in tests: under Triton's interpreter where there is no GPU."""

import importlib.util
import os
import sys

import torch

GPU = torch.cuda.is_available()


def interpreted_triton():
    """``moekit.kernels.triton``, imported with TRITON_INTERPRET=1 when there is no GPU (kernels are built for
    the interpreter when decorated, i.e. at import); None where they cannot run in this session: no triton
    package, or triton imported earlier without the interpreter (run the test file on its own then)."""
    if importlib.util.find_spec("triton") is None:
        return None
    late = (not GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
            and "moekit.kernels.triton" not in sys.modules)
    saved = os.environ.get("TRITON_INTERPRET")
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import moekit.kernels.triton as tk
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return None if late or not (GPU or tk.INTERPRETED) else tk
