"""Pure factorization math: layer specs in, factor layer specs out (docs/methods.md).

No graph surgery here: a pass picks the layers and the ranks (`tensorfold.passes.ranks.policy`)
and splices the returned specs into the graph. Every method works in float64 and stores the
factor weights as float32; ranks of grouped convs are per group. A layer a method cannot
factor raises `NotFactorable` (its `reason` is the skip reason); bad arguments raise
`PipelineError`. Each method has `check_*(spec) -> reason | None`, `*_max_rank(s)`,
`*_params` (for the ratio policy) and `*_layout` (zero-weight specs, for costing a rank).
"""
from __future__ import annotations

from ._common import NotFactorable
from .cp import (check_cp, cp_als, cp_factors, cp_kernel_shape, cp_layout, cp_max_rank, cp_params,
                 cp_realise, cp_specs, exact_cp, exact_cp_rank)
from .cp_epc import balance, cp_epc, sensitivity
from .spatial_svd import (check_spatial_svd, spatial_svd_layout, spatial_svd_max_rank, spatial_svd_params,
                          spatial_svd_specs)
from .sigma import cp_sigma_factors, sigma_error, sigma_spectrum, svd_sigma_factors, tucker2_sigma_factors
from .svd import check_svd, svd_factors, svd_realise, svd_layout, svd_max_rank, svd_params, svd_specs
from .tt import (check_tt, factorize_size, tt_layout, tt_max_ranks, tt_modes, tt_params, tt_ranks, tt_spec,
                 unfolding_matrices)
from .tucker2 import check_tucker2, tucker2_factors, tucker2_realise, tucker2_layout, tucker2_max_ranks, tucker2_params, tucker2_specs

__all__ = [
    "NotFactorable",
    "balance", "check_cp", "cp_als", "cp_epc", "cp_factors", "cp_kernel_shape", "cp_layout", "cp_max_rank",
    "cp_params", "cp_realise", "cp_specs", "exact_cp", "exact_cp_rank", "sensitivity",
    "check_spatial_svd", "spatial_svd_layout", "spatial_svd_max_rank", "spatial_svd_params", "spatial_svd_specs",
    "cp_sigma_factors", "sigma_error", "sigma_spectrum", "svd_sigma_factors", "tucker2_sigma_factors",
    "check_svd", "svd_factors", "svd_realise", "svd_layout", "svd_max_rank", "svd_params", "svd_specs",
    "check_tt", "factorize_size", "tt_layout", "tt_max_ranks", "tt_modes", "tt_params", "tt_ranks", "tt_spec",
    "unfolding_matrices",
    "check_tucker2", "tucker2_factors", "tucker2_realise", "tucker2_layout", "tucker2_max_ranks", "tucker2_params", "tucker2_specs",
]
