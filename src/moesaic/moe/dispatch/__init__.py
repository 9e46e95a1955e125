"""Dispatchers group token copies by expert and scatter the results back, weighted."""

from moesaic.moe.dispatch.base import Dispatcher, DispatcherConfig, DispatchState

__all__ = ["Dispatcher", "DispatcherConfig", "DispatchState"]
