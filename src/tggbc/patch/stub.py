"""Let the StreamPETR plugin import where flash-attn cannot: placeholder `flash_attn` modules.

StreamPETR's `models/utils/attention.py` imports flash-attn at import time, so its plugin (and with it
every config, flash or not) fails to import where flash-attn is not installed or does not load on
the GPU. The placeholders make that import succeed; any call into them raises. `tggbc.patch.apply`
routes PETRMultiheadFlashAttention through SDPA, so a patched model never calls them.

Imports nothing but the standard library.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["install_flash_attn_stub"]

# The modules StreamPETR's attention.py imports names from.
_MODULES = ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding")


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(
            f"flash_attn.{name} was called, but flash-attn is not available here (tggbc.patch placeholder): "
            "call tggbc.patch.apply(model) so PETRMultiheadFlashAttention runs through SDPA"
        )

    call.__name__ = name
    return call


def install_flash_attn_stub() -> list[str]:
    """Register placeholder flash-attn modules if the real ones do not import.

    Call it before the repository's plugin is imported (in tools/test.py: before the
    `plugin` import block). Every attribute of the placeholders is a function that raises.

    Returns:
        the module names registered in sys.modules (empty when the real flash-attn imports, in which
        case nothing is changed).
    """
    try:
        for name in _MODULES:
            importlib.import_module(name)
        return []
    except Exception:  # not installed, or its CUDA extension does not load: both end the same way
        pass
    for name in _MODULES:
        sys.modules.pop(name, None)  # drop what a half-failed import left behind
    installed = []
    for name in _MODULES:
        module = types.ModuleType(name, "tggbc.patch placeholder for flash-attn: every call raises")
        module.__getattr__ = _unavailable  # PEP 562: `from flash_attn.x import anything` succeeds
        sys.modules[name] = module
        installed.append(name)
    root = sys.modules["flash_attn"]
    root.__path__ = []  # a package, so its submodules resolve
    root.flash_attn_interface = sys.modules["flash_attn.flash_attn_interface"]
    root.bert_padding = sys.modules["flash_attn.bert_padding"]
    return installed
