"""Knowledge-distillation methods. Adding a method = one file with a Distiller + one line here."""
from kd.at import AT
from kd.base import Distiller
from kd.baseline import Baseline
from kd.byot import BYOT
from kd.dml import DML
from kd.fitnets import FitNets
from kd.hinton import KD

METHODS: dict[str, type[Distiller]] = {
    "Baseline": Baseline,
    "KD": KD,
    "AT": AT,
    "FitNets": FitNets,
    "DML": DML,
    "BYOT": BYOT,
}
