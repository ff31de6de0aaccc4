"""Deprecated: the SL-CAI data step is ``generate`` everywhere now (CLI, module, job script,
config files, output folder, manifest), so its module is ``cai_ray.generate``. This name
keeps old imports working for one release."""

import warnings

from cai_ray.generate import SLWorker, generate, generation_fingerprint

warnings.warn(
    "cai_ray.sl is now cai_ray.generate; the old name will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["SLWorker", "generate", "generation_fingerprint"]
