"""surgeon_core: activation-sparse backprop (SURGEON) with real, measured memory savings.

Pure PyTorch: no threads, sockets, global state or device choice.
"""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version, else this source tree's."""
    try:
        from importlib.metadata import version

        return version("surgeon")
    except Exception:  # noqa: BLE001 - PackageNotFoundError when run from a source tree
        return __version__
