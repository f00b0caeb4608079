"""fused-attn's C ABI from Python through ctypes (no build step, no numpy):
the benchmark bridge of issue 13, so that `scripts/peers.py` can time our
kernels in the same process, on the same tensors, as the PyTorch peers.

    lib = FusedAttnLib()                       # libfused_attn_capi.so: $FUSED_ATTN_CAPI_LIB or target/*/
    attn = lib.open(0)                         # a handle on GPU 0
    attn.forward(q, k, v, o, causal=True)      # torch tensors [B, L, H, D] (any strides, last dim contiguous)
    lib.reference_forward(DTYPE_BF16, q, k, v, o)  # host buffers (HostTensor), O as float
    ws = torch.empty(lib.backward_workspace_len(B, L, H, D), dtype=torch.float32, device="cuda")
    attn.backward(q, k, v, o, lse, d_o, dq, dk, dv, workspace=ws)  # the tiled kernels (needs LSE)
    lib.reference_backward(DTYPE_BF16, q, k, v, d_o, dq, dk, dv)   # host buffers, gradients as float

Tensors are described by anything with `data_ptr()`, `shape` and
`stride()` (torch tensors), or by `Tensor(ptr, shape, strides)`. Errors
raise `FusedAttnError` with the ABI's message (which names the argument).
"""
import ctypes
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPE_F16 = 1
DTYPE_BF16 = 2
MASK_FULL, MASK_CAUSAL, MASK_WINDOW = 0, 1, 2


class FusedAttnError(RuntimeError):
    def __init__(self, status, name, message):
        super().__init__("%s (%d): %s" % (name, status, message))
        self.status = status


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("shape", ctypes.c_int64 * 4), ("strides", ctypes.c_int64 * 4)]


class _Lse(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("shape", ctypes.c_int64 * 3), ("strides", ctypes.c_int64 * 3)]


class _Options(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_int32), ("alignment", ctypes.c_int32), ("window_left", ctypes.c_int64),
                ("window_right", ctypes.c_int64), ("has_scale", ctypes.c_int32), ("scale", ctypes.c_float),
                ("softcap", ctypes.c_float), ("kernel", ctypes.c_int32), ("alibi_slopes", ctypes.c_void_p),
                ("alibi_per_batch", ctypes.c_int32), ("sinks", ctypes.c_void_p)]


class Tensor:
    """A raw tensor: address, shape, element strides."""

    def __init__(self, ptr, shape, strides):
        self.ptr, self.shape, self.strides = int(ptr), tuple(shape), tuple(strides)

    def data_ptr(self):
        return self.ptr

    def stride(self):
        return self.strides


def _tensor(t):
    s, st = tuple(t.shape), tuple(t.stride())
    if len(s) != len(st):
        raise ValueError("shape and strides differ in rank")
    cls = _Tensor if len(s) == 4 else _Lse
    return cls(t.data_ptr(), (ctypes.c_int64 * len(s))(*s), (ctypes.c_int64 * len(s))(*st))


def _options(causal=False, window=None, scale=None, softcap=0.0, top_left=False, kernel=0):
    o = _Options()
    if window is not None:
        o.mask = MASK_WINDOW
        o.window_left = -1 if window[0] is None else window[0]
        o.window_right = -1 if window[1] is None else window[1]
    elif causal:
        o.mask = MASK_CAUSAL
    o.alignment = 1 if top_left else 0
    if scale is not None:
        o.has_scale, o.scale = 1, scale
    o.softcap = softcap
    o.kernel = kernel
    return o


