"""diffuse-engine: an inference engine for masked-diffusion language models (LLaDA, Dream)."""

from .config import ModelConfig
from .engine import Engine, EngineConfig, RequestOutput, StepOutput
from .llm import LLM
from .sampling_params import REMASKING, SamplingParams
from .version import __version__

__all__ = ["LLM", "REMASKING", "Engine", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams",
           "StepOutput", "__version__"]
