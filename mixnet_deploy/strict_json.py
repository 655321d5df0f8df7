"""JSON that strict parsers (jq, JavaScript) read: NaN and infinity (a broken kernel's outputs, say) as null."""
from __future__ import annotations

import json
import math


def finite(data: object) -> object:
    """`data` with every NaN or infinity as None."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def dumps(data: object, **options: object) -> str:
    """`data` as strict JSON (options: json.dumps's)."""
    return json.dumps(finite(data), allow_nan=False, **options)
