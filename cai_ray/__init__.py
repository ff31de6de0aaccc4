"""cai-ray: Constitutional AI at cluster scale on Ray.

The tree reads in the method's order (ARCHITECTURE.md): ``core`` (the method, pure),
``engine``, ``batch`` (the Ray Data machinery), one package per step (``generate``,
``label``, ``train``, ``eval``, ``serve``) with its config beside it, ``pipeline``, ``cli``.
"""

import sys

__version__ = "0.1.0"

# modules that moved into the packages (old name -> new), importable under the old name with
# a deprecation warning for one release
MOVED = {
    "cai_ray.constitution": "cai_ray.core.constitution",
    "cai_ray.prompts": "cai_ray.core.prompts",
    "cai_ray.labeler": "cai_ray.core.labeler",
    "cai_ray.label_math": "cai_ray.core.label_math",
    "cai_ray.eval_math": "cai_ray.core.eval_math",
    "cai_ray.refusal": "cai_ray.core.refusal",
    "cai_ray.train.rl_math": "cai_ray.core.rl_math",
    "cai_ray.stage": "cai_ray.batch.stage",
    "cai_ray.sink": "cai_ray.batch.sink",
    "cai_ray.ledger": "cai_ray.batch.ledger",
    "cai_ray.records": "cai_ray.batch.records",
    "cai_ray.readers": "cai_ray.batch.readers",
    "cai_ray.datasets": "cai_ray.batch.readers",
    "cai_ray.storage": "cai_ray.batch.storage",
    "cai_ray.sl": "cai_ray.generate.run",
    "cai_ray.pairs": "cai_ray.label.pairs",
    "cai_ray.evaluate": "cai_ray.eval.run",
    "cai_ray.eval_stages": "cai_ray.eval.stages",
    "cai_ray.report": "cai_ray.eval.report",
    "cai_ray.train.critic_free": "cai_ray.train.ppo.critic_free",
    "cai_ray.train.rollout": "cai_ray.train.ppo.rollout",
    "cai_ray.train.reward": "cai_ray.train.ppo.reward",
    "cai_ray.train.monitors": "cai_ray.train.ppo.monitors",
}


class _MovedModules:
    """Finds an old module name and hands back the module it became (after every real
    module, so it never shadows one)."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        import importlib
        import warnings

        warnings.warn(
            f"{spec.name} is now {MOVED[spec.name]}; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
