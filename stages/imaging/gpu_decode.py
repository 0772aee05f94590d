"""JPEG decoding on a CUDA device, for a model stage that runs there (align's `decode: gpu`): the CPU workers hand
the JPEG bytes over instead of pixels, and the model's process decodes them next to the model.

    backend()            the first decoder importable here, or None: "nvimgcodec" (nvidia-nvimgcodec-cu12 or
                         -cu13: nvJPEG, with the hardware decoder where the GPU has one), then "torchvision"
                         (torchvision.io.decode_jpeg on CUDA, nvJPEG). Import only: no CUDA context is made.
    is_jpeg(data)        the bytes start with a JPEG's SOI marker (other formats stay on the CPU path)
    JpegDecoder(device)  decode(datas) -> a uint8 [3, H, W] tensor on the device per item, None where the device
                         decoder refused it (CMYK, corrupt or truncated files...): the caller decodes those on the
                         CPU, so a row's result never depends on the GPU decoder's coverage. After a failure of the
                         decoder itself (a missing nvJPEG library, say), it stops trying and says so once.

Decoded pixels match PIL's within JPEG's rounding (IDCT and colour conversion differ by a level or two).
"""
from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

_BACKEND: list = []  # [name or None], filled on first use


def backend() -> str | None:
    """"nvimgcodec", "torchvision" or None (see the module docstring); cached per process."""
    if not _BACKEND:
        found = None
        for name, module in (("nvimgcodec", "nvidia.nvimgcodec"), ("torchvision", "torchvision.io")):
            try:
                mod = importlib.import_module(module)
            except Exception:  # absent, or a build that does not match torch (seen: "torchvision::nms does not exist")
                continue
            if name == "torchvision" and not hasattr(mod, "decode_jpeg"):
                continue
            found = name
            break
        _BACKEND.append(found)
    return _BACKEND[0]


def is_jpeg(data) -> bool:
    return data is not None and bytes(data[:3]) == b"\xff\xd8\xff"


class JpegDecoder:
    """JPEG bytes -> uint8 [3, H, W] RGB tensors on `device` (see the module docstring). Thread-safe."""

    def __init__(self, device, name: str | None = None):
        self.device = device
        self.name = name or backend()
        if self.name is None:
            raise RuntimeError("no GPU JPEG decoder is installed (nvidia-nvimgcodec-cu12/cu13, or torchvision "
                               "with CUDA)")
        self.broken: str | None = None  # why the decoder itself failed; then every call returns None items
        self.decoded = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._nv = None

    def decode(self, datas: list) -> list:
        if self.broken or not datas:
            return [None] * len(datas)
        try:
            out = self._nvimgcodec(datas) if self.name == "nvimgcodec" else self._torchvision(datas)
        except Exception as e:  # the decoder itself: stop using it (CPU decoding takes over)
            with self._lock:
                if self.broken is None:
                    self.broken = f"{type(e).__name__}: {e}"
                    log.warning("GPU JPEG decoding (%s) failed, decoding on the CPU from now on: %s", self.name,
                                self.broken)
            return [None] * len(datas)
        with self._lock:
            ok = sum(t is not None for t in out)
            self.decoded += ok
            self.refused += len(out) - ok
        return out

    def _torchvision(self, datas: list) -> list:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the batched call: decode one at a time to find it
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            if all(o is None for o in out):
                raise
            return out

    def _nvimgcodec(self, datas: list) -> list:
        import torch
        from nvidia import nvimgcodec

        if self._nv is None:
            index = self.device.index if getattr(self.device, "index", None) is not None else 0
            self._nv = (nvimgcodec.Decoder(device_id=index),
                        nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.RGB, allow_any_depth=False))
        decoder, params = self._nv
        images = decoder.decode([bytes(d) for d in datas], params=params)  # None for an item it cannot decode
        out = []
        for im in images:
            if im is None:
                out.append(None)
                continue
            t = torch.as_tensor(im, device=self.device)  # HWC uint8 on the device, through __cuda_array_interface__
            out.append(t.permute(2, 0, 1).contiguous())
        return out
