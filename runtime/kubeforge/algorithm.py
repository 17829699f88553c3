"""Settings read from the job's free-form `spec.algorithm` (camelCase keys, as in YAML).

The trainer, each app and the reward role read their own keys from the same section; keys a
settings class does not know belong to another reader and are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel


class AlgorithmSettings(BaseModel):
    """Base of every spec.algorithm reader: typed fields, camelCase keys, one clear error per bad key."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    @classmethod
    def from_algorithm(cls, algorithm: Mapping[str, Any] | None) -> Self:
        try:
            return cls.model_validate(dict(algorithm or {}))
        except ValidationError as e:
            error = e.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            if error["type"] == "value_error":  # a validator's own message already names the field
                raise ValueError(str(error["ctx"]["error"])) from None
            raise ValueError(f"spec.algorithm.{key}: got {error['input']!r}; {error['msg']}") from None
