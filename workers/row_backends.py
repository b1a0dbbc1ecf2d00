"""How coalition rows run fast: SDPA attention (with an eager switch for the one pass that reads attention
weights) and an optional `torch.compile`d row model. Separate from `model.py`, which owns layout and scoring."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from pathlib import Path

__all__ = ["CompiledRows", "compiled_row_model", "cpu_has_amx", "eager_attention", "from_pretrained_fast_attention",
           "onednn_linears", "wants_compile"]

logger = logging.getLogger("tokencredit.model")


_ATTENTION_SWITCH = threading.Lock()


def from_pretrained_fast_attention(auto_class, root, torch_dtype):
    """SDPA attention where the architecture has it (rows measured ~12 % faster than eager on the demo RM, CPU
    bf16; more on GPU), eager otherwise. `attention_row` switches to eager for the one pass that needs weights."""
    try:
        return auto_class.from_pretrained(root, dtype=torch_dtype, attn_implementation="sdpa")
    except (ValueError, ImportError):
        return auto_class.from_pretrained(root, dtype=torch_dtype, attn_implementation="eager")


@contextlib.contextmanager
def eager_attention(model):
    """Eager attention for one call: SDPA cannot return attention weights. Under a lock, so two threads never
    interleave the switch; a row batch running meanwhile in another thread is still correct, only slower."""
    with _ATTENTION_SWITCH:
        previous = getattr(model.config, "_attn_implementation", "eager")
        if previous != "eager":
            model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if previous != "eager":
                model.set_attn_implementation(previous)


def cpu_has_amx() -> bool:
    """The CPU has AMX tiles (Sapphire Rapids and later), where oneDNN's bf16 matmuls are several times faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no measurement says compiling pays there
        return False
    return "amx_bf16" in flags or "amx_tile" in flags


@functools.lru_cache(maxsize=None)
def _onednn_linear_type():
    import torch

    class OneDNNLinear(torch.nn.Module):
        """`torch.nn.Linear` through oneDNN's fp32 matmul, sharing the Linear's weight and bias."""

        def __init__(self, linear):
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    return OneDNNLinear


def onednn_linears(model):
    """A copy of `model` that shares its weights and runs its Linear layers through oneDNN instead of MKL's sgemm,
    or None where oneDNN cannot (not CPU, no mkldnn ops). Measured on the demo RM's padded score passes (AMD EPYC,
    AVX-512, one thread): 17 vs 26-30 ms per item, ×1.6 (MKL takes a slow path on non-Intel CPUs); scores differ
    by ~1e-6 of their value (other fp32 summation order)."""
    import copy

    import torch

    if next(model.parameters()).device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        probe = torch.nn.Linear(4, 3)
        with torch.inference_mode():
            torch.testing.assert_close(_onednn_linear_type()(probe)(torch.ones(2, 5, 4)), probe(torch.ones(2, 5, 4)))
    except Exception:  # a build without the op, or one that computes it differently: keep MKL
        return None
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    fast = copy.deepcopy(model, shared)  # new modules, same tensors
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, _onednn_linear_type()(child))
    return fast.eval()


def wants_compile(compile_rows, kind: str, device: str, amx: bool | None = None) -> bool:
    """Whether an RM's coalition rows run through `torch.compile`.

    `auto` compiles only where it was measured to pay: encoder rows on a CPU with AMX (×1.33 per row on the demo
    RM, bf16). On CPUs without AMX it measured ×1.06 (issue 14) for a 20-40 s compile, and it is not measured on
    GPU, so auto leaves it off there. `amx` overrides the CPU probe (tests).
    """
    if compile_rows not in ("on", "off", "auto"):
        raise ValueError(f"compile_rows must be auto, on or off, got {compile_rows!r}")
    if compile_rows == "auto":
        return kind == "encoder" and device == "cpu" and (cpu_has_amx() if amx is None else amx)
    return compile_rows == "on" and kind == "encoder"


class CompiledRows:
    """The row model under `torch.compile`, compiled off the request path.

    The first call starts the compile on a background thread with that call's inputs and runs the eager row
    model; every call runs eager until the graph is ready, then every call runs the graph. So a server is ready
    as soon as its model is loaded and warmed up eager (the compile takes 20-40 s on CPU), and switches over when
    the graph is. A compile that fails leaves the rows eager for good (logged once).

    Args:
        row_model: the eager row network (called with `input_ids`, `attention_mask`, `token_type_ids`).
        compiled: its compiled form (lazy: compiling happens at its first call).
        background: False compiles in the first call itself, as `torch.compile` does (a failure then raises to
            the caller, `RewardModel.scores`, which falls back to eager).
    """

    def __init__(self, row_model, compiled, background: bool = True):
        self.eager = row_model
        self.compiled = compiled
        self.background = background
        self.state = "idle"  # idle → compiling → ready | failed
        self.compile_seconds: float | None = None
        self._thread: threading.Thread | None = None

    def __call__(self, **inputs):
        if self.state == "ready":
            return self.compiled(**inputs)
        if not self.background:
            out = self.compiled(**inputs)
            self.state = "ready"
            return out
        if self.state == "idle":
            self._start(inputs)
        return self.eager(**inputs)

    def _start(self, inputs: dict) -> None:
        sample = {k: v.clone() for k, v in inputs.items() if v is not None}
        self.state = "compiling"
        self._thread = threading.Thread(target=self._compile, args=(sample,), name="tokencredit-compile-rows", daemon=True)
        self._thread.start()

    def _compile(self, sample: dict) -> None:
        import torch

        started = time.perf_counter()
        try:
            with torch.inference_mode():  # thread-local: the rows always run under it
                self.compiled(**sample)
        except Exception as exc:  # inductor needs a C++ toolchain; eager rows are always correct
            self.state = "failed"
            logger.warning("compiled rows failed (%s: %s); rows run eager from now on", type(exc).__name__, exc)
            return
        self.compile_seconds = time.perf_counter() - started
        self.state = "ready"
        logger.info("coalition rows compiled in %.1f s; they run compiled from now on", self.compile_seconds)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a started background compile ends; True when the graph is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state == "ready"


def compiled_row_model(row_model, background: bool = True) -> CompiledRows:
    """The row model under inductor with frozen weights (constant-folded, prepacked for oneDNN on CPU): measured
    on the demo RM, CPU bf16. Dynamic shapes so that new response lengths and chunk sizes do not recompile.
    Compiled in the background from its first call on (`CompiledRows`)."""
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights never change while serving; rows always run under inference_mode
    return CompiledRows(row_model, torch.compile(row_model, dynamic=True), background=background)
