"""Benchmark building blocks: what the scripts in ``experiments/`` share.

Each script in ``experiments/`` is a thin command line over these modules; tests test them
here. The registry of methods is ``air_reg.zoo``.
"""
