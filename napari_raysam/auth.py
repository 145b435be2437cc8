"""The Ray auth token on this computer: the embedded cluster's token file, and tokens sent in the clear.

Ray's token is a bearer secret: whoever reads it can run code on the cluster. So the file is
owner-only from its first byte, and a token about to travel over plain ``http://`` to another
computer is warned about (loopback never leaves this computer, so it is not).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from backend import atomic

logger = logging.getLogger("napari_raysam")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an IP, IPv4-mapped IPv6 included) is this computer's loopback."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name other than localhost may resolve anywhere
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def in_clear_warning(dashboard_url: str) -> str | None:
    """One line saying why a token sent to ``dashboard_url`` can be read on the way, or None when it cannot."""
    parts = urlsplit(dashboard_url)
    if parts.scheme != "http" or is_loopback_host(parts.hostname or ""):
        return None
    return (
        f"the Ray token goes to {parts.hostname} over plain http, readable by anyone on the network path: "
        f"use https, or an SSH tunnel / kubectl port-forward and the address http://127.0.0.1:{parts.port or 8265}"
    )


def warn_if_token_in_clear(dashboard_url: str, token: str | None) -> None:
    """Log :func:`in_clear_warning` (one line, never the token) when a token would be sent in the clear."""
    warning = in_clear_warning(dashboard_url) if token else None
    if warning:
        logger.warning(warning)


def ensure_token_file(path: Path) -> str:
    """The token in ``path``, first creating the file (owner-only from its first byte) with a random token."""
    if not path.exists():
        atomic.write_text(path, secrets.token_hex(32), mode=atomic.PRIVATE_MODE)
    return path.read_text().strip()
