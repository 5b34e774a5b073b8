"""The dashboard end to end in a real headless Chromium (Debian's package, driven by Playwright).

`interp app` serves a workspace prepared with a small induction run on the zoo default, plus a
one-fact causal trace and conflict heads on a few items (the default scan's page sources, small)
and a run of a plug-in head detector installed through an entry point; every page is opened,
shows stored content, its charts must render and no exception text may appear; the plug-in's
run shows on the page of its declared output only; the first paint of the stored scan's page is
measured and printed; a small detector is started from the form and followed to completion; bad
input in the form shows a message, not a traceback. Apart, `interp app` in a folder with no
workspace opens on the run form, and the first scan started there creates the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]
PLUGIN = "gated-memory-tracer"
INTERP = [sys.executable, "-m", "interp.cli"]
PAGES = {"Home": "", "Head maps": "Head_maps", "Causal tracing": "Causal_tracing",
         "Conflicts": "Conflicts", "Compare": "Compare"}
EXCEPTION_TEXT = ("Traceback", "Error")
# What the default scan adds for the Causal tracing and Conflicts pages, at a fraction of its
# settings (one model load, seconds): one fact, one noise sample; four items of the built-in facts.
SMALL_SCAN = [
    ("causal-trace", {"limit": 1, "samples": 1, "kinds": "state"}),
    ("conflict-heads", {"max_items": 4, "formats": "qa", "facts": "builtin"}),
    # A plug-in head detector (tests/plugins/gated.py, gate open) whose name the pages once
    # routed elsewhere ("memory", "trac"): it belongs on Head maps alone.
    (PLUGIN, {"n_units": 2, "open_units": 2}),
]
SMALL_SCAN_CODE = """
import json, sys
import interp
from interp.runs.runner import finalized
from interp.runs.runner import run_detector
from interp.runs.store import Store
model = interp.load_model("smollm2-135m")
with Store(sys.argv[1]) as store:
    for name, params in json.loads(sys.argv[2]):
        run_detector(model, name, params, store, progress=False)
