"""Review ordering: which unreviewed case `GET /cases/next` serves, and the case score the uncertainty orderings use.

A strategy is an object with a `name` and `pick(candidates) -> case_id`; the datastore hands it the candidates (the
split's unreviewed cases not leased by someone else) inside the transaction that takes the lease, so the choice and
the lease are one atomic step. New orderings are new classes in STRATEGIES; the datastore does not change.

The case score is the one rule for ranking a case under a model version: the mean and the sum of its normalised
entropy map (`SCORE_KIND`). Both the inference route and the worker's scoring pass after a promotion record it
through `record_score`.
"""

from __future__ import annotations

import numpy as np

from training.datastore import Candidate, Datastore, InvalidInput

# Total predictive uncertainty ranks cases: it is high wherever the model is wrong or unsure, which is what a
# reviewer's time is best spent on; the heat map shown in a review may be another kind.
SCORE_KIND = "entropy"


class UncertaintyOrder:
    """Highest mean uncertainty first; cases never scored come after the scored ones, by id."""

    name = "uncertainty"
    key = "score"

    def pick(self, candidates: list[Candidate]) -> str:
        scored = sorted((c for c in candidates if getattr(c, self.key) is not None),
                        key=lambda c: (-getattr(c, self.key), c.case_id))
        unscored = sorted((c for c in candidates if getattr(c, self.key) is None), key=lambda c: c.case_id)
        return (scored + unscored)[0].case_id


class UncertaintySumOrder(UncertaintyOrder):
    """Highest summed uncertainty first (favours cases with large uncertain regions)."""

    name = "uncertainty_sum"
    key = "score_sum"


class RandomOrder:
    """Uniform among the candidates (the baseline the uncertainty orderings are compared with)."""

    name = "random"

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng

    def pick(self, candidates: list[Candidate]) -> str:
        rng = self.rng or np.random.default_rng()
        return candidates[int(rng.integers(len(candidates)))].case_id


STRATEGIES = {cls.name: cls for cls in (UncertaintyOrder, UncertaintySumOrder, RandomOrder)}


def get_strategy(name: str, **kwargs):
    """The strategy object for a name; InvalidInput for an unknown one."""
    if name not in STRATEGIES:
        raise InvalidInput(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    return STRATEGIES[name](**kwargs)


def case_score(prediction) -> dict:
    """{"kind", "mean", "sum"} of a Prediction's score map (SCORE_KIND)."""
    u = prediction.uncertainty(SCORE_KIND)
    return {"kind": SCORE_KIND, "mean": float(u.mean()), "sum": float(u.sum())}


def record_score(store: Datastore, case_id: str, prediction, version: str) -> dict:
    """Score a case from a prediction of `version` and store it for the uncertainty orderings; returns the score."""
    score = case_score(prediction)
    store.set_score(case_id, score["mean"], score["sum"], version)
    return score
