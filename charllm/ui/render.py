"""HTML of the campaign view (Jinja2, autoescaped): the campaigns list, a campaign's page, an attempt folder.

The pages are served by the plugin's FastAPI app and shown by Airflow's UI in an iframe
(a tab of the DAG page, and the "Campaigns" entry of the navigation). Links into Airflow's
own pages open in the top window (the iframe asks the host page's router to navigate);
links to the plugin's files stay relative to the plugin's mount point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, select_autoescape

from charllm.ui.data import METRICS, STATUSES, CampaignInfo, FigureRun, Matrix, Report

STATUS_HELP = {
    "ok": "measured: a valid result",
    "oom": "out of memory: a result of the cell, not an error",
    "skipped": "not run on purpose (GPU control the cluster profile denies): a result, never retried",
    "failed": "ended without a result (failed, timeout, cancelled or lost)",
    "running": "an attempt is in flight, or its tasks are queued in a DAG run",
    "not run": "no attempt yet",
}


@dataclass
class RunView:
    """A DAG run of the campaign, as the view lists it (filled in from Airflow by the plugin)."""

    run_id: str
    run_type: str
    state: str
    when: datetime | None
    planned: int = 0
    failed: list[tuple[str, int]] = field(default_factory=list)  # (cell id, repeat) that can be re-run


@dataclass
class Links:
    """Where things are: the plugin's mount point and Airflow's UI root (both end with '/')."""

    plugin: str
    airflow: str

    def dag(self, dag_id: str) -> str:
        return f"{self.airflow}dags/{quote(dag_id, safe='')}"

    def run(self, dag_id: str, run_id: str) -> str:
        return f"{self.dag(dag_id)}/runs/{quote(run_id, safe='')}"

    def task(self, dag_id: str, run_id: str, task_id: str, map_index: int | None = None) -> str:
        base = f"{self.run(dag_id, run_id)}/tasks/{quote(task_id, safe='')}"
        return f"{base}/mapped/{int(map_index)}" if map_index is not None and map_index >= 0 else base

    def tab(self, dag_id: str) -> str:
        return f"{self.dag(dag_id)}/plugin/campaign"

    def page(self, dag_id: str, figures: str | None = None) -> str:
        url = f"{self.plugin}dags/{quote(dag_id, safe='')}"
        return f"{url}?figures={quote(figures, safe='')}" if figures else url

    def figure(self, dag_id: str, run: str, name: str) -> str:
        return f"{self.plugin}dags/{quote(dag_id, safe='')}/figures/{quote(run, safe='')}/{quote(name, safe='')}"

    def folder(self, dag_id: str, cell_id: str, repeat: int, attempt: int) -> str:
        return f"{self.plugin}dags/{quote(dag_id, safe='')}/attempts/{cell_id}/{int(repeat)}/{int(attempt)}/"

    def file(self, dag_id: str, cell_id: str, repeat: int, attempt: int, rel: str) -> str:
        return self.folder(dag_id, cell_id, repeat, attempt) + "files/" + quote(rel, safe="/")

    def rerun(self, dag_id: str, run_id: str, cell_id: str, repeat: int) -> str:
        return f"{self.plugin}dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/cells/{cell_id}/{int(repeat)}/rerun"

    def rerun_failed(self, dag_id: str, run_id: str) -> str:
        return f"{self.plugin}dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/rerun-failed"


def fmt_metric(col: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if col == "step_time_median_s":
        return f"{v:.3g} s"
    if col == "tokens_per_s_per_gpu":
        return f"{v:,.0f} tok/s/GPU" if v >= 100 else f"{v:.3g} tok/s/GPU"
    if col == "mfu":
        return f"MFU {v:.1f} %"
    if col == "energy_per_token_j":
        return f"{v:.3g} mJ/token"
    if col == "peak_gpu_temp_c":
        return f"peak {v:.0f} °C"
    return f"{v:.3g}"


def _shown_path(path: str) -> str:
    """A campaign file as ``include/campaigns/<file>`` when it is in the include folder, else as is."""
    from charllm.paths import include_dir

    try:
        return str(Path(path).resolve().relative_to(include_dir().resolve().parent))
    except ValueError:
        return path


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else ""


_CSS = """
:root { --ok:#1b7f3b; --ok-bg:#e3f4e8; --oom:#b45309; --oom-bg:#fff1de; --failed:#b42318; --failed-bg:#fde8e7;
        --skipped:#6941c6; --skipped-bg:#f4f0ff;
        --running:#175cd3; --running-bg:#e4eeff; --notrun:#667085; --notrun-bg:#f2f4f7; --line:#d0d5dd; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", "DejaVu Sans",
       "Liberation Sans", sans-serif;
       color: #101828; margin: 0; padding: 16px 20px 40px; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
h3 { font-size: 14px; margin: 18px 0 6px; }
a { color: #175cd3; text-decoration: none; } a:hover { text-decoration: underline; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f2f4f7; padding: 1px 4px;
       border-radius: 4px; }
.muted { color: #667085; } .small { font-size: 12px; }
.facts { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 6px 0 0; color: #344054; }
.banner { border: 1px solid #f5c46b; background: #fffaeb; padding: 8px 12px; border-radius: 6px; margin: 12px 0; }
.banner.info { border-color: #b2ccff; background: #eff4ff; }
.legend { display: flex; flex-wrap: wrap; gap: 8px; margin: 10px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600; font-size: 12px;
         border: 1px solid currentColor; }
.st-ok { --c: var(--ok); --bg: var(--ok-bg); } .st-oom { --c: var(--oom); --bg: var(--oom-bg); }
.st-failed { --c: var(--failed); --bg: var(--failed-bg); } .st-running { --c: var(--running); --bg: var(--running-bg); }
.st-not-run { --c: var(--notrun); --bg: var(--notrun-bg); } .st-skipped { --c: var(--skipped); --bg: var(--skipped-bg); }
.badge.st-ok, .badge.st-oom, .badge.st-skipped, .badge.st-failed, .badge.st-running, .badge.st-not-run { color: var(--c); background: var(--bg); }
table { border-collapse: collapse; }
table.matrix th, table.matrix td { border: 1px solid var(--line); padding: 6px 8px; vertical-align: top; }
table.matrix th { background: #f9fafb; text-align: left; font-size: 12px; position: sticky; top: 0; }
table.matrix td.cell { max-width: 340px; }
table.matrix td.cell .name { font-weight: 600; word-break: break-all; }
td.blank { background: repeating-linear-gradient(45deg, #fff, #fff 6px, #f7f8fa 6px, #f7f8fa 12px); }
td.entry { background: var(--bg); border-left: 4px solid var(--c) !important; min-width: 190px; }
td.entry .head { display: flex; gap: 6px; align-items: center; }
td.entry .badge { color: var(--c); background: #fff; }
td.entry ul.metrics { list-style: none; margin: 4px 0; padding: 0; font-size: 12px; color: #344054; }
td.entry .links { font-size: 12px; display: flex; flex-wrap: wrap; gap: 4px 10px; align-items: center; }
td.entry .why { font-size: 12px; color: var(--c); max-width: 260px; word-break: break-word; }
button { font: inherit; font-size: 12px; padding: 2px 8px; border-radius: 5px; border: 1px solid #98a2b3;
         background: #fff; cursor: pointer; } button:hover { background: #f2f4f7; }
button.confirm { border-color: var(--failed); color: var(--failed); }
.msg { font-size: 12px; margin-left: 4px; } .msg.err { color: var(--failed); } .msg.ok { color: var(--ok); }
table.plain th, table.plain td { border-bottom: 1px solid var(--line); padding: 4px 10px 4px 0; text-align: left;
                                 font-size: 13px; vertical-align: top; }
tr.violation td { background: var(--failed-bg); color: var(--failed); font-weight: 600; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 18px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #475467; margin-top: 6px; display: flex; gap: 12px; }
form.inline { display: inline; }
select { font: inherit; padding: 2px 4px; }
"""

_JS = """
(function () {
  // Airflow shows this page in an iframe: open Airflow's own pages in the top window through its router.
  function topNavigate(href) {
    try {
      if (window.top !== window && window.top.location.origin === window.location.origin) {
        window.top.history.pushState({}, '', href);
        window.top.dispatchEvent(new PopStateEvent('popstate', {state: {}}));
        return true;
      }
    } catch (e) { /* another origin: navigate here */ }
    return false;
  }
  document.addEventListener('click', function (ev) {
    var a = ev.target.closest && ev.target.closest('a[data-top]');
    if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
    if (topNavigate(a.getAttribute('href'))) ev.preventDefault();
  });
  // Re-run buttons: the first click asks, the second posts (no dialogs: the iframe may not open any).
  document.addEventListener('click', function (ev) {
    var b = ev.target.closest && ev.target.closest('button[data-post]');
    if (!b) return;
    var msg = b.parentNode.querySelector('.msg');
    if (!b.classList.contains('confirm')) {
      b.classList.add('confirm');
      b.dataset.label = b.textContent;
      b.textContent = b.dataset.ask || 'confirm';
      setTimeout(function () {
        if (b.classList.contains('confirm')) { b.classList.remove('confirm'); b.textContent = b.dataset.label; }
      }, 6000);
      return;
    }
    b.classList.remove('confirm');
    b.textContent = b.dataset.label;
    b.disabled = true;
    fetch(b.dataset.post, {method: 'POST', credentials: 'same-origin',
                           headers: {'Content-Type': 'application/json'}, body: '{}'})
      .then(function (r) { return r.json().then(function (j) { return [r.status, j]; }); })
      .then(function (res) {
        var ok = res[0] >= 200 && res[0] < 300;
        if (msg) {
          msg.className = 'msg ' + (ok ? 'ok' : 'err');
          msg.textContent = ok ? ('cleared ' + res[1].cleared + ' task instance(s) (' + (res[1].task_instances || []).map(
                                   function (t) { return t.task_id + (t.map_index >= 0 ? '[' + t.map_index + ']' : ''); }
                                 ).join(', ') + '): ' + (res[1].dag_paused
                                   ? 'the DAG is paused: they run once you unpause it'
                                   : 'the scheduler runs them again'))
                               : ((res[1] && res[1].detail) || ('error ' + res[0]));
        }
        b.disabled = ok;
      })
      .catch(function (e) { if (msg) { msg.className = 'msg err'; msg.textContent = String(e); } b.disabled = false; });
  });
})();
"""

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}Campaigns{% endblock %} · charllm</title><style>{{ css|safe }}</style></head>
<body>{% block body %}{% endblock %}<script>{{ js|safe }}</script></body></html>
"""

_INDEX = """{% extends "base" %}
{% block title %}Campaigns{% endblock %}
{% block body %}
<h1>Campaigns</h1>
<p class="muted">Each campaign is a DAG <code>charllm_&lt;campaign&gt;</code>; its <b>Campaign</b> tab shows the matrix of
cells and repeats, the figures and the reference checks. Outcomes are read from the results catalog
<code>{{ catalog }}</code>.</p>
{% if not campaigns %}<p>No campaign you may read.</p>{% else %}
<table class="plain" id="campaigns">
<tr><th>campaign</th><th>cells</th><th>outcomes (cell x repeat)</th><th>schedule</th><th>figures</th><th>file</th></tr>
{% for c in campaigns %}
<tr data-campaign="{{ c.info.name }}">
  <td><a data-top href="{{ links.tab(c.info.dag_id) }}"><b>{{ c.info.name }}</b></a>
      <div class="small muted">{{ c.info.description }}</div></td>
  <td>{{ c.cells }}</td>
  <td>{% for s in statuses %}{% if c.counts.get(s) %}<span class="badge {{ cls(s) }}">{{ s }} {{ c.counts[s] }}</span> {% endif %}{% endfor %}
      {% if c.source == "tables" %}<div class="small muted">recorded results</div>{% endif %}</td>
  <td>{% if c.info.schedule %}<code>{{ c.info.schedule }}</code>{% else %}<span class="muted">manual</span>{% endif %}</td>
  <td>{% if c.figures %}{{ c.figures }}{% else %}<span class="muted">none yet</span>{% endif %}</td>
  <td class="small">{% if c.info.source %}<code>{{ c.info.source.rsplit('/', 1)[-1] }}</code>{% endif %}
      {% if c.info.error %}<div class="why">{{ c.info.error }}</div>{% endif %}</td>
</tr>
{% endfor %}
</table>{% endif %}
{% endblock %}
"""

_CAMPAIGN = """{% extends "base" %}
{% block title %}{{ info.name }}{% endblock %}
{% block body %}
<h1>Campaign <code>{{ info.name }}</code></h1>
{% if info.description %}<div>{{ info.description }}</div>{% endif %}
<div class="facts small">
  <span>DAG <a data-top href="{{ links.dag(dag_id) }}"><code>{{ dag_id }}</code></a></span>
  {% if info.backend %}<span>backend <b>{{ info.backend }}</b> · cluster <b>{{ info.cluster }}</b> ({{ info.gpu_type }})</span>{% endif %}
  <span>{{ matrix.rows|length }} cells x {{ matrix.repeats|length }} repeat(s)</span>
  {% if info.source %}<span>file <code>{{ shown_path(info.source) }}</code></span>{% endif %}
</div>
<div class="facts small" id="schedule">
{% if info.schedule %}
  <span>nightly: <code>{{ info.schedule }}</code>; a scheduled run adds {{ info.nightly_repeats }} new repeat(s) of the
  cells matching <code>{{ info.nightly_cells }}</code> (the drift chart)</span>
  {% if paused %}<span><span class="badge st-oom">DAG paused</span> unpause it (the toggle beside its name) to run nightly</span>
  {% else %}<span>next run: <b>{{ next_run or "—" }}</b></span>{% endif %}
{% else %}<span>no schedule: runs when triggered</span>{% endif %}
</div>
{% if info.error %}<div class="banner">The campaign file does not load: {{ info.error }}</div>{% endif %}
{% if matrix.source == "tables" %}<div class="banner info" id="recorded">Recorded results: this installation has not run
this campaign. The matrix and the figures below come from the tables copied from a recorded run
({{ recorded_note or "see the figures' report" }}); trigger the DAG to measure it here.</div>{% endif %}

<h2>Matrix</h2>
{% if paused and can_edit %}<div class="banner" id="paused">The DAG is paused: a re-run (or a trigger) waits until you
unpause it with the toggle beside its name.</div>{% endif %}
<div class="legend">{% for s in statuses %}<span class="badge {{ cls(s) }}" title="{{ help[s] }}">{{ s }}: {{ counts[s] }}</span>{% endfor %}</div>
<div class="small muted">Each entry: the outcome of a cell repeat, its attempt, and the key metrics (median step time,
tokens/s per GPU, model FLOPs utilisation, energy per token, peak GPU temperature; what the cell measured).
<i>logs</i> opens the task instances of that cell in its DAG run; <i>folder</i> the attempt's manifest, logs and outputs.</div>
<table class="matrix" id="matrix">
<tr><th>cell</th>{% for r in matrix.repeats %}<th>repeat {{ r }}</th>{% endfor %}</tr>
{% for row in matrix.rows %}
<tr data-cell="{{ row.cell_id }}" data-name="{{ row.name }}">
  <td class="cell"><div class="name">{{ row.name }}</div><div class="small muted"><code>{{ row.cell_id }}</code>
    {% if not row.in_file %} · no longer in the campaign file{% endif %}</div></td>
  {% for e in row.entries %}
  {% if not e.expected and not e.attempts and e.map_index is none %}
  <td class="blank" data-cell="{{ e.cell_id }}" data-repeat="{{ e.repeat }}" data-status="{{ e.status }}"
      title="not re-measured by the nightly runs">&nbsp;</td>
  {% else %}
  <td class="entry {{ cls(e.status) }}" data-cell="{{ e.cell_id }}" data-repeat="{{ e.repeat }}" data-status="{{ e.status }}">
    <div class="head"><span class="badge">{{ e.status }}</span>
      {% if e.outcome and e.outcome not in (e.status, "ok", "oom", "skipped") %}<span class="small">({{ e.outcome }})</span>{% endif %}
      {% if e.attempt %}<span class="small muted">attempt {{ e.attempt }}{% if e.attempts > 1 %} of {{ e.attempts }}{% endif %}</span>{% endif %}
      {% if e.ti_state and e.status in ("running", "not run") %}<span class="small muted">task {{ e.ti_state }}</span>{% endif %}
    </div>
    {% set ms = metric_lines(e) %}{% if ms %}<ul class="metrics">{% for m in ms %}<li>{{ m }}</li>{% endfor %}</ul>{% endif %}
    {% if e.status == "failed" and e.message %}<div class="why">{{ e.message[:300] }}</div>{% endif %}
    <div class="links">
      {% if e.link_run and e.map_index is not none %}<span>logs:
        <a data-top href="{{ links.task(dag_id, e.link_run, 'cell.submit', e.map_index) }}">submit</a>
        <a data-top href="{{ links.task(dag_id, e.link_run, 'cell.wait', e.map_index) }}">wait</a>
        <a data-top href="{{ links.task(dag_id, e.link_run, 'cell.collect', e.map_index) }}">collect</a></span>{% endif %}
      {% if e.has_folder %}<a class="folder" href="{{ links.folder(dag_id, e.cell_id, e.repeat, e.attempt) }}">folder</a>{% endif %}
      {% if e.link_run and e.map_index is not none and can_edit %}
        <span><button class="rerun" data-post="{{ links.rerun(dag_id, e.link_run, e.cell_id, e.repeat) }}"
          data-ask="re-run {{ row.name }} r{{ e.repeat }}?" title="Clear this cell's task instances in run {{ e.link_run }}
(submit, wait, collect) so that the scheduler runs them again; its collect updates the tables{% if e.status in ('ok', 'oom') %}. It has a valid result: the run re-uses it unless the run was triggered with Force re-run{% endif %}">re-run</button><span class="msg"></span></span>
      {% endif %}
    </div>
  </td>
  {% endif %}
  {% endfor %}
</tr>
{% endfor %}
</table>

<h2>DAG runs</h2>
{% if not runs %}<p class="muted">No DAG run yet. Trigger <a data-top href="{{ links.dag(dag_id) }}">{{ dag_id }}</a>
(the form chooses cells, repeats, a dry run or a forced re-run).</p>{% else %}
<table class="plain" id="runs">
<tr><th>run</th><th>type</th><th>state</th><th>when</th><th>cell repeats planned</th><th>without a result</th><th></th></tr>
{% for r in runs %}
<tr data-run="{{ r.run_id }}"><td><a data-top href="{{ links.run(dag_id, r.run_id) }}"><code>{{ r.run_id }}</code></a></td>
  <td>{{ r.run_type }}</td><td>{{ r.state }}</td><td class="small">{{ when(r.when) }}</td><td>{{ r.planned }}</td>
  <td>{{ r.failed|length }}</td>
  <td>{% if r.failed and can_edit %}<button class="rerun-failed" data-post="{{ links.rerun_failed(dag_id, r.run_id) }}"
      data-ask="re-run {{ r.failed|length }} cell repeat(s)?">re-run failed cells</button><span class="msg"></span>{% endif %}</td></tr>
{% endfor %}
</table>{% endif %}

<h2 id="figures">Figures</h2>
{% if figures_paused %}<div class="banner" id="figures-paused">The DAG <a data-top href="{{ links.dag(dag_id + '_figures') }}"><code>{{ dag_id }}_figures</code></a>
is paused: it draws the figures after each campaign run (nightly ones included) once you unpause it.</div>{% endif %}
{% if not fig_runs %}<p class="muted">No figures yet: the DAG <code>{{ dag_id }}_figures</code> draws them after each
campaign run (scheduled on the campaign's tables).</p>{% else %}
<form class="inline" method="get" action="{{ links.page(dag_id) }}#figures">
  figures run <select name="figures" onchange="this.form.submit()">
  {% for fr in fig_runs %}<option value="{{ fr.name }}"{% if fr.name == chosen.name %} selected{% endif %}>{{ fr.name }}{% if loop.first %} (latest){% endif %}</option>{% endfor %}
  </select><noscript><button>show</button></noscript></form>
<span class="small muted">folder <code>var/figures/{{ info.name }}/{{ chosen.name }}/</code>: each figure as PNG, PDF and the
plotted numbers as CSV</span>
{% if chosen.recorded %}<div class="banner info">Recorded data: these figures were drawn from a run recorded on real GPUs
and shipped with the repository, not measured by this installation.</div>{% endif %}
{% if report %}
<h3>Report</h3>
{% for line in report.intro %}<div class="small">{{ line }}</div>{% endfor %}
<div id="checks-verdict" class="{{ 'why' if report.violations else '' }}"><b>{{ report.verdict or "No reference checks." }}</b>
 <a class="small" href="{{ links.figure(dag_id, chosen.name, 'report.md') }}">report.md</a></div>
{% if report.checks %}<details id="checks-all"{% if report.violations %} open{% endif %}><summary class="small">{{ report.checks|length }}
checks{% if report.violations %}, {{ report.violations }} violated (first){% endif %}</summary>
<table class="plain" id="checks"><tr>{% for c in report.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for chk in report.checks %}<tr class="{{ '' if chk._ok else 'violation' }}">{% for c in report.columns %}<td>{{ chk.get(c, "") }}</td>{% endfor %}</tr>{% endfor %}
</table></details>{% endif %}
{% endif %}
<div class="figs">
{% for stem in chosen.figures %}
<figure id="fig-{{ stem }}"><img loading="lazy" src="{{ links.figure(dag_id, chosen.name, stem + '.png') }}" alt="{{ stem }}">
<figcaption><b>{{ stem }}</b>
  {% if stem + '.pdf' in chosen.files %}<a href="{{ links.figure(dag_id, chosen.name, stem + '.pdf') }}">PDF</a>{% endif %}
  {% if stem + '.csv' in chosen.files %}<a href="{{ links.figure(dag_id, chosen.name, stem + '.csv') }}">data (CSV)</a>{% endif %}
</figcaption></figure>
{% endfor %}
</div>
{% endif %}
{% endblock %}
"""

_NOT_CAMPAIGN = """{% extends "base" %}
{% block body %}
<h1>Not a campaign</h1>
<p>The DAG <code>{{ dag_id }}</code> is not a charllm campaign. Campaign DAGs are named <code>charllm_&lt;campaign&gt;</code>;
see <a href="{{ links.plugin }}">all campaigns</a>.</p>
{% endblock %}
"""

_FOLDER = """{% extends "base" %}
{% block title %}{{ name }} r{{ repeat }} a{{ attempt }}{% endblock %}
{% block body %}
<p class="small"><a href="{{ links.page(dag_id) }}">&larr; campaign {{ campaign }}</a></p>
<h1>{{ name }} · repeat {{ repeat }} · attempt {{ attempt }}</h1>
<div class="facts small"><span>cell <code>{{ cell_id }}</code></span><span>outcome <b>{{ outcome or state }}</b></span>
{% if job_id %}<span>job <code>{{ job_id }}</code></span>{% endif %}{% if run_id %}<span>DAG run
<a data-top href="{{ links.run(dag_id, run_id) }}"><code>{{ run_id }}</code></a></span>{% endif %}</div>
<div class="small muted">folder <code>{{ folder }}</code></div>
{% if message %}<div class="banner">{{ message }}</div>{% endif %}
<table class="plain" id="files"><tr><th>file</th><th>size</th></tr>
{% for rel, size in files %}<tr><td><a href="{{ links.file(dag_id, cell_id, repeat, attempt, rel) }}">{{ rel }}</a></td>
<td class="small">{{ "{:,}".format(size) }} B</td></tr>{% endfor %}
</table>
{% endblock %}
"""


def _env() -> Environment:
    from jinja2 import DictLoader

    env = Environment(
        loader=DictLoader(
            {"base": _BASE, "index": _INDEX, "campaign": _CAMPAIGN, "folder": _FOLDER, "not_campaign": _NOT_CAMPAIGN}
        ),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        css=_CSS,
        js=_JS,
        statuses=STATUSES,
        help=STATUS_HELP,
        cls=lambda s: "st-" + str(s).replace(" ", "-"),
        when=_when,
        shown_path=_shown_path,
        metric_lines=lambda e: [t for col, *_ in METRICS if (t := fmt_metric(col, e.metrics.get(col, math.nan)))],
    )
    return env


_ENV = _env()


@dataclass
class IndexItem:
    info: CampaignInfo
    cells: int
    counts: dict[str, int]
    source: str
    figures: int


def index_page(items: Sequence[IndexItem], links: Links, catalog: str) -> str:
    return _ENV.get_template("index").render(campaigns=items, links=links, catalog=catalog)


def campaign_page(
    *,
    info: CampaignInfo,
    matrix: Matrix,
    links: Links,
    runs: Sequence[RunView],
    fig_runs: Sequence[FigureRun],
    chosen: FigureRun | None,
    report: Report | None,
    can_edit: bool,
    next_run: str | None = None,
    paused: bool = False,
    figures_paused: bool = False,
    recorded_note: str | None = None,
) -> str:
    return _ENV.get_template("campaign").render(
        info=info,
        dag_id=info.dag_id,
        matrix=matrix,
        counts=matrix.counts,
        links=links,
        runs=runs,
        fig_runs=fig_runs,
        chosen=chosen,
        report=report,
        can_edit=can_edit,
        next_run=next_run,
        paused=paused,
        figures_paused=figures_paused,
        recorded_note=recorded_note,
    )


def not_campaign_page(dag_id: str, links: Links) -> str:
    return _ENV.get_template("not_campaign").render(dag_id=dag_id, links=links)


def folder_page(**kw: Any) -> str:
    return _ENV.get_template("folder").render(**kw)
