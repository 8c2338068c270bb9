"""oneDNN's direct convolutions as XLA custom calls (CPU only).

Why: XLA:CPU runs every convolution as Eigen's im2col + GEMM. For the 16-channel convolutions of a
CIFAR ResNet's first stage, building the im2col panels takes 40-44% of the convolution's time, and
the weight gradient needs transposed copies of its activations besides (docs/performance.md).
oneDNN, the library behind PyTorch's CPU convolutions, has direct (JIT-compiled, im2col-free)
kernels for the forward pass and both gradients, but only on its *blocked* activation layout
`nChw{B}c`: channels split into blocks of B, the block innermost, B = 16 on AVX-512 processors and
8 on AVX2 ones (`BLOCK`). Here that layout is a plain array of shape (N, C/B, H, W, B).
`conv2d_nhwc` takes and returns NHWC, like `lax.conv`, so the models never see the layout: the
reorders around each call are transposes that XLA fuses into the neighbouring BN/ReLU/addition
(and with B = 16, a 16-channel first stage needs none at all).

How: each distinct convolution (pass, shapes, stride, padding) becomes one oneDNN primitive,
created when jax traces the call, and one XLA FFI target whose handler (a ctypes callback,
`ffi_ctypes`) runs it on XLA's buffers, without copies. The handler is Python but does little:
~165 calls per ResNet-56 train step, against ~1.3 s of convolution work. Kernels are stored
HWIO like `nnx.Conv`'s (checkpoints do not change); they are reordered to oneDNN's weight
layouts inside the jitted computation (a few thousand numbers per layer).

The shared library comes from the `onednn-cpu-gomp` wheel (Intel's oneDNN 3.2 build with GNU
OpenMP; a dependency on Linux x86-64). `available()` says whether it loaded; the backend choice
(`resnet_jax.backends.select`) falls back to XLA's convolutions when it did not.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from resnet_jax.backends import cpu_isa
from resnet_jax.backends.onednn import ffi_ctypes

ENV_LIBRARY = "RESNET_JAX_ONEDNN_LIBRARY"  # path of libdnnl.so.3, overriding the wheel's
ENV_BLOCK = "RESNET_JAX_ONEDNN_BLOCK"  # 8 or 16, overriding the channel block chosen by ISA


def _channel_block() -> int:
    """oneDNN's native channel block on this CPU: 16 (`nChw16c`) with AVX-512, else 8."""
    if os.environ.get(ENV_BLOCK):
        block = int(os.environ[ENV_BLOCK])
        if block not in (8, 16):
            raise ValueError(f"${ENV_BLOCK}={block} is not valid; choose 8 or 16.")
        return block
    return 16 if cpu_isa() == "avx512" else 8


BLOCK = _channel_block()

# oneDNN C API constants (oneapi/dnnl/dnnl_types.h, v3.2).
_F32, _CPU_ENGINE, _DEFAULT_STREAM = 3, 1, 1
_FORWARD_TRAINING, _DIRECT = 64, 1
# Format tags (dnnl_format_tag_t) by our names: activations "blocked" (nChw{B}c), weights "w_io"
# (OIhw{B}i{B}o: forward and weight gradient), "w_oi" (OIhw{B}o{B}i: input gradient) and
# "w_first" (Ohwi{B}o: a first layer reading NCHW images), for each channel block B.
_TAGS = {8: {"nchw": 5, "blocked": 102, "w_io": 107, "w_oi": 100, "w_first": 216},
         16: {"nchw": 5, "blocked": 78, "w_io": 79, "w_oi": 75, "w_first": 211}}[BLOCK]
_ARG_SRC, _ARG_WEIGHTS, _ARG_DST = 1, 33, 17
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_QUERY_IMPL_INFO_STR, _QUERY_EXEC_ARG_MD = 8, 255

_Dims = ctypes.c_int64 * 12


class OneDNNError(RuntimeError):
    """oneDNN could not be loaded, or refused a convolution."""


# --------------------------------------------------------------------------------------------
# Loading the library


