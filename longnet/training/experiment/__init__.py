"""``longnet experiment``: LongNet against baselines at equal compute (issue 12 §2).

* :mod:`.plan`: settings, the six architectures and their equal FLOP budgets (arithmetic only);
* :mod:`.execute`: training each run through :func:`longnet.training.trainer.train` and
  evaluating its checkpoint on the test split;
* :mod:`.report`: the CSVs, plots and table;
* :mod:`.command`: the ``longnet experiment`` command line.
"""

from .plan import DEFAULT, QUICK, ModelSpec, Run, Settings, model_specs, plan_runs

__all__ = ["DEFAULT", "QUICK", "ModelSpec", "Run", "Settings", "model_specs", "plan_runs"]
