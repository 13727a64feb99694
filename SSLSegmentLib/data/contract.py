"""What the backend and the review side agree on: id and name rules, the uncertainty maps, the served volumes.

Standard library only, so the Slicer side, the backend and the benchmarks import the same rules. Each rule raises
`ValueError` with a message a user can act on; the backend turns it into a 4xx.
"""

from __future__ import annotations

import re

# Ids and names become file and folder names on the backend: a safe alphabet, no separators, no "..".
CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
AUTHOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^v[0-9]{4,9}$")

# The uncertainty maps a reviewer can be shown and whose regions can be reviewed, the heat map's default first.
UNCERTAINTY_KINDS = ("entropy", "mutual_information")
DEFAULT_UNCERTAINTY = UNCERTAINTY_KINDS[0]


def validate_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not CASE_ID_RE.match(case_id) or ".." in case_id:
        raise ValueError(f"invalid case id {case_id!r}: use letters, digits, '_', '-', '.' (max 128, no '..')")
    return case_id


def validate_author(author: str) -> str:
    if not isinstance(author, str) or not AUTHOR_RE.match(author) or ".." in author:
        raise ValueError(f"invalid author (annotator name) {author!r}: use letters, digits, '_', '-', '.' (max 64, no '..')")
    return author


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError(f"invalid model version {version!r}: expected v followed by digits, e.g. v0003")
    return version


def validate_uncertainty_kind(kind: str) -> str:
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {kind!r}")
    return kind


def validate_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold < 1.0:  # NaN fails both comparisons
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return threshold
