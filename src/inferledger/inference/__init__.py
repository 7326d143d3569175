"""Inference backends behind one small protocol (see :mod:`inferledger.inference.base`).

Backends are imported lazily by :func:`load_backend`, so choosing ``scripted`` or
``openai_http`` never imports torch or transformers, nor anything but ``llama_cpp`` the
optional llama-cpp-python.
"""

from __future__ import annotations

from typing import Any

from inferledger.inference.base import (
    UNKNOWN_TOKEN_ID,
    Backend,
    BackendError,
    BackendUnavailable,
    Event,
    Finish,
    FinishReason,
    GenerationParams,
    Hidden,
    Message,
    Token,
    UnsupportedFeature,
    UpstreamError,
)

BACKEND_NAMES = ("transformers", "llama_cpp", "scripted", "openai_http")

__all__ = [
    "BACKEND_NAMES",
    "UNKNOWN_TOKEN_ID",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Event",
    "Finish",
    "FinishReason",
    "GenerationParams",
    "Hidden",
    "Message",
    "Token",
    "UnsupportedFeature",
    "UpstreamError",
    "load_backend",
]


def load_backend(name: str, /, **options: Any) -> Backend:
    """Build the backend called ``name``; ``options`` go to its constructor."""
    if name == "transformers":
        try:
            from inferledger.inference.transformers_backend import TransformersBackend
        except ImportError as error:
            raise BackendUnavailable(
                f"transformers backend needs torch and transformers ({error}); "
                "run `pip install torch==2.13.0` then `pip install transformers accelerate gguf`"
            ) from error
        return TransformersBackend(**options)
    if name == "llama_cpp":
        from inferledger.inference.llama_cpp_backend import LlamaCppBackend

        return LlamaCppBackend(**options)
    if name == "scripted":
        from inferledger.inference.scripted import ScriptedBackend

        return ScriptedBackend(**options)
    if name == "openai_http":
        from inferledger.inference.openai_http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
