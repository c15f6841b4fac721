"""Benchmark building blocks: what the scripts in ``experiments/`` share.

Each script in ``experiments/`` is a thin command line over these modules; tests test them
here. The registry of methods is ``air_reg.zoo``.

- ``pairs``: the benchmark pairs (``benchmark_batches``) and known deformations of them;
- ``training``: ``train_for(experiment, data, budget, out)`` and ``export`` (shipped weights);
- ``tables``: the tables' writers (``write_tables``, ``seed_table``, the compact tables);
- ``reproduction``: Table 1 and Fig. 3 (``experiments/reproduce.py``);
- ``convergence``: Table 1 trained to a plateau (``experiments/converge.py``);
- ``refinement``: one-shot vs cascade vs refined, refinement speed (the one door to
  ``air_reg.refine`` for the benchmarks);
- ``brain``, ``brain_report``: the brain MRI benchmark (``experiments/brain_mri.py``);
- ``families``, ``family_bench``: 2-D pairs with known fields (small, large, contrast change)
  from images inside the installed wheels, and the benchmark over them
  (``experiments/refine_families.py``);
- ``machine``: what a report says about the machine; ``speed``: the speed benchmark.
"""
