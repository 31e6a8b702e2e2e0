"""The CPU every benchmark prints beside its figures: model, cores, and the SIMD features that
decide which kernels run (AVX2, FMA, AVX-512F, VNNI, BF16, FP16, AMX)."""
import os
import platform


def cpu():
    model, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("?", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    named = [("AVX2", "avx2"), ("FMA", "fma"), ("AVX-512F", "avx512f"),
             ("AVX512-VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"), ("AVX512-BF16", "avx512_bf16"),
             ("AVX512-FP16", "avx512_fp16"), ("AMX-BF16", "amx_bf16"), ("AMX-INT8", "amx_int8")]
    return model, os.cpu_count(), [n for n, f in named if f in flags], [n for n, f in named if f not in flags]
