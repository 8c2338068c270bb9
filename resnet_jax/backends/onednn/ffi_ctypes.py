"""A Python function as an XLA:CPU FFI target, through ctypes: no C++ build needed.

XLA's typed FFI (xla/ffi/api/c_api.h) calls a C function with a call frame that lists the
operand and result buffers. Here that function is a ctypes callback: it answers XLA's metadata
query (the API version) when the target is registered, then on every call hands the raw buffer
addresses to `fn(out, ins)` and turns a returned message (or an exception) into an XLA error,
which jax raises. One output buffer; no attributes (register one target per configuration).
The callback takes the GIL, so `fn` should hand the work to native code that releases it
(ctypes foreign calls do).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import jax


class _Extension(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                ("next", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major", ctypes.c_int), ("minor", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("base", _Extension), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Buffers(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets have this layout
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.c_void_p),
                ("items", ctypes.POINTER(ctypes.POINTER(_Buffer)))]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ERROR_CREATE)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(_Extension)),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _Buffers), ("rets", _Buffers)]


_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))
_METADATA_EXTENSION, _FFI_API_MAJOR, _FFI_API_MINOR, _ERROR_INTERNAL = 1, 0, 1, 13
_HANDLERS: dict[str, _HANDLER] = {}  # keeps the callbacks alive for as long as XLA may call them


def _make_handler(fn: Callable[[int, list[int]], str | None]) -> _HANDLER:
    def handle(frame_ptr):
        frame = frame_ptr.contents
        if frame.extension_start and frame.extension_start.contents.type == _METADATA_EXTENSION:
            # XLA asks for the handler's API version when the target is registered.
            ext = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension))
            meta = ext.contents.metadata.contents
            meta.api_version.major, meta.api_version.minor = _FFI_API_MAJOR, _FFI_API_MINOR
            meta.traits = 0
            return None
        try:
            ins = [frame.args.items[i].contents.data for i in range(frame.args.size)]
            message = fn(frame.rets.items[0].contents.data, ins)
        except Exception as e:  # noqa: BLE001 - reported to XLA, which raises it in jax
            message = f"{type(e).__name__}: {e}"
        if message is None:
            return None
        err = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(),
                               _ERROR_INTERNAL)
        return frame.api.contents.error_create(ctypes.byref(err))

    return _HANDLER(handle)


def registered(name: str) -> bool:
    """Whether `register_cpu_target` has registered `name` in this process."""
    return name in _HANDLERS


def register_cpu_target(name: str, fn: Callable[[int, list[int]], str | None]) -> None:
    """Registers `fn(out_address, in_addresses) -> error message or None` as FFI target `name`.

    Call `jax.ffi.ffi_call(name, result_shape_dtype)(*operands)` afterwards; the buffers are
    XLA's own, so `fn` must write the whole result and nothing else.
    """
    _HANDLERS[name] = _make_handler(fn)
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(_HANDLERS[name]), platform="cpu")
