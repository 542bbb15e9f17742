"""Results as JSON values: what `luncher --json` prints and `healthyluncher.to_json` returns."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def to_json(result: Any) -> Any:
    """A result as JSON values, as the `--json` of the matching `luncher` command prints it:
    dataclasses as objects (or as their own `to_json()` gives them), paths as strings,
    floats rounded to 6 digits, NaN and infinities as None. `json.dumps` takes the answer.

    >>> json.dumps(healthyluncher.to_json(lun.predict(["lunch.jpg"])[0]))
    '{"path": "lunch.jpg", "label": "healthy", "probability": 0.93, ...}'
    """
    if hasattr(result, "to_json") and not isinstance(result, type):
        # Its own form: a retrain's names as the CLI prints them, a photo held in memory
        # as its name rather than its megabytes.
        return to_json(result.to_json())
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {f.name: to_json(getattr(result, f.name)) for f in dataclasses.fields(result)}
    if isinstance(result, dict):
        return {str(k): to_json(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [to_json(v) for v in result]
    if isinstance(result, float):
        return round(result, 6) if math.isfinite(result) else None
    if isinstance(result, (str, int, bool)) or result is None:
        return result
    return str(result)
