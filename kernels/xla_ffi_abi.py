"""What ``kernels/ffi.py`` knows of XLA's typed-FFI C API: every struct offset, size and enum value
it reads or writes, named, in this one place (no Numba, no JAX).

The values are those of ``xla/ffi/api/c_api.h`` as jaxlib 0.10.2 to 0.12.1 ship it (XLA FFI API
0.3) on LP64 targets (x86-64, aarch64: 8-byte pointers, ``size_t`` and ``int64_t``; 4-byte enums
and ``int``). ``C_EXPRESSIONS`` gives, for each constant, the C expression that must equal it;
tests/test_ffi_abi.py compiles them with gcc against the header of the installed jax
(``jax.ffi.include_dir()``) and fails on any difference. ``*_STRUCT_SIZE`` are the header's
``XLA_FFI_DEFINE_STRUCT_TRAITS`` sizes (up to the end of the last member that API version
knows), which is what XLA writes into ``struct_size`` and checks, not ``sizeof``.

The structs, with the offsets used (``@``):

    XLA_FFI_CallFrame   struct_size@0 extension_start@8 api@16 ctx@24 stage@32
                        args  {size@56 args@72}
                        rets  {size@96 rets@112}
                        attrs {size@136 types@144 names@152 attrs@160}
    XLA_FFI_Buffer      dtype@16 data@24 rank@32 dims@40
    XLA_FFI_Scalar      dtype@0 value@8        XLA_FFI_ByteSpan  ptr@0 len@8
    XLA_FFI_Extension_Base        struct_size@0 type@8
    XLA_FFI_Metadata_Extension    metadata@24
    XLA_FFI_Metadata              api_version {struct_size@8 extension_start@16 major@24
                                  minor@28} traits@32
    XLA_FFI_Api                   struct_size@0 api_version.major_version@32
                                  XLA_FFI_Error_Create@48 XLA_FFI_Error_Destroy@64
                                  XLA_FFI_ThreadPool_Schedule@136 XLA_FFI_ThreadPool_NumThreads@144
    XLA_FFI_Error_Create_Args           message@16 errc@24
    XLA_FFI_Error_Destroy_Args          error@16
    XLA_FFI_ThreadPool_Schedule_Args    ctx@16 task@24 data@32
    XLA_FFI_ThreadPool_NumThreads_Args  ctx@16 num_threads@24

Every struct starts with ``size_t struct_size`` (@0) and ``extension_start`` (@8), except
``XLA_FFI_Metadata`` (no extension_start: its api_version follows struct_size).
"""

from __future__ import annotations

# The API version the handler implements and answers XLA's metadata query with.
FFI_API_MAJOR = 0
FFI_API_MINOR = 3

# Widths of the scalar kinds read and written (LP64).
POINTER_BYTES = 8  # pointers, size_t, int64_t
ENUM_BYTES = 4  # XLA_FFI_DataType, XLA_FFI_AttrType, XLA_FFI_ExecutionStage, error codes, int

STRUCT_SIZE = 0  # every struct's size_t struct_size
EXTENSION_START = 8  # and its XLA_FFI_Extension_Base* extension_start (not in XLA_FFI_Metadata)

# XLA_FFI_CallFrame
CALL_FRAME_STRUCT_SIZE = 168
CALL_FRAME_API = 16
CALL_FRAME_CTX = 24
CALL_FRAME_STAGE = 32
CALL_FRAME_ARGS_SIZE = 56
CALL_FRAME_ARGS = 72  # XLA_FFI_Buffer* per argument
CALL_FRAME_RETS_SIZE = 96
CALL_FRAME_RETS = 112  # XLA_FFI_Buffer* per result
CALL_FRAME_ATTRS_SIZE = 136
CALL_FRAME_ATTR_TYPES = 144  # XLA_FFI_AttrType per attribute
CALL_FRAME_ATTR_NAMES = 152  # XLA_FFI_ByteSpan* per attribute
CALL_FRAME_ATTRS = 160  # a pointer per attribute (XLA_FFI_Scalar* for a scalar)

# XLA_FFI_Buffer
BUFFER_DTYPE = 16
BUFFER_DATA = 24
BUFFER_RANK = 32
BUFFER_DIMS = 40

# XLA_FFI_Scalar, XLA_FFI_ByteSpan
SCALAR_DTYPE = 0
SCALAR_VALUE = 8
BYTE_SPAN_PTR = 0
BYTE_SPAN_LEN = 8

