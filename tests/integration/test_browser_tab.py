"""The LoRA Kit tab in a real browser against a running WebUI: create a project, upload images,
train a tiny LoRA with A1111's progress bar moving, and see the epoch grid appear.

Skipped unless ``LORAKIT_A1111_URL`` points at a WebUI with LoRA Kit installed and Playwright can
be imported. Uses a system Chromium (``CHROME``, default ``/usr/bin/chromium``); every request
that does not go to the WebUI's host is aborted. ``tests/conftest.py`` imports torch, so with the
harness run it with the WebUI's Python and the browser venv's Playwright on the path:

    LORAKIT_A1111_URL=http://127.0.0.1:7861 \\
    PYTHONPATH=/work/main:<folder holding pytest>:/root/a1111h/browser-venv/lib/python3.11/site-packages \\
        /root/a1111h/venv/bin/python -m pytest tests/integration/test_browser_tab.py

Needs a small SD1.x checkpoint loaded (the harness's tiny model runs this in well under a minute on
a CPU). conftest.py shrinks LoRA Kit's grid settings while the test runs, and its A1111 log
(``LORAKIT_A1111_LOG``, where readable) must show the Lora loader matching every key. The test creates a
project ``itui<timestamp>`` and LoRA files of that name. Screenshots of the Train and Compare
sub-tabs are left in ``LORAKIT_SCREENSHOTS`` (default: the system temp folder).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")

URL = os.environ.get("LORAKIT_A1111_URL", "").rstrip("/")
CHROME = os.environ.get("CHROME", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("LORAKIT_SCREENSHOTS", tempfile.gettempdir()))
TRAIN_TIMEOUT_MS = 600_000


@pytest.fixture(scope="module")
def page(a1111, new_log_lines, small_grids):
    host = urlparse(URL).hostname
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROME, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})

        def local_only(route):
            url = route.request.url
            return route.continue_() if urlparse(url).hostname == host or url.startswith(("data:", "blob:")) else route.abort()

        page.route("**/*", local_only)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(URL + "/", wait_until="domcontentloaded")
        page.wait_for_selector("#tab_lorakit", state="attached", timeout=60_000)
        # A1111 reads its settings into the page's `opts` once the UI has been quiet for a moment;
        # a progress bar created before that is hidden (opts.show_progressbar is still undefined).
        page.wait_for_function("() => Object.keys(opts).length > 0", timeout=60_000)
        page.locator("#tabs > .tab-nav button", has_text="LoRA Kit").click()
        yield page
        browser.close()
    assert errors == [], errors


def images(folder: Path, count: int) -> list[str]:
    from PIL import Image

    paths = []
    for i in range(count):
        path = folder / f"look{i}.png"
        Image.new("RGB", (96, 64), (40 * i, 200 - 30 * i, 90)).save(path)
        path.with_suffix(".txt").write_text(f"itkat, look {i}", encoding="utf-8")
        paths += [str(path), str(path.with_suffix(".txt"))]
    return paths


def sub_tab(page, name: str) -> None:
    page.locator("#lorakit_tabs > .tab-nav button", has_text=name).click()


def set_number(page, elem_id: str, value) -> None:
    """Types into a number box or a slider's number box, as a user would, and leaves it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def test_project_upload_train_and_grid(page, a1111, new_log_lines, tmp_path):
    a1111.call("POST", "/sdapi/v1/options", json={"lorakit_auto_grid": True})  # other modules may turn it off
    name = f"itui{int(time.time())}"
    # A new project from the project row.
    page.fill("#lorakit_new_project textarea", name)
    page.click("#lorakit_create_project")
    page.wait_for_selector("#lorakit_project_message :text('Created')")

    # Upload images with their captions.
    sub_tab(page, "Dataset")
    page.set_input_files("#lorakit_import_upload input[type=file]", images(tmp_path, 2))
    page.click("#lorakit_import_upload_button")
    page.wait_for_selector("#lorakit_import_message :text('Imported 2 images (2 with captions)')")

    # A tiny run: 2 epochs of 2 steps at 64 px.
    sub_tab(page, "Train")
    page.fill("#lorakit_train_output_name textarea", name)
    page.fill("#lorakit_train_trigger textarea", "itkat")
    for elem_id, value in (
        ("lorakit_train_min_bucket_reso", 64),
        ("lorakit_train_resolution", 64),
        ("lorakit_train_max_bucket_reso", 128),
        ("lorakit_train_train_batch_size", 1),
        ("lorakit_train_num_repeats", 1),
        ("lorakit_train_max_train_epochs", 2),
    ):
        set_number(page, elem_id, value)
    page.wait_for_function(
        "document.querySelector('#lorakit_train_plan textarea').value.includes('Found 2 images with 1 repeats')"
    )
    assert "After bucketing" in page.input_value("#lorakit_train_plan textarea")

    page.click("#lorakit_train_start")
    # A1111's progress bar (progressbar.js) sits right above our status box while the job runs.
    bar = page.wait_for_selector("#tab_lorakit .progressDiv .progress", timeout=60_000)
    seen = set()
    deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while page.query_selector("#tab_lorakit .progressDiv") and time.monotonic() < deadline:
        seen.add(bar.evaluate("el => el.style.width + ' ' + el.textContent"))
        page.wait_for_timeout(200)
    assert any("epoch" in text for text in seen), seen  # our textinfo, shown by A1111's bar
    assert len({text.split(" ")[0] for text in seen}) > 1, seen  # the bar's width moved
    assert all(text.count("ETA") <= 1 for text in seen), seen  # A1111's ETA only, not a second one of ours
    assert any("epoch grid · cell" in text for text in seen), seen  # the grid after training, cell by cell

    page.wait_for_selector("#lorakit_train_progress :text('Finished')", timeout=TRAIN_TIMEOUT_MS)
    files = page.inner_text("#lorakit_train_files")
    assert f"{name}-01.safetensors" in files and f"{name}-02.safetensors" in files
    # The epoch grid LoRA Kit draws after training (Settings: lorakit_auto_grid) appears under Samples.
    page.wait_for_selector("#lorakit_train_samples img", timeout=60_000)
    page.screenshot(path=str(SHOTS / "lorakit-train.png"), full_page=True)

    # Compare: the run is offered at once, and a grid can be drawn on demand.
    sub_tab(page, "Compare")
    page.wait_for_selector(f"#lorakit_compare_info :text('{name}: 2 epoch files')")
    # The sliders hold the settings from when the page was built, before conftest shrank them.
    set_number(page, "lorakit_compare_size", 64)
    set_number(page, "lorakit_compare_steps", 4)
    page.click("#lorakit_grid_start")
    page.wait_for_selector("#lorakit_grid_progress :text('Grid saved as')", timeout=TRAIN_TIMEOUT_MS)
    page.wait_for_selector("#lorakit_grid_gallery img")
    page.screenshot(path=str(SHOTS / "lorakit-compare.png"), full_page=True)
    log = new_log_lines()
    for bad in ("didn't match keys", "Lora not found", "Failed to load network", "Couldn't find network"):
        assert log is None or bad not in log


