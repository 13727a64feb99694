"""Sub-command modules of `sslsegment`; each exposes `register(subparsers)`."""

from __future__ import annotations

import json


def parse_key_values(pairs: list[str]) -> dict:
    """KEY=VALUE strings → dict; values are JSON when they parse as JSON (numbers, booleans, objects), else strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
