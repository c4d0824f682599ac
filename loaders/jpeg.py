"""FFCV's image decode with libjpeg-turbo's accurate IDCT, so that every loader sees the same pixels.

FFCV's C `imdecode` asks libjpeg-turbo for TJFLAG_FASTDCT (the fast integer IDCT): its pixels differ from PIL,
OpenCV, torchvision and DALI's CPU decoder (which all use the accurate 'islow' IDCT with fancy upsampling, and
agree to 0 levels) by up to ~7 levels on CIFAR at quality 90, with a per-channel bias. `AccurateRGBImageDecoder`
is FFCV's SimpleRGBImageDecoder with that one flag removed: the same libturbojpeg FFCV links against
(`libturbojpeg.so.0`), called through ctypes from FFCV's numba-compiled decode loop (flags 0: accurate IDCT,
fancy upsampling). Raw-mode samples are copied as FFCV copies them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

import numpy as np

TJPF_RGB = 0          # libturbojpeg's pixel format code for packed RGB
TJ_ACCURATE = 0       # decompress flags: no TJFLAG_FASTDCT (2048), no TJFLAG_FASTUPSAMPLE (256)


def _load_turbojpeg() -> ctypes.CDLL:
    errors = []
    for name in ("libturbojpeg.so.0", ctypes.util.find_library("turbojpeg")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise ImportError(f"libturbojpeg not found (FFCV needs it too; Debian: libturbojpeg0-dev): {'; '.join(errors)}")


_tj = _load_turbojpeg()
_tj_init = _tj.tjInitDecompress
_tj_init.argtypes = []
_tj_init.restype = ctypes.c_void_p
_tj_decompress = _tj.tjDecompress2
_tj_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_int,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
_tj_decompress.restype = ctypes.c_int
_tj_destroy = _tj.tjDestroy
_tj_destroy.argtypes = [ctypes.c_void_p]
_tj_destroy.restype = ctypes.c_int


def imdecode_accurate(source: np.ndarray, destination: np.ndarray, height: int, width: int) -> int:
    """Decode the JPEG bytes `source` (1-D uint8) into `destination` (height, width, 3) uint8 RGB, accurate IDCT.

    Returns libturbojpeg's status (0 = success). A handle per call (under a microsecond) keeps it safe on any
    number of FFCV's decode threads. Callable from Python and from numba-compiled code.
    """
    handle = _tj_init()
    status = _tj_decompress(handle, source.ctypes.data, source.size, destination.ctypes.data, width, 0, height,
                            TJPF_RGB, TJ_ACCURATE)
    _tj_destroy(handle)
    return status


def decode_jpeg(data: bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """JPEG bytes -> uint8 (height, width, 3) RGB as the FFCV loaders decode them (for tests and tools)."""
    source = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.ascontiguousarray(data)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    if imdecode_accurate(source, out, height, width) != 0:
        raise ValueError("cannot decode JPEG (libturbojpeg refused the data)")
    return out


def _accurate_decoder_class():
    """Built on first use: importing FFCV (numba, its C library) costs seconds."""
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import memcpy
    from ffcv.pipeline.compiler import Compiler

    class AccurateRGBImageDecoder(SimpleRGBImageDecoder):
        """SimpleRGBImageDecoder (constant-size images, jpg or raw) with the accurate IDCT: PIL's pixels."""

        def generate_code(self) -> Callable:
            mem_read = self.memory_read
            decode_c = Compiler.compile(imdecode_accurate)
            my_memcpy = Compiler.compile(memcpy)
            my_range = Compiler.get_iterator()
            jpg = IMAGE_MODES["jpg"]

            def decode(batch_indices, destination, metadata, storage_state):
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    if field["mode"] == jpg:
                        decode_c(image_data, destination[dst_ix], field["height"], field["width"])
                    else:
                        my_memcpy(image_data, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return AccurateRGBImageDecoder


_DECODER = None


def accurate_rgb_decoder():
    """A new FFCV decoder operation for the image field (the class is made once)."""
    global _DECODER
    if _DECODER is None:
        _DECODER = _accurate_decoder_class()
    return _DECODER()
