"""What ``flipback run`` would refuse about a valid config in a given environment, so
that ``flipback check`` reports it too (a config that checks must start). Pure: the
environment is passed in."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import yaml

from proxy.config.model import ProxyConfig
from proxy.config.yamlnodes import child, line_of


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_exposed(cfg: ProxyConfig, env: Mapping[str, str]) -> str | None:
    """Why the admin listener must not start (non-loopback, no token), or None."""
    if env.get(cfg.admin.token_env) or is_loopback(split_listen(cfg.admin.listen)[0]):
        return None
    return (f"{cfg.admin.listen} is not loopback and ${cfg.admin.token_env} is not set: "
            f"flipback run refuses to expose admin actions without a token (set "
            f"{cfg.admin.token_env}, or listen on 127.0.0.1)")


def run_refusals(cfg: ProxyConfig, text: str, env: Mapping[str, str]) -> list[str]:
    """Every refusal of ``run`` as ``FILE:LINE: path: message`` lines."""
    out: list[str] = []
    why = admin_exposed(cfg, env)
    if why is not None:
        out.append(f"{cfg.source}:{_line(text, 'admin', 'listen')}: admin.listen: {why}")
    return out


def _line(text: str, *path: str) -> int:
    """The line of ``path`` in the YAML text (1 when it is not written there)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return 1
    if node is None:
        return 1
    for key in path:
        found = child(node, key)
        if found is None:
            return line_of(node)
        node = found
    return line_of(node)
