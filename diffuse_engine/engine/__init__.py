"""The denoising engine (requests, schedules, batched steps)."""

from .engine import Engine, EngineConfig
from .request import RequestMetrics, RequestOutput, RequestStatus, StepOutput

__all__ = ["Engine", "EngineConfig", "RequestMetrics", "RequestOutput", "RequestStatus", "StepOutput"]