def find_library():
    env = os.environ.get("FUSED_ATTN_CAPI_LIB")
    if env:
        return env
    found = sorted(glob.glob(os.path.join(ROOT, "target", "*", "libfused_attn_capi.so")), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError("libfused_attn_capi.so not found: set FUSED_ATTN_CAPI_LIB or "
                                "`cargo build --release -p fused-attn-capi`")
    return found[-1]


class FusedAttnLib:
    def __init__(self, path=None):
        self.lib = ctypes.CDLL(path or find_library())
        L = self.lib
        P = ctypes.POINTER
        L.fused_attn_last_error_message.restype = ctypes.c_char_p
        L.fused_attn_status_name.restype = ctypes.c_char_p
        L.fused_attn_status_name.argtypes = [ctypes.c_int32]
        L.fused_attn_create.argtypes = [ctypes.c_int32, P(ctypes.c_void_p)]
        L.fused_attn_destroy.argtypes = [ctypes.c_void_p]
        L.fused_attn_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, P(_Tensor), P(_Tensor),
                                         P(_Tensor), P(_Tensor), P(_Lse), P(_Options)]
        L.fused_attn_reference_forward.argtypes = [ctypes.c_int32, P(_Tensor), P(_Tensor), P(_Tensor), P(_Tensor),
                                                   P(_Lse), P(_Options)]
        L.fused_attn_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32] + [P(_Tensor)] * 4 + [
            P(_Lse)] + [P(_Tensor)] * 4 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int32,
                                           P(_Options)]
        L.fused_attn_backward_workspace_len.argtypes = [ctypes.c_int64] * 4 + [P(ctypes.c_uint64)]
        L.fused_attn_reference_backward.argtypes = [ctypes.c_int32] + [P(_Tensor)] * 7 + [ctypes.c_void_p,
                                                                                         P(_Options)]
        for f in (L.fused_attn_create, L.fused_attn_destroy, L.fused_attn_forward, L.fused_attn_reference_forward,
                  L.fused_attn_backward, L.fused_attn_backward_workspace_len, L.fused_attn_reference_backward):
            f.restype = ctypes.c_int32

    def check(self, status):
        if status != 0:
            name = self.lib.fused_attn_status_name(status).decode()
            raise FusedAttnError(status, name, self.lib.fused_attn_last_error_message().decode())

    def open(self, device=0):
        return Handle(self, device)

    def reference_forward(self, dtype, q, k, v, o, lse=None, **opts):
        """The CPU reference on host memory (O and LSE as float)."""
        lse_c = ctypes.byref(_tensor(lse)) if lse is not None else None
        self.check(self.lib.fused_attn_reference_forward(
            dtype, ctypes.byref(_tensor(q)), ctypes.byref(_tensor(k)), ctypes.byref(_tensor(v)),
            ctypes.byref(_tensor(o)), lse_c, ctypes.byref(_options(**opts))))

    def backward_workspace_len(self, batch, seqlen_q, heads_q, head_dim):
        """Floats of workspace the tiled backward needs (16-byte aligned)."""
        n = ctypes.c_uint64()
        self.check(self.lib.fused_attn_backward_workspace_len(batch, seqlen_q, heads_q, head_dim, ctypes.byref(n)))
        return n.value

    def reference_backward(self, dtype, q, k, v, d_o, dq, dk, dv, **opts):
        """The CPU reference gradients on host memory (dQ, dK, dV as float)."""
        t = lambda x: ctypes.byref(_tensor(x))  # noqa: E731
        self.check(self.lib.fused_attn_reference_backward(
            dtype, t(q), t(k), t(v), t(d_o), t(dq), t(dk), t(dv), None, ctypes.byref(_options(**opts))))


class Handle:
    def __init__(self, lib, device):
        self.lib, self.h = lib, None
        h = ctypes.c_void_p()
        lib.check(lib.lib.fused_attn_create(device, ctypes.byref(h)))
        self.h = h

    def close(self):
        if self.h:
            self.lib.lib.fused_attn_destroy(self.h)
            self.h = None

    def __del__(self):
        self.close()

    def forward(self, q, k, v, o, lse=None, dtype=None, stream=None, **opts):
        """Attention on device memory, asynchronously on `stream` (a CUstream
        address, e.g. torch.cuda.current_stream().cuda_stream; None: legacy
        default). dtype: DTYPE_F16 / DTYPE_BF16, or taken from a torch q."""
        if dtype is None:
            dtype = DTYPE_BF16 if "bfloat16" in str(getattr(q, "dtype", "")) else DTYPE_F16
        lse_c = ctypes.byref(_tensor(lse)) if lse is not None else None
        self.lib.check(self.lib.lib.fused_attn_forward(
            self.h, ctypes.c_void_p(stream or 0), dtype, ctypes.byref(_tensor(q)), ctypes.byref(_tensor(k)),
            ctypes.byref(_tensor(v)), ctypes.byref(_tensor(o)), lse_c, ctypes.byref(_options(**opts))))

    def backward(self, q, k, v, o, lse, d_o, dq, dk, dv, workspace=None, deterministic=False, dtype=None,
                 stream=None, **opts):
        """dQ, dK, dV on device memory from the forward's O and LSE, asynchronously
        on `stream`. `workspace`: None (the baseline CUDA-core kernels) or a
        float tensor of at least `backward_workspace_len` elements (the tiled
        tensor-core kernels)."""
        if dtype is None:
            dtype = DTYPE_BF16 if "bfloat16" in str(getattr(q, "dtype", "")) else DTYPE_F16
        t = lambda x: ctypes.byref(_tensor(x))  # noqa: E731
        ws, ws_len = None, 0
        if workspace is not None:
            ws, ws_len = ctypes.c_void_p(workspace.data_ptr()), workspace.numel()
        self.lib.check(self.lib.lib.fused_attn_backward(
            self.h, ctypes.c_void_p(stream or 0), dtype, t(q), t(k), t(v), t(o), t(lse), t(d_o), t(dq), t(dk),
            t(dv), None, ws, ws_len, 1 if deterministic else 0, ctypes.byref(_options(**opts))))
