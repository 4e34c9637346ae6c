"""The vocabulary every layer shares: image references, platforms, pull-list formats and containerd
label names. Pure.
"""
