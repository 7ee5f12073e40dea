"""Sample robustness (paper Sec. 3.2.1): a thin re-export of :mod:`db3kd.search`, the query engine.

Kept so that ``from db3kd.robustness import boundary_distance`` (and the other names below) keeps
working; new code imports from :mod:`db3kd.search`.
"""

from db3kd.search import (  # noqa: F401
    DEFAULT_MILESTONES,
    ESTIMATORS,
    RobustnessResult,
    boundary_distance,
    boundary_search,
    minimal_boundary_distance,
    minimal_boundary_search,
    plan_chunks,
    sample_distance,
)

__all__ = [
    "RobustnessResult",
    "sample_distance",
    "boundary_distance",
    "boundary_search",
    "minimal_boundary_distance",
    "minimal_boundary_search",
    "plan_chunks",
    "DEFAULT_MILESTONES",
    "ESTIMATORS",
]
