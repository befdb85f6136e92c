"""Training objectives: each registers its name, settings class and objective class (see ``base``).

Adding one: subclass ``ObjectiveConfig`` (a ``name`` Literal, its settings as fields, ``build()``) and
``Objective`` (``group_loss``; ``fork``, ``bind``, ``after_step``, ``state_dict`` when it needs them),
decorate the config with ``@register_objective`` and import the module here.
"""

from . import copo, kvpo, nft, sde_grpo  # noqa: F401  (register themselves)
from .base import OBJECTIVES, GroupInput, GroupLoss, Objective, ObjectiveConfig, register_objective

__all__ = ["OBJECTIVES", "GroupInput", "GroupLoss", "Objective", "ObjectiveConfig", "register_objective"]
