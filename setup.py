"""Only the C extension lives here; everything else is in pyproject.toml."""
import platform

from setuptools import Extension, setup

# -O3 is portable; -march flags are not (a wheel built with -mavx2 crashes on an
# aarch64 Jetson or an older x86). Vectorisation comes from -O3 + plain loops.
extra = ["-O3", "-std=c99"]
if platform.system() == "Windows":
    extra = ["/O2"]

setup(
    ext_modules=[
        Extension(
            "vlmedge.runtime._cpreprocess",
            sources=["runtime/_cpreprocess.c"],
            extra_compile_args=extra,
        )
    ]
)
