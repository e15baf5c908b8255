"""Search plugins: ``direct`` (POINT), ``files`` (DYNAMIC, JSON file), ``svp`` (DYNAMIC, SVP).

`PLUGINS` maps a plugin name to its class. ``svp`` lives in a sub-package written separately
and is imported on first use, so the daemon runs (direct, files) even when svp is absent or
broken; `get_plugin` raises `KeyError` for an unknown or unloadable plugin.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping

from varpd.plugins.base import Plugin

log = logging.getLogger("varpd.plugins")

# name -> "module:attribute"
_LAZY: dict[str, str] = {
    "direct": "varpd.plugins.direct:DirectPlugin",
    "files": "varpd.plugins.files:FilesPlugin",
    "svp": "varpd.plugins.svp:SvpPlugin",
}


class PluginRegistry(Mapping[str, type[Plugin]]):
    """A mapping that imports each plugin module the first time it is asked for."""

    def __init__(self, lazy: dict[str, str]) -> None:
        self._lazy = dict(lazy)
        self._loaded: dict[str, type[Plugin]] = {}
        self._failed: dict[str, str] = {}

    def register(self, cls: type[Plugin]) -> None:
        self._loaded[cls.name] = cls
        self._failed.pop(cls.name, None)

    def __getitem__(self, name: str) -> type[Plugin]:
        if name in self._loaded:
            return self._loaded[name]
        target = self._lazy.get(name)
        if target is None:
            raise KeyError(name)
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, attr)
        except Exception as exc:  # an absent or broken plugin must not take the daemon down
            reason = f"{type(exc).__name__}: {exc}"
            if self._failed.get(name) != reason:
                log.warning("search plugin %s cannot be loaded: %s", name, reason)
            self._failed[name] = reason
            raise KeyError(name) from exc
        self._loaded[name] = cls
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._lazy, *self._loaded]))

    def __len__(self) -> int:
        return len(set(self._lazy) | set(self._loaded))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def available(self) -> list[str]:
        return [name for name in self if name in self]


PLUGINS = PluginRegistry(_LAZY)


def get_plugin(name: str) -> type[Plugin]:
    return PLUGINS[name]
