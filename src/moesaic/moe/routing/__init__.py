"""Routers, one per file, registered in :data:`moesaic.moe.routing.base.ROUTERS`; balance losses in ``losses``."""

from moesaic.moe.routing.base import Router, RouterConfig, stable_topk

__all__ = ["Router", "RouterConfig", "stable_topk"]
