"""Air-gapped sites: the registry client, ``bundle`` (registry to archive) and ``verify`` (an
archive checked offline).
"""
