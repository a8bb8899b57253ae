"""Whether the Hugging Face hub can be reached, found out at once instead of after the hub client's retries."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """The user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


@functools.lru_cache(maxsize=1)
def reachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the hub (HF_ENDPOINT, default huggingface.co) opens within `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable_reason() -> str:
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    return f"the Hugging Face hub ({host}) cannot be reached from this machine"
