"""Every endpoint of the plugin behind Airflow's authentication and the user's DAG permissions,
and nothing in a request picks a file: names are checked against what exists.

Against a real ``airflow api-server`` (see conftest): no token and a wrong token get 401/403,
``outsider`` (no role) gets 403 everywhere, ``viewer`` reads but may not re-run, ``admin`` reads.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

pytestmark = pytest.mark.airflow

WRONG_TOKEN = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZG1pbiJ9.bm90LWEtc2lnbmF0dXJl"


def _endpoints(s) -> list[tuple[str, str]]:
    run = quote(s.run_id, safe="")
    cell = s.cell_id(3)
    fig = s.prepared["figures_run"]
    return [
        ("GET", "/charllm/"),
        ("GET", "/charllm/dags/charllm_demo"),
        ("GET", "/charllm/dags/charllm_demo/matrix.json"),
        ("GET", f"/charllm/dags/charllm_demo/figures/{fig}/throughput.png"),
        ("GET", f"/charllm/dags/charllm_demo/figures/{fig}/report.md"),
        ("GET", f"/charllm/dags/charllm_demo/attempts/{cell}/0/1/"),
        ("GET", f"/charllm/dags/charllm_demo/attempts/{cell}/0/1/files/manifest.json"),
        ("POST", f"/charllm/dags/charllm_demo/runs/{run}/cells/{cell}/0/rerun"),
        ("POST", f"/charllm/dags/charllm_demo/runs/{run}/rerun-failed"),
    ]


def test_every_endpoint_refuses_anonymous_wrong_token_and_outsider(ui_server):
    s = ui_server
    seen = []
    for method, path in _endpoints(s):
        anon = s.request(method, path, json={} if method == "POST" else None)
        assert anon.status_code == 401, (method, path, anon.status_code, anon.text[:200])
        wrong = s.request(method, path, token=WRONG_TOKEN, json={} if method == "POST" else None)
        assert wrong.status_code in (401, 403), (method, path, wrong.status_code)
        cookie = s.request(method, path, cookies={"_token": "garbage"}, json={} if method == "POST" else None)
        assert cookie.status_code in (401, 403), (method, path, cookie.status_code)
        outsider = s.request(method, path, user="outsider", json={} if method == "POST" else None)
        assert outsider.status_code == 403, (method, path, outsider.status_code, outsider.text[:200])
        seen.append(path)
    assert len(seen) == 9


def test_viewer_reads_but_may_not_rerun(ui_server):
    s = ui_server
    for method, path in _endpoints(s):
        r = s.request(method, path, user="viewer", json={} if method == "POST" else None)
        if method == "GET":
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
        else:
            assert r.status_code == 403, (path, r.status_code, r.text[:300])
    page = s.request("GET", "/charllm/dags/charllm_demo", user="viewer").text
    assert 'id="matrix"' in page and 'button class="rerun"' not in page  # no button a viewer cannot use
    tis = s.request(
        "GET", f"/api/v2/dags/charllm_demo/dagRuns/{quote(s.run_id, safe='')}/taskInstances", user="admin"
    ).json()["task_instances"]
    assert all(t["state"] == "success" for t in tis if t["task_id"].startswith("cell."))  # nothing was cleared


def test_admin_reads_everything(ui_server):
    s = ui_server
    for method, path in _endpoints(s):
        if method == "GET":
            r = s.request(method, path, user="admin")
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
    png = s.request("GET", _endpoints(s)[3][1], user="admin")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    m = s.request("GET", "/charllm/dags/charllm_demo/matrix.json", user="admin").json()
    status = {(c["cell_id"], r["repeat"]): r["status"] for c in m["cells"] for r in c["repeats"]}
    want = ["ok", "ok", "oom", "failed", "running", "not run"]
    assert [status[(s.cell_id(i), 0)] for i in range(6)] == want
    assert status[(s.cell_id(0), 1)] == "ok" and status[(s.cell_id(0), 2)] == "ok"
    # r1 and r2 are expected of the nightly cells (*dp1-mb2*: cells 0 and 4) only
    assert m["counts"] == {"ok": 4, "oom": 1, "skipped": 0, "failed": 1, "running": 1, "not run": 3}
    # the run's plan gives every cell repeat its map index (the order of the campaign file)
    first = next(c for c in m["cells"] if c["cell_id"] == s.cell_id(3))["repeats"][0]
    assert first["link_run"] == s.run_id and first["map_index"] == 3
    assert m["runs"][0]["failed"] == [[s.cell_id(3), 0]]


@pytest.mark.parametrize(
    "path",
    [
        "/charllm/dags/charllm_demo/figures/{fig}/..%2F..%2F..%2Fcatalog.db",
        "/charllm/dags/charllm_demo/figures/{fig}/%2Fetc%2Fpasswd",
        "/charllm/dags/charllm_demo/figures/{fig}/notthere.png",
        "/charllm/dags/charllm_demo/figures/..%2F..%2Ftables/cells.parquet",
        "/charllm/dags/charllm_demo/figures/not-a-run/throughput.png",
        "/charllm/dags/charllm_demo?figures=..%2F..%2Ftables",
        "/charllm/dags/charllm_demo/attempts/{cell}/0/1/files/..%2F..%2F..%2F..%2Fcatalog.db",
        "/charllm/dags/charllm_demo/attempts/{cell}/0/1/files/%2Fetc%2Fpasswd",
        "/charllm/dags/charllm_demo/attempts/{cell}/0/9/",
        "/charllm/dags/charllm_demo/attempts/{other}/0/1/",
        "/charllm/dags/charllm_nosuch/matrix.json",
    ],
)
def test_names_from_the_request_are_checked_against_what_exists(ui_server, path):
    s = ui_server
    url = path.format(fig=s.prepared["figures_run"], cell=s.cell_id(3), other="0123456789abcdef")
    r = s.request("GET", url, user="admin")
    assert r.status_code in (404, 422), (url, r.status_code, r.text[:200])


def test_rerun_refuses_what_the_run_did_not_plan(ui_server):
    s = ui_server
    run = quote(s.run_id, safe="")
    r = s.request("POST", f"/charllm/dags/charllm_demo/runs/{run}/cells/{s.cell_id(0)}/7/rerun", user="admin", json={})
    assert r.status_code == 404
    r = s.request("POST", "/charllm/dags/charllm_demo/runs/manual__nosuch/rerun-failed", user="admin", json={})
    assert r.status_code == 404


def test_a_dag_that_is_not_a_campaign_says_so(ui_server):
    s = ui_server
    r = s.request("GET", "/charllm/dags/some_other_dag", user="admin")
    assert r.status_code == 200 and "not a charllm campaign" in r.text