def _library_path() -> str | None:
    if os.environ.get(ENV_LIBRARY):
        return os.environ[ENV_LIBRARY]
    try:
        files = importlib.metadata.files("onednn-cpu-gomp") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith("libdnnl.so.3"):
            return str(f.locate())
    return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    path = _library_path()
    if path is None:
        return None, ("the onednn-cpu-gomp package is not installed "
                       f"(pip install onednn-cpu-gomp, or set ${ENV_LIBRARY})")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, f"loading {path} failed: {e}"
    lib.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
    return lib, ""


def available() -> bool:
    """True when oneDNN's library is installed and loads on this machine."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise OneDNNError(f"oneDNN is not available: {why}.")
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise OneDNNError(f"oneDNN {what} failed with status {status}.")


@functools.cache
def _engine() -> ctypes.c_void_p:
    engine = ctypes.c_void_p()
    _check(_lib().dnnl_engine_create(ctypes.byref(engine), _CPU_ENGINE, 0), "engine_create")
    return engine


def _memory_desc(dims: Sequence[int], tag: str) -> ctypes.c_void_p:
    md = ctypes.c_void_p()
    _check(_lib().dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(dims), _Dims(*dims),
                                                   _F32, _TAGS[tag]), "memory_desc_create")
    return md


# --------------------------------------------------------------------------------------------
# Primitives: one per (pass, shapes); created at trace time, run by the FFI handler.


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


@dataclass
class _Primitive:
    handle: ctypes.c_void_p
    in_args: tuple[int, ...]  # oneDNN argument ids of the custom call's operands, in order
    out_arg: int
    mds: dict[int, ctypes.c_void_p]
    implementation: str  # e.g. "jit:avx2"; "ref:any" would be oneDNN's slow reference code


_PRIMITIVES: dict[str, _Primitive] = {}
_THREAD = threading.local()  # per XLA thread: a oneDNN stream and memory objects per primitive


def _primitive(desc: ctypes.c_void_p, in_args: tuple[int, ...], out_arg: int) -> _Primitive:
    lib = _lib()
    handle = ctypes.c_void_p()
    _check(lib.dnnl_primitive_create(ctypes.byref(handle), desc), "primitive_create")
    mds = {a: ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(desc, _QUERY_EXEC_ARG_MD, a))
           for a in (*in_args, out_arg)}
    impl = ctypes.c_char_p()
    lib.dnnl_primitive_desc_query(desc, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(impl))
    return _Primitive(handle, in_args, out_arg, mds, (impl.value or b"?").decode())


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution as oneDNN sees it (logical NCHW / OIHW sizes)."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: int
    padding: tuple[int, int, int, int]  # top, bottom, left, right
    src: str  # "blocked", or "nchw" for a first layer whose channels are no multiple of BLOCK

    @property
    def out_hw(self) -> tuple[int, int]:
        pt, pb, pl, pr = self.padding
        return ((self.h + pt + pb - self.kh) // self.stride + 1,
                (self.w + pl + pr - self.kw) // self.stride + 1)

    @property
    def weights_tag(self) -> str:
        """oneDNN's weight layout for the forward pass and the weight gradient."""
        return "w_first" if self.src == "nchw" else "w_io"

    @property
    def key(self) -> str:
        p = "_".join(map(str, self.padding))
        return (f"{self.n}x{self.c_in}x{self.h}x{self.w}_{self.c_out}x{self.kh}x{self.kw}"
                f"_s{self.stride}_p{p}_{self.src}")


