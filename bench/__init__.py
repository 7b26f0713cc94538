"""Benchmarks, run on the machine they measure as ``python -m bench.<name>`` from the repository root.

``bench/README.md`` has each one's commands and results; ``bench/common.py`` the helpers they share,
``bench/real_size.py`` the real-size pipelines with random weights that the GPU benchmarks build.
"""
