"""Starting the web app for tests: the real `cxr app` command (or, where a test needs a second
configuration, the same app object under uvicorn in a thread), on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.conftest import ROOT, STUDIES, VENV_BIN, _free_port, clean_env, registered_copy

TOKEN = "CXR_APP_TOKEN"
NIH_PNG = STUDIES / "00000001_000.png"
DICOM = STUDIES / "Fake_MONOHR1.dcm"


def app_params(trained, root: Path, name: str, **app) -> tuple["Params", Path]:
    """A registered private model copy, an app store and a runs folder under `root`; the params file."""
    params = registered_copy(trained, f"models-{name}")
    folder = Path(trained.paths.models).parent / f"app-{name}"
    app = {"store": str(folder / "store"), "runs": [str(folder / "runs")], **app}
    from cxr.core.config import Params

    params = Params.model_validate({**params.model_dump(mode="json", by_alias=True), "app": app})
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    path = root / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return params, path


@contextmanager
def cxr_app(params_file: Path, *, env: dict | None = None, log: Path | None = None):
    """`cxr --params FILE app --port N` as a subprocess; yields (base URL, process)."""
    port = _free_port()
    full_env = clean_env({"PYTHONPATH": str(ROOT), **(env or {})})
    if TOKEN not in (env or {}):
        full_env.pop(TOKEN, None)  # a token in the caller's shell must not change what is tested
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([str(VENV_BIN / "cxr"), "--params", str(params_file), "app", "--port", str(port)],
                            cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful stop: the lifespan folds the record
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"cxr app exited with {proc.returncode} before serving")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("cxr app did not become healthy")


@contextmanager
def threaded_app(params, *, token: str | None = None):
    """The same app object (create_app) under a real uvicorn server in a thread of this process."""
    import uvicorn

    from app.main import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(params, token=token), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def jpeg_of(png: Path, out: Path) -> Path:
    from PIL import Image

    Image.open(png).convert("L").save(out, format="JPEG", quality=92)
    return out


def photo(out: Path) -> Path:
    """A colour photograph (scikit-image's bundled astronaut): not a radiograph."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(out)
    return out


def corrupt(out: Path) -> Path:
    """A PNG cut off after its header: the loader must refuse it with a reason."""
    out.write_bytes(NIH_PNG.read_bytes()[:300])
    return out


def post_file(client: httpx.Client, path: Path, name: str | None = None, **kw) -> httpx.Response:
    with open(path, "rb") as handle:
        return client.post("/api/v1/studies", files={"file": (name or path.name, handle)}, **kw)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
