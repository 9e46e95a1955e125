"""``moesaic serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for moesaic checkpoints and
Hugging Face MoE folders, with continuous batching and MoE telemetry in ``/metrics``. docs/serve.md."""

from moesaic.serve.app import ServeConfig, create_app
from moesaic.serve.engine import Engine, Job, JobEvent, QueueFull
from moesaic.serve.server import READY_RE, build_app, launch, run_server, serve_in_thread

__all__ = ["READY_RE", "Engine", "Job", "JobEvent", "QueueFull", "ServeConfig", "build_app", "create_app", "launch",
           "run_server", "serve_in_thread"]
