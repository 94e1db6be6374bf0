"""The SuperLink's public face: a gate that lets sites reach the Fleet API and nothing else.

Flower 1.42's SuperLink serves its Fleet API (``/v1/fleet/*``: what SuperNodes use), its Control
API (``/v1/control/*``: submit, stop and list runs, stream logs, register node keys) and its
runtime API (``/v1/runtime/*``: what the ServerApp process uses) from one HTTP server on one
port, and its Control API's default authentication plugin lets every caller in. So ``sapf serve``
binds the SuperLink to 127.0.0.1 only and puts this gate on the public address: it forwards
``POST /v1/fleet/...`` to the SuperLink and answers everything else with 404, so a site (or
anyone who reaches the port) can join as a SuperNode but cannot submit a run, read logs or
register a key. Under TLS the gate terminates it with the SuperLink's certificate and speaks TLS
to the SuperLink too (SuperNode authentication requires a TLS SuperLink); the SuperNodes' signed
authentication headers pass through unchanged.

Run: ``python -m sapf.federation.fleet_gate --host H --port P --upstream URL [--ssl-certfile F
--ssl-keyfile K --ca-certfile CA]``.
"""

from __future__ import annotations

import argparse

FLEET_PREFIX = "/v1/fleet/"
REFUSED_BODY = b'{"detail": "not found (sapf fleet gate: only the Fleet API is served here)"}'
MAX_BODY = 64 * 1024 * 1024  # Flower objects are at most tens of MB (a FAB is at most 10 MB)
HOP_BY_HOP = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive", b"upgrade"}


def is_fleet_request(method: str, path: str) -> bool:
    return method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path and "//" not in path


def make_app(upstream: str, ca_certfile: str | None = None):
    """An ASGI app forwarding Fleet API calls to `upstream` (e.g. ``https://127.0.0.1:9100``)."""
    import httpx

    client = httpx.AsyncClient(base_url=upstream, verify=ca_certfile or True, timeout=httpx.Timeout(600.0))

    async def respond(send, status: int, body: bytes, headers=()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if not is_fleet_request(scope["method"], scope["path"]):
            await respond(send, 404, REFUSED_BODY, [(b"content-type", b"application/json")])
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                await respond(send, 413, b'{"detail": "request too large"}')
                return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        try:
            r = await client.post(scope["path"], content=body, headers=headers)
        except httpx.HTTPError:
            await respond(send, 502, b'{"detail": "the SuperLink did not answer"}')
            return
        keep = [(k.encode(), v.encode()) for k, v in r.headers.items()
                if k.lower().encode() not in HOP_BY_HOP and k.lower() != "content-encoding"]
        await respond(send, r.status_code, r.content, keep)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m sapf.federation.fleet_gate", description=__doc__.split("\n")[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="The SuperLink's URL on the loopback interface.")
    ap.add_argument("--ssl-certfile")
    ap.add_argument("--ssl-keyfile")
    ap.add_argument("--ca-certfile", help="CA that verifies the SuperLink's certificate (TLS upstream).")
    a = ap.parse_args(argv)
    uvicorn.run(make_app(a.upstream, a.ca_certfile), host=a.host, port=a.port, ssl_certfile=a.ssl_certfile,
                ssl_keyfile=a.ssl_keyfile, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
