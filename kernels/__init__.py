"""Triton kernels of diffuse-engine and their pure-torch references (``reference``).

Installed as ``diffuse_engine.kernels``. Importing this package imports no kernel: each op lives in its own
module and is imported by ``diffuse_engine.ops`` on first use.
"""
