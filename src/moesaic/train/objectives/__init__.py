"""Training objectives, one file each, registered in :data:`moesaic.train.objectives.base.OBJECTIVES` and chosen
with ``train.objective: {kind: NAME, ...}`` (docs/training.md, "Training objectives")."""

from moesaic.train.objectives.base import LossPieces, Objective, ObjectiveConfig, ObjectiveContext

__all__ = ["LossPieces", "Objective", "ObjectiveConfig", "ObjectiveContext"]
