"""Running nodes as processes: ``kvstore-server`` (``main``) and ``kvstore local-cluster``
(``local``: a cluster of processes on 127.0.0.1 for demos, tests and benchmarks).
"""
