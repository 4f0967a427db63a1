"""FFCV is an optional extra: one place that imports it and, when it is missing, says how to install it.

ffcv builds a C extension against libturbojpeg and OpenCV at install time and loads them at run
time, so installing it needs the system libraries first (Debian/Ubuntu package names below).
"""
from __future__ import annotations

from types import ModuleType

__all__ = ["FFCV_INSTALL_HINT", "FFCVNotInstalledError", "require_ffcv"]

FFCV_INSTALL_HINT = (
    "install it with `apt-get install -y libturbojpeg0-dev libopencv-dev pkg-config` "
    "(Debian/Ubuntu; conda: `conda install -c conda-forge libjpeg-turbo opencv pkg-config`) "
    "and then `pip install 'condconv[ffcv]'`"
)


class FFCVNotInstalledError(ImportError, ValueError):
    """ffcv (or a system library it needs) is missing.

    Also a `ValueError`, so the command lines report it as one line like any other bad
    configuration (`format: ffcv` on a machine without ffcv) instead of a traceback.
    """


def require_ffcv() -> ModuleType:
    """Import and return `ffcv`; raise a one-line `FFCVNotInstalledError` with the install hint if it fails.

    A missing system library (e.g. `libturbojpeg.so.0`) surfaces as an `ImportError` of ffcv's
    extension module and is reported the same way.
    """
    try:
        import ffcv
        import ffcv.fields  # noqa: F401  (loads the compiled extension, which needs the system libraries)
    except ImportError as err:
        raise FFCVNotInstalledError(
            f"data format 'ffcv' needs the optional package ffcv, which cannot be imported ({err}); "
            f"{FFCV_INSTALL_HINT}"
        ) from err
    return ffcv
