"""Accuracy differences with their uncertainty: a policy against a reference on the same requests.

Two runs that answered the same requests are compared request by request (a paired difference), and
the interval comes from a bootstrap over users, not over requests: one user's requests are correlated
(the same history, a similar taste), so resampling requests would understate the spread. The relative
difference is a ratio of sums, (sum of the policy's metric - sum of the reference's) / sum of the
reference's, recomputed on each resample of users, and its 2.5th and 97.5th percentiles are the 95%
interval. An interval that holds zero is what "this policy costs nothing measurable here" means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000


@dataclass(frozen=True)
class PairedDifference:
    relative: float  # (policy - reference) / reference, over the paired requests
    ci95: tuple[float, float]  # bootstrap over users, percentile interval of `relative`
    se: float  # bootstrap standard error of `relative`
    absolute: float  # mean of (policy - reference) per request
    requests: int
    users: int

    def to_dict(self) -> dict:
        return {"relative": self.relative, "ci95": list(self.ci95), "se": self.se, "absolute": self.absolute,
                "requests": self.requests, "users": self.users}


def paired_difference(reference: list[float], policy: list[float], users: list, *, resamples: int = RESAMPLES,
                      seed: int = 0) -> PairedDifference | None:
    """The paired relative difference of `policy` against `reference`, where position i of both lists is
    the same request, made by user users[i]. None when there is nothing to compare (no request, or a
    reference that sums to zero)."""
    if not (len(reference) == len(policy) == len(users)):
        raise ValueError(f"paired lists differ in length: {len(reference)}, {len(policy)}, {len(users)}")
    ref, pol = np.asarray(reference, dtype=float), np.asarray(policy, dtype=float)
    if len(ref) == 0 or ref.sum() <= 0:
        return None
    _, user_index = np.unique(np.asarray(users, dtype=object).astype(str), return_inverse=True)
    n_users = int(user_index.max()) + 1
    ref_sum = np.bincount(user_index, weights=ref, minlength=n_users)  # [U]
    diff_sum = np.bincount(user_index, weights=pol - ref, minlength=n_users)  # [U]
    draws = np.random.default_rng(seed).multinomial(n_users, np.full(n_users, 1 / n_users), size=resamples)  # [R, U]
    denom = draws @ ref_sum
    boot = (draws @ diff_sum)[denom > 0] / denom[denom > 0]  # [R'] relative difference per resample
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedDifference(float(diff_sum.sum() / ref_sum.sum()), (float(low), float(high)), float(boot.std(ddof=1)),
                            float((pol - ref).mean()), len(ref), n_users)
