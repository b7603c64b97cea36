"""Optional native CPU kernels (C++ torch custom ops, built lazily on first use).

    int8_gemv.py   ``fleetlm::int8_linear``: weight-only int8 GEMV for decode
    int4_gemv.py   ``fleetlm::int4_linear``: weight-only 4-bit group-wise GEMV for decode
    lora_sgmv.py   ``fleetlm::lora_sgmv``: multi-LoRA deltas grouped by adapter slot
    cpu.py         which SIMD path the kernels run (chosen at run time from the CPU's
                   features; ``FLEETLM_CPU_ISA`` forces one) and what the CPU offers
    _build.py      the shared lazy build (torch.utils.cpp_extension), once per process

Every kernel here has a pure-PyTorch fallback: callers check the module's ``load()`` and
keep using the ATen op when the build is unavailable or disabled. Kernels know tensors
and shapes only: nothing about models, adapters or requests.
"""