"""
# Text a page shows when it has no stored run to show.
EMPTY_TEXT = ("no runs stored yet", "no head-detector runs", "no tracing runs", "no conflict or intervention runs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on ``port``: another program that took the port
    between its choice and the server's start must not be mistaken for ours."""
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _start_app(ws: Path, log: Path, env: dict[str, str], attempts: int = 5) -> tuple[subprocess.Popen[bytes], int]:
    """``interp app`` on a free port. A port is free when chosen but may be taken before the
    server binds it (other tests, other programs): then the server exits, and another port is
    tried. The server is up when this very process listens on the port (the event waited on)."""
    for _ in range(attempts):
        port = _free_port()
        with open(log, "ab") as fh:
            proc = subprocess.Popen([*INTERP, "app", "--workspace", str(ws), "--port", str(port)],
                                    stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + 120  # a guard against a hang, not a bound under test
        while proc.poll() is None and not _listening(proc.pid, port) and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is None and _listening(proc.pid, port):
            return proc, port
        proc.kill()
        proc.wait()
    raise AssertionError(f"interp app did not come up on any of {attempts} ports: {log.read_text()}")


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the processes that write and serve the workspace: the gated plug-in
    installed (an entry point on their PYTHONPATH), as a user's own package would be."""
    from tests.plugins import install

    site = install(tmp_path_factory.mktemp("site"), "gated-plugin", "tests.plugins.gated")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, plugin_env: dict[str, str]) -> tuple[Path, int]:
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set (the browser tests use the zoo default)")
    ws = tmp_path_factory.mktemp("dash-ws")
    proc = subprocess.run(
        [*INTERP, "run", "induction", "--n-prompts", "4", "--batch-size", "2", "--seq-len", "20",
         "--workspace", str(ws), "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    small = subprocess.run([sys.executable, "-c", SMALL_SCAN_CODE, str(ws), json.dumps(SMALL_SCAN)],
                           capture_output=True, text=True, timeout=600, check=False, cwd=REPO, env=plugin_env)
    assert small.returncode == 0, small.stderr
    return ws, int(json.loads(proc.stdout)["run_id"])


def _stop_jobs(ws: Path) -> None:
    """Jobs run detached from the server: end any the tests left running."""
    for meta in (ws / "jobs").glob("*.json"):
        if meta.with_suffix(".rc").exists():
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            os.killpg(int(json.loads(meta.read_text())["pid"]), signal.SIGKILL)


@pytest.fixture(scope="module")
def server(
    workspace: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory, plugin_env: dict[str, str]
) -> Iterator[str]:
    ws, _ = workspace
    log = tmp_path_factory.mktemp("dash-log") / "app.log"
    proc, port = _start_app(ws, log, plugin_env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"interp app exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"interp app did not come up: {log.read_text()}"
            time.sleep(0.5)
        yield base
    finally:
        _stop_jobs(ws)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = context.new_page()
    p.set_default_timeout(90_000)
    try:
        yield p
    finally:
        context.close()


def _settle(page: Any, quiet_s: float = 1.5) -> None:
    """Wait until the script run is over: Streamlit's status widget shows while a script runs
    (after a short delay), so wait until it has been absent for ``quiet_s`` in a row."""
    page.wait_for_selector("h1")
    deadline = time.monotonic() + 180
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        if page.locator('[data-testid="stStatusWidget"]').count():
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        page.wait_for_timeout(100)
    raise AssertionError("the page kept running for 3 minutes")


def _no_exception(page: Any, name: str) -> str:
    text = page.inner_text("body")
    assert page.locator('[data-testid="stException"]').count() == 0, f"{name}: exception shown\n{text[:2000]}"
    for needle in EXCEPTION_TEXT:
        assert needle not in text, f"{name}: {needle!r} in the page\n{text[:2000]}"
    return text


def test_every_page_renders(server: str, workspace: tuple[Path, int], page: Any, tmp_path: Path) -> None:
    _, run_id = workspace
    # Head maps: the heatmap of the metric picked (induction); Causal tracing: the stored fact's
    # heatmap; Conflicts: the conflict-heads map; Compare (one run per detector: a head
    # detector's run against itself): depth scatter, depth difference, head-by-head difference
    # and the two maps.
    expected_charts = {"Home": 0, "Head maps": 1, "Causal tracing": 1, "Conflicts": 1, "Compare": 5}
    for name, path in PAGES.items():
        page.goto(f"{server}/{path}?run={run_id}")
        _settle(page)
        page.wait_for_selector("h1")
        if expected_charts[name]:
            page.wait_for_selector(".js-plotly-plot .main-svg")
        n_charts = page.locator(".js-plotly-plot").count()
        assert n_charts >= expected_charts[name], f"{name}: {n_charts} charts"
        text = _no_exception(page, name)
        empty = [t for t in EMPTY_TEXT if t in text]
        assert not empty, f"{name}: says {empty}: the workspace's runs should show here"
        page.screenshot(path=str(tmp_path / f"{path or 'Home'}.png"), full_page=True)
        print(f"{name}: {n_charts} plotly charts, screenshot {tmp_path / (path or 'Home')}.png")
        if name == "Home":
            # The models and runs tables (canvas grids, so their text is not in the DOM).
            assert page.locator('[data-testid="stDataFrame"]').count() >= 2
            assert "start a run" in text
        if name == "Head maps":
            # The stored threshold (0.4) outlines the heads above it.
            assert "top heads by induction" in text
            if os.environ.get("INTERP_UPDATE_SCREENSHOT"):
                # The README's screenshot; refreshed on request only, so tests leave the tree clean.
                page.screenshot(path=str(REPO / "docs" / "dashboard.png"))


def test_first_paint_of_stored_scan(server: str, workspace: tuple[Path, int], page: Any) -> None:
    _, run_id = workspace
    url = f"{server}/Head_maps?run={run_id}"
    page.goto(url)  # the server's first visit imports the page's modules
    page.wait_for_selector(".js-plotly-plot .main-svg")
    times = []
    fcp = None
    for _ in range(2):
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector(".js-plotly-plot .main-svg")
        times.append(time.perf_counter() - t0)
        fcp = page.evaluate(
            "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || null"
        )
    print(f"\nfirst paint of a stored scan page (Head maps, navigation to first rendered heatmap): "
          f"{', '.join(f'{t:.2f}' for t in times)} s; browser first-contentful-paint {fcp} ms")
    _no_exception(page, "Head maps")


def test_a_plugin_detector_shows_on_the_page_of_its_output(
    server: str, workspace: tuple[Path, int], page: Any
) -> None:
    """The plug-in's run, asked for by id on each page: Head maps (its output, head scores)
    selects and draws it; Causal tracing and Conflicts, whose words its name holds, do not list
    it (they open on their own runs)."""
    from interp.runs.store import Store

    ws, _ = workspace
    with Store(ws, create=False) as s:
        runs = s.runs()
    [run_id] = runs.loc[runs["detector"] == PLUGIN, "id"].tolist()
    page.goto(f"{server}/Head_maps?run={run_id}")
    _settle(page)
    page.wait_for_selector(".js-plotly-plot .main-svg")
    text = _no_exception(page, "Head maps")
    assert "top heads by gated" in text
    # The run's header: its detector, and its units done of the total its settings recorded.
    header = {m.split("\n")[0]: m.split("\n")[-1] for m in page.get_by_test_id("stMetric").all_inner_texts()}
    assert (header["detector"], header["units"]) == (PLUGIN, "2/2")
    for path in ("Causal_tracing", "Conflicts"):
        page.goto(f"{server}/{path}?run={run_id}")
        _settle(page)
        assert PLUGIN not in _no_exception(page, path), path


def _select(page: Any, label: str, option: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.get_by_test_id("stSelectbox").filter(has_text=label).first
    choice = page.get_by_role("option", name=option, exact=True)
    for _ in range(3):
        # A click that has to scroll the page first can land while it still moves, and the
        # dropdown closes again: scroll, let it settle, click, and retry if no list opened.
        box.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        box.click()
        try:
            choice.wait_for(timeout=5_000)
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
            continue
        choice.click()
        return
    raise AssertionError(f"the {label!r} selectbox did not open on {option!r}")


def _number(page: Any, label: str, value: int) -> None:
    # No Enter: inside a form it submits the form.
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Tab")


def test_bad_model_folder_shows_an_error(server: str, page: Any) -> None:
    page.goto(server)
    _settle(page)
    _select(page, "model", "local folder...")
    _settle(page)
    page.get_by_label("local model folder (with config.json)").fill("/nonexistent/model")
    page.get_by_label("local model folder (with config.json)").press("Enter")
    _settle(page)
    page.get_by_test_id("stFormSubmitButton").get_by_role("button").click()
    page.get_by_text("no such folder").wait_for()
    _no_exception(page, "Home after bad input")


def test_run_a_detector_from_the_form(server: str, workspace: tuple[Path, int], page: Any) -> None:
    ws, _ = workspace
    from interp.runs.store import Store

    with Store(ws) as s:
        before = set(s.runs()["id"])
    page.goto(server)
    _settle(page)
    _select(page, "detector", "induction")
    _settle(page)
    _number(page, "n_prompts", 2)
    _number(page, "batch_size", 2)
    _number(page, "seq_len", 8)
    page.get_by_test_id("stFormSubmitButton").get_by_role("button").click()
    page.get_by_text("started: induction").wait_for(timeout=60_000)
    # The job panel refreshes itself; the job ends with its run in the store.
    page.get_by_text("finished: the results are in the runs table").wait_for(timeout=300_000)
    _no_exception(page, "Home after the run")
    with Store(ws) as s:
        runs = s.runs()
    new = runs[~runs["id"].isin(sorted(before))]
    assert len(new) == 1, runs
    assert new.iloc[0]["status"] == "done"
    assert json.loads(new.iloc[0]["params_json"])["seq_len"] == 8
    # A reload finds the finished job again instead of starting it once more.
    page.reload()
    _settle(page)
    page.get_by_text("finished: the results are in the runs table").wait_for()
    with Store(ws) as s:
        assert len(s.runs()) == len(runs)
    shutil.rmtree(ws / "jobs", ignore_errors=True)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``interp app`` with no workspace given, in a folder without one: the default workspace
    (./.interp) has no store yet."""
    port = _free_port()
    log = tmp_path / "app.log"
    env = {k: v for k, v in os.environ.items() if k != "INTERP_WORKSPACE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*INTERP, "app", "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=tmp_path, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"interp app exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"interp app did not come up: {log.read_text()}"
            time.sleep(0.5)
        yield base, tmp_path / ".interp"
    finally:
        _stop_jobs(tmp_path / ".interp")
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log.read_text()[-3000:])


def test_the_first_scan_from_a_new_workspace(fresh_server: tuple[str, Path], page: Any) -> None:
    """A person who starts with the dashboard: `interp app` where no workspace exists opens on
    the run form, creates nothing, and the scan started there creates the store and shows its run."""
    from interp.runs.store import Store

    base, ws = fresh_server
    page.goto(base)
    _settle(page)
    text = _no_exception(page, "Home of a new workspace")
    assert "the first run creates this workspace's results store" in text
    assert "start a run" in text
    assert not ws.exists(), "opening the dashboard created the workspace"
    page.get_by_test_id("stRadio").get_by_text("scan", exact=True).click()
    _settle(page)
    # The scan's detectors: induction alone (the default scan's others take minutes here).
    box = page.get_by_test_id("stMultiSelect").filter(has_text="detectors (scan parameters)")
    box.get_by_role("button", name="Clear all").click()
    box.locator("input").fill("induction")
    box.locator("input").press("Enter")
    page.keyboard.press("Escape")
    page.get_by_test_id("stFormSubmitButton").get_by_role("button").click()
    page.get_by_text("started: scan (induction)").wait_for(timeout=60_000)
    page.get_by_text("finished: the results are in the runs table").wait_for(timeout=300_000)
    _no_exception(page, "Home after the first scan")
    with Store(ws, create=False) as s:
        runs = s.runs()
    assert list(runs["detector"]) == ["induction"]
    assert list(runs["status"]) == ["done"]
    page.reload()
    _settle(page)
    assert "no runs stored yet" not in _no_exception(page, "Home with the first run")
    assert page.locator('[data-testid="stDataFrame"]').count() >= 2  # the models and runs tables


def test_atlas_cell_opens_the_run_behind_it(server: str, workspace: tuple[Path, int], page: Any) -> None:
    """The Atlas page in a browser: a stored atlas run whose induction claim points at the workspace's
    induction run (its summary the stored run's own, re-finalized); clicking that cell opens the
    Head maps page on that run."""
    import interp
    from circuits.atlas.claims import ModelResults, summarize
    from circuits.atlas.stored import finish_atlas, start_atlas
    from interp.runs.registry import get_detector
    from interp.runs.runner import finalized, unit_rows
    from interp.runs.schema import TABLES
    from interp.runs.store import Store

    ws, run_id = workspace
    model = interp.load_model("smollm2-135m")
    det = get_detector("induction")
    with Store(ws) as store:
        run = store.run(run_id)
        cfg = det.parse_params(run.info()["params"])
        tables = {t: unit_rows(run.results(t), det.units(model, cfg)) for t in TABLES}
    summary = finalized(model, det, cfg, tables)
    res = ModelResults(n_layers=model.info.n_layers, n_heads=model.info.n_total_heads,
                       summaries={"induction": summary})
    doc = {**summarize({"smollm2-135m": res}, ["induction"], 5),
           "runs": {"smollm2-135m": {"induction": {"run_id": run_id}}}}
    doc["models"]["smollm2-135m"]["label"] = "smollm2-135m"
    with Store(ws) as store:
        atlas_run = start_atlas(store, ["smollm2-135m"], ["induction"], ["induction"], top=5, prefix="auto",
                                dtype="float32", resume=False)
        finish_atlas(atlas_run, doc)
    try:
        page.goto(f"{server}/Atlas")
        _settle(page)
        page.wait_for_selector(".js-plotly-plot .main-svg")  # the induction heads by relative depth
        _no_exception(page, "Atlas")
        # Three claims come from the induction run first: "induction exists", its keys from
        # previous-token heads and the induction/retrieval overlap.
        link = page.locator(f'a[href$="Head_maps?run={run_id}"]')
        assert link.count() == 3
        # Each cell shows its 95 % interval: the induction claim's from the top head's prompts.
        ind = next(c for c in doc["claims"] if c["id"] == "induction-exists")["models"]["smollm2-135m"]
        assert f"[{ind['lo']:.2g}, {ind['hi']:.2g}]" in page.locator("body").inner_text()
        # Streamlit opens markdown links in a new tab.
        with page.context.expect_page() as opened:
            link.first.click()
        run_page = opened.value
        run_page.wait_for_url(f"**/Head_maps?run={run_id}*")
        _settle(run_page)
        run_page.wait_for_selector(".js-plotly-plot .main-svg")
        assert "top heads by induction" in _no_exception(run_page, "Head maps from the atlas")
        run_page.close()
    finally:
        with Store(ws) as store:
            store.delete_run(atlas_run.id)
