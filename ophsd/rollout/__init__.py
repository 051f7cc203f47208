"""Generation engines shared by student rollouts and harness calls."""

from ophsd.rollout.base import Completion, Engine, EngineError, InvalidRequestError, SamplingParams

__all__ = ["Completion", "Engine", "EngineError", "InvalidRequestError", "SamplingParams"]
