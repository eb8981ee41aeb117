"""Knowledge-distillation methods. Adding a method = one file with a Distiller + one line here."""
from kd.at import AT
from kd.base import Distiller
from kd.baseline import Baseline
from kd.byot import BYOT
from kd.crd import CRD
from kd.dist import DIST
from kd.dkd import DKD
from kd.dml import DML
from kd.fitnets import FitNets
from kd.hinton import KD
from kd.pkt import PKT
from kd.reviewkd import ReviewKD
from kd.rkd import RKD
from kd.sp import SP

METHODS: dict[str, type[Distiller]] = {
    "Baseline": Baseline,
    "KD": KD,
    "AT": AT,
    "FitNets": FitNets,
    "DML": DML,
    "BYOT": BYOT,
    "DKD": DKD,
    "DIST": DIST,
    "CRD": CRD,
    "ReviewKD": ReviewKD,
    "RKD": RKD,
    "SP": SP,
    "PKT": PKT,
    "KD_LS": KD,    # KD and DKD on standardized logits: the same classes with the
    "DKD_LS": DKD,  # reference's settings (`standardize` in METHODS_CONFIG)
}
