"""surgeon_core: activation-sparse backprop (SURGEON) with real, measured memory savings.

Pure PyTorch: no threads, sockets, global state or device choice.
"""

__version__ = "0.1.0"