# XLA_FFI_Extension_Base, XLA_FFI_Metadata_Extension, XLA_FFI_Metadata, XLA_FFI_Api_Version
EXTENSION_TYPE = 8
METADATA_EXTENSION_STRUCT_SIZE = 32
METADATA_EXTENSION_METADATA = 24
METADATA_STRUCT_SIZE = 36
METADATA_API_VERSION = 8  # the nested XLA_FFI_Api_Version (its struct_size)
METADATA_API_VERSION_EXTENSION_START = 16
METADATA_API_MAJOR = 24
METADATA_API_MINOR = 28
METADATA_TRAITS = 32
API_VERSION_STRUCT_SIZE = 24

# XLA_FFI_Api: the version and the functions called
API_MAJOR = 32
API_ERROR_CREATE = 48
API_ERROR_DESTROY = 64
API_THREAD_POOL_SCHEDULE = 136
API_THREAD_POOL_NUM_THREADS = 144
API_THREAD_POOL_END = 152  # api->struct_size must reach past XLA_FFI_ThreadPool_NumThreads

# The argument structs of those functions
ERROR_CREATE_ARGS_STRUCT_SIZE = 28
ERROR_CREATE_ARGS_MESSAGE = 16
ERROR_CREATE_ARGS_ERRC = 24
ERROR_DESTROY_ARGS_STRUCT_SIZE = 24
ERROR_DESTROY_ARGS_ERROR = 16
SCHEDULE_ARGS_STRUCT_SIZE = 40
SCHEDULE_ARGS_CTX = 16
SCHEDULE_ARGS_TASK = 24
SCHEDULE_ARGS_DATA = 32
NUM_THREADS_ARGS_STRUCT_SIZE = 32
NUM_THREADS_ARGS_CTX = 16
NUM_THREADS_ARGS_NUM_THREADS = 24

# Enum values
EXTENSION_METADATA = 1  # XLA_FFI_Extension_Type
STAGE_EXECUTE = 3  # XLA_FFI_ExecutionStage
DTYPE_S64 = 5  # XLA_FFI_DataType
DTYPE_F32 = 11
ATTR_SCALAR = 3  # XLA_FFI_AttrType
ERR_INVALID_ARGUMENT = 3  # XLA_FFI_Error_Code
ERR_RESOURCE_EXHAUSTED = 8
ERR_UNIMPLEMENTED = 12


def _offset(struct: str, member: str) -> str:
    return f"offsetof({struct}, {member})"


def _width(struct: str, member: str) -> str:
    return f"sizeof((({struct}*)0)->{member})"


_F, _B, _M = "XLA_FFI_CallFrame", "XLA_FFI_Buffer", "XLA_FFI_Metadata"

