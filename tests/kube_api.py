"""A local stand-in for the Kubernetes API's EndpointSlice list and watch (no kube-apiserver
can run here). It speaks the protocol the `kubernetes` client uses: a list returns the items
and a resourceVersion; a watch from a version streams JSON events in HTTP chunks, ends after
timeoutSeconds, and answers a version it no longer holds with an ERROR event of code 410.

Tests change the slices (`set_endpoints`, `delete`), break watches (`drop_watches`) and
forget old versions (`compact`); `watches` records the resourceVersion each watch asked for.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"
SERVICE_LABEL = "kubernetes.io/service-name"


class FakeKubeApi:
    def __init__(self, namespace: str = "tandem"):
        self.namespace = namespace
        self.version = 1000
        self.slices: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.oldest_version = 0  # a watch from before this gets 410 Gone
        self.watches: list[str] = []  # resourceVersion of each watch request, in order
        self.lists = 0
        self._drops = 0
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()

    # --- what tests change ---------------------------------------------------------------

    def set_endpoints(self, name: str, service: str, endpoints: list[tuple[str, bool]], port: int,
                      port_name: str = "grpc") -> None:
        """Create or replace slice `name` of `service` with (ip, ready) endpoints on `port`."""
        with self._cond:
            self.version += 1
            kind = "MODIFIED" if name in self.slices else "ADDED"
            self.slices[name] = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": name, "namespace": self.namespace, "resourceVersion": str(self.version),
                             "labels": {SERVICE_LABEL: service}},
                "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints],
            }
            self.events.append((self.version, kind, copy.deepcopy(self.slices[name])))
            self._cond.notify_all()

    def delete(self, name: str) -> None:
        with self._cond:
            self.version += 1
            obj = self.slices.pop(name)
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.events.append((self.version, "DELETED", obj))
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Break every open watch connection mid-stream, as a restarting API server would."""
        with self._cond:
            self._drops += 1
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the event history: watches from any version seen so far get 410 Gone."""
        with self._cond:
            self.oldest_version = self.version + 1
            self.events.clear()

    # --- the HTTP side -------------------------------------------------------------------

    def _selected(self, obj: dict, selector: str) -> bool:
        if not selector:
            return True
        key, _, value = selector.partition("=")
        return obj["metadata"]["labels"].get(key) == value

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):  # noqa: N802 - the http.server name
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path != f"{PREFIX}{api.namespace}/endpointslices":
                    return self._send_json(404, {"kind": "Status", "code": 404, "reason": "NotFound",
                                                 "message": f"no route {url.path}"})
                selector = query.get("labelSelector", "")
                if query.get("watch") in ("true", "1"):
                    return self._watch(selector, int(query.get("resourceVersion") or api.version),
                                       float(query.get("timeoutSeconds", 30)))
                with api._cond:
                    api.lists += 1
                    items = [copy.deepcopy(s) for s in api.slices.values() if api._selected(s, selector)]
                    body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                            "metadata": {"resourceVersion": str(api.version)}, "items": items}
                self._send_json(200, body)

            def _send_json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, event: dict) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _watch(self, selector: str, since: int, timeout_s: float) -> None:
                api.watches.append(str(since))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with api._cond:
                    drops = api._drops
                    if since < api.oldest_version:
                        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                  "reason": "Expired", "message": f"too old resource version: {since}"}
                        self._chunk({"type": "ERROR", "object": status})
                        return self._end()
                    sent = since
                    deadline_left = timeout_s
                    while True:
                        if api._drops != drops:  # break the connection without the final chunk
                            self.connection.shutdown(socket.SHUT_RDWR)
                            self.close_connection = True
                            return
                        for version, kind, obj in api.events:
                            if version > sent and api._selected(obj, selector):
                                self._chunk({"type": kind, "object": obj})
                            sent = max(sent, version)
                        if deadline_left <= 0:
                            return self._end()
                        api._cond.wait(0.1)
                        deadline_left -= 0.1

            def _end(self) -> None:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                self.close_connection = True

        return Handler
