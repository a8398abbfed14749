"""JAX's persistent compilation cache, on by default, and a count of what each command compiled.

A restarted or repeated run (a resumed erasure, ``eval``, ``bench``) finds its programs in the
cache and skips XLA's backend compile (minutes for SD 1.5). Where the cache lives, first match:

1. ``COERASE_COMPILE_CACHE`` in the environment (a launcher points every host at shared storage);
2. ``compile.cache_dir`` in the config;
3. ``$XDG_CACHE_HOME/coerase-jax/xla``, else ``~/.cache/coerase-jax/xla``.

``off`` (or an empty string in 1 or 2) turns it off. Clearing it is deleting the folder: entries
are keyed by the program, the jax/XLA version and the device, so a stale entry is never used.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax

ENV_CACHE = "COERASE_COMPILE_CACHE"
OFF = ("", "off", "none")


def cache_dir(setting: str = "auto", environ=os.environ) -> Path | None:
    """The folder the cache uses for this ``compile.cache_dir`` setting, or None when it is off."""
    chosen = environ.get(ENV_CACHE, setting)
    if chosen.strip().lower() in OFF:
        return None
    if chosen != "auto":
        return Path(chosen).expanduser()
    root = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return root / "coerase-jax" / "xla"


def enable(setting: str = "auto") -> Path | None:
    """Turns the cache on for every program compiled from now on (all of them, however quick)."""
    folder = cache_dir(setting)
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder


class CompileCounter:
    """Counts, from JAX's monitoring events, the programs XLA compiled and those the cache gave.

    A cache hit also reports a "backend compile" event (the call that looked it up), so the
    programs really compiled are those events less the hits."""

    def __init__(self):
        self.lookups = self.cache_hits = 0
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)

    def _event(self, name: str, **_) -> None:
        if name == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def _duration(self, name: str, _seconds: float, **_) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            self.lookups += 1

    def counts(self) -> tuple[int, int]:
        """(programs compiled, programs loaded from the cache) so far in this process."""
        return self.lookups - self.cache_hits, self.cache_hits


@functools.cache
def counter() -> CompileCounter:
    """The process's one counter (listeners, once registered, stay)."""
    return CompileCounter()