def pick_project(page, name: str) -> None:
    """Chooses ``name`` in the project row, after 🔄 has read the project list (it may be newer than the page)."""
    page.click("#lorakit_project_refresh")
    page.wait_for_timeout(1000)
    box = page.locator("#lorakit_project input")
    box.click()
    box.fill(name)
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#lorakit_project input').value === '{name}'")


@pytest.fixture(scope="module")
def duplicates(a1111):
    """A project (not the alphabetically first) of two clusters of small near-duplicate files."""
    import io

    import numpy as np
    from PIL import Image

    name = f"itzz{int(time.time())}"
    a1111.lorakit("POST", "/projects", json={"name": name})
    rng = np.random.default_rng(7)
    files = []
    for cluster in range(2):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 192), Image.BICUBIC)
        for i, size in enumerate([(256, 192), (128, 96), (16, 12)]):
            data = io.BytesIO()
            base.resize(size).save(data, "PNG")
            files.append(("files", (f"c{cluster}_{i}.png", data.getvalue(), "image/png")))
    assert len(a1111.lorakit("POST", f"/projects/{name}/import/upload", files=files)["imported"]) == 6
    return name


def test_dedupe_thumbnails_show_whole_with_readable_sizes(page, duplicates):
    pick_project(page, duplicates)
    sub_tab(page, "Dataset")
    page.click("#lorakit_dedupe_find")
    page.wait_for_selector("#lorakit_cluster_0 img")
    page.wait_for_timeout(500)  # the thumbnails' layout settles
    fit = page.evaluate("""() => {
        const wrap = document.querySelector('#lorakit_cluster_0 .grid-wrap');
        const bottom = wrap.getBoundingClientRect().bottom;
        const items = [...wrap.querySelectorAll('.thumbnail-item')];
        return {hidden: wrap.scrollHeight - wrap.clientHeight, cut: items.filter(i => i.getBoundingClientRect().bottom > bottom + 1).length,
                captions: [...wrap.querySelectorAll('.caption-label')].map(c => c.textContent)};
    }""")
    assert fit["hidden"] <= 1 and fit["cut"] == 0, fit
    assert any(caption.endswith(" B") for caption in fit["captions"]) and not any(" 0 KiB" in c for c in fit["captions"]), fit
    page.locator("#lorakit_cluster_0").screenshot(path=str(SHOTS / "lorakit-dedupe-cluster.png"))


def test_saving_a_caption_updates_the_tag_counts_and_the_lint(page, duplicates):
    pick_project(page, duplicates)
    sub_tab(page, "Captions")
    page.wait_for_function("document.querySelector('#lorakit_editor_name input').value === 'c0_0.png'")
    page.wait_for_selector("#lorakit_lint_table :text('c0_0.png')")  # no caption yet: lint lists it as empty
    page.fill("#lorakit_editor_caption textarea", "itnewtag, red")
    page.click("#lorakit_editor_save")
    page.wait_for_selector("#lorakit_editor_message :text('Saved c0_0.txt')")
    page.wait_for_selector("#lorakit_tag_counts :text('itnewtag')")
    page.wait_for_function("!document.querySelector('#lorakit_lint_table').innerText.includes('c0_0.png')")


def test_a_reload_opens_the_project_last_used(page, duplicates):
    fresh = page.context.browser.new_page()
    fresh.route("**/*", lambda route: route.continue_() if urlparse(route.request.url).hostname == urlparse(URL).hostname else route.abort())
    fresh.goto(URL + "/", wait_until="domcontentloaded")
    fresh.wait_for_selector("#tab_lorakit", state="attached", timeout=60_000)
    fresh.wait_for_function(f"document.querySelector('#lorakit_project input').value === '{duplicates}'", timeout=60_000)
    fresh.close()
