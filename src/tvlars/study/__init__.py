"""The study: ``tvlars sweep`` (run a grid), ``tvlars report`` (Table 1), ``tvlars plot`` (figures).

Everything here reads and writes run folders (see docs/ARCHITECTURE.md, "Run folder");
nothing here imports torch at module level.
"""
