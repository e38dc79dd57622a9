"""Peer-to-peer chunk distribution: a peer chunk service, a tracker and Dragonfly proxy support.

Not built yet: see the P2P issue.
"""
