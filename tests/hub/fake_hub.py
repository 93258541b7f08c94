"""A stand-in for the Hugging Face Hub on 127.0.0.1: the resolve endpoint, with HEAD, byte ranges, the
headers huggingface_hub reads, a token check, byte counting and an injectable dropped connection.

Shaped like the real hub where streammerge's behaviour depends on it: errors carry X-Error-Code and
X-Error-Message (a missing repo is a 401 to an anonymous caller, since the hub hides private repos; an
invalid token is a 401 "Invalid credentials in Authorization header"); with `cdn` set, LFS files answer
with a 302 to another host (`FakeCDN`) carrying X-Linked-Etag/X-Linked-Size; a renamed repo answers with
a relative 307 to its new name."""

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
        self.renamed: dict[str, str] = {}          # old repo id -> new repo id (answered with a relative 307)
        self.cdn: FakeCDN | None = None            # set: LFS files redirect there
        self.requests: list[tuple[str, str]] = []  # (method, path) as received
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
        self.requests.append((h.command, h.path))
        parts = unquote(h.path).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "EntryNotFound", "Entry not found")
        repo_id, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        auth = h.headers.get("Authorization")
        if auth is not None and (self.token is None or auth != f"Bearer {self.token}"):
            return self._error(h, 401, None, "Invalid credentials in Authorization header")
        if self.token is not None and auth is None:
            return self._error(h, 401, "GatedRepo", "Access to model is restricted.")
        if repo_id in self.renamed:
            h.send_response(307)
            h.send_header("Location", "/" + "/".join([self.renamed[repo_id], *parts[2:]]))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        repo = self.repos.get(repo_id)
        if repo is None:  # the hub hides private repos: a missing one is a 401 to an anonymous caller
            return self._error(h, 404 if auth else 401, "RepoNotFound", "Repository not found")
        commit = repo["branches"].get(rev, rev if rev in repo["commits"] else None)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        data = repo["commits"][commit].get(filename)
        if data is None:
            h.send_response(404)
            h.send_header("X-Repo-Commit", commit)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Error-Message", "Entry not found")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.cdn is not None and filename.endswith(".safetensors"):
            sha = hashlib.sha256(data).hexdigest()
            self.cdn.blobs[sha] = (f"{repo_id}/{filename}", data)
            h.send_response(302)
            h.send_header("Location", f"{self.cdn.url}/repos/{sha}?X-Amz-Signature=fake")
            h.send_header("X-Repo-Commit", commit)
            h.send_header("ETag", f'"{sha}"')
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("Content-Length", "0")  # the redirect's own body, not the file's size
            h.end_headers()
            return
        rng, start, end = _byte_range(h, len(data))
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
    def _error(h: BaseHTTPRequestHandler, code: int, kind: str | None, message: str) -> None:
        h.send_response(code)
        if kind:
            h.send_header("X-Error-Code", kind)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Length", "0")
        h.end_headers()


class FakeCDN:
    """The host LFS downloads are redirected to: bytes by sha256 with ranges; it records every
    Authorization header it is sent (a hub token must never reach it) and counts into the hub's `served`."""

    def __init__(self, hub: FakeHub) -> None:
        self.blobs: dict[str, tuple[str, bytes]] = {}
        self.auth_seen: list[str] = []
        self.hits = 0
        self.expired = False                       # set: every link is refused (403), as an expired signed URL
        cdn = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                cdn._answer(self, hub, body=False)

            def do_GET(self) -> None:
                cdn._answer(self, hub, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        hub.cdn = self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, hub: FakeHub, body: bool) -> None:
        self.hits += 1
        if h.headers.get("Authorization") is not None:
            self.auth_seen.append(h.headers["Authorization"])
        sha = h.path.split("?")[0].rsplit("/", 1)[-1]
        if sha not in self.blobs or self.expired:
            h.send_response(403 if self.expired else 404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        key, data = self.blobs[sha]
        rng, start, end = _byte_range(h, len(data))
        h.send_response(206 if rng else 200)
        h.send_header("ETag", f'"{sha}"')
        h.send_header("Accept-Ranges", "bytes")
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.send_header("Content-Length", str(end - start + 1))
        h.end_headers()
        if not body:
            return
        cut = hub.drop_after.pop(key, None)
        chunk = data[start:end + 1] if cut is None else data[start:start + cut]
        h.wfile.write(chunk)
        hub.served[key] += len(chunk)
        if cut is not None:
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)


def _byte_range(h: BaseHTTPRequestHandler, size: int) -> tuple[str | None, int, int]:
    """The request's Range header and the first and last byte it asks for (the whole file without one)."""
    rng = h.headers.get("Range")
    if not rng:
        return None, 0, size - 1
    a, _, b = rng.removeprefix("bytes=").partition("-")
    return rng, int(a), min(int(b) if b else size - 1, size - 1)
