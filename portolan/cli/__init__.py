"""The ``portolan`` command line.

`main.py` builds one argparse parser; each command module adds its subcommands with a
``register(subparsers)`` function and sets ``func`` on them: a callable taking the parsed
`argparse.Namespace` and returning the process exit code (0 ok, 1 the request failed, 2 the
command line or configuration was refused). Commands that need trio call ``trio.run`` inside.

- `serve`: the daemon (store -> index -> SVP server, management API, /metrics).
- `load`: import a starting state from a JSON document, all or nothing.
- `lookup`: SVP debugging client (``lookup vl2|vl3``, ``ping``, ``log``).
- ``admin`` (written with the API): ``cn``, ``network``, ``vnic``, ``rule`` commands; optional,
  `main` works without it.
"""

from __future__ import annotations

import ipaddress


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into (host, port); ValueError if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST:PORT (write IPv6 as [addr]:port)")
        port_text = rest[1:]
    elif text.count(":") > 1:
        raise ValueError(f"{text!r} is not HOST:PORT (write IPv6 as [addr]:port)")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{text!r} has no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    """The inverse of `parse_hostport`: IPv6 hosts get brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; any other name counts as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