def _create(shape: ConvShape) -> None:
    """Creates the forward, input-gradient and weight-gradient primitives of `shape`."""
    lib, eng = _lib(), _engine()
    ho, wo = shape.out_hw
    src = _memory_desc([shape.n, shape.c_in, shape.h, shape.w], shape.src)
    dst = _memory_desc([shape.n, shape.c_out, ho, wo], "blocked")
    w_dims = [shape.c_out, shape.c_in, shape.kh, shape.kw]
    w_fwd = _memory_desc(w_dims, shape.weights_tag)
    pt, pb, pl, pr = shape.padding
    strides, dilation = _Dims(shape.stride, shape.stride), _Dims(0, 0)
    pad_l, pad_r = _Dims(pt, pl), _Dims(pb, pr)
    fwd, bwd_data, bwd_weights = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.dnnl_convolution_forward_primitive_desc_create(
        ctypes.byref(fwd), eng, _FORWARD_TRAINING, _DIRECT, src, w_fwd, None, dst,
        strides, dilation, pad_l, pad_r, None), f"convolution {shape.key} (forward)")
    _check(lib.dnnl_convolution_backward_weights_primitive_desc_create(
        ctypes.byref(bwd_weights), eng, _DIRECT, src, w_fwd, None, dst, strides, dilation,
        pad_l, pad_r, fwd, None), f"convolution {shape.key} (weight gradient)")
    _PRIMITIVES["f" + shape.key] = _primitive(fwd, (_ARG_SRC, _ARG_WEIGHTS), _ARG_DST)
    _PRIMITIVES["w" + shape.key] = _primitive(bwd_weights, (_ARG_SRC, _ARG_DIFF_DST),
                                              _ARG_DIFF_WEIGHTS)
    if shape.src == "blocked":  # a first layer's input (the image) needs no gradient
        w_bwd = _memory_desc(w_dims, "w_oi")
        _check(lib.dnnl_convolution_backward_data_primitive_desc_create(
            ctypes.byref(bwd_data), eng, _DIRECT, src, w_bwd, dst, strides, dilation,
            pad_l, pad_r, fwd, None), f"convolution {shape.key} (input gradient)")
        _PRIMITIVES["d" + shape.key] = _primitive(bwd_data, (_ARG_DIFF_DST, _ARG_WEIGHTS),
                                                  _ARG_DIFF_SRC)


def _primitive_for(shape: ConvShape, kind: str) -> _Primitive | None:
    """Pass `kind` ('f', 'd' or 'w') of `shape`, created with its siblings on first use; None
    when oneDNN has no such pass (an NCHW first layer's input gradient)."""
    if "f" + shape.key not in _PRIMITIVES:
        _create(shape)
    return _PRIMITIVES.get(kind + shape.key)


def implementations(shape: ConvShape) -> dict[str, str]:
    """oneDNN's implementation name for each pass of `shape` ('jit:avx2', ...), for tests/docs."""
    _primitive_for(shape, "f")
    return {k[0]: p.implementation for k, p in _PRIMITIVES.items() if k[1:] == shape.key}


def _execute(key: str, out: int, ins: Sequence[int]) -> str | None:
    """Runs primitive `key` on XLA's buffers; an error message for XLA, or None."""
    status = _run(key, out, ins)
    return None if status == 0 else f"oneDNN {key}: execute returned status {status}"


def _run(key: str, out: int, ins: Sequence[int]) -> int:
    lib, prim = _lib(), _PRIMITIVES[key]
    state = getattr(_THREAD, "state", None)
    if state is None:
        stream = ctypes.c_void_p()
        _check(lib.dnnl_stream_create(ctypes.byref(stream), _engine(), _DEFAULT_STREAM),
               "stream_create")
        state = _THREAD.state = (stream, {})
    stream, args_by_key = state
    args = args_by_key.get(key)
    if args is None:
        ids = (*prim.in_args, prim.out_arg)
        args = (_ExecArg * len(ids))()
        for i, a in enumerate(ids):
            mem = ctypes.c_void_p()
            _check(lib.dnnl_memory_create(ctypes.byref(mem), prim.mds[a], _engine(), None),
                   "memory_create")
            args[i] = _ExecArg(a, mem)
        args_by_key[key] = args
    for i, ptr in enumerate((*ins, out)):
        lib.dnnl_memory_set_data_handle(ctypes.c_void_p(args[i].memory), ctypes.c_void_p(ptr))
    return lib.dnnl_primitive_execute(prim.handle, stream, len(args), args)


