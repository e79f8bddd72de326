"""The PMixED private next-token service: ensemble replicas and one budget on Ray, behind gRPC.

``members`` (what is served), ``budget`` (the ledger, one query per token), ``replica`` (the
ensemble, paying before releasing), ``service`` (Ray actors and dispatch), ``grpc_api`` (the
gRPC servicer), ``cli`` (``privtune serve``).
"""
