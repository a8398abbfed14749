"""JAX's persistent compilation cache, on by default, and a count of what each command compiled.

A restarted or repeated run (a resumed erasure, ``eval``, ``bench``) finds its programs in the
cache and skips XLA's backend compile (minutes for SD 1.5). Where the cache lives, first match:

1. ``COERASE_COMPILE_CACHE`` in the environment (a launcher points every host at shared storage);
2. ``compile.cache_dir`` in the config;
3. ``$XDG_CACHE_HOME/coerase-jax/xla``, else ``~/.cache/coerase-jax/xla``.

``off`` (or an empty string in 1 or 2) turns it off. Clearing it is deleting the folder: entries
are keyed by the program, the jax/XLA version and the device, so a stale entry is never used.

The erasure step and the bench's programs are also kept whole, as serialised executables in
``executables/`` under the same folder (``compile_program``), so that a warm start skips tracing
and lowering too; ``compile.executables=false`` or ``COERASE_EXECUTABLE_CACHE=off`` keeps XLA's
cache alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pickle
from importlib import metadata
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache.compilation_cache import reset_cache

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


def enable(setting: str = "auto", executables: bool = True) -> Path | None:
    """Turns the cache on for every program compiled from now on (all of them, however quick), and
    with ``executables`` the cache of whole executables below (``compile_program``)."""
    folder = cache_dir(setting)
    executables = executables and os.environ.get(ENV_EXECUTABLES, "on").strip().lower() not in OFF
    enable_executables(folder / "executables" if folder is not None and executables else None)
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
        self.executables_loaded = 0  # whole programs from the executable cache (no event of JAX's)
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
        return self.lookups - self.cache_hits, self.cache_hits + self.executables_loaded


@functools.cache
def counter() -> CompileCounter:
    """The process's one counter (listeners, once registered, stay)."""
    return CompileCounter()


# --------------------------------------------------------------------------- compiled executables
#
# XLA's cache above skips only the backend compile: every process still traces the step (the
# remat'd UNet inside the z_t scan, the loss, the optimizer) and lowers it to StableHLO, which for
# SD 1.5 takes longer than the compile itself. So the erasure step and the bench's programs are
# also kept as serialised executables, under ``<cache>/executables/``, keyed by everything the
# program is made of: this package's source, the library versions, the devices, the arguments'
# shapes, dtypes and shardings, and the ``static`` values the caller names (the config sections
# and model definitions its closures read). A warm start loads the executable and traces nothing.

ENV_EXECUTABLES = "COERASE_EXECUTABLE_CACHE"  # "off": keep using XLA's cache only
_executables: Path | None = None


def enable_executables(folder: Path | None) -> None:
    """Keeps executables in ``folder`` from now on (None: off, the default until ``enable``)."""
    global _executables
    _executables = None if folder is None else Path(folder)


@contextlib.contextmanager
def executables_in(folder: Path | None):
    """Executables kept in ``folder`` inside the block; the earlier setting again after it."""
    before = _executables
    enable_executables(folder)
    try:
        yield
    finally:
        enable_executables(before)


