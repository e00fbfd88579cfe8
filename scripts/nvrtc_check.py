#!/usr/bin/env python3
"""Compiles CUDA sources with NVRTC (from the nvidia-cuda-nvrtc wheel) for sm_90.

Usage: nvrtc_check.py LIBNVRTC FILE.cu [FILE.cu ...]
Exits non-zero and prints NVRTC's log on any compile error. Guards CUDA code that a
machine without a GPU cannot run.
"""
import ctypes
import sys


def main():
    lib = ctypes.CDLL(sys.argv[1])
    failed = 0
    for path in sys.argv[2:]:
        src = open(path, "rb").read()
        prog = ctypes.c_void_p()
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 0, None, None)
        assert rc == 0, f"nvrtcCreateProgram: {rc}"
        opts = [b"--gpu-architecture=sm_90", b"-default-device", b"--std=c++17"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace").strip()
        if rc != 0:
            failed += 1
            print(f"FAIL {path}: nvrtc {rc}\n{text}")
        else:
            cubin = ctypes.c_size_t()
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
            print(f"ok   {path}: {cubin.value} bytes of sm_90 cubin" + (f"\n{text}" if text else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
