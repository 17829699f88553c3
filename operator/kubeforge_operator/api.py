"""How the operator talks to the API server: every call has a deadline, and what counts as transport.

The Kubernetes client waits forever by default: a call to an API server that accepted the
connection and never answers would hold a reconcile thread, and the job's daemon with it, for
good. Every call passes `_request_timeout=REQUEST_TIMEOUT` (connect, read). A timeout, a refused
or dropped connection, or a broken TLS session is a urllib3 error (`TRANSPORT_ERRORS`), not an
ApiException: the daemon retries it with kopf's TemporaryError (kubeforge_operator.handlers).
"""

from __future__ import annotations

from urllib3.exceptions import HTTPError

# Seconds: (to connect, to read the answer). A list of a large job's pods or a status patch answers
# in well under a second on a healthy API server; 30 s is a server in trouble.
REQUEST_TIMEOUT = (5.0, 30.0)

TRANSPORT_ERRORS = (HTTPError, OSError)
