#!/usr/bin/env python3
"""A tiny Docker token server for Ember's bearer-auth end-to-end test.

Usage: token_server.py KEY.pem CERT.pem LOG.jsonl

Listens on a free 127.0.0.1 port and prints that port on the first line of
stdout. `GET /token?service=S&scope=repository:NAME:ACTIONS` answers
`{"token": JWT, "access_token": JWT, "expires_in": 300}`, where JWT is an
RS256 token signed with KEY.pem carrying CERT.pem in its `x5c` header, as
CNCF distribution's `auth: token` expects.

The realm may carry a query string of its own (`/token?service=S&foo=bar`,
as some real registries' realms do); every parameter is logged, so a test can
check that a client kept the realm's parameters and still sent its scope.

Anonymous requests get `pull` only; Basic `alice:s3cret` gets `pull,push`;
other Basic credentials, and any scope on a repository under `private/`,
get 401. Every request is logged to LOG.jsonl as one JSON object a line.
"""

import base64
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

ISSUER = "ember-test-issuer"
USERS = {"alice": "s3cret"}

KEY, CERT, LOG = sys.argv[1], sys.argv[2], sys.argv[3]
with open(CERT) as f:
    CERT_DER_B64 = base64.b64encode(ssl.PEM_cert_to_DER_cert(f.read())).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(signing_input: bytes) -> bytes:
    return subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", KEY],
        input=signing_input,
        capture_output=True,
        check=True,
    ).stdout


def make_jwt(subject: str, service: str, access: list) -> str:
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "x5c": [CERT_DER_B64]}
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": service,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": os.urandom(16).hex(),
        "access": access,
    }
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    ).encode()
    return signing_input.decode() + "." + b64url(sign(signing_input))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):  # keep stderr quiet
        pass

    def reply(self, status: int, body: dict, entry: dict):
        entry["status"] = status
        with open(LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        authz = self.headers.get("Authorization")
        entry = {
            "path": url.path,
            "raw_query": url.query,
            "foo": query.get("foo", []),
            "service": query.get("service", []),
            "scope": query.get("scope", []),
            "authorization": authz.split(" ", 1)[0] if authz else None,
            "user": None,
        }
        if url.path != "/token":
            return self.reply(404, {"error": "not found"}, entry)

        subject, allowed = "anon", {"pull"}
        if authz:
            scheme, _, value = authz.partition(" ")
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except Exception:
                user, password = None, None
            entry["user"] = user
            if scheme.lower() != "basic" or USERS.get(user) != password:
                return self.reply(401, {"error": "bad credentials"}, entry)
            subject, allowed = user, {"pull", "push"}

        access = []
        for scope in query.get("scope", []):
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            # Names may not contain ':', but be lenient: actions are last.
            name, actions = ":".join(parts[1:-1]), parts[-1].split(",")
            if name.startswith("private/"):
                return self.reply(401, {"error": f"access to {name} denied"}, entry)
            granted = [a for a in actions if a in allowed]
            access.append({"type": "repository", "name": name, "actions": granted})
        entry["granted"] = access

        service = (query.get("service") or [""])[0]
        token = make_jwt(subject, service, access)
        self.reply(
            200,
            {"token": token, "access_token": token, "expires_in": 300},
            entry,
        )


def main():
    server = HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
