"""Bayesian optimisation of the shaping weights (`pip install tokencredit[bo]`).

`BayesOpt` suggests simplex weights and learns from the objective you report (`suggest` / `observe` / `best`);
`Study` is its JSON file, saved after every change so a killed run resumes; `tokencredit bo run` drives it
against a live server (push the weights through the admin API, run your objective command, observe).
Importing this package imports neither torch nor botorch (they load on the first model fit).
"""

from tokencredit.bo.controller import BayesOpt
from tokencredit.bo.study import COMPLETE, FAILED, PENDING, Study, Trial

__all__ = ["BayesOpt", "Study", "Trial", "PENDING", "COMPLETE", "FAILED"]
