"""db3kd: knowledge distillation from decision-based black-box teachers, and its benchmark.

Lightweight at import: torch is loaded only when one of the names below is first used, so
``db3kd --help`` answers at once.

    from db3kd import HardLabelOracle, QueryBudgetExceeded
"""

from __future__ import annotations

from db3kd.errors import ConfigError, DatasetNotFoundError, DB3KDError, QueryBudgetExceeded

__version__ = "0.1.0"
__all__ = [
    "HardLabelOracle",
    "ScoreOracle",
    "QueryBudgetExceeded",
    "DB3KDError",
    "ConfigError",
    "DatasetNotFoundError",
    "__version__",
]

_LAZY = {"HardLabelOracle": "db3kd.oracle", "ScoreOracle": "db3kd.oracle"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'db3kd' has no attribute {name!r}")
