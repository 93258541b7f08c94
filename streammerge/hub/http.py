"""HTTP to the hub: file metadata (HEAD), byte ranges and streamed downloads.

The token comes from huggingface_hub's lookup (HF_TOKEN, the saved login) and is sent only to the hub's
own host: a download redirected to a CDN goes there without it. No message holds the token.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterator

from ..errors import HubError, clip
from . import cache
from .refs import RepoRef

TIMEOUT_S = 30.0
CHUNK = 8 << 20


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("this config names a hub repository, which needs huggingface_hub: "
                       "pip install 'streammerge[hub]' (or give local model folders)") from None
    return huggingface_hub


@dataclass(frozen=True)
class FileMeta:
    repo_id: str
    filename: str
    commit: str
    etag: str
    size: int
    url: str                            # where the bytes are (the resolve URL, or the CDN it redirects to)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102  (urllib's hook)
        return None


class _DropAuthOnHostChange(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102  (urllib's hook)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        if new is not None and req.has_header("Range"):
            new.add_header("Range", req.get_header("Range"))
        return new


class HubClient:
    """One endpoint and token for a run; every request names the repo and file in its errors."""

    def __init__(self) -> None:
        self.endpoint = cache.endpoint()
        self._host = urllib.parse.urlsplit(self.endpoint).netloc
        self._token = _hf().get_token() or None
        self._head_opener = urllib.request.build_opener(_NoRedirect)
        self._get_opener = urllib.request.build_opener(_DropAuthOnHostChange)
        self.bytes_received = 0

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"User-Agent": "streammerge", "Accept-Encoding": "identity"}
        if self._token and urllib.parse.urlsplit(url).netloc == self._host:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _fail(self, what: str, e: Exception, url: str | None = None) -> HubError:
        if isinstance(e, urllib.error.HTTPError):
            url = getattr(e, "url", None) or url  # where it failed: after a redirect, the CDN
            if url is not None and urllib.parse.urlsplit(url).netloc != self._host and e.code in (401, 403, 410):
                return HubError(f"{what}: the download link the hub gave ({urllib.parse.urlsplit(url).netloc}) was "
                                f"refused (HTTP {e.code}; signed links expire); run the same command again")
            code, message = e.headers.get("X-Error-Code"), e.headers.get("X-Error-Message") or ""
            if code == "GatedRepo":
                return HubError(f"{what}: the repository is gated (HTTP {e.code}): accept its terms on its hub page "
                                "with your account, then log in (`huggingface-cli login`) or set HF_TOKEN")
            if e.code in (401, 403):
                if self._token and (e.code == 403 or message == "Invalid credentials in Authorization header"):
                    why = "the token is not valid or has no access to it; check HF_TOKEN or `huggingface-cli login`"
                else:
                    why = "it is private or gated; log in (`huggingface-cli login`) or set HF_TOKEN"
                return HubError(f"{what}: access denied (HTTP {e.code}): {why}")
            return HubError(f"{what}: the hub answered HTTP {e.code} ({clip(self._scrub(message or str(e.reason)), 80)})")
        reason = getattr(e, "reason", None) or e
        return HubError(f"{what}: cannot reach {self.endpoint} ({clip(self._scrub(str(reason)), 120)}); check the "
                        "network, or set HF_HUB_OFFLINE=1 to use only what is in the cache")

    def _not_found(self, ref: RepoRef, e: urllib.error.HTTPError) -> HubError | None:
        """The hub's 'no such repository / revision' (a 401 without a token, since it hides private repos)."""
        code, message = e.headers.get("X-Error-Code"), e.headers.get("X-Error-Message") or ""
        if code == "RevisionNotFound":
            return HubError(f"{ref}: revision '{ref.revision or 'main'}' not found in {ref.repo_id} on the hub; "
                            "check the branch, tag or commit hash after '@'")
        if code == "RepoNotFound" or (e.code == 401 and code is None and not self._token
                                      and message != "Invalid credentials in Authorization header"):
            return HubError(f"{ref}: repository {ref.repo_id} not found on the hub ({self.endpoint}); check the "
                            "name, or, if it is private, log in (`huggingface-cli login`) or set HF_TOKEN")
        return None

    def url(self, repo_id: str, filename: str, revision: str) -> str:
        return (f"{self.endpoint}/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/"
                f"{urllib.parse.quote(filename)}")

    def head(self, ref: RepoRef, filename: str) -> FileMeta | None:
        """A file's metadata at the revision; None when the repo has no such file. A missing repository
        or revision is an error naming which."""
        url = self.url(ref.repo_id, filename, ref.revision or "main")
        what = f"{ref}: {filename}"
        for _ in range(5):  # relative redirects: a renamed repo
            req = urllib.request.Request(url, method="HEAD", headers=self._headers(url))
            try:
                resp = self._head_opener.open(req, timeout=TIMEOUT_S)
            except urllib.error.HTTPError as e:
                if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                    loc = urllib.parse.urljoin(url, e.headers["Location"])
                    if urllib.parse.urlsplit(loc).netloc == urllib.parse.urlsplit(url).netloc:
                        url = loc
                        continue
                    return self._redirected_meta(ref, filename, e.headers, loc, what)
                if e.code in (401, 404):
                    missing = self._not_found(ref, e)
                    if missing is not None:
                        raise missing from None
                if e.code == 404:
                    return None
                raise self._fail(what, e) from None
            except (urllib.error.URLError, OSError) as e:
                raise self._fail(what, e) from None
            with resp:
                return self._meta(ref, filename, resp.headers, url, what)
        raise HubError(f"{what}: too many redirects from {self.endpoint}")

    def _redirected_meta(self, ref: RepoRef, filename: str, headers, loc: str, what: str) -> FileMeta:
        """An LFS file redirected to a CDN: its size is X-Linked-Size (the redirect's Content-Length is the
        redirect's own); without it, ask the CDN, sending no token."""
        if headers.get("X-Linked-Size") is None:
            req = urllib.request.Request(loc, method="HEAD", headers=self._headers(loc))
            try:
                with self._head_opener.open(req, timeout=TIMEOUT_S) as resp:
                    size = resp.headers.get("Content-Length")
            except (urllib.error.URLError, OSError) as e:
                raise self._fail(what, e, loc) from None
            headers = {k: v for k, v in headers.items()} | {"X-Linked-Size": size or ""}
        return self._meta(ref, filename, headers, loc, what, redirected=True)

    def _meta(self, ref: RepoRef, filename: str, headers, url: str, what: str, redirected: bool = False) -> FileMeta:
        commit = headers.get("X-Repo-Commit")
        etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").strip('"').removeprefix("W/").strip('"')
        size = headers.get("X-Linked-Size") or (None if redirected else headers.get("Content-Length"))
        if not commit or not etag or size is None or not size.isdigit():
            raise HubError(f"{what}: the hub's answer lacks X-Repo-Commit, ETag or the size; is HF_ENDPOINT "
                           f"({self.endpoint}) a Hugging Face hub?")
        return FileMeta(ref.repo_id, filename, commit, etag, int(size), url)

    def read(self, meta: FileMeta, start: int, length: int) -> bytes:
        """`length` bytes from `start` (a header: a range request, never the file)."""
        with self._open(meta, start, start + length - 1) as resp:
            data = resp.read(length + 1)
        self.bytes_received += len(data)
        if len(data) != length:
            raise HubError(f"{meta.repo_id}: {meta.filename}: asked for bytes {start}..{start + length - 1}, "
                           f"got {len(data)} bytes; the file on the hub is shorter than its header says")
        return data

    def stream(self, meta: FileMeta, start: int) -> Iterator[bytes]:
        """The file from `start` to its end, in chunks."""
        resp = self._open(meta, start, None)
        with resp:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, ValueError) as e:  # a dropped connection mid-body
                    raise self._fail(f"{meta.repo_id}: {meta.filename}", e, meta.url) from None
                if not chunk:
                    return
                self.bytes_received += len(chunk)
                yield chunk

    def _open(self, meta: FileMeta, start: int, end: int | None):
        headers = self._headers(meta.url)
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        req = urllib.request.Request(meta.url, headers=headers)
        try:
            resp = self._get_opener.open(req, timeout=TIMEOUT_S)
        except (urllib.error.URLError, OSError) as e:
            raise self._fail(f"{meta.repo_id}: {meta.filename}", e, meta.url) from None
        if (start or end is not None) and resp.status != 206:
            resp.close()
            raise HubError(f"{meta.repo_id}: {meta.filename}: the server ignored the byte range (HTTP {resp.status}); "
                           "streammerge needs range requests to read headers and resume downloads")
        return resp
