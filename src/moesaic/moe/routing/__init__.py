"""Routers, one per file, registered in :data:`moesaic.core.registry.ROUTERS`; balance losses in ``losses``."""

from moesaic.moe.routing.base import Router, RouterConfig, stable_topk

__all__ = ["Router", "RouterConfig", "stable_topk"]