@functools.cache
def code_fingerprint() -> str:
    """A hash of every source file of this package: any code change makes every key new."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _environment() -> list:
    versions = [metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")]
    devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
    return [versions, devices, jax.process_index(), jax.process_count(), code_fingerprint()]


def describe(value) -> object:
    """A canonical, JSON-able description of ``value`` that is equal for equal programs' inputs.

    Arrays are described by dtype, shape and a hash of their bytes; abstract or placed arrays
    (ShapeDtypeStruct, jax.Array arguments) by shape, dtype and sharding; dataclasses (flax modules
    too) by type and fields; functions by name only (what they capture must be named in ``static``
    too). Anything else falls back on ``repr``, and a repr carrying an address is refused: it
    would give a key that never matches again."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, ml_collections.ConfigDict):
        return describe(value.to_dict())
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [describe(v) for v in value]]
    if isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        return ["ndarray", str(value.dtype), value.shape, hashlib.sha256(value.tobytes()).hexdigest()]
    if isinstance(value, (jax.Array, jax.ShapeDtypeStruct)):
        return ["array", str(value.dtype), tuple(value.shape), describe(getattr(value, "sharding", None))]
    if isinstance(value, jax.sharding.NamedSharding):
        return ["named", describe(value.mesh), str(value.spec), describe(value.memory_kind)]
    if isinstance(value, jax.sharding.Mesh):
        return ["mesh", list(value.axis_names), value.devices.shape, [d.id for d in value.devices.flat]]
    if isinstance(value, jax.sharding.Sharding):
        return [type(value).__name__, [d.id for d in value.device_set]]
    if isinstance(value, (np.dtype, type)):
        return str(value)
    if dataclasses.is_dataclass(value):
        fields = [f.name for f in dataclasses.fields(value) if f.name not in ("parent", "name")]
        return [type(value).__qualname__, {name: describe(getattr(value, name)) for name in fields}]
    if callable(value) and hasattr(value, "__qualname__"):
        return ["function", getattr(value, "__module__", ""), value.__qualname__]
    text = repr(value)
    if " at 0x" in text:
        raise TypeError(f"cannot describe {type(value).__qualname__} for a cache key: {text[:80]}")
    return [type(value).__qualname__, text]


def program_key(label: str, static, args) -> str:
    """The executable's name: ``label`` and a hash of the environment, ``static`` and the arguments."""
    arguments = [str(jax.tree_util.tree_structure(args)), [describe(a) for a in jax.tree_util.tree_leaves(args)]]
    text = json.dumps([label, _environment(), describe(static), arguments], sort_keys=True, default=str)
    return f"{label}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # readers see the whole file or none


@contextlib.contextmanager
def _past_xla_cache():
    """XLA's cache neither read nor written inside: what compiles here is compiled afresh. An
    executable that cache gave back cannot be serialised again on CPU (the copy lacks its kernels:
    "Function ... not found" when run), so the executables kept here never come from it."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    reset_cache()  # JAX decides once per process whether the cache is used; decide again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        reset_cache()


def _kept_path(label: str, static, args, suffix: str) -> Path | None:
    """Where this program's kept file lives; None when nothing is kept (off, or no stable key)."""
    if _executables is None:
        return None
    try:
        return _executables / f"{program_key(label, static, args)}{suffix}"
    except TypeError as err:
        print(f"coerase: not caching {label}{suffix} ({err})")
        return None


def compile_program(jitted, args, static, label: str):
    """``jitted.lower(*args).compile()``, or the executable an earlier process compiled from the
    same program. Returns ``(compiled, "compiled" | "loaded")``."""
    path = _kept_path(label, static, args, ".bin")
    if path is None:
        return jitted.lower(*args).compile(), "compiled"
    if path.is_file():
        try:
            payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
            by_id = {d.id: d for d in jax.devices()}
            loaded = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
            counter().executables_loaded += 1
            return loaded, "loaded"
        except Exception as err:  # unreadable or from an incompatible runtime: compile again
            print(f"coerase: could not load {path.name} ({type(err).__name__}: {str(err)[:120]}); compiling")
    with _past_xla_cache():
        compiled = jitted.lower(*args).compile()
    try:
        # its device assignment goes with it, in order (else it would be loaded onto every device);
        # read where jax's serialize() reads the executable, as jax's own cache passes it on load
        device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
        _write_atomically(path, pickle.dumps((*serialize_executable.serialize(compiled), device_ids)))
    except Exception as err:  # a program the runtime cannot serialise still runs
        print(f"coerase: could not save the {label} executable ({type(err).__name__}: {str(err)[:120]})")
    return compiled, "compiled"


def remembered(label: str, static, compute) -> dict:
    """``compute()`` (a JSON-able dict), kept beside the executables under the same kind of key:
    figures that would need a program traced again (the bench's FLOP counts)."""
    path = _kept_path(label, static, (), ".json")
    if path is None:
        return compute()
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    figures = compute()
    _write_atomically(path, json.dumps(figures).encode())
    return figures
