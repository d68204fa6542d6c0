"""``discovery show --watcher``: what it reads from a watcher's ``/v1/health``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from discovery.cli.show import ejections

EJECTED = [{"service": "web", "id": "h3:3:80", "reason": "5 errors in a row", "ejections": 2,
            "back_in_s": 12.5},
           {"service": "api", "id": "h4:4:80", "reason": "other service", "ejections": 1,
            "back_in_s": 1.0}]


@pytest.fixture
def watcher_http() -> Iterator[dict[str, Any]]:
    """A fake watcher HTTP API: ``answer["status"]`` and ``answer["body"]`` for every GET."""
    answer: dict[str, Any] = {"status": 200, "body": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps(answer["body"]).encode()
            self.send_response(answer["status"])
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answer["addr"] = f"127.0.0.1:{server.server_address[1]}"
    yield answer
    server.shutdown()
    server.server_close()


def test_ejections_of_one_service_with_until(watcher_http: dict[str, Any]) -> None:
    watcher_http["body"] = {"ok": True, "components": {"outliers": {"ejected": EJECTED}}}
    assert ejections(watcher_http["addr"], "web", 1000.0) == {"h3:3:80": {
        "reason": "5 errors in a row", "ejections": 2, "back_in_s": 12.5, "until": 1012.5}}
    assert ejections(watcher_http["addr"], "db", 1000.0) == {}


def test_an_unhealthy_watcher_still_reports_its_ejections(watcher_http: dict[str, Any]) -> None:
    watcher_http["status"] = 503  # e.g. its registry is down: /v1/health answers 503
    watcher_http["body"] = {"ok": False, "components": {"outliers": {"ejected": EJECTED[:1]}}}
    assert list(ejections(watcher_http["addr"], "web", 0.0)) == ["h3:3:80"]


def test_a_watcher_without_outlier_detection_ejected_nothing(
        watcher_http: dict[str, Any]) -> None:
    watcher_http["body"] = {"ok": True, "components": {"registry": {"ok": True}}}
    assert ejections(watcher_http["addr"], "web", 0.0) == {}


def test_an_error_is_one_line_naming_the_watcher(watcher_http: dict[str, Any],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    watcher_http["status"], watcher_http["body"] = 500, {"error": "boom"}
    with pytest.raises(SystemExit) as info:
        ejections(watcher_http["addr"], "web", 0.0)
    assert info.value.code == 2
    assert capsys.readouterr().err == f"discovery: watcher at {watcher_http['addr']}: boom\n"
