"""Optional native CPU kernels (C++ torch custom ops, built lazily on first use).

Every kernel here has a pure-PyTorch fallback: callers check the module's ``load()`` and
keep using the ATen op when the build is unavailable or disabled.
"""
