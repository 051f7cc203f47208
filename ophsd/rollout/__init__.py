"""Generation engines shared by student rollouts and harness calls.

``Engine`` is the interface; implementations (imported lazily, they pull in transformers):
``EmbeddedEngine`` (in-process, continuous batching), ``SGLangEngine`` (HTTP client for SGLang
servers or ``python -m ophsd.rollout.serve``), ``ServerLauncher``; ``push_weights`` streams
trainer weights into any of them.
"""

from ophsd.rollout.base import Completion, Engine, EngineError, InvalidRequestError, SamplingParams

__all__ = ["Completion", "Engine", "EngineError", "InvalidRequestError", "SamplingParams",
           "EmbeddedEngine", "SGLangEngine", "ServerLauncher", "push_weights"]

_LAZY = {
    "EmbeddedEngine": "ophsd.rollout.embedded",
    "SGLangEngine": "ophsd.rollout.sglang",
    "ServerLauncher": "ophsd.rollout.launcher",
    "push_weights": "ophsd.rollout.weight_sync",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ophsd.rollout' has no attribute {name!r}")
