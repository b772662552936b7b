"""tvlars: LARS, LAMB and TVLARS for large-batch training, and the paper's study harness.

The optimizer library is ``tvlars.optim`` (torch only); its public API is re-exported here.
"""

from tvlars.optim import LAMB, LARS, TVLARS, LayerStats, TVFactorLR, anneal_factor_args, param_groups, tv_factor

__all__ = ["LARS", "LAMB", "TVLARS", "LayerStats", "TVFactorLR", "tv_factor", "anneal_factor_args", "param_groups"]
__version__ = "0.2.0"  # the one place: pyproject.toml reads it, the harness records it
