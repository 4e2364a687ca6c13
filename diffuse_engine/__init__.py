"""diffuse-engine: an inference engine for masked-diffusion language models (LLaDA, Dream)."""

from .config import ModelConfig
from .engine import Engine, EngineConfig, RequestOutput, StepOutput
from .entrypoints.async_engine import AsyncEngine
from .entrypoints.llm import LLM
from .sampling_params import REMASKING, SamplingParams
from .version import __version__

__all__ = ["LLM", "REMASKING", "AsyncEngine", "Engine", "EngineConfig", "ModelConfig", "RequestOutput",
           "SamplingParams", "StepOutput", "__version__"]
