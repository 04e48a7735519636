"""Integration tests of LoRA Kit inside a real A1111 (v1.10.1 in the harness).

Two ways, each skipped without its variable:

* over HTTP, against a running WebUI with LoRA Kit installed (``LORAKIT_A1111_URL``)::

    /work/shared/a1111-harness/install_extension.sh /work/main lorakit   # symlink + install.py
    A1111H=/root/a1111h /work/shared/a1111-harness/start_a1111.sh         # tiny SD1.5, CPU, port 7861
    LORAKIT_A1111_URL=http://127.0.0.1:7861 .venv/bin/python -m pytest tests/integration -q

  Run it again with ``A1111H_EXTRA_ARGS=--medvram`` (and ``--lowvram``, where training must be
  refused) given to start_a1111.sh to cover those modes.

* in-process, with A1111's own objects (``LORAKIT_A1111_DIR``, see a1111_inprocess.py), under
  the WebUI's Python with pytest added to the path::

    LORAKIT_A1111_DIR=/root/a1111h/webui PYTHONPATH=/work/main:<folder holding pytest> \\
        /root/a1111h/venv/bin/python -m pytest tests/integration -q

  (pytest kept out of the WebUI's venv: ``/root/a1111h/venv/bin/python -m pip install --target
  /root/pytest-lib pytest``). The browser tests (test_browser_tab.py) run in
  the HTTP way under the WebUI's Python, with the harness's Playwright venv on the path.

Environment:
    LORAKIT_A1111_URL   base URL of the WebUI (started with --api)
    LORAKIT_A1111_LOG   its log, checked for Lora key mismatches (default /root/a1111h/webui.log;
                        the check is skipped when the file is not there)
    LORAKIT_A1111_AUTH  user:password when the WebUI runs with --api-auth

The HTTP tests need a small SD1.x checkpoint loaded (the harness's tiny model renders 64×64 in
well under a second on an idle CPU). They create projects and LoRA files named ``it<timestamp>…``
and set LoRA Kit's grid settings to 64 px / 4 steps while they run (restored afterwards). A test
module requests ``new_log_lines`` and ``small_grids`` in the first fixture that makes the server
work, so the log is read from before that; each module reads its own part of the log (the SDXL
tests provoke a "didn't match keys" line on purpose, which another module's check must not see).
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import pytest

URL = os.environ.get("LORAKIT_A1111_URL", "").rstrip("/")
LOG = Path(os.environ.get("LORAKIT_A1111_LOG", "/root/a1111h/webui.log"))
V1 = "/lorakit/v1"
TERMINAL = ("finished", "interrupted", "failed")


class A1111:
    def __init__(self, url: str):
        import requests

        self.url = url
        self.http = requests.Session()
        auth = os.environ.get("LORAKIT_A1111_AUTH")
        if auth:
            self.http.auth = tuple(auth.split(":", 1))

    def call(self, method: str, path: str, expect: int | tuple = (200, 202), **kwargs):
        answer = self.http.request(method, self.url + path, timeout=600, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        assert answer.status_code in expected, f"{method} {path} → {answer.status_code}: {answer.text[:2000]}"
        return answer.json()

    def png(self, prompt: str, seed: int = 1234) -> bytes:
        body = {"prompt": prompt, "seed": seed, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7}
        return base64.b64decode(self.call("POST", "/sdapi/v1/txt2img", json=body)["images"][0])

    def txt2img(self, prompt: str, seed: int = 1234) -> bytes:
        """The pixels only: the PNG also holds the infotext, which names the prompt."""
        from PIL import Image

        return Image.open(io.BytesIO(self.png(prompt, seed))).convert("RGB").tobytes()

    def new_project(self, prefix: str, prompt: str, count: int = 4) -> str:
        """A project named ``<prefix><time>`` holding ``count`` images A1111 generated from ``prompt``."""
        name = f"{prefix}{int(time.time())}"
        self.lorakit("POST", "/projects", json={"name": name})
        files = [("files", (f"cat {i}.png", self.png(f"{prompt} {i}", seed=100 + i), "image/png")) for i in range(count)]
        report = self.lorakit("POST", f"/projects/{name}/import/upload", files=files)
        assert len(report["imported"]) == count and not report["rejected"]
        return name

    def loaded_checkpoint(self) -> str:
        return self.call("GET", "/sdapi/v1/options")["sd_model_checkpoint"]

    def lorakit(self, method: str, path: str, **kwargs):
        """A call to LoRA Kit's API, ``path`` relative to ``/lorakit/v1``."""
        return self.call(method, V1 + path, **kwargs)

    def job(self, job_id: str) -> dict:
        return self.lorakit("GET", f"/jobs/{job_id}")

    def wait(self, job_id: str, until=lambda job: job["status"] in TERMINAL, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id} did not get there in {timeout} s: {job}"
            time.sleep(0.05)


@pytest.fixture(scope="session")
def a1111() -> A1111:
    if not URL:
        pytest.skip("set LORAKIT_A1111_URL to a running A1111 with LoRA Kit installed (see tests/integration/conftest.py)")
    server = A1111(URL)
    server.lorakit("GET", "/projects")
    return server


@pytest.fixture(scope="module")
def new_log_lines(a1111):
    """A function returning what A1111 logged since the test module started, or None without a log."""
    start = LOG.stat().st_size if LOG.is_file() else None

    def read():
        if start is None:
            return None
        with open(LOG, encoding="utf-8", errors="replace") as fh:
            fh.seek(start)
            return fh.read()

    return read


@pytest.fixture(scope="session")
def small_grids(a1111):
    keys = ("lorakit_grid_size", "lorakit_grid_steps", "lorakit_auto_grid")
    before = {k: v for k, v in a1111.call("GET", "/sdapi/v1/options").items() if k in keys}
    a1111.call("POST", "/sdapi/v1/options", json={"lorakit_grid_size": 64, "lorakit_grid_steps": 4, "lorakit_auto_grid": True})
    yield
    if before:
        a1111.call("POST", "/sdapi/v1/options", json=before)


@pytest.fixture(scope="session")
def webui():
    """The in-process A1111 (a1111_inprocess.py), skipped without ``LORAKIT_A1111_DIR``."""
    from a1111_inprocess import skip_reason, start

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return start()
