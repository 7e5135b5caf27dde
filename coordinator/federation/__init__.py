"""Federation: sites (one Redis each, with their workers and beat) joined into one cluster through
NATS JetStream. :mod:`.envelope` says how a message looks on NATS, :mod:`.connect` how to reach
NATS and the namespace's stream, :mod:`.directory` the sites and the cluster-wide election in the
key-value bucket. :mod:`.bridge` holds a site's bridge lease and runs its parts: :mod:`.export`
(this site's messages out), :mod:`.intake` (other sites' and plain clients' messages in) and
:mod:`.governor` (the site's record and the namespace's one leader), sharing :mod:`.active`.

Nothing here is imported unless ``SIDECAR_NATS_URL`` is set.
"""
