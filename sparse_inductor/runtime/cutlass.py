"""Build, cache, load and call CUTLASS kernels generated as C++ (lowering/cutlass_24.py writes them).

- The toolchain: nvcc (SPARSE_INDUCTOR_NVCC, else $CUDA_HOME/bin/nvcc, else PATH, else
  /usr/local/cuda/bin) and the CUTLASS headers (SPARSE_INDUCTOR_CUTLASS_DIR: a CUTLASS checkout or
  any folder holding include/cutlass and tools/util/include; else the pip package nvidia-cutlass,
  `pip install 'sparse_inductor[cutlass]'`, whose cutlass_library/source/ has both).
  `available(device)` says why the family cannot run somewhere (None where it can).
- One shared library per generated source, built with nvcc for sm_90a (`nvcc_command`), several
  at a time (`build_many`: a pool of nvcc subprocesses; SPARSE_INDUCTOR_CUTLASS_JOBS caps it, else
  the CPU count and ~6 GB of free memory per build: one sm90 CUTLASS translation unit took 5.2 GB
  and 106 s on a shared 2-core machine). Cached on disk under SPARSE_INDUCTOR_CUTLASS_CACHE_DIR
  (default `<SPARSE_INDUCTOR_CACHE_DIR or Inductor's cache>/sparse_inductor/cutlass`), keyed by
  a digest of the source text itself (which the generator derives from the kernel's config), the
  nvcc flags and arch, and the CUTLASS and nvcc versions (`_key`); written by an atomic
  rename, so concurrent builders never see half a file.
- Loaded with ctypes (no torch headers in the library: any torch version can load it); `GemmLibrary`
  checks tensors (shape, dtype, device, contiguity, 16-byte alignment: each error names the bad
  input) and launches on `torch.cuda.current_stream()`. The library itself checks its arguments
  and CUTLASS's `can_implement` before it launches anything, and returns a code instead.

Nothing here knows about torch.fx or Inductor.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Iterable, Optional

import torch

log = logging.getLogger("sparse_inductor")

__all__ = ["ENV_CUTLASS_DIR", "ENV_NVCC", "ENV_CACHE_DIR", "ENV_JOBS", "nvcc_path", "nvcc_version",
           "cutlass_dirs", "cutlass_version", "available", "nvcc_command", "cache_dir", "library_path",
           "build", "build_many", "CutlassBuildError", "CutlassCallError", "GemmSignature", "GemmLibrary",
           "load_gemm", "GEMM_PARAMS", "gemm_call_args"]

ENV_CUTLASS_DIR = "SPARSE_INDUCTOR_CUTLASS_DIR"
ENV_NVCC = "SPARSE_INDUCTOR_NVCC"
ENV_CACHE_DIR = "SPARSE_INDUCTOR_CUTLASS_CACHE_DIR"
ENV_JOBS = "SPARSE_INDUCTOR_CUTLASS_JOBS"
_ENV_ROOT = "SPARSE_INDUCTOR_CACHE_DIR"  # measure.py's root: the libraries go in <root>/cutlass

ARCH = "sm_90a"
CANNOT_IMPLEMENT = 1000 + 11  # the library's code for cutlass::Status::kInvalid, can_implement's "no"
MIN_NVCC = (12, 2)  # CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED
_BUILD_GB = 6.0  # memory one build may take (5.2 GB measured for one translation unit)


class CutlassBuildError(RuntimeError):
    """nvcc failed on a generated source; the message ends with the tail of its output."""


class CutlassCallError(RuntimeError):
    """A generated function refused its arguments or failed (nothing was launched when it refused)."""


# ----------------------------------------------------------------------------------------------
# The toolchain
# ----------------------------------------------------------------------------------------------

def nvcc_path() -> Optional[str]:
    explicit = os.environ.get(ENV_NVCC)
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found is None and os.path.isfile("/usr/local/cuda/bin/nvcc"):  # CUDA's default install
        found = "/usr/local/cuda/bin/nvcc"
    return found


@functools.lru_cache(maxsize=8)
def _nvcc_version_of(nvcc: str) -> Optional[tuple[int, int, str]]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    full = re.search(r"V(\d+\.\d+\.\d+)", out)
    return (int(m.group(1)), int(m.group(2)), full.group(1) if full else "") if m else None


def nvcc_version(nvcc: Optional[str] = None) -> Optional[tuple[int, int, str]]:
    """(major, minor, full version string) of nvcc, or None."""
    nvcc = nvcc or nvcc_path()
    return _nvcc_version_of(nvcc) if nvcc else None


def _dirs_under(root: str) -> Optional[tuple[str, str]]:
    for inc in (os.path.join(root, "include"), root):
        if os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")):
            base = os.path.dirname(inc) if inc != root else root
            util = os.path.join(base, "tools", "util", "include")
            if os.path.isfile(os.path.join(util, "cutlass", "util", "packed_stride.hpp")):
                return inc, util
    return None


def cutlass_dirs() -> Optional[tuple[str, str]]:
    """(include dir, tools/util/include dir) of the CUTLASS headers, or None."""
    explicit = os.environ.get(ENV_CUTLASS_DIR)
    if explicit:
        return _dirs_under(explicit)
    spec = importlib.util.find_spec("cutlass_library")  # the pip package nvidia-cutlass; not imported
    if spec is None or not spec.origin:
        return None
    return _dirs_under(os.path.join(os.path.dirname(spec.origin), "source"))


def cutlass_version() -> Optional[str]:
    dirs = cutlass_dirs()
    if dirs is None:
        return None
    try:
        with open(os.path.join(dirs[0], "cutlass", "version.h")) as f:
            text = f.read()
    except OSError:
        return None
    parts = [re.search(rf"#define CUTLASS_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def _toolchain_why_not() -> Optional[str]:
    nvcc = nvcc_path()
    if nvcc is None:
        return f"nvcc not found (put it on PATH, or set CUDA_HOME or {ENV_NVCC})"
    ver = nvcc_version(nvcc)
    if ver is None:
        return f"nvcc at {nvcc} did not report a version"
    if ver[:2] < MIN_NVCC:
        return f"nvcc {ver[0]}.{ver[1]}: CUTLASS's sm90 sparse GEMM needs CUDA {MIN_NVCC[0]}.{MIN_NVCC[1]} or newer"
    if cutlass_dirs() is None:
        where = f" in {ENV_CUTLASS_DIR}={os.environ[ENV_CUTLASS_DIR]}" if os.environ.get(ENV_CUTLASS_DIR) else ""
        return f"CUTLASS headers not found{where}: pip install 'sparse_inductor[cutlass]'"
    return None


def available(device=None) -> Optional[str]:
    """None where the CUTLASS family can run on `device` (a torch.device or string; None: only the
    toolchain is checked), else the reason."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"needs a CUDA device, got {device.type}"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) != (9, 0):  # sm_90a code runs on sm90 only (not on sm100 / sm120)
            return f"needs sm90 (Hopper: H100 / H200), got sm{major}{minor}"
    return _toolchain_why_not()


