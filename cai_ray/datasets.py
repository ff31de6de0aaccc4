"""Deprecated: the prompt readers are ``cai_ray.readers`` now (this name shadowed Hugging
Face's ``datasets`` package imported beside it). Kept for one release."""

import warnings

from cai_ray.readers import *  # noqa: F403
from cai_ray.readers import InputError, read_local, read_prompts, validate_row  # noqa: F401

warnings.warn(
    "cai_ray.datasets is now cai_ray.readers; the old name will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
