"""A Hugging Face Hub stand-in for the push tests: stdlib ``http.server`` on 127.0.0.1 only.

It implements the routes huggingface_hub 2.4 calls for ``HfApi.create_repo``, ``create_branch``,
``upload_folder`` (its ``hf_xet`` pipeline and the legacy ``create_commit`` path), ``repo_info``,
``list_repo_tree`` / ``get_paths_info``, ``create_pull_request``, ``ModelCard.validate`` and
``hf_hub_download`` (read from ``hf_api.py``, ``_commit_api.py``, ``_upload_pipeline.py``,
``repocard.py`` and ``file_download.py`` of that version):

====== ================================================ =========================================
method route                                            used by
====== ================================================ =========================================
GET    /api/whoami-v2                                   ``whoami``
POST   /api/repos/create                                ``create_repo`` (409 when it exists)
POST   /api/models/{repo}/branch/{branch}               ``create_branch`` (409 when it exists)
GET    /api/models/{repo}/refs                          ``list_repo_refs``
POST   /api/validate-yaml                               ``ModelCard.validate``, ``_validate_yaml``
POST   /api/models/{repo}/preupload/{rev}               upload modes: always ``"regular"``
POST   /api/models/{repo}/commit/{rev}                  NDJSON commit (``file`` / ``deletedFile``)
POST   /api/models/{repo}/discussions                   ``create_pull_request`` (``refs/pr/N``)
GET    /api/models/{repo}/discussions/{num}             ``get_discussion_details``
GET    /api/models/{repo}[/revision/{rev}]              ``repo_info`` / ``model_info``
GET    /api/models/{repo}/tree/{rev}[/{path}]           ``list_repo_tree``
POST   /api/models/{repo}/paths-info/{rev}              ``get_paths_info``
HEAD   /{repo}/resolve/{rev}/{path} (and GET)           ``hf_hub_download``
====== ================================================ =========================================

Every file is answered with upload mode ``"regular"``, so contents travel base64-inline in the
commit (no LFS, no Xet). Each branch is stored as a plain folder ``root/{namespace}/{name}/{rev}``
(``rev`` URL-quoted: ``refs%2Fpr%2F1``), so tests compare bytes with ordinary file reads. Every
request is recorded (method, path, query, lower-cased headers, body) and every commit (repo,
revision, summary, description, files); requests to routes the stand-in does not know are
answered 404 and listed in ``unhandled``. ``fail()`` makes the next matching requests return an
error (a JSON body, or an HTML page as a proxy or a website would send: ``html=True``, also with
status 200 where JSON is expected), ``hang()`` makes them wait without answering until ``stop()``,
and ``echo_authorization = True`` makes every error body (and an ``X-HF-Warning`` header, which
huggingface_hub logs) quote the request's ``Authorization`` header back, as a careless server might.
Tokens: ``WRITE_TOKEN`` (user ``tester``, member of ``lorasave-org``) and ``READ_TOKEN``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

WRITE_TOKEN = "hf_standinWRITEtokenAbCdEf0123456789"
READ_TOKEN = "hf_standinREADtokenAbCdEf01234567890"
USER = "tester"
ORG = "lorasave-org"
_MAX_BODY = 256 << 20  # the stand-in refuses bodies above 256 MiB
_YAML_BLOCK = re.compile(r"\A\ufeff?\s*---[\r\n]+([\s\S]*?)[\r\n]+---(\r\n|\n|$)")
_ACTIONS = "preupload|commit|branch|revision|tree|paths-info|refs|discussions"
_REPO_ROUTE = re.compile(rf"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<action>{_ACTIONS})(?:/(?P<rest>.*))?$")
_INFO_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)$")
_RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data`` (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Request:
    """One request as the stand-in received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0


@dataclass
class Commit:
    """One commit the stand-in applied."""

    repo_id: str
    revision: str
    oid: str
    summary: str
    description: str
    added: list[str]
    deleted: list[str]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    heads: dict[str, str] = field(default_factory=dict)  # branch / PR ref -> commit oid
    prs: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    message: str
    html: bool = False
    hang: bool = False


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra


