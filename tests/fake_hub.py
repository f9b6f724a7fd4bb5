"""A local stand-in for the Hugging Face hub's file endpoint, so that partial downloads run through the real
``huggingface_hub`` code path offline: ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{path}`` of files under a
folder per repo, with the headers ``hf_hub_download`` reads (commit, ETag, size) and the hub's 404 for a missing
entry. It records every GET, so a test can tell which files were fetched."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.gets: list[str] = []  # "repo/path" of every GET
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _file(self) -> tuple[str, Path | None]:
                parts = unquote(self.path.split("?", 1)[0]).lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return "", None
                repo, rel = "/".join(parts[:2]), "/".join(parts[4:])
                folder = hub.repos.get(repo)
                path = folder / rel if folder else None
                return f"{repo}/{rel}", path if path is not None and path.is_file() else None

            def _headers(self, path: Path | None) -> None:
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()

            def do_HEAD(self) -> None:
                self._headers(self._file()[1])

            def do_GET(self) -> None:
                name, path = self._file()
                self._headers(path)
                if path is not None:
                    hub.gets.append(name)
                    self.wfile.write(path.read_bytes())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
