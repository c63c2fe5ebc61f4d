"""The campaign view as a person uses it: headless Chromium (Debian's) driven by Playwright against
a real ``airflow api-server`` with the plugin (see conftest).

Log in through Airflow's login page, open the demo DAG's "Campaign" tab, read the matrix
(ok, oom, failed, running, not run), see a figure load and the violated reference check,
follow a log link into Airflow's task page, re-run the failed cell (only its mapped task
instances are cleared, checked through the REST API), and open the "Campaigns" entry of the
navigation and the recorded GPU campaign. Screenshots are saved as test artifacts (and with
``CHARLLM_UI_DOCS=1`` copied to ``docs/ui/``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from .conftest import CHROMIUM_ARGS, chromium_or_skip, publish

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def page(ui_server) -> Iterator[Any]:
    """A logged-in admin's browser page."""
    chromium = chromium_or_skip()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1560, "height": 1000})
        context.set_default_timeout(60_000)
        pg = context.new_page()
        pg.goto(ui_server.url + "/")
        pg.wait_for_url("**/auth/login**")
        pg.fill("input[name=username]", "admin")
        pg.fill("input[name=password]", ui_server.passwords["admin"])
        pg.click("button[type=submit]")
        pg.wait_for_url(ui_server.url + "/")
        yield pg
        context.close()
        browser.close()


def _frame(pg: Any, suffix: str) -> Any:
    """The plugin's iframe in Airflow's page (the tab or the navigation entry), once it shows ``suffix``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        el = pg.wait_for_selector("iframe")
        fr = el.content_frame()
        if fr is not None and fr.url.rstrip("/").endswith(suffix.rstrip("/")):
            return fr
        time.sleep(0.3)
    raise AssertionError(f"no plugin frame showing {suffix}")


def _campaign_frame(pg: Any, dag_id: str) -> Any:
    """The iframe of the DAG's "Campaign" tab, once its matrix is there."""
    fr = _frame(pg, f"/charllm/dags/{dag_id}")
    fr.wait_for_selector("#matrix")
    return fr


def _status(fr: Any, cell_id: str, repeat: int) -> str:
    return str(fr.get_attribute(f"td.entry[data-cell='{cell_id}'][data-repeat='{repeat}']", "data-status"))


def test_campaign_tab_shows_matrix_figures_and_checks(ui_server, page, screenshots):
    s, pg = ui_server, page
    pg.goto(f"{s.url}/dags/charllm_demo/plugin/campaign")
    fr = _campaign_frame(pg, "charllm_demo")
    assert [_status(fr, s.cell_id(i), 0) for i in range(6)] == ["ok", "ok", "oom", "failed", "running", "not run"]
    assert _status(fr, s.cell_id(0), 2) == "ok"  # the nightly repeats
    ok = fr.inner_text(f"td.entry[data-cell='{s.cell_id(0)}'][data-repeat='0']")
    assert "tok/s/GPU" in ok and " s" in ok and "attempt 1" in ok
    assert "RuntimeError: prepared failure" in fr.inner_text(f"td.entry[data-cell='{s.cell_id(3)}'][data-repeat='0']")
    assert "0 2 * * *" in fr.inner_text("#schedule")
    # the campaign DAG is paused (as Airflow creates it): the view says what that holds back; its
    # figures DAG is created unpaused (it only reacts to the campaign's tables), so no warning for it
    assert "unpause" in fr.inner_text("#paused")
    assert fr.query_selector("#figures-paused") is None
    # Airflow's own header shows the nightly schedule's next run (the demo ships with a schedule)
    assert "Next Run" in pg.inner_text("body")
    pg.screenshot(path=str(screenshots / "campaign-tab.png"))
    publish(screenshots / "campaign-tab.png")

    # the figures of the latest figures run, inline: they load
    fr.locator("#fig-throughput img").scroll_into_view_if_needed()
    fr.wait_for_function(
        "() => { const i = document.querySelector('#fig-throughput img'); return i && i.complete && i.naturalWidth > 200; }"
    )
    assert fr.evaluate("() => document.querySelector('#fig-drift img') !== null")
    # the violated reference check is highlighted
    bad = fr.locator("#checks tr.violation")
    assert bad.count() == 1 and "FAIL" in bad.inner_text()
    assert "VIOLATED" in fr.inner_text("#checks-verdict")
    fr.locator("#figures").scroll_into_view_if_needed()
    pg.screenshot(path=str(screenshots / "campaign-figures.png"))
    publish(screenshots / "campaign-figures.png")

    # the attempt folder of the failed cell lists its files
    fr.click(f"td.entry[data-cell='{s.cell_id(3)}'][data-repeat='0'] a.folder")
    fr.wait_for_selector("#files")
    assert "manifest.json" in fr.inner_text("#files") and "out/steps.csv" in fr.inner_text("#files")


