"""Reading fairseq checkpoints (and any pickled PyTorch file: `load_torch_file`) without fairseq and
without running code stored in the file.

`torch.load(weights_only=True)` refuses the few non-tensor classes fairseq pickles: the target
`Dictionary` of CTC checkpoints, `argparse.Namespace` and numpy scalars of older `args`-style files.
Small stand-ins are allowed under those names instead (`torch.serialization.safe_globals`). Plain pickle
(`weights_only=False`) is used only when the caller says it trusts the file.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import pickle
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xlsr_jax.convert.hf import ConversionError

log = logging.getLogger(__name__)


class DictionaryStub:
    """Stand-in for `fairseq.data.dictionary.Dictionary`: keeps the pickled attributes (`symbols`, ...)."""

    symbols: list[str]

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def _safe_globals() -> list:
    """The non-tensor globals fairseq checkpoints pickle, as `torch.serialization.safe_globals` entries."""
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:
        from numpy.core import multiarray
    entries: list = [(DictionaryStub, "fairseq.data.dictionary.Dictionary"), argparse.Namespace]
    # numpy 1.x pickles name `numpy.core`, numpy 2 `numpy._core`.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    entries += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # A dtype is rebuilt by BUILD on an instance of its dtype class, which must be allowed too.
    scalar_types = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                    np.float16, np.float32, np.float64, np.complex64, np.complex128, np.str_)  # fmt: skip
    for t in scalar_types:
        cls = type(np.dtype(t))
        entries.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return entries


class _TrustedUnpickler(pickle.Unpickler):
    """Plain pickle (arbitrary code allowed), but fairseq's Dictionary loads without fairseq installed."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("fairseq.data.dictionary", "Dictionary"):
            return DictionaryStub
        return super().find_class(module, name)


_TRUSTED_PICKLE = types.ModuleType("xlsr_jax_trusted_pickle")
_TRUSTED_PICKLE.Unpickler = _TrustedUnpickler
_TRUSTED_PICKLE.load = lambda f, **kwargs: _TrustedUnpickler(f, **kwargs).load()


def load_fairseq_checkpoint(path: str | pathlib.Path, trust_pickle: bool = False) -> dict:
    """Read a fairseq checkpoint with `weights_only=True` (or plain pickle when `trust_pickle`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"fairseq checkpoint not found: {path}")
    ckpt = load_torch_file(path, trust_pickle, allowed=_safe_globals(), trusted_pickle_module=_TRUSTED_PICKLE)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ConversionError(f"{path} is not a fairseq checkpoint: no 'model' state dict at the top level")
    return dict(ckpt)


def load_torch_file(path: pathlib.Path, trust_pickle: bool = False, allowed: Sequence = (),
                    trusted_pickle_module: types.ModuleType = pickle) -> Any:
    """`torch.load` of a pickled PyTorch file (fairseq `.pt`, Hugging Face `pytorch_model.bin`) that runs no
    code stored in it: `weights_only=True` plus the `allowed` globals (`torch.serialization.safe_globals`
    entries). `trust_pickle` loads with `weights_only=False` through `trusted_pickle_module`. Every failure
    is a ConversionError naming the file (and, for a refused global, what it is and how to allow it)."""
    import torch

    if trust_pickle:
        log.warning("loading %s with weights_only=False (--trust-pickle): it may run code stored in the file", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=trusted_pickle_module)
        except Exception as e:  # e.g. a class from a package that is not installed
            raise ConversionError(f"could not unpickle {path}: {type(e).__name__}: {e}") from e
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path, str(e), allowed)
        if not names:
            raise ConversionError(f"could not read {path} as a PyTorch checkpoint: {e}") from e
        raise ConversionError(
            f"{path} pickles {', '.join(names)}, which the safe loader (torch.load weights_only=True) does "
            "not allow. trust_pickle=True (--trust-pickle) loads it with weights_only=False, which runs "
            "arbitrary code stored in the file: use it only for files you trust."
        ) from None
    except Exception as e:  # a truncated or foreign file fails with zip/pickle/key errors alike
        raise ConversionError(f"could not read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e


def _unsafe_globals(path: pathlib.Path, message: str, allowed: Sequence) -> list[str]:
    """Globals in the file that neither torch nor `allowed` allow (best effort)."""
    import torch

    ours = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}" for entry in allowed}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - e.g. an opcode the scanner does not know: fall back to torch's message
        names = []
    names = [n for n in names if n not in ours]
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", message)
    return sorted(set(names))


__all__ = ["DictionaryStub", "load_fairseq_checkpoint", "load_torch_file"]
