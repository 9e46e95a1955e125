"""Dispatchers turn a routing decision into a dispatch plan: token rows grouped by expert, with weights."""

from moesaic.moe.dispatch.base import Dispatcher, DispatcherConfig, sort_plan

__all__ = ["Dispatcher", "DispatcherConfig", "sort_plan"]