# ----------------------------------------------------------------------------------------------
# Building and the disk cache
# ----------------------------------------------------------------------------------------------

def nvcc_command(source: str, output: str, *, nvcc: Optional[str] = None, arch: str = ARCH,
                 shared: bool = True) -> list[str]:
    """The nvcc command line for one generated translation unit (`shared=False`: an object file)."""
    dirs = cutlass_dirs()
    if dirs is None:
        raise CutlassBuildError(_toolchain_why_not() or "CUTLASS headers not found")
    compute = arch.replace("sm_", "compute_")
    cmd = [nvcc or nvcc_path() or "nvcc", "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
           f"-gencode=arch={compute},code={arch}", "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden",
           "-I", dirs[0], "-I", dirs[1]]
    cmd += ["-shared"] if shared else ["-c"]
    return cmd + ["-o", output, source]


def cache_dir() -> str:
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return explicit
    root = os.environ.get(_ENV_ROOT)
    if not root:
        # Inductor's internals: loaded by the compile that calls this
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

        root = os.path.join(inductor_cache_dir(), "sparse_inductor")
    return os.path.join(root, "cutlass")


def _key(name: str, source: str, arch: str) -> str:
    """What the library's bytes depend on: the source, the arch, nvcc's flags (the header folders
    left out: where they lie differs between machines; the CUTLASS version names their contents)
    and the CUTLASS and nvcc versions. Not torch's: the library does not link it. So a library
    built on one machine serves another with the same toolchain."""
    ver = nvcc_version()
    flags = [f for f in nvcc_command("x.cu", "x.so", nvcc="nvcc", arch=arch)[1:] if not os.path.isabs(f)]
    parts = [name, source, arch, " ".join(flags), cutlass_version() or "?", ver[2] if ver else "?"]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def library_path(name: str, source: str, arch: str = ARCH) -> str:
    """Where the library of this source is (or will be) cached."""
    return os.path.join(cache_dir(), f"{name}_{_key(name, source, arch)}.so")


_build_locks: dict[str, threading.Lock] = {}
_build_locks_guard = threading.Lock()


