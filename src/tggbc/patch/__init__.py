"""tgGBC inside the user's own model: one call patches it, one call restores it.

    import tggbc.patch
    tggbc.patch.apply(model, r=21000, n=1, k=175)    # StreamPETR V2-99 1600x640, the paper's setting
    ...                                              # the model's own test loop, unchanged
    tggbc.patch.remove(model)                        # the original forwards, bit for bit

`model` is the detector (or head) built by the original PETR / StreamPETR repositories (mmcv 1.x,
mmdet3d), found by structure; mmcv is never imported. See docs/patch.md and `tggbc.patch.petr`.

Nothing in tggbc imports this package: it sits on top of the core and touches only the modules of
the model it is given.
"""

from .petr import ATTENTION_MODES, DecoderPatch, apply, patches, remove
from .stub import install_flash_attn_stub

__all__ = ["ATTENTION_MODES", "DecoderPatch", "apply", "install_flash_attn_stub", "patches", "remove"]
