"""Federation: sites (one Redis each, with their workers and beat) joined into one cluster through
NATS JetStream. :mod:`.envelope` says how a message looks on NATS, :mod:`.connect` how to reach
NATS and the namespace's stream, :mod:`.bridge` moves messages between a site and NATS.

Nothing here is imported unless ``SIDECAR_NATS_URL`` is set.
"""
