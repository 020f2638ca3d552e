"""Classic reference recommenders on the same splits: most-popular and SASRec.

``python -m hanorec.baselines --prepared-dir DIR --protocol candidates --out DIR`` trains and
evaluates both on prepared data (see :mod:`hanorec.baselines.__main__`).
"""

from hanorec.baselines.popularity import MostPopular
from hanorec.baselines.sasrec import SASRec, SASRecConfig

__all__ = ["MostPopular", "SASRec", "SASRecConfig"]
