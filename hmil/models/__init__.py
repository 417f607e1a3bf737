"""MIL models behind one interface: bag [N, D] → :class:`MILOutput`, built by name::

model = create_model("hmil", in_dim=features.shape[1], hierarchy=hierarchy)
output = model(features)  # MILOutput
"""

from hmil.models import abmil, clam, dsmil, hmil, mhim, transmil  # noqa: F401  (registers)
from hmil.models.output import MILOutput, coarse_probs_from_fine
from hmil.models.registry import create_model, list_models, register_model

__all__ = ["MILOutput", "coarse_probs_from_fine", "create_model", "list_models", "register_model"]