class HubStandIn:
    """State and storage of the stand-in; ``start()`` serves it on 127.0.0.1 in a daemon thread."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens = {WRITE_TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}
        self.orgs = {USER: [ORG]}
        self.requests: list[Request] = []
        self.commits: list[Commit] = []
        self.unhandled: list[str] = []
        self._repos: dict[str, _Repo] = {}
        self._failures: list[_Failure] = []
        self.echo_authorization = False
        self._released = threading.Event()  # set by stop(): hanging handlers give up
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the value for ``HF_ENDPOINT``)."""
        assert self._httpd is not None, "not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubStandIn:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        stand_in = self

        class Handler(_Handler):
            hub = stand_in

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (bounded: joins the thread for at most 5 s)."""
        self._released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ test helpers

    def fail(self, method: str, path_regex: str, status: int, *, times: int = 1, message: str = "stand-in: injected failure", html: bool = False) -> None:
        """Answer the next ``times`` requests whose path matches ``path_regex`` (``re.search``) with ``status``.

        ``html``: the body is an HTML page (``Content-Type: text/html``, no ``X-Error-Message``), as a
        proxy, a captive portal or a website at ``HF_ENDPOINT`` answers; with ``status=200`` it stands
        where JSON is expected.
        """
        with self._lock:
            self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, times, message, html=html))

    def hang(self, method: str, path_regex: str, *, times: int = 1) -> None:
        """Accept the next ``times`` matching requests and never answer them (until ``stop()``)."""
        with self._lock:
            self._failures.append(_Failure(method.upper(), re.compile(path_regex), 0, times, "", hang=True))

    def clear_failures(self) -> None:
        """Forget the failures ``fail()`` planned and not yet served."""
        with self._lock:
            self._failures.clear()

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repos[repo_id].private

    def branches(self, repo_id: str) -> dict[str, str]:
        """``{ref: head commit oid}`` of a repo (branches and ``refs/pr/N``)."""
        with self._lock:
            return dict(self._repos[repo_id].heads)

    def folder(self, repo_id: str, revision: str = "main") -> Path:
        """The plain folder holding ``revision`` of ``repo_id``."""
        return self.root / repo_id / quote(revision, safe="")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """``{path in repo: bytes}`` of a revision."""
        base = self.folder(repo_id, revision)
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    def requests_matching(self, method: str, path_regex: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and re.search(path_regex, r.path)]

    # ------------------------------------------------------------------ dispatch

    def handle(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        """Route one request; returns (status, headers, body)."""
        with self._lock:
            self.requests.append(req)
            planned = next((f for f in self._failures if f.times > 0 and f.method == req.method and f.pattern.search(req.path)), None)
            if planned is not None:
                planned.times -= 1
        if planned is not None and planned.hang:
            self._released.wait()
            return _json_response(503, {"error": "stand-in: stopped while hanging"})
        if planned is not None and planned.html:
            page = f"<!DOCTYPE html><html><head><title>{planned.status}</title></head><body><h1>{planned.message}</h1>{self._echo(req)}</body></html>"
            return planned.status, {"Content-Type": "text/html; charset=utf-8"}, page.encode()
        if planned is not None:
            message = planned.message + self._echo(req)
            return _json_response(planned.status, {"error": message}, {"X-Error-Message": message, **self._echo_warning(req)})
        try:
            return self._route(req)
        except _HubError as e:
            message = e.message + self._echo(req)
            headers = {"X-Error-Message": message, **self._echo_warning(req)}
            if e.code:
                headers["X-Error-Code"] = e.code
            return _json_response(e.status, {"error": message, **e.extra}, headers)

    def _echo_warning(self, req: Request) -> dict[str, str]:
        """An ``X-HF-Warning`` header quoting ``Authorization`` (huggingface_hub logs it) when ``echo_authorization`` is on."""
        echo = self._echo(req)
        return {"X-HF-Warning": f"stand-in-echo;{echo}"} if echo else {}

    def _echo(self, req: Request) -> str:
        """`` (you sent Authorization: ...)`` when ``echo_authorization`` is on."""
        auth = req.headers.get("authorization")
        return f" (you sent Authorization: {auth})" if self.echo_authorization and auth else ""

    def _route(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        m, p = req.method, req.path
        if m == "GET" and p == "/api/whoami-v2":
            return self._whoami(req)
        if m == "POST" and p == "/api/repos/create":
            return self._create_repo(req)
        if m == "POST" and p == "/api/validate-yaml":
            return self._validate_yaml(req)
        if (mm := _INFO_ROUTE.match(p)) and m == "GET":
            return self._info(req, unquote(mm["repo"]), "main")
        if mm := _REPO_ROUTE.match(p):
            repo_id, action, rest = unquote(mm["repo"]), mm["action"], mm["rest"] or ""
            if m == "POST" and action == "preupload":
                return self._preupload(req, repo_id, unquote(rest))
            if m == "POST" and action == "commit":
                return self._commit(req, repo_id, unquote(rest))
            if m == "POST" and action == "branch":
                return self._create_branch(req, repo_id, unquote(rest))
            if m == "GET" and action == "revision":
                return self._info(req, repo_id, unquote(rest))
            if m == "GET" and action == "tree":
                rev, _, sub = rest.partition("/")
                return self._tree(req, repo_id, unquote(rev), unquote(sub))
            if m == "POST" and action == "paths-info":
                return self._paths_info(req, repo_id, unquote(rest))
            if m == "GET" and action == "refs":
                return self._refs(req, repo_id)
            if m == "POST" and action == "discussions" and not rest:
                return self._create_pr(req, repo_id)
            if m == "GET" and action == "discussions" and rest.isdigit():
                return self._pr_details(req, repo_id, int(rest))
        if (mm := _RESOLVE_ROUTE.match(p)) and m in ("GET", "HEAD"):
            return self._resolve(req, unquote(mm["repo"]), unquote(mm["rev"]), unquote(mm["path"]))
        if m == "GET" and p == "/api/agent-harnesses":
            # huggingface_hub fetches this registry once per process when it first builds its
            # User-Agent; a 404 makes it fall back to "no agent" without writing a cache file
            raise _HubError(404, "stand-in: agent registry not emulated")
        with self._lock:
            self.unhandled.append(f"{m} {p}")
        raise _HubError(404, f"stand-in: no route for {m} {p}")

    # ------------------------------------------------------------------ auth

    def _user(self, req: Request, *, required: bool) -> tuple[str, str] | None:
        auth = req.headers.get("authorization", "")
        if not auth:
            if required:
                raise _HubError(401, "You must be authenticated to access this resource")
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _writer(self, req: Request, namespace: str) -> str:
        user, role = self._user(req, required=True) or ("", "")
        if role != "write":
            raise _HubError(403, "This token does not have write access")
        if namespace != user and namespace not in self.orgs.get(user, []):
            raise _HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        return user

    def _repo(self, req: Request, repo_id: str, *, write: bool) -> _Repo:
        user = self._user(req, required=write)
        with self._lock:
            repo = self._repos.get(repo_id)
        visible = repo is not None and (not repo.private or (user is not None and self._may_access(user[0], repo_id)))
        if not visible:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._writer(req, repo_id.split("/")[0])
        assert repo is not None
        return repo

    def _may_access(self, user: str, repo_id: str) -> bool:
        ns = repo_id.split("/")[0]
        return ns == user or ns in self.orgs.get(user, [])

    def _head(self, repo: _Repo, rev: str) -> tuple[str, str]:
        """(ref name, commit oid) of a branch, a PR ref or a head commit oid."""
        if rev in repo.heads:
            return rev, repo.heads[rev]
        for ref, oid in repo.heads.items():
            if rev == oid:
                return ref, oid
        raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # ------------------------------------------------------------------ routes

    def _whoami(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        user, role = self._user(req, required=True) or ("", "")
        orgs = [{"type": "org", "name": o, "fullname": o} for o in self.orgs.get(user, [])]
        doc = {
            "type": "user",
            "name": user,
            "fullname": user,
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in", "role": role}},
        }
        return _json_response(200, doc)

    def _create_repo(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        body = _json_body(req)
        name, org = body.get("name"), body.get("organization")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise _HubError(400, f"Invalid repo name: {name!r}")
        if body.get("type", "model") != "model":
            raise _HubError(400, "the stand-in only hosts model repos")
        user, _ = self._user(req, required=True) or ("", "")
        namespace = org or user
        self._writer(req, namespace)
        repo_id = f"{namespace}/{name}"
        url = f"{self._base(req)}/{repo_id}"
        with self._lock:
            if repo_id in self._repos:
                # the Hub's 409 carries the repo URL: create_repo(exist_ok=True) builds its RepoUrl from it
                raise _HubError(409, "You already created this model repo", url=url)
            private = body.get("visibility") == "private" or body.get("private") is True
            repo = _Repo(repo_id, private)
            self._repos[repo_id] = repo
            folder = self.folder(repo_id, "main")
            folder.mkdir(parents=True)
            (folder / ".gitattributes").write_bytes(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            repo.heads["main"] = self._record_commit(repo_id, "main", "initial commit", "", [".gitattributes"], [])
        return _json_response(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _create_branch(self, req: Request, repo_id: str, branch: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=True)
        if not branch or branch.startswith("refs/"):
            raise _HubError(400, f"Invalid reference for a branch: {branch}")
        start = _json_body(req).get("startingPoint") or "main"
        with self._lock:
            if branch in repo.heads:
                raise _HubError(409, f"Reference refs/heads/{branch} already exists")
            ref, oid = self._head(repo, start)
            shutil.copytree(self.folder(repo_id, ref), self.folder(repo_id, branch))
            repo.heads[branch] = oid
        return _json_response(200, {})

    def _refs(self, req: Request, repo_id: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=False)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.heads.items() if not b.startswith("refs/")]
        return _json_response(200, {"branches": branches, "converts": [], "tags": []})

    def _validate_yaml(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        content = _json_body(req).get("content", "")
        errors: list[dict[str, str]] = []
        m = _YAML_BLOCK.search(content)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                meta = None
                errors.append({"message": f"YAML parse error: {e}".replace("\n", " ")})
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
            elif isinstance(meta, dict):
                bases = meta.get("base_model")
                for base in [bases] if isinstance(bases, str) else (bases or []):
                    if not isinstance(base, str) or base.startswith(("/", "./", "../", "~")) or base.count("/") > 1:
                        errors.append({"message": f'"base_model" must be a Hub model id, got "{base}"'})
                if "license" in meta and not isinstance(meta["license"], str):
                    errors.append({"message": '"license" must be a string'})
        status = 400 if errors else 200
        return _json_response(status, {"errors": errors, "warnings": []})

    def _preupload(self, req: Request, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=True)
        with self._lock:
            ref, _ = self._head(repo, rev)
            folder = self.folder(repo_id, ref)
        out = []
        for f in _json_body(req).get("files", []):
            path = f["path"]
            base64.b64decode(f["sample"], validate=True)  # a malformed sample is a client bug: 500 below
            existing = folder / path
            oid = git_blob_oid(existing.read_bytes()) if existing.is_file() else None
            out.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return _json_response(200, {"files": out, "commitOid": repo.heads[ref]})

    def _commit(self, req: Request, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=True)
        if req.headers.get("content-type", "").split(";")[0] != "application/x-ndjson":
            raise _HubError(400, "commit payload must be application/x-ndjson")
        lines = [json.loads(ln) for ln in req.body.splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        summary = header.get("summary") or ""
        if not summary:
            raise _HubError(400, "commit summary is required")
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, "file entries must be base64")
                added[_safe_repo_path(value["path"])] = base64.b64decode(value["content"], validate=True)
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(_safe_repo_path(value["path"]))
            elif key == "lfsFile":
                raise _HubError(400, "the stand-in answers uploadMode 'regular' only: an lfsFile entry is a client bug")
            else:
                raise _HubError(400, f"unknown commit entry {key!r}")
        create_pr = req.query.get("create_pr", ["0"])[0] == "1"
        with self._lock:
            ref, head = self._head(repo, rev)
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            if create_pr:
                num = self._new_pr(repo, req, summary, ref)
                ref = f"refs/pr/{num}"
            folder = self.folder(repo_id, ref)
            for path in deleted:
                target = folder / path
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.is_file():
                    target.unlink()
                else:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for path, data in added.items():
                target = folder / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            oid = self._record_commit(repo_id, ref, summary, header.get("description", ""), sorted(added), deleted)
            repo.heads[ref] = oid
        base = self._base(req)
        doc: dict[str, Any] = {"success": True, "commitOid": oid, "commitUrl": f"{base}/{repo_id}/commit/{oid}"}
        if create_pr:
            doc["pullRequestUrl"] = f"{base}/{repo_id}/discussions/{num}"
        return _json_response(200, doc)

    def _new_pr(self, repo: _Repo, req: Request, title: str, base_ref: str) -> int:
        num = max(repo.prs, default=0) + 1
        ref = f"refs/pr/{num}"
        shutil.copytree(self.folder(repo.repo_id, base_ref), self.folder(repo.repo_id, ref))
        repo.heads[ref] = repo.heads[base_ref]
        user = self._user(req, required=True) or ("", "")
        repo.prs[num] = {"title": title, "author": user[0], "base": base_ref, "createdAt": _now()}
        return num

    def _create_pr(self, req: Request, repo_id: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=True)
        body = _json_body(req)
        if not body.get("pullRequest"):
            raise _HubError(400, "the stand-in only opens pull requests")
        with self._lock:
            num = self._new_pr(repo, req, body.get("title") or "", "main")
        return _json_response(200, {"num": num, "url": f"{self._base(req)}/{repo_id}/discussions/{num}", "pullRequest": True})

    def _pr_details(self, req: Request, repo_id: str, num: int) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=False)
        pr = repo.prs.get(num)
        if pr is None:
            raise _HubError(404, "Discussion not found")
        doc = {
            "title": pr["title"],
            "num": num,
            "author": {"name": pr["author"]},
            "createdAt": pr["createdAt"],
            "status": "draft",
            "repo": {"name": repo_id, "type": "model"},
            "isPullRequest": True,
            "events": [],
            "changes": {"base": f"refs/heads/{pr['base']}"},
            "filesWithConflicts": [],
        }
        return _json_response(200, doc)

    def _entries(self, repo_id: str, ref: str) -> list[dict[str, Any]]:
        base = self.folder(repo_id, ref)
        out: list[dict[str, Any]] = []
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base).as_posix()
            if p.is_dir():
                out.append({"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel})
            else:
                data = p.read_bytes()
                out.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": rel})
        return out

    def _info(self, req: Request, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=False)
        with self._lock:
            ref, oid = self._head(repo, rev)
            files = [e for e in self._entries(repo_id, ref) if e["type"] == "file"]
        doc = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": _now(),
            "createdAt": _now(),
            "siblings": [{"rfilename": e["path"], "size": e["size"], "blobId": e["oid"]} for e in files],
        }
        return _json_response(200, doc)

    def _tree(self, req: Request, repo_id: str, rev: str, sub: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=False)
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with self._lock:
            ref, _ = self._head(repo, rev)
            entries = self._entries(repo_id, ref)
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        if prefix and not any(e["path"].startswith(prefix) for e in entries):
            raise _HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound")
        rows = [e for e in entries if e["path"].startswith(prefix) and (recursive or "/" not in e["path"][len(prefix) :])]
        return _json_response(200, rows)

    def _paths_info(self, req: Request, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=False)
        ctype = req.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            paths = _json_body(req).get("paths", [])
        else:
            paths = parse_qs(req.body.decode()).get("paths", [])
        with self._lock:
            ref, _ = self._head(repo, rev)
            entries = {e["path"]: e for e in self._entries(repo_id, ref)}
        return _json_response(200, [entries[p] for p in paths if p in entries])

    def _resolve(self, req: Request, repo_id: str, rev: str, path: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(req, repo_id, write=False)
        with self._lock:
            ref, oid = self._head(repo, rev)
            target = self.folder(repo_id, ref) / _safe_repo_path(path)
            if not target.is_file():
                raise _HubError(404, "Entry not found", "EntryNotFound")
            data = target.read_bytes()
        headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_oid(data)}"', "Content-Type": "application/octet-stream"}
        return 200, headers, data

    # ------------------------------------------------------------------ internals

    def _record_commit(self, repo_id: str, ref: str, summary: str, description: str, added: list[str], deleted: list[str]) -> str:
        self._counter += 1
        oid = hashlib.sha1(f"{repo_id}\0{ref}\0{summary}\0{self._counter}".encode()).hexdigest()
        self.commits.append(Commit(repo_id, ref, oid, summary, description, added, deleted))
        return oid

    @staticmethod
    def _base(req: Request) -> str:
        return f"http://{req.headers.get('host', '127.0.0.1')}"


def _safe_repo_path(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _json_body(req: Request) -> dict[str, Any]:
    try:
        doc = json.loads(req.body or b"{}")
    except ValueError:
        raise _HubError(400, "request body is not JSON") from None
    if not isinstance(doc, dict):
        raise _HubError(400, "request body must be a JSON object")
    return doc


def _json_response(status: int, doc: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(doc).encode()


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"
    timeout = 10  # a kept-alive connection idle this long is closed: no handler thread outlives a test for long

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY:
                    raise _HubError(413, "body too large for the stand-in")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise _HubError(413, "body too large for the stand-in")
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        split = urlsplit(self.path)
        req = Request(self.command, split.path, parse_qs(split.query), {k.lower(): v for k, v in self.headers.items()}, b"")
        try:
            req.body = self._read_body()
            status, headers, body = self.hub.handle(req)
        except _HubError as e:
            status, headers, body = _json_response(e.status, {"error": e.message}, {"X-Error-Message": e.message})
        except Exception as e:  # a stand-in bug or a malformed client request: visible to the test as a 500
            status, headers, body = _json_response(500, {"error": f"stand-in error: {type(e).__name__}: {e}"})
        req.status = status
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _serve
