"""The distillation methods: the `Distiller` base (base.py), how a method declares itself and the registry
(registry.py), the helpers several methods share (common.py), and one file per method, which registers it.

Adding a method: its file, one import line below, and its entry in final.py's METHODS_CONFIG.
"""
from kd.methods.base import Distiller
from kd.methods.registry import METHODS, Method, register

# Each import registers its method; their order is the order of `--methods all` and of the results.
from kd.methods import baseline  # noqa: E402, F401  isort: skip
from kd.methods import kd  # noqa: E402, F401  isort: skip
from kd.methods import at  # noqa: E402, F401  isort: skip
from kd.methods import fitnets  # noqa: E402, F401  isort: skip
from kd.methods import dml  # noqa: E402, F401  isort: skip
from kd.methods import byot  # noqa: E402, F401  isort: skip
from kd.methods import dkd  # noqa: E402, F401  isort: skip
from kd.methods import dist_kd  # noqa: E402, F401  isort: skip
from kd.methods import crd  # noqa: E402, F401  isort: skip
from kd.methods import reviewkd  # noqa: E402, F401  isort: skip
from kd.methods import rkd  # noqa: E402, F401  isort: skip
from kd.methods import sp  # noqa: E402, F401  isort: skip
from kd.methods import pkt  # noqa: E402, F401  isort: skip
from kd.methods import kd_ls  # noqa: E402, F401  isort: skip
from kd.methods import dkd_ls  # noqa: E402, F401  isort: skip
from kd.methods import wttm  # noqa: E402, F401  isort: skip
from kd.methods import ctkd  # noqa: E402, F401  isort: skip
from kd.methods import normkd  # noqa: E402, F401  isort: skip
from kd.methods import mlkd  # noqa: E402, F401  isort: skip
from kd.methods import ofa  # noqa: E402, F401  isort: skip

# The method every gain is measured against; the teacher trains as it does (cross-entropy alone).
REFERENCE = "Baseline"

__all__ = ["METHODS", "REFERENCE", "Distiller", "Method", "register"]