def test_log_link_opens_the_task_page_in_airflow(ui_server, page):
    s, pg = ui_server, page
    pg.goto(f"{s.url}/dags/charllm_demo/plugin/campaign")
    fr = _campaign_frame(pg, "charllm_demo")
    fr.click(f"td.entry[data-cell='{s.cell_id(3)}'][data-repeat='0'] a:text('wait')")
    pg.wait_for_url("**/dags/charllm_demo/runs/**/tasks/cell.wait/mapped/3**")
    assert quote(s.run_id, safe="") in pg.url or s.run_id in pg.url


def test_rerun_this_cell_clears_only_its_instances(ui_server, page, screenshots):
    s, pg = ui_server, page
    pg.goto(f"{s.url}/dags/charllm_demo/plugin/campaign")
    fr = _campaign_frame(pg, "charllm_demo")
    entry = f"td.entry[data-cell='{s.cell_id(3)}'][data-repeat='0']"
    fr.click(f"{entry} button.rerun")  # asks
    assert "re-run" in fr.inner_text(f"{entry} button.rerun")
    fr.click(f"{entry} button.rerun")  # confirms
    fr.wait_for_selector(f"{entry} .msg.ok")
    # the cell's three mapped task instances, and the run's setup task that Airflow clears with them
    assert "cleared 4 task instance(s)" in fr.inner_text(f"{entry} .msg")
    pg.screenshot(path=str(screenshots / "rerun-cell.png"))
    publish(screenshots / "rerun-cell.png")
    tis = s.request(
        "GET", f"/api/v2/dags/charllm_demo/dagRuns/{quote(s.run_id, safe='')}/taskInstances", user="admin"
    ).json()["task_instances"]
    cleared = sorted((t["task_id"], t["map_index"]) for t in tis if t["state"] is None)
    assert cleared == [("cell.collect", 3), ("cell.submit", 3), ("cell.wait", 3), ("check_params", -1)], cleared
    others = [t for t in tis if t["task_id"].startswith("cell.") and t["map_index"] != 3]
    assert len(others) == 15 and all(t["state"] == "success" for t in others)
    assert {t["task_id"]: t["state"] for t in tis if t["task_id"] in ("plan", "aggregate", "verdict")} == {
        "plan": "success",
        "aggregate": "success",
        "verdict": "success",
    }
    run = s.request("GET", f"/api/v2/dags/charllm_demo/dagRuns/{quote(s.run_id, safe='')}", user="admin").json()
    assert run["state"] == "queued"  # the scheduler picks the cleared cell up

    # "re-run failed cells" of the run: the cell repeats without a result, here the failed one only
    row = f"#runs tr[data-run='{s.run_id}']"
    fr.click(f"{row} button.rerun-failed")
    fr.click(f"{row} button.rerun-failed")
    fr.wait_for_selector(f"{row} .msg.ok")
    msg = fr.inner_text(f"{row} .msg")
    assert "cell.submit[3]" in msg and "cell.collect[3]" in msg and "paused" in msg
    assert not any(f"[{i}]" in msg for i in (0, 1, 2, 4, 5)), msg


def test_campaigns_nav_and_the_recorded_gpu_campaign(ui_server, page, screenshots):
    s, pg = ui_server, page
    pg.goto(f"{s.url}/plugin/campaigns")
    fr = _frame(pg, "/charllm/")
    fr.wait_for_selector("#campaigns")
    rows = fr.inner_text("#campaigns")
    assert "demo" in rows and "ppt_small_1gpu" in rows and "recorded results" in rows
    pg.screenshot(path=str(screenshots / "campaigns.png"))
    publish(screenshots / "campaigns.png")
    # the campaign link opens its DAG's Campaign tab in Airflow
    fr.click("tr[data-campaign='ppt_small_1gpu'] a")
    pg.wait_for_url("**/dags/charllm_ppt_small_1gpu/plugin/campaign")
    gpu = _campaign_frame(pg, "charllm_ppt_small_1gpu")
    assert "Recorded results" in gpu.inner_text("#recorded")
    text = gpu.inner_text("#matrix")
    assert "MFU" in text and "mJ/token" in text and "peak" in text and "°C" in text
    assert gpu.locator("td.entry[data-status='ok']").count() == 8
    pg.screenshot(path=str(screenshots / "recorded-gpu-campaign.png"))
    publish(screenshots / "recorded-gpu-campaign.png")
    gpu.locator("#fig-throughput").scroll_into_view_if_needed()
    gpu.wait_for_function(
        "() => { const i = document.querySelector('#fig-pareto img'); return i && i.complete && i.naturalWidth > 200; }"
    )
    assert "all 24 checks pass" in gpu.inner_text("#checks-verdict").lower()
    assert gpu.locator("#checks-all").get_attribute("open") is None  # nothing violated: the table stays folded
    pg.screenshot(path=str(screenshots / "recorded-gpu-figures.png"))
    publish(screenshots / "recorded-gpu-figures.png")
