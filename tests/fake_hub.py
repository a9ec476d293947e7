"""A small fake Hugging Face Hub for upload tests: enough of the HTTP API for the real `huggingface_hub` client's
`create_repo` + `upload_folder` / `create_commit` (and so `push_to_hub`) to succeed, with no network.

    with fake_hub(tmp_path / "hub") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "any-token"}
        subprocess.run([...], env=env)          # huggingface_hub reads HF_ENDPOINT at import: use a fresh process
        hub.repo_dir("org/name")                # the uploaded files, as a folder
        hub.requests                            # every request, as (method, path)

Served on 127.0.0.1 (a free port) by `http.server` in a background thread:

| request                                        | reply                                                          |
| ---------------------------------------------- | -------------------------------------------------------------- |
| `POST /api/repos/create`                       | `{"url": endpoint/ns/name}`                                    |
| `POST /api/validate-yaml`                      | `{}`                                                           |
| `POST /api/models/{ns}/{name}/preupload/{rev}` | every file `"uploadMode": "regular"` (inline base64: no LFS)   |
| `POST /api/models/{ns}/{name}/commit/{rev}`    | stores the NDJSON `file` lines under `storage/ns/name/`        |
| anything else                                  | 404                                                            |

Deleted files (`deletedFile` / `deletedFolder` lines) are removed; LFS files cannot arrive since preupload never
asks for LFS. Not served: downloads (`/resolve/`), so `from_pretrained("ns/name")` against it does not work; load
`repo_dir(...)` as a local folder instead.
"""

import base64
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

_REPO = r"([\w.-]+/[\w.-]+)"
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/([^/?]+)")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/([^/?]+)")


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str | None
    files: list[str]
    deleted: list[str]


@dataclass
class FakeHub:
    """The state of a running fake Hub. `endpoint` is the URL to put in HF_ENDPOINT, `storage` the folder holding
    one sub-folder per repository id."""

    storage: Path
    endpoint: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def repo_dir(self, repo_id: str) -> Path:
        return self.storage / repo_id

    def repo_files(self, repo_id: str) -> list[str]:
        """The repository's files, as sorted POSIX paths relative to its root."""
        root = self.repo_dir(repo_id)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    @property
    def paths(self) -> list[str]:
        """Every request path received, without the query string, in order."""
        return [path.split("?")[0] for _, path in self.requests]

    # ---- request handling (called from the server threads) -----------------------------------------------------------

    def _target(self, repo_id: str, rel: str) -> Path:
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad path in commit: {rel!r}")
        return self.repo_dir(repo_id).joinpath(*parts)

    def _create(self, body: bytes, endpoint: str) -> tuple[int, dict]:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or 'mockuser'}/{payload['name']}"
        with self._lock:
            self.created.append({**payload, "repo_id": repo_id})
        self.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)
        return 200, {"url": f"{endpoint}/{repo_id}", "name": repo_id}

    def _commit(self, repo_id: str, revision: str, body: bytes, endpoint: str) -> tuple[int, dict]:
        header, files, deleted, writes = {}, [], [], []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise ValueError(f"unsupported encoding {value.get('encoding')!r}")
                writes.append((self._target(repo_id, value["path"]), base64.b64decode(value["content"])))
                files.append(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile, copies: never requested by this fake's preupload reply
                raise ValueError(f"unsupported commit operation {key!r}")
        for rel in deleted:
            target = self._target(repo_id, rel.rstrip("/"))
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for target, data in writes:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            self.commits.append(Commit(repo_id, revision, header.get("summary"), files, deleted))
        return 200, {"commitUrl": f"{endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _handle_post(self, path: str, body: bytes, endpoint: str) -> tuple[int, dict]:
        path = path.split("?")[0]
        if path == "/api/repos/create":
            return self._create(body, endpoint)
        if path == "/api/validate-yaml":
            return 200, {}
        if m := _PREUPLOAD.match(path):
            files = json.loads(body)["files"]
            return 200, {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                ]
            }
        if m := _COMMIT.match(path):
            return self._commit(m.group(1), m.group(2), body, endpoint)
        return 404, {"error": f"not served by the fake Hub: POST {path}"}


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output quiet
            pass

        def _record(self) -> None:
            with hub._lock:
                hub.requests.append((self.command, self.path))

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: dict | None, head: bool = False) -> None:
            data = json.dumps(payload or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 404:
                self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def do_POST(self):
            self._record()
            body = self._body()
            try:
                status, payload = hub._handle_post(self.path, body, f"http://{self.headers['Host']}")
            except (ValueError, KeyError) as e:  # a malformed request: a 400 the client will show
                with hub._lock:
                    hub.errors.append(f"POST {self.path}: {e}")
                status, payload = 400, {"error": str(e)}
            self._send(status, payload)

        def _not_found(self, head: bool = False) -> None:
            self._record()
            self._body()
            self._send(404, {"error": f"not served by the fake Hub: {self.command} {self.path}"}, head=head)

        def do_GET(self):
            self._not_found()

        def do_HEAD(self):
            self._not_found(head=True)

        def do_PUT(self):
            self._not_found()

        def do_DELETE(self):
            self._not_found()

    return Handler


@contextmanager
def fake_hub(storage: str | Path) -> Iterator[FakeHub]:
    """Serves a fake Hub storing uploads under `storage` until the block ends; yields its `FakeHub`."""
    hub = FakeHub(storage=Path(storage))
    hub.storage.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(hub))
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
