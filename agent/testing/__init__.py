"""Development aids shipped with the package: a private containerd, sample archives, and the
helpers tests and benchmarks share.
"""
