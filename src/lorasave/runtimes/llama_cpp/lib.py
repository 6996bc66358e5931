"""The optional llama.cpp runtime, through ctypes: load a GGUF (+ GGUF LoRA adapters), tokenize,
get the logits of every position, and quantize with llama.cpp's own ``llama_model_quantize``.

The shared libraries are the prebuilt ones of the npm package ``@node-llama-cpp/linux-x64@3.22.1``
(llama.cpp tag v0.5.0), installed by ``lorasave install-llama-cpp`` (see
:mod:`lorasave.runtimes.llama_cpp.install` for where). lorasave runs without them: only the commands that
need llama.cpp call :func:`require`.

The structs and signatures, copied from that tag's ``include/llama.h`` field by field, are
:mod:`lorasave.runtimes.llama_cpp.llama_h`. Load order: libggml-base,
libggml, ``ggml_backend_load_all_from_path`` (the CPU backends are separate libraries, one per
instruction set; ggml picks the best one for this CPU), then libllama. llama.cpp's log goes to
``logging.getLogger("lorasave.runtimes.llama_cpp.lib")`` at DEBUG.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from ctypes import POINTER, c_char_p, c_float, c_size_t, c_void_p
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from lorasave.errors import InvalidOptionError, LlamaCppError, LlamaCppNotInstalledError
from lorasave.pipeline.rename import apply_umask
from lorasave.runtimes.llama_cpp.install import INSTALL_COMMAND, LLAMA_CPP_TAG, PACKAGE, PACKAGE_VERSION, REQUIRED_FILES, default_dir, is_installed
from lorasave.runtimes.llama_cpp.llama_h import LLAMA_FUNCS, GgmlType, LlamaFlashAttnType, ggml_log_callback, llama_token
from lorasave.runtimes.llama_cpp.llama_h import QUANT_TYPES as QUANT_TYPES
from lorasave.runtimes.llama_cpp.llama_h import LlamaFtype as LlamaFtype  # re-exported: lib is the runtime's one entry point
from lorasave.runtimes.llama_cpp.llama_h import ggml_backend_sched_eval_callback as ggml_backend_sched_eval_callback
from lorasave.runtimes.llama_cpp.llama_h import llama_model_imatrix_data as llama_model_imatrix_data

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def request_amx() -> bool:
    """Ask Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``), as
    ggml's CPU backend does when it loads (``ggml_amx_init``), but early.

    The kernel refuses it (ENOSPC) once any thread of the process has an alternate signal stack too
    small for the enlarged signal frame (Ray's in-process driver installs one); ggml then still picks
    its Sapphire Rapids variant on an AMX CPU and its first ``tileloadd`` dies with SIGILL. Asking
    before such a library runs makes the permission stick for the whole process. A no-op (False)
    off Linux x86-64 or on a CPU without AMX.
    """
    import platform

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(158, 0x1023, 18)) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError):
        return False


class _Runtime:
    """The loaded libraries (one per process: llama.cpp's backend registry is global)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._log_buf: list[str] = []
        self._log_cb = ggml_log_callback(self._on_log)  # kept referenced: C holds the pointer
        mode = getattr(os, "RTLD_NOW", 2) | getattr(os, "RTLD_LOCAL", 0)
        request_amx()
        try:
            base = ctypes.CDLL(str(folder / REQUIRED_FILES[0]), mode=mode)
            ggml = ctypes.CDLL(str(folder / REQUIRED_FILES[1]), mode=mode)
            base.ggml_log_set.argtypes, base.ggml_log_set.restype = [ggml_log_callback, c_void_p], None
            base.ggml_log_set(self._log_cb, None)  # backend loading logs too
            ggml.ggml_backend_load_all_from_path.argtypes, ggml.ggml_backend_load_all_from_path.restype = [c_char_p], None
            ggml.ggml_backend_load_all_from_path(os.fsencode(folder))
            ggml.ggml_backend_dev_count.argtypes, ggml.ggml_backend_dev_count.restype = [], c_size_t
            if ggml.ggml_backend_dev_count() == 0:
                raise LlamaCppError(f"no ggml backend in {folder} loads on this CPU; reinstall with {INSTALL_COMMAND} --force", path=folder)
            lib = ctypes.CDLL(str(folder / REQUIRED_FILES[2]), mode=mode)
            for name, (restype, argtypes) in LLAMA_FUNCS.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except (OSError, AttributeError) as e:
            if isinstance(e, LlamaCppError):
                raise
            raise LlamaCppError(f"could not load the llama.cpp runtime from {folder} ({e}); reinstall it with {INSTALL_COMMAND} --force", path=folder) from e
        self.base, self.ggml, self.lib = base, ggml, lib
        lib.llama_log_set(self._log_cb, None)
        lib.llama_backend_init()

    def _on_log(self, level: int, text: bytes | None, user_data: int | None) -> None:
        """llama.cpp's log lines (sent in pieces, CONT continuing the previous one) to ``logger.debug``."""
        try:
            self._log_buf.append((text or b"").decode("utf-8", "replace"))
            if self._log_buf[-1].endswith("\n"):
                msg = "".join(self._log_buf).rstrip()
                self._log_buf.clear()
                if msg:
                    logger.debug("llama.cpp: %s", msg)
        except Exception:  # an exception must never cross into C
            self._log_buf.clear()


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def runtime_dir() -> Path:
    """Where the runtime is looked for (see :func:`lorasave.runtimes.llama_cpp.install.default_dir`)."""
    return default_dir()


def available() -> bool:
    """True when the runtime is installed in :func:`runtime_dir` (nothing is loaded by this call)."""
    return is_installed(runtime_dir())


def require() -> None:
    """Check that the runtime is installed, without loading it.

    Raises:
        LlamaCppNotInstalledError: the runtime is not installed; the message names the install command.
    """
    if not available():
        raise LlamaCppNotInstalledError(
            f"this needs the llama.cpp runtime ({PACKAGE}@{PACKAGE_VERSION}, llama.cpp {LLAMA_CPP_TAG}), not found in {runtime_dir()}; "
            f"install it with: {INSTALL_COMMAND}",
            path=runtime_dir(),
        )


def _lib() -> Any:
    """The loaded ``libllama`` (loaded, and llama_backend_init called, once per process).

    Raises:
        LlamaCppNotInstalledError: not installed.
        LlamaCppError: installed but does not load.
    """
    global _runtime
    require()
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime(runtime_dir())
        return _runtime.lib  # one runtime per process, whatever runtime_dir() says later


def _existing(path: PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise LlamaCppError(f"{what} {p} does not exist or is not a file", path=p)
    return os.fsencode(p)


class LlamaCppModel:
    """A GGUF model (plus GGUF LoRA adapters) loaded in llama.cpp, on the CPU.

    Use as a context manager (``with LlamaCppModel(path) as m: ...``); everything is freed on
    exit (or by :meth:`close`). Loading happens in the constructor.

    Args:
        gguf_path: the model file.
        loras: ``(adapter.gguf, scale)`` pairs, applied as ``llama_set_adapters_lora`` does
            (llama.cpp multiplies each by its ``alpha / rank``).
        n_ctx: the most tokens one :meth:`logits` call takes (context, batch and micro-batch size).
        precise: an F32 KV cache and no flash attention, so that the logits depend on the GGUF's
            weights alone (on the tiny test Llama: 5e-7 of max |logit| from transformers). False:
            llama.cpp's defaults (F16 KV cache, flash attention, which rounds Q through F16 on the
            CPU: about 1e-3 of max |logit|), as ``llama-cli`` runs it.
        n_threads: CPU threads of ``llama_decode`` (``n_threads``, ``n_threads_batch``); None = every core.

    Raises:
        LlamaCppNotInstalledError: the runtime is not installed.
        LlamaCppError: a file is missing, or llama.cpp refused the model, an adapter or the context.
    """

    def __init__(
        self, gguf_path: PathLike, *, loras: Sequence[tuple[PathLike, float]] = (), n_ctx: int = 512, precise: bool = True, n_threads: int | None = None
    ) -> None:
        self._lib = _lib()
        self.path = Path(gguf_path)
        self._model: int | None = None
        self._ctx: int | None = None
        self._adapters: list[int] = []
        if n_ctx < 1 or (n_threads is not None and n_threads < 1):
            raise InvalidOptionError(f"n_ctx and n_threads must be at least 1, not {n_ctx} and {n_threads}")
        lib = self._lib
        try:
            mparams = lib.llama_model_default_params()
            mparams.n_gpu_layers = 0
            self._model = lib.llama_model_load_from_file(_existing(gguf_path, "GGUF model"), mparams)
            if not self._model:
                raise LlamaCppError(f"llama.cpp could not load {gguf_path} (see the debug log: lorasave --debug)", path=gguf_path)
            for path, _ in loras:
                adapter = lib.llama_adapter_lora_init(self._model, _existing(path, "GGUF LoRA adapter"))
                if not adapter:
                    raise LlamaCppError(f"llama.cpp could not load the LoRA adapter {path} onto {gguf_path}", path=path)
                self._adapters.append(adapter)
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count() or 1
            cparams.no_perf = True
            if precise:
                cparams.type_k = cparams.type_v = GgmlType.F32
                cparams.flash_attn_type = LlamaFlashAttnType.DISABLED
            self._ctx = lib.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise LlamaCppError(f"llama.cpp could not create a context of {n_ctx} tokens for {gguf_path}", path=gguf_path)
            if self._adapters:
                n = len(self._adapters)
                ptrs = (c_void_p * n)(*self._adapters)
                scales = (c_float * n)(*[float(s) for _, s in loras])
                if lib.llama_set_adapters_lora(self._ctx, ptrs, n, scales) != 0:
                    raise LlamaCppError(f"llama.cpp could not apply the LoRA adapters to {gguf_path}", path=gguf_path)
            self._vocab = lib.llama_model_get_vocab(self._model)
            self.n_vocab: int = int(lib.llama_vocab_n_tokens(self._vocab))
            # llama.cpp may round n_ctx up; one decode takes at most n_batch tokens
            self.n_ctx: int = min(int(lib.llama_n_ctx(self._ctx)), int(lib.llama_n_batch(self._ctx)))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Free the context, the adapters and the model (in that order); safe to call twice."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        for adapter in getattr(self, "_adapters", []):
            lib.llama_adapter_lora_free(adapter)
        self._adapters = []
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def _live(self) -> None:
        if not self._ctx:
            raise LlamaCppError(f"the llama.cpp model {self.path} is closed", path=self.path)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` with the GGUF's own tokenizer (``llama_tokenize``).

        Args:
            add_special: add BOS/EOS as the GGUF's ``tokenizer.ggml.add_*_token`` say.
            parse_special: turn special-token text (``<|endoftext|>``) into its id.

        Raises:
            LlamaCppError: llama.cpp failed to tokenize.
        """
        self._live()
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):  # INT32_MIN: overflow in llama.cpp
                break
            cap = -n
        raise LlamaCppError(f"llama.cpp could not tokenize a text of {len(data)} bytes", path=self.path)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits of every position, from one ``llama_decode`` of ``token_ids`` on an empty memory.

        Returns:
            float32 array of shape ``(len(token_ids), n_vocab)``; row ``i`` predicts token ``i + 1``.

        Raises:
            InvalidOptionError: no tokens, more than ``n_ctx``, or an id outside ``[0, n_vocab)``.
            LlamaCppError: ``llama_decode`` failed.
        """
        self._live()
        ids = [int(t) for t in token_ids]
        n = len(ids)
        if n == 0 or n > self.n_ctx:
            raise InvalidOptionError(f"logits() takes 1 to {self.n_ctx} tokens (n_ctx), not {n}; pass a larger n_ctx")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidOptionError(f"token id {bad[0]} is outside the vocabulary of {self.path} ({self.n_vocab} tokens)")
        lib = self._lib
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(ids):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            rc = _fresh_thread(lambda: int(lib.llama_decode(self._ctx, batch)))
            if rc != 0:
                raise LlamaCppError(f"llama_decode failed with code {rc} on {n} tokens of {self.path}", path=self.path)
            out = np.empty((n, self.n_vocab), dtype=np.float32)
            for i in range(n):
                row = lib.llama_get_logits_ith(self._ctx, i)
                if not row:
                    raise LlamaCppError(f"llama.cpp returned no logits for position {i} of {self.path}", path=self.path)
                out[i] = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
            return out
        finally:
            lib.llama_batch_free(batch)


def _fresh_thread(fn: Any) -> Any:
    """``fn()`` on a new thread (the GIL is released in C; this thread waits).

    ggml's AMX kernels (its Sapphire Rapids CPU variant) configure the calling thread's tiles once
    (a thread-local flag); torch's oneDNN releases the tiles of the threads it runs on, so a later
    ggml call on such a thread loads tiles that are not configured and dies with SIGILL (seen in a
    long test process: dmesg ``invalid opcode`` at ``tileloadd``). A fresh thread has no such history.
    """
    box: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # handed back to the caller
            errors.append(e)

    t = threading.Thread(target=run, name="lorasave-llama-decode")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return box[0]


def _ggml_type_value(t: str | int) -> int:
    """A GGML type name (``ggml_type_name``, any case, as llama-quantize's ``parse_ggml_type``) or value -> ``enum ggml_type``.

    Raises:
        InvalidOptionError: an unknown name or value.
    """
    import gguf

    try:
        return int(gguf.GGMLQuantizationType(t) if isinstance(t, int) else gguf.GGMLQuantizationType[str(t).upper()])
    except (KeyError, ValueError):
        raise InvalidOptionError(f"unknown GGML type {t!r}") from None


def quantize(
    src_gguf: PathLike,
    dst_gguf: PathLike,
    type: str,
    *,
    nthread: int = 0,
    pure: bool = False,
    output_tensor_type: str | int | None = None,
    token_embedding_type: str | int | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Quantize a GGUF with llama.cpp's ``llama_model_quantize`` (what ``llama-quantize`` runs).

    The per-tensor choices (which tensors stay F32, the fallbacks for rows not divisible by the
    block size, the tensors promoted in mixes such as q4_k_m) are llama.cpp's
    (``src/llama-quant.cpp``). The output is written beside ``dst_gguf`` and renamed into place.

    Args:
        src_gguf: an F32/F16/BF16 GGUF.
        dst_gguf: the file to write (replaced if it exists).
        type: a llama-quantize type name: ``"q4_k_m"``, ``"q6_k"``, ``"q4_0"``, ``"q8_0"``, ... (see ``QUANT_TYPES``).
        nthread: threads; 0 = all cores.
        pure: ``llama_model_quantize_params.pure`` (llama-quantize ``--pure``): no per-tensor mix.
        output_tensor_type: ``.output_tensor_type`` (``--output-tensor-type``): a GGML type name
            (``"q8_0"``, any case) or ``enum ggml_type`` value; None = llama.cpp's choice.
        token_embedding_type: ``.token_embedding_type`` (``--token-embedding-type``), the same way.
        imatrix: ``.imatrix`` (``--imatrix``): GGUF tensor name -> float32 1-D importance, the values
            llama-quantize hands over (``formats.gguf.imatrix.Imatrix.importances``); None for none.

    Raises:
        InvalidOptionError: unknown ``type`` or GGML type name.
        LlamaCppNotInstalledError: the runtime is not installed.
        LlamaCppError: ``src_gguf`` is missing, or llama.cpp failed (its message is in the debug log).
    """
    ftype = QUANT_TYPES.get(type.lower())
    if ftype is None:
        raise InvalidOptionError(f"unknown quantization type {type!r}; choose one of {', '.join(QUANT_TYPES)}")
    lib = _lib()
    src = _existing(src_gguf, "GGUF model")
    dst = Path(dst_gguf)
    params = lib.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.pure = bool(pure)
    if output_tensor_type is not None:
        params.output_tensor_type = _ggml_type_value(output_tensor_type)
    if token_embedding_type is not None:
        params.token_embedding_type = _ggml_type_value(token_embedding_type)
    if imatrix is not None:  # NULL-terminated; the arrays stay referenced until the call returns
        kept = {name.encode(): np.ascontiguousarray(values, dtype=np.float32).reshape(-1) for name, values in imatrix.items()}
        entries = (llama_model_imatrix_data * (len(kept) + 1))()
        for i, (name, values) in enumerate(kept.items()):
            entries[i] = llama_model_imatrix_data(name, values.ctypes.data_as(POINTER(c_float)), values.size)
        params.imatrix = ctypes.cast(entries, c_void_p)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".lorasave-tmp", dir=dst.parent)
    os.close(fd)
    try:
        rc = lib.llama_model_quantize(src, os.fsencode(tmp), ctypes.byref(params))
        if rc != 0:
            raise LlamaCppError(f"llama.cpp could not quantize {src_gguf} to {type} (code {rc}; see the debug log: lorasave --debug)", path=src_gguf)
        apply_umask(Path(tmp))  # mkstemp made it 0600; an output file follows the umask
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