def _target(shape: ConvShape, kind: str) -> str:
    """The FFI target running pass `kind` ('f', 'd' or 'w') of `shape`, registered on first use."""
    key = kind + shape.key
    if _primitive_for(shape, kind) is None:
        raise OneDNNError(f"no oneDNN primitive for pass {kind!r} of {shape.key}")
    name = "resnet_jax_onednn_conv_" + key
    if not ffi_ctypes.registered(name):
        ffi_ctypes.register_cpu_target(name, functools.partial(_execute, key))
    return name


def _call(shape: ConvShape, kind: str, out_shape: tuple[int, ...], *operands: jax.Array):
    # Under vmap (packed seeds) each member of the batch is one more call of the same primitive.
    return jax.ffi.ffi_call(_target(shape, kind), jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")(*operands)


# --------------------------------------------------------------------------------------------
# Layouts and the differentiable convolution


def to_blocked(x: jax.Array) -> jax.Array:
    """NHWC -> (N, C/B, H, W, B), oneDNN's `nChw{B}c` for the channel block B = BLOCK."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, c // BLOCK, BLOCK).transpose(0, 3, 1, 2, 4)


def from_blocked(x: jax.Array) -> jax.Array:
    """(N, C/B, H, W, B) -> NHWC."""
    n, cb, h, w, b = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(n, h, w, cb * b)


def _kernel_to(k: jax.Array, tag: str) -> jax.Array:
    """HWIO kernel -> oneDNN weight layout `tag`."""
    kh, kw, ci, co = k.shape
    b = BLOCK
    if tag == "w_io":  # [O/B, I/B, H, W, Bi, Bo]
        return k.reshape(kh, kw, ci // b, b, co // b, b).transpose(4, 2, 0, 1, 3, 5)
    if tag == "w_oi":  # [O/B, I/B, H, W, Bo, Bi]
        return k.reshape(kh, kw, ci // b, b, co // b, b).transpose(4, 2, 0, 1, 5, 3)
    if tag == "w_first":  # [O/B, H, W, I, Bo]
        return k.reshape(kh, kw, ci, co // b, b).transpose(3, 0, 1, 2, 4)
    raise ValueError(f"unknown weight layout {tag!r}")


def _kernel_from(kb: jax.Array, tag: str, hwio: tuple[int, ...]) -> jax.Array:
    """Inverse of `_kernel_to`."""
    if tag == "w_io":
        return kb.transpose(2, 3, 1, 4, 0, 5).reshape(hwio)
    if tag == "w_first":
        return kb.transpose(1, 2, 3, 0, 4).reshape(hwio)
    raise ValueError(f"unknown weight layout {tag!r}")


def conv_shape(x_shape: Sequence[int], k_shape: Sequence[int], stride: int,
               padding: tuple[int, int, int, int]) -> ConvShape:
    """The `ConvShape` of a blocked (5-D) or NCHW first-layer (4-D) input and an HWIO kernel."""
    kh, kw, ci, co = k_shape
    if len(x_shape) == 5:
        n, cb, h, w, b = x_shape
        src, c_in = "blocked", cb * b
    else:
        n, c_in, h, w = x_shape
        src = "nchw"
    if c_in != ci:
        raise ValueError(f"input has {c_in} channels, the kernel expects {ci}")
    if co % BLOCK or (src == "blocked" and ci % BLOCK):
        raise ValueError(f"oneDNN blocked convolutions need channel counts divisible by {BLOCK}; "
                         f"got {ci} -> {co}")
    return ConvShape(n, c_in, h, w, co, kh, kw, stride, tuple(padding), src)


def _xla_conv2d(x: jax.Array, kernel: jax.Array, stride: int,
                padding: tuple[int, int, int, int]) -> jax.Array:
    """`conv2d`'s contract by XLA: the fallback for a pass oneDNN has only reference code for."""
    pt, pb, pl, pr = padding
    if x.ndim == 5:
        x, dn = from_blocked(x), ("NHWC", "HWIO", "NHWC")
    else:
        dn = ("NCHW", "HWIO", "NHWC")
    return to_blocked(jax.lax.conv_general_dilated(x, kernel, (stride, stride),
                                                   ((pt, pb), (pl, pr)), dimension_numbers=dn))


def _jit_kernel(s: ConvShape, kind: str) -> bool:
    """Whether oneDNN runs pass `kind` of `s` with a JIT kernel (else only its slow reference
    code does, e.g. the weight gradient of a 1-channel first layer: XLA then takes the pass)."""
    prim = _primitive_for(s, kind)
    return prim is not None and not prim.implementation.startswith("ref")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int,
           padding: tuple[int, int, int, int]) -> jax.Array:
    """2-D convolution (cross-correlation, as `lax.conv`) by oneDNN; float32 only.

    x: blocked activations (N, C/B, H, W, B), or an NCHW image batch (N, C, H, W) for a first
    layer; kernel: HWIO; padding: (top, bottom, left, right). Returns (N, O/B, H', W', B).
    Gradients: oneDNN's input- and weight-gradient kernels. A pass for which oneDNN has no JIT
    kernel (an image's gradient; a 1-channel first layer's weight gradient) is XLA's.
    """
    return _conv2d_fwd(x, kernel, stride, padding)[0]


