"""The base of every config section, shared by `collapse.config` and the evaluation modules.

Kept apart from `collapse.config` so that an evaluation module can declare its own section
(`eval.<name>`) without importing the config that is assembled from those modules.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
