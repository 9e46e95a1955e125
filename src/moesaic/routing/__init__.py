"""Routers, one per file, registered in :data:`moesaic.registry.ROUTERS`; balance losses in ``losses``."""

from moesaic.routing.base import Router, RouterConfig, stable_topk

__all__ = ["Router", "RouterConfig", "stable_topk"]
