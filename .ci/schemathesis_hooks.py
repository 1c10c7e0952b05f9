"""Schemathesis hooks for .ci/contract (loaded through SCHEMATHESIS_HOOKS).

A `101 Switching Protocols` answer to `GET /v1/ws` hands the connection to the WebSocket
protocol, but `requests` puts it back in its pool as if it were an HTTP connection; the next
request on it would be read as WebSocket frames and the server would close it. Closing the
socket of every 101 answer makes the pool open a fresh connection instead. This changes no
request and no answer that schemathesis checks.
"""

import requests.adapters

_build_response = requests.adapters.HTTPAdapter.build_response


def _build_response_closing_upgrades(self, req, resp):
    if resp.status == 101:
        conn = getattr(resp, "connection", None)
        if conn is not None:
            conn.close()
    return _build_response(self, req, resp)


requests.adapters.HTTPAdapter.build_response = _build_response_closing_upgrades
