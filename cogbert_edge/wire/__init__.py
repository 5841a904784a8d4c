"""The device-cloud contract, used by both sides and nothing else: the topic map (``topics``),
experience records (``records``) and batches (``batch``), and every other message
(``messages``: ack, telemetry, status report, release offer, chunk). Versioning rules are in
:mod:`cogbert_edge.wire.messages`."""
