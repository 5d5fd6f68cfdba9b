"""FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization"): v_t = v_{t-1} + d_t^2.

The rest of the step is shared with FedYogi and FedAdam (fedopt.py).
"""

from __future__ import annotations

from .base import register
from .fedopt import FedOpt


@register
class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def second_moment(self, v, d):
        return v + d.square()