def _conv2d_fwd(x, kernel, stride, padding):
    s = conv_shape(x.shape, kernel.shape, stride, padding)
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    if not _jit_kernel(s, "f"):
        return _xla_conv2d(x32, k32, stride, padding), (x, kernel)
    y = _call(s, "f", (s.n, s.c_out // BLOCK, *s.out_hw, BLOCK), x32,
              _kernel_to(k32, s.weights_tag))
    return y, (x, kernel)


def _conv2d_bwd(stride, padding, res, dy):
    x, kernel = res
    s = conv_shape(x.shape, kernel.shape, stride, padding)
    x32, k32, dy = x.astype(jnp.float32), kernel.astype(jnp.float32), dy.astype(jnp.float32)
    if _jit_kernel(s, "w"):
        wtag = s.weights_tag
        dk = _kernel_from(_call(s, "w", _kernel_to(k32, wtag).shape, x32, dy), wtag,
                          kernel.shape)
    else:
        (dk,) = jax.vjp(lambda k: _xla_conv2d(x32, k, stride, padding), k32)[1](dy)
    if _jit_kernel(s, "d"):
        dx = _call(s, "d", x.shape, dy, _kernel_to(k32, "w_oi"))
    else:  # unused for an image batch (XLA removes it), but a correct gradient
        (dx,) = jax.vjp(lambda v: _xla_conv2d(v, k32, stride, padding), x32)[1](dy)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def unsupported(x_shape: Sequence[int], k_shape: Sequence[int], dtype) -> str | None:
    """Why `conv2d_nhwc` cannot run this NHWC input / HWIO kernel (None: it can)."""
    if len(x_shape) != 4 or len(k_shape) != 4:
        return f"a {len(x_shape)}-D input (NHWC only)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"dtype {jnp.dtype(dtype).name} (float32 only)"
    if k_shape[3] % BLOCK:
        return f"{k_shape[3]} output channels (needs a multiple of {BLOCK})"
    return None


def conv2d_nhwc(x: jax.Array, kernel: jax.Array, stride: int,
                padding: tuple[int, int, int, int]) -> jax.Array:
    """`conv2d` with NHWC input and output, like `lax.conv` with ("NHWC", "HWIO", "NHWC").

    The layout changes around the call are transposes that XLA fuses into the neighbouring
    elementwise ops (BN, ReLU, the residual addition), which read and write the activations
    anyway; a first layer with few input channels reads the images as NCHW.
    """
    xin = to_blocked(x) if x.shape[-1] % BLOCK == 0 else x.transpose(0, 3, 1, 2)
    return from_blocked(conv2d(xin, kernel, stride, padding))