# constant -> the C expression (over xla/ffi/api/c_api.h) that must equal it
C_EXPRESSIONS: dict[str, str] = {
    "FFI_API_MAJOR": "XLA_FFI_API_MAJOR",
    "FFI_API_MINOR": "XLA_FFI_API_MINOR",
    "POINTER_BYTES": "sizeof(void*)",
    "STRUCT_SIZE": _offset(_F, "struct_size"),
    "EXTENSION_START": _offset(_F, "extension_start"),
    "CALL_FRAME_STRUCT_SIZE": "XLA_FFI_CallFrame_STRUCT_SIZE",
    "CALL_FRAME_API": _offset(_F, "api"),
    "CALL_FRAME_CTX": _offset(_F, "ctx"),
    "CALL_FRAME_STAGE": _offset(_F, "stage"),
    "CALL_FRAME_ARGS_SIZE": _offset(_F, "args.size"),
    "CALL_FRAME_ARGS": _offset(_F, "args.args"),
    "CALL_FRAME_RETS_SIZE": _offset(_F, "rets.size"),
    "CALL_FRAME_RETS": _offset(_F, "rets.rets"),
    "CALL_FRAME_ATTRS_SIZE": _offset(_F, "attrs.size"),
    "CALL_FRAME_ATTR_TYPES": _offset(_F, "attrs.types"),
    "CALL_FRAME_ATTR_NAMES": _offset(_F, "attrs.names"),
    "CALL_FRAME_ATTRS": _offset(_F, "attrs.attrs"),
    "BUFFER_DTYPE": _offset(_B, "dtype"),
    "BUFFER_DATA": _offset(_B, "data"),
    "BUFFER_RANK": _offset(_B, "rank"),
    "BUFFER_DIMS": _offset(_B, "dims"),
    "SCALAR_DTYPE": _offset("XLA_FFI_Scalar", "dtype"),
    "SCALAR_VALUE": _offset("XLA_FFI_Scalar", "value"),
    "BYTE_SPAN_PTR": _offset("XLA_FFI_ByteSpan", "ptr"),
    "BYTE_SPAN_LEN": _offset("XLA_FFI_ByteSpan", "len"),
    "EXTENSION_TYPE": _offset("XLA_FFI_Extension_Base", "type"),
    "METADATA_EXTENSION_STRUCT_SIZE": "XLA_FFI_Metadata_Extension_STRUCT_SIZE",
    "METADATA_EXTENSION_METADATA": _offset("XLA_FFI_Metadata_Extension", "metadata"),
    "METADATA_STRUCT_SIZE": "XLA_FFI_Metadata_STRUCT_SIZE",
    "METADATA_API_VERSION": _offset(_M, "api_version.struct_size"),
    "METADATA_API_VERSION_EXTENSION_START": _offset(_M, "api_version.extension_start"),
    "METADATA_API_MAJOR": _offset(_M, "api_version.major_version"),
    "METADATA_API_MINOR": _offset(_M, "api_version.minor_version"),
    "METADATA_TRAITS": _offset(_M, "traits"),
    "API_VERSION_STRUCT_SIZE": "XLA_FFI_Api_Version_STRUCT_SIZE",
    "API_MAJOR": _offset("XLA_FFI_Api", "api_version.major_version"),
    "API_ERROR_CREATE": _offset("XLA_FFI_Api", "XLA_FFI_Error_Create"),
    "API_ERROR_DESTROY": _offset("XLA_FFI_Api", "XLA_FFI_Error_Destroy"),
    "API_THREAD_POOL_SCHEDULE": _offset("XLA_FFI_Api", "XLA_FFI_ThreadPool_Schedule"),
    "API_THREAD_POOL_NUM_THREADS": _offset("XLA_FFI_Api", "XLA_FFI_ThreadPool_NumThreads"),
    "API_THREAD_POOL_END": (f"{_offset('XLA_FFI_Api', 'XLA_FFI_ThreadPool_NumThreads')} + "
                            f"{_width('XLA_FFI_Api', 'XLA_FFI_ThreadPool_NumThreads')}"),
    "ERROR_CREATE_ARGS_STRUCT_SIZE": "XLA_FFI_Error_Create_Args_STRUCT_SIZE",
    "ERROR_CREATE_ARGS_MESSAGE": _offset("XLA_FFI_Error_Create_Args", "message"),
    "ERROR_CREATE_ARGS_ERRC": _offset("XLA_FFI_Error_Create_Args", "errc"),
    "ERROR_DESTROY_ARGS_STRUCT_SIZE": "XLA_FFI_Error_Destroy_Args_STRUCT_SIZE",
    "ERROR_DESTROY_ARGS_ERROR": _offset("XLA_FFI_Error_Destroy_Args", "error"),
    "SCHEDULE_ARGS_STRUCT_SIZE": "XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE",
    "SCHEDULE_ARGS_CTX": _offset("XLA_FFI_ThreadPool_Schedule_Args", "ctx"),
    "SCHEDULE_ARGS_TASK": _offset("XLA_FFI_ThreadPool_Schedule_Args", "task"),
    "SCHEDULE_ARGS_DATA": _offset("XLA_FFI_ThreadPool_Schedule_Args", "data"),
    "NUM_THREADS_ARGS_STRUCT_SIZE": "XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE",
    "NUM_THREADS_ARGS_CTX": _offset("XLA_FFI_ThreadPool_NumThreads_Args", "ctx"),
    "NUM_THREADS_ARGS_NUM_THREADS": _offset("XLA_FFI_ThreadPool_NumThreads_Args", "num_threads"),
    "EXTENSION_METADATA": "XLA_FFI_Extension_Metadata",
    "STAGE_EXECUTE": "XLA_FFI_ExecutionStage_EXECUTE",
    "DTYPE_S64": "XLA_FFI_DataType_S64",
    "DTYPE_F32": "XLA_FFI_DataType_F32",
    "ATTR_SCALAR": "XLA_FFI_AttrType_SCALAR",
    "ERR_INVALID_ARGUMENT": "XLA_FFI_Error_Code_INVALID_ARGUMENT",
    "ERR_RESOURCE_EXHAUSTED": "XLA_FFI_Error_Code_RESOURCE_EXHAUSTED",
    "ERR_UNIMPLEMENTED": "XLA_FFI_Error_Code_UNIMPLEMENTED",
}

# The members read or written with a width other than 8 bytes: each must be ENUM_BYTES wide.
ENUM_MEMBERS = (
    (_F, "stage"), (_B, "dtype"), ("XLA_FFI_Scalar", "dtype"), ("XLA_FFI_Extension_Base", "type"),
    (_M, "api_version.major_version"), (_M, "api_version.minor_version"), (_M, "traits"),
    ("XLA_FFI_Api", "api_version.major_version"), ("XLA_FFI_Error_Create_Args", "errc"),
)
C_EXPRESSIONS.update({f"ENUM_BYTES {s}.{m}": _width(s, m) for s, m in ENUM_MEMBERS})
C_EXPRESSIONS["ENUM_BYTES attribute type"] = "sizeof(XLA_FFI_AttrType)"
