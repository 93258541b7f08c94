"""A stand-in for the Hugging Face Hub on 127.0.0.1: the resolve endpoint, with HEAD, byte ranges, the
headers huggingface_hub reads, a token check, byte counting and an injectable dropped connection."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class FakeHub:
    def __init__(self, token: str | None = None) -> None:
        self.repos: dict[str, dict] = {}
        self.token = token
        self.served: Counter[str] = Counter()      # body bytes sent per "repo/file"
        self.drop_after: dict[str, int] = {}       # "repo/file" -> send this many bytes, then cut (once)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"branches": {}, "commits": {}})
        repo["branches"][branch] = commit
        repo["commits"][commit] = files
        return commit

    def weight_bytes(self, repo_id: str) -> int:
        files = next(iter(self.repos[repo_id]["commits"].values()))
        return sum(len(v) for k, v in files.items() if k.endswith(".safetensors"))

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        parts = unquote(h.path).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "EntryNotFound")
        repo_id, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "GatedRepo")
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound")
        commit = repo["branches"].get(rev, rev if rev in repo["commits"] else None)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound")
        data = repo["commits"][commit].get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        start, end = 0, len(data) - 1
        rng = h.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
        h.send_response(206 if rng else 200)
        h.send_header("X-Repo-Commit", commit)
        if filename.endswith(".safetensors"):  # an LFS file: its ETag is its sha256
            sha = hashlib.sha256(data).hexdigest()
            h.send_header("ETag", f'"{sha}"')
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
        else:
            h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.send_header("Content-Length", str(end - start + 1 if body or rng else len(data)))
        h.end_headers()
        if not body:
            return
        chunk = data[start:end + 1]
        key = f"{repo_id}/{filename}"
        cut = self.drop_after.pop(key, None)
        if cut is not None:
            h.wfile.write(chunk[:cut])
            h.wfile.flush()
            self.served[key] += min(cut, len(chunk))
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(chunk)
        self.served[key] += len(chunk)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, code: int, kind: str) -> None:
        h.send_response(code)
        h.send_header("X-Error-Code", kind)
        h.send_header("Content-Length", "0")
        h.end_headers()
