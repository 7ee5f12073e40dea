"""Exceptions raised by db3kd. Every error a user can trigger derives from :class:`DB3KDError`."""

from __future__ import annotations


class DB3KDError(Exception):
    """Base class of every error db3kd raises on purpose (bad input, missing data, spent budget)."""


class QueryBudgetExceeded(DB3KDError):
    """The oracle refused a batch because answering it would exceed the query budget.

    Raised *before* the batch runs, so ``queries`` is the count answered so far and no partial batch
    was counted. Attributes: ``budget`` (int), ``queries`` (int, answered so far), ``requested`` (int,
    images in the refused call).
    """

    def __init__(self, budget: int, queries: int, requested: int):
        self.budget, self.queries, self.requested = budget, queries, requested
        super().__init__(
            f"query budget exceeded: budget is {budget} queries, {queries} already answered, "
            f"this call asks for {requested} more ({queries + requested} > {budget})"
        )


class DatasetNotFoundError(DB3KDError, FileNotFoundError):
    """Dataset files are missing or corrupt; the message says where they were looked for and how to get them."""


class ConfigError(DB3KDError, ValueError):
    """A configuration key is unknown, has the wrong type, or lies outside its allowed range."""
