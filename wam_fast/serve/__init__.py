"""Serving a WAMPipeline to robots: ``python -m wam_fast.serve`` (openpi's websocket policy protocol).

``wam_fast.serve.server.PolicyServer`` / ``ServerThread`` serve from Python; ``wam_fast.serve.wire`` is the
msgpack + numpy format; ``wam_fast.serve.adapter`` turns an observation into a pipeline session call.
"""
