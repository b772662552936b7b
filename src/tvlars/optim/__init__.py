"""Layer-wise adaptive optimizers: LARS, LAMB and TVLARS (torch only)."""

from ._base import LayerStats
from .factor import TVFactorLR, anneal_factor_args, tv_factor
from .groups import param_groups
from .lamb import LAMB
from .lars import LARS
from .tvlars import TVLARS

__all__ = ["LARS", "LAMB", "TVLARS", "LayerStats", "TVFactorLR", "tv_factor", "anneal_factor_args", "param_groups"]
