"""A great-expectations suite (GX Core 1.x, as a plain dict) run on a DataFrame, and its results in
words: monitoring's quality check on a window, retraining's validation of a dataset.

The suite is data (``{"name", "expectations": [{"type", "kwargs"}]}``), stored with what it
describes (a version's profile, a model's retraining settings); it runs in an ephemeral GX context,
so nothing is written anywhere and nothing from before is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Outcome:
    """One expectation's result."""

    type: str  # expect_column_values_to_not_be_null, ...
    kwargs: dict[str, Any]
    success: bool
    unexpected_share: float  # of the rows (column expectations), 0 for table ones
    examples: list[Any] = field(default_factory=list)  # a few of the values that missed it
    observed: Any = None  # what a table or aggregate expectation saw (a row count, a number of values)

    @property
    def column(self) -> str:
        return str(self.kwargs.get("column", ""))

    @property
    def kind(self) -> str:
        return self.type.removeprefix("expect_column_").removeprefix("expect_")

    @property
    def mostly(self) -> float:
        return float(self.kwargs.get("mostly", 1.0))

    def words(self, examples: bool = True) -> str:
        """``'amount': values not null failed: 2.0% of rows miss it (at most 0.0% may)``, and a few
        of the values that missed it when ``examples``."""
        what = (
            f"'{self.column}': {words(self.kind, self.kwargs)}"
            if self.column
            else words(self.kind, self.kwargs)
        )
        if self.success:
            return f"{what} holds" + (f" ({self.unexpected_share:.1%} miss it)" if self.column else "")
        if self.observed is not None and not self.unexpected_share:
            return f"{what} failed: observed {self.observed}"
        text = (
            f"{what} failed: {self.unexpected_share:.1%} of rows miss it (at most {1 - self.mostly:.1%} may)"
        )
        return text + (f"; e.g. {self.examples}" if examples and self.examples else "")


def validate(frame: Any, suite: Mapping[str, Any]) -> list[Outcome]:
    """Every expectation of ``suite`` on ``frame`` (a pandas DataFrame), in the suite's order."""
    import logging
    import os

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    expectations = gx.ExpectationSuite(
        name=suite.get("name", "suite"),
        expectations=[
            ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"]).to_domain_obj()
            for e in suite.get("expectations", [])
        ],
    )
    batch = (
        context.data_sources.add_pandas("frame")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    outcomes = []
    for item in batch.validate(expectations, result_format="SUMMARY").results:
        config = item.expectation_config
        result = item.result or {}
        outcomes.append(
            Outcome(
                type=config.type,
                kwargs=dict(config.kwargs),
                success=bool(item.success),
                unexpected_share=float(result.get("unexpected_percent") or 0.0) / 100,
                examples=[plain(v) for v in (result.get("partial_unexpected_list") or [])[:5]],
                observed=plain(result.get("observed_value")),
            )
        )
    return outcomes


def words(kind: str, kwargs: Mapping[str, Any]) -> str:
    """An expectation in words: ``values between 0 and 16``."""
    if kind == "values_to_be_between":
        return f"values between {kwargs.get('min_value'):.4g} and {kwargs.get('max_value'):.4g}"
    if kind == "values_to_be_in_set":
        return f"values in {kwargs.get('value_set')}"
    if kind == "values_to_not_be_null":
        return "values not null"
    if kind == "to_exist":
        return "column exists"
    if kind == "table_row_count_to_be_between":
        return f"at least {kwargs.get('min_value')} rows"
    if kind == "unique_value_count_to_be_between":
        return f"at least {kwargs.get('min_value')} distinct values"
    if kind == "values_to_be_in_type_list":
        return f"values of type {kwargs.get('type_list')}"
    return kind.replace("_", " ")


def plain(value: Any) -> Any:
    """A value as JSON has it (numpy scalars unwrapped, NaN as null)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value