def build(name: str, source: str, *, arch: str = ARCH, describe: str = "", timeout: Optional[float] = None) -> str:
    """The path of the shared library of `source`, compiled now unless cached. Logs a line when a
    compile starts and its time when it ends."""
    why = _toolchain_why_not()
    if why:
        raise CutlassBuildError(why)
    path = library_path(name, source, arch)
    with _build_locks_guard:
        lock = _build_locks.setdefault(path, threading.Lock())
    with lock:
        if os.path.isfile(path):
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        src_path = path[:-3] + ".cu"
        if not os.path.isfile(src_path):
            _write_atomic(src_path, source)
        log.info("sparse_inductor: compiling CUTLASS kernel %s%s with nvcc", name, f" ({describe})" if describe else "")
        start = time.perf_counter()
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        try:
            proc = subprocess.run(nvcc_command(src_path, tmp, arch=arch), capture_output=True, text=True,
                                  timeout=timeout)
            if proc.returncode != 0:
                out = (proc.stderr + proc.stdout).strip().splitlines()
                raise CutlassBuildError(f"nvcc failed on {src_path} (rc {proc.returncode}):\n" + "\n".join(out[-30:]))
            os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep the cache private to one user
            os.replace(tmp, path)
        except subprocess.TimeoutExpired as e:
            raise CutlassBuildError(f"nvcc took more than {timeout} s on {src_path}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("sparse_inductor: compiled CUTLASS kernel %s in %.1f s", name, time.perf_counter() - start)
        return path


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _default_jobs(n: int) -> int:
    env = os.environ.get(ENV_JOBS)
    if env:
        return max(1, int(env))
    jobs = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        jobs = min(jobs, max(1, int(avail_kb / 2**20 / _BUILD_GB)))
    except (OSError, StopIteration, ValueError):
        pass
    return max(1, min(jobs, n))


def build_many(items: Iterable[tuple], *, jobs: Optional[int] = None, arch: str = ARCH,
               timeout: Optional[float] = None) -> list:
    """Build (name, source[, describe]) items in parallel (nvcc subprocesses); per item the library
    path or the exception that stopped it (one failure does not stop the others)."""
    items = [tuple(it) + ("",) * (3 - len(it)) for it in items]
    if not items:
        return []
    jobs = jobs or _default_jobs(len(items))
    results: list = [None] * len(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(build, name, src, arch=arch, describe=desc, timeout=timeout): i
                   for i, (name, src, desc) in enumerate(items)}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as e:  # noqa: BLE001 - reported per item
                results[i] = e
    return results


# ----------------------------------------------------------------------------------------------
# Calling a generated GEMM library
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GemmSignature:
    """What one generated library computes, as the launcher must check it (made by the lowering).

    suffix: the functions' name suffix; dtype: W's values and x; out_dtype: y; bias_dtype /
    aux_dtype: None where the epilogue reads none; weight_scale / token_scale: None, "vector"
    (fp32 [N] / [M]) or "tensor" (one fp32); streamk: the call's `splits` may be other than 1;
    tile_k: the metadata layout's tile K (formats/cutlass_sm90.layout_tile_k).
    """

    suffix: str
    dtype: torch.dtype
    out_dtype: torch.dtype
    bias_dtype: Optional[torch.dtype] = None
    aux_dtype: Optional[torch.dtype] = None
    weight_scale: Optional[str] = None
    token_scale: Optional[str] = None
    streamk: bool = False
    tile_k: int = 128


_P, _I, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
# The parameters of the generated si_gemm_SUFFIX, in its order (lowering/cutlass_24.py writes the
# function; tests/test_cutlass.py checks its signature against these names). The call is made
# from a dict by name (`gemm_call_args`): ctypes takes raw addresses, so a pointer in the wrong
# place is no error, only wrong outputs or an illegal address.
GEMM_PARAMS = ("a_values", "a_meta", "x", "y", "bias", "aux", "weight_scale", "token_scale", "M", "N", "K",
               "splits", "workspace", "workspace_bytes", "stream")
# (restype, argtypes) of each generated function si_NAME_SUFFIX (a test reads them against the source)
_FUNCTIONS = {
    "gemm": (_I, [_P] * 8 + [_I] * 4 + [_P, _SZ, _P]),
    "can_implement": (_I, [_I] * 4),
    "workspace": (_SZ, [_I] * 4),
    "compress": (_I, [_P, _P, _P, _I, _I, _P, _SZ, _P]),
    "compress_workspace": (_SZ, [_I, _I]),
    "compressed_shape": (None, [_I, _I, ctypes.POINTER(ctypes.c_longlong)]),
    "host_compress": (_I, [_P, _P, _P, _I, _I]),
    "error_string": (ctypes.c_char_p, [_I]),
}


def gemm_call_args(**kw) -> tuple:
    """si_gemm's positional arguments from keywords named as GEMM_PARAMS (every one given)."""
    if set(kw) != set(GEMM_PARAMS):
        raise TypeError(f"si_gemm arguments: missing {sorted(set(GEMM_PARAMS) - set(kw))}, "
                        f"unknown {sorted(set(kw) - set(GEMM_PARAMS))}")
    return tuple(kw[p] for p in GEMM_PARAMS)


_libs: dict[str, ctypes.CDLL] = {}
_libs_guard = threading.Lock()


def _load(path: str) -> ctypes.CDLL:
    with _libs_guard:
        lib = _libs.get(path)
        if lib is None:
            lib = _libs[path] = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0))
        return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class GemmLibrary:
    """A loaded library: y = epilogue(x @ W^T) with W compressed in CUTLASS's layout."""

    def __init__(self, path: str, sig: GemmSignature):
        self.path, self.sig = path, sig
        lib = _load(path)
        s = sig.suffix

        def fn(name):
            f = getattr(lib, f"si_{name}_{s}")
            f.restype, f.argtypes = _FUNCTIONS[name]
            return f

        self._gemm = fn("gemm")
        self._can = fn("can_implement")
        self._ws = fn("workspace")
        self._compress = fn("compress")
        self._compress_ws = fn("compress_workspace")
        self._shape = fn("compressed_shape")
        self._host_compress = fn("host_compress")
        self._err = fn("error_string")

    # -- helpers ---------------------------------------------------------------------------
    def error_string(self, code: int) -> str:
        if code == CANNOT_IMPLEMENT:  # GemmUniversalAdapter::can_implement's only refusal
            return ("CUTLASS's can_implement refused the problem (TMA: the rows of x, the compressed W, "
                    "y and aux must be multiples of 16 bytes)")
        return self._err(int(code)).decode(errors="replace")

    def _raise(self, what: str, code: int):
        raise CutlassCallError(f"CUTLASS kernel {self.sig.suffix}: {what} returned {code} ({self.error_string(code)})")

    def compressed_shape(self, n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
        out = (ctypes.c_longlong * 4)()
        self._shape(n, k, out)
        return (out[0], out[1]), (out[2], out[3])

    def can_implement(self, m: int, n: int, k: int, splits: int = 1) -> int:
        """0 where the kernel takes this problem, else the code it would refuse it with."""
        return int(self._can(m, n, k, splits))

    def workspace_bytes(self, m: int, n: int, k: int, splits: int = 1) -> int:
        return int(self._ws(m, n, k, splits))

    # -- compression -----------------------------------------------------------------------
    def _compressed_buffers(self, w: torch.Tensor):
        n, k = w.shape
        (vr, vc), (me, ke) = self.compressed_shape(n, k)
        values = torch.zeros(vr, vc, dtype=w.dtype, device=w.device)
        meta = torch.zeros(me, ke, dtype=torch.uint8, device=w.device)
        return values, meta

    def _check_weight(self, w: torch.Tensor):
        _check(w, "W", self.sig.dtype, (None, None))
        if w.shape[1] % 4:
            raise ValueError(f"W: K={w.shape[1]} is not a multiple of 4")

    def compress_on_device(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CUTLASS's own compressor kernel on W [N, K] (CUDA): (values, meta)."""
        self._check_weight(w)
        _check_cuda(w, "W")
        values, meta = self._compressed_buffers(w)
        n, k = w.shape
        ws = int(self._compress_ws(n, k))
        work = torch.empty(max(ws, 1), dtype=torch.uint8, device=w.device)
        with torch.cuda.device(w.device):
            rc = self._compress(w.data_ptr(), values.data_ptr(), meta.data_ptr(), n, k, work.data_ptr(), ws,
                                torch.cuda.current_stream(w.device).cuda_stream)
        if rc:
            self._raise("compress", rc)
        return values, meta

    def compress_on_host(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The library's host port of the same compressor on a CPU W (for tests without a GPU)."""
        self._check_weight(w)
        if w.device.type != "cpu":
            raise ValueError(f"W: compress_on_host needs a CPU tensor, got {w.device}")
        values, meta = self._compressed_buffers(w)
        rc = self._host_compress(w.data_ptr(), values.data_ptr(), meta.data_ptr(), w.shape[0], w.shape[1])
        if rc:
            if rc == 2004:
                raise ValueError("W is not 2:4 along K: a group of four has more than two nonzeros")
            self._raise("host_compress", rc)
        return values, meta

    # -- the GEMM --------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, *,
                 bias: Optional[torch.Tensor] = None, aux: Optional[torch.Tensor] = None,
                 weight_scale: Optional[torch.Tensor] = None, token_scale: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None, splits: int = 1) -> torch.Tensor:
        """y [M, N] = epilogue(x [M, K] @ W^T), W [n, K] given compressed as (values, meta)."""
        sig = self.sig
        if x.dim() != 2:
            raise ValueError(f"x: expected a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
        m, k = x.shape
        _check(x, "x", sig.dtype, (m, k))
        device = x.device
        (vr, vc), (me, ke) = self.compressed_shape(n, k)
        _check(values, "values", sig.dtype, (vr, vc), device)
        _check(meta, "meta", torch.uint8, (me, ke), device)
        e_bytes = torch.empty((), dtype=sig.dtype).element_size()
        k_mult = 32 // e_bytes  # the compressed row (K / 2 values) must be a multiple of 16 bytes
        if k % k_mult:
            raise ValueError(f"x: K={k} must be a multiple of {k_mult} for {sig.dtype} (TMA's 16-byte rows)")
        for dt, what in ((sig.out_dtype, "y"), (sig.aux_dtype, "aux")):
            mult = 16 // torch.empty((), dtype=dt).element_size() if dt is not None else 1
            if n % mult:
                raise ValueError(f"N={n} must be a multiple of {mult} for a {dt} {what} (TMA's 16-byte rows)")
        # a kernel with a bias adds 0 without one
        if bias is not None and _present(bias, "bias", sig.bias_dtype is not None, ""):
            _check(bias, "bias", sig.bias_dtype, (n,), device)
        if _present(aux, "aux", sig.aux_dtype is not None, f"{sig.aux_dtype}, shape [{m}, {n}]"):
            _check(aux, "aux", sig.aux_dtype, (m, n), device)
        for t, name, kind, length in ((weight_scale, "weight_scale", sig.weight_scale, n),
                                      (token_scale, "token_scale", sig.token_scale, m)):
            if not _present(t, name, kind is not None, f"{kind}, fp32"):
                continue
            if kind == "vector":
                t = t.reshape(-1) if t.dim() == 2 and 1 in t.shape else t
                _check(t, name, torch.float32, (length,), device)
            else:
                if t.numel() != 1:
                    raise ValueError(f"{name}: expected one number (a per-tensor scale), got shape {tuple(t.shape)}")
                _check(t.reshape(()), name, torch.float32, (), device, align=4)
            if name == "weight_scale":
                weight_scale = t
            else:
                token_scale = t
        if out is None:
            out = torch.empty(m, n, dtype=sig.out_dtype, device=device)
        else:
            _check(out, "out", sig.out_dtype, (m, n), device)
        if splits != 1 and not sig.streamk:
            raise ValueError(f"splits={splits}: this kernel has no stream-K scheduler (splits must be 1)")
        _check_cuda(x, "x")  # last: every other check also runs on CPU tensors (tests)
        if m == 0:
            return out
        ws = self.workspace_bytes(m, n, k, splits)
        work = torch.empty(ws, dtype=torch.uint8, device=device) if ws else None
        with torch.cuda.device(device):
            rc = self._gemm(*gemm_call_args(
                a_values=values.data_ptr(), a_meta=meta.data_ptr(), x=x.data_ptr(), y=out.data_ptr(),
                bias=_ptr(bias), aux=_ptr(aux), weight_scale=_ptr(weight_scale), token_scale=_ptr(token_scale),
                M=m, N=n, K=k, splits=splits, workspace=_ptr(work), workspace_bytes=ws,
                stream=torch.cuda.current_stream(device).cuda_stream))
        if rc:
            self._raise("gemm", rc)
        return out


def _check_cuda(t: torch.Tensor, name: str):
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got {t.device}")


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple, device=None, align: int = 16):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (x's device)")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (row-major), got strides {t.stride()}")
    if t.numel() and t.data_ptr() % align:
        raise ValueError(f"{name}: data pointer must be {align}-byte aligned (TMA), got address {t.data_ptr():#x}")


def _present(t: Optional[torch.Tensor], name: str, wanted: bool, what: str) -> bool:
    """Whether the epilogue input `t` is there to be checked: an error where it is given but not
    read, or read but not given."""
    if not wanted:
        if t is not None:
            raise ValueError(f"{name}: this kernel's epilogue reads no {name}")
        return False
    if t is None:
        raise ValueError(f"{name}: this kernel's epilogue needs one ({what})")
    return True


def load_gemm(path: str, sig: GemmSignature) -> GemmLibrary:
    return GemmLibrary(path, sig)
