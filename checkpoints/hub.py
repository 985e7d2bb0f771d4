"""Is the Hugging Face Hub reachable? Asked once, up front, so that with no network a command
fails in seconds with one line (huggingface_hub and datasets retry for 25-27 s before they
give up)."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (offline mode, no DNS, no route), or None when a TCP
    connection to its host opens within `timeout_s`. Behind a proxy nothing is probed (None):
    a direct connection failing says nothing about the proxy's."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{url.hostname}: {err.strerror or err}"
    return None
