"""The run report in a real browser: headless Chromium (selenium + chromedriver) opens report.html
of a run directory that has every section, and the page must render without console errors with
every plot present at a non-zero size. A negative test injects an error to prove the check bites.

The fixture run directory is written with the project's own writers: curation shards through
`ShardStore`, per-rank step times through the monitor's `append_jsonl`, goodput from the monitor's
`goodput`, eval results from `evaluate` (a scripted engine with known answers)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import DATA
from distill.config import HFEngineConfig, PromptConfig, RunConfig, SamplingConfig
from distill.curate.verify import VerifyConfig
from distill.evaluate import EvalRun, ModelSpec, evaluate, load_eval_set, resolve_benchmark
from distill.report import build_report, eval_rows, format_table, render_html, step_time_grid, write_report
from distill.store import ShardStore
from distill.teachers.base import Completion, Result
from distill.train.monitor import STEP_TIME_KEYS, append_jsonl, goodput, step_times_path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

EXPECTED_PLOTS = ["plot-funnel", "plot-reasons", "plot-lengths", "plot-passrate", "plot-decontam", "plot-loss",
                  "plot-throughput", "plot-step-s", "plot-lr", "plot-grad-norm", "plot-steptime-heatmap",
                  "plot-goodput", "plot-eval", "plot-retries"]


# --------------------------------------------------------------------------- fixture run directory

# What stages/generate.py writes: the engine's counters (retries_<cause>) and the pool's shard retries.
GENERATE_SUMMARY = {"engine": {"sequences": 40, "retries_429": 7, "retries_5xx": 3, "retries_timeout": 0},
                    "generated_this_run": 40, "samples_per_s": 2.5, "tokens_per_s": 310.0, "seconds": 16.0,
                    "shard_retries": {"replica_died": 2}}


class RightOnEvenEngine:
    """Answers the reference on every other question (offset per model), else 999."""

    def __init__(self, answers: dict[str, str], offset: int):
        self.answers, self.offset = answers, offset

    def generate(self, requests, params):
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            i, ref = next((i, a) for i, (p, a) in enumerate(self.answers.items()) if p in text)
            ans = ref if (i + self.offset + (r.seed or 0)) % 2 == 0 else "999"
            out.append(Result([Completion(f"Work.\n\\boxed{{{ans}}}", "stop", 5, 7)]))
        return out

    def stats(self):
        return {}

    def close(self):
        pass


def _stage(run: Path, stage: str, records: list[dict], rejected: list[dict], summary: dict | None = None) -> None:
    schema = pa.Table.from_pylist(records).schema
    rej_schema = pa.Table.from_pylist(rejected).schema if rejected else pa.schema([*schema, ("reason", pa.string())])
    store = ShardStore(run / stage, stage=stage, fingerprint="f", settings={}, schema=schema,
                       rejected_schema=rej_schema).open()
    store.commit(0, records, rejected)
    store.finish(summary or {})


def make_run_dir(run: Path, *, eval_results: bool = True, train: bool = True) -> Path:
    rng = random.Random(0)
    run.mkdir(parents=True)
    cfg = RunConfig.model_validate({"run": {"dir": str(run)}, "source": {"path": "seed.jsonl"}})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    samples = [{"id": f"q{i}", "key": f"q{i}#{s}", "n_tokens": rng.randint(40, 400), "sample_idx": s}
               for i in range(20) for s in range(2)]
    _stage(run, "generate", samples, [{**samples[0], "key": "q99#0", "reason": "prompt_too_long: 5000 > 4096"}],
           GENERATE_SUMMARY)
    verified = [{**r, "pass_rate": (i % 5) / 4, "verdict": "equal" if i % 3 else "not_equal"}
                for i, r in enumerate(samples)]
    _stage(run, "verify", verified, [])
    kept = [r for r in verified if r["verdict"] == "equal"]
    wrong = [{**r, "reason": "wrong_answer: not equal"} for r in verified if r["verdict"] != "equal"]
    _stage(run, "filter", kept, wrong)
    hits = [{**kept[0], "bench": "gsm8k", "bench_id": "gsm8k-3", "match_method": "exact", "match_score": 1.0,
             "reason": "contaminated: gsm8k exact"}]
    _stage(run, "decontam", kept[1:], hits, {"benchmarks": {"gsm8k": {
        "name": "gsm8k", "items": 1319, "files": [str(DATA / "benchmarks" / "gsm8k.jsonl")],
        "sha256": {str(DATA / "benchmarks" / "gsm8k.jsonl"): "ab" * 32}}}})

    if train:
        tdir = run / "train"
        tdir.mkdir()
        with open(tdir / "metrics.jsonl", "w") as f:
            for step in range(1, 41):
                f.write(json.dumps({"step": step, "loss": 2.5 * 0.97 ** step + rng.random() * 0.05,
                                    "lr": 5e-5 * min(1, step / 4), "grad_norm": 1 + rng.random(),
                                    "tokens_per_s": 900 + rng.random() * 100, "target_tokens_per_s": 400 + rng.random() * 50,
                                    "mfu": None, "step_s": 1.0 + rng.random() * 0.2}) + "\n")
        t0 = 1_700_000_000.0
        steps = []
        for rank in range(4):
            for step in range(1, 41):
                slow = 2.0 if rank == 2 and step > 30 else 1.0
                rec = {"step": step, "rank": rank, "node": f"node-{rank // 2}", "attempt": 0, "data_s": 0.01,
                       "compute_s": 0.8 * slow, "comm_s": 0.2, "step_s": 1.01 * slow, "time": t0 + step * 1.1}
                assert set(rec) == set(STEP_TIME_KEYS)
                append_jsonl(step_times_path(tdir, rank), rec)
                if rank == 0:
                    steps.append(rec)
        with open(tdir / "stragglers.jsonl", "w") as f:
            f.write(json.dumps({"step": 35, "rank": 2, "node": "node-1", "ratio": 1.98, "windows": 3,
                                "policy": "warn", "action": "logged"}) + "\n")
        starts = [{"attempt": 0, "started": t0, "resumed_from_step": 0}]
        (tdir / "goodput.json").write_text(json.dumps(goodput(starts, {}, steps, wall_s=60.0, now=t0 + 60)))

    if eval_results:
        sets = [load_eval_set(resolve_benchmark(n, DATA / "benchmarks"), limit=6) for n in ("gsm8k", "svamp")]
        answers = {p: a for s in sets for _, p, a in s.items}
        run_spec = EvalRun(prompt=PromptConfig(), sampling=SamplingConfig(temperature=0.7), greedy=True, samples=4,
                           ks=[1, 2, 4], verify=VerifyConfig(workers=1))
        models = {}
        for role, offset in (("teacher", 0), ("student_after", 1)):
            res, _ = evaluate(ModelSpec("hf", HFEngineConfig()), sets, run_spec,
                              engine=RightOnEvenEngine(answers, offset), log=lambda m: None)
            models[role] = {**res, "key": role, "records": f"{role}.records.jsonl", "same_as": None}
        models["student_before"] = {**models["teacher"], "same_as": "teacher"}
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps({
            "benchmarks": {s.name: {"sha256": s.sha256, "files": s.files, "n_questions": len(s.items)} for s in sets},
            "models": models}))
    return run


# --------------------------------------------------------------------------- pure parts (no browser)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("report") / "run")


def test_report_has_every_section_and_says_not_recorded_for_missing_files(full_run, tmp_path):
    full = build_report(full_run)
    page = render_html(full)
    for plot in EXPECTED_PLOTS:
        assert f'id="{plot}"' in page, plot
    assert "not recorded" not in page
    assert full["config"]["sha256"] and "sha256" in page and full["config"]["sha256"] in page

    bare = build_report(make_run_dir(tmp_path / "bare", eval_results=False, train=False))
    page = render_html(bare)
    for what in ("RUN/train/metrics.jsonl", "RUN/train/step_times/rank-*.jsonl", "RUN/train/stragglers.jsonl",
                 "RUN/train/goodput.json", "RUN/eval/results.json"):
        assert f"not recorded ({what} is absent)" in page
    assert 'id="plot-loss"' not in page and 'id="plot-funnel"' in page


def test_generation_retries_by_cause_are_in_the_report_and_the_cli_table(full_run):
    report = build_report(full_run)
    assert report["generation"]["request_retries"] == {"429": 7, "5xx": 3}  # zero counts are left out
    assert report["generation"]["shard_retries"] == {"replica_died": 2}
    page = render_html(report)
    assert 'id="sec-generation"' in page and "request: 429" in page and "shard: replica_died" in page
    table = format_table(report)
    assert table.startswith("stage") and "generation retries: requests 429=7, 5xx=3; shards replica_died=2" in table


def test_a_run_without_curation_still_gets_a_useful_table(full_run, tmp_path):
    """`distill train` / `distill eval` run dirs have no funnel; the CLI used to print an empty table."""
    import shutil

    run = tmp_path / "train_only"
    run.mkdir()
    shutil.copytree(full_run / "train", run / "train")
    shutil.copytree(full_run / "eval", run / "eval")
    report = build_report(run)
    table = format_table(report).splitlines()
    assert table[0].startswith("no curation output")
    loss = report["train"]["curves"]["loss"]
    assert any(line.startswith("train: ") and f"{loss[-1][1]:.4g} at step 40" in line for line in table), table
    assert any(line.startswith("goodput: ") for line in table), table
    assert {line.split(" greedy")[0] for line in table if line.startswith("eval ")} == {"eval gsm8k", "eval svamp"}
    assert 'not recorded (RUN/generate/_manifest.json is absent)' in render_html(report)


def test_eval_rows_have_three_models_and_the_delta_after_minus_before(full_run):
    results = json.loads((full_run / "eval" / "results.json").read_text())
    rows = eval_rows(results)
    assert {r["metric"] for r in rows} == {"greedy", "pass@1", "maj@1", "pass@2", "maj@2", "pass@4", "maj@4"}
    assert {r["benchmark"] for r in rows} == {"gsm8k", "svamp"}
    for r in rows:
        assert set(r["values"]) == {"teacher", "student_before", "student_after"}
        assert r["same_as"] == {"student_before": "teacher"}
        assert r["delta"] == pytest.approx(r["values"]["student_after"] - r["values"]["student_before"])
    g = next(r for r in rows if r["benchmark"] == "gsm8k" and r["metric"] == "greedy")
    # Greedy requests carry no seed: the teacher is right on even questions (3 of 6), the
    # student with offset 1 on the odd ones (3 of 6).
    assert g["values"]["teacher"] == pytest.approx(0.5) and g["n"] == 6


def test_step_time_grid_bins_steps_and_keeps_the_last_attempt():
    recs = [{"step": s, "rank": r, "step_s": 1.0 + r, "attempt": 0} for r in range(2) for s in range(10)]
    recs.append({"step": 3, "rank": 1, "step_s": 9.0, "attempt": 1})  # step 3 redone after a restart
    g = step_time_grid(recs, max_cols=5)
    assert g["ranks"] == [0, 1] and g["columns"] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert g["values"][0] == [1.0] * 5
    assert g["values"][1][1] == pytest.approx((2.0 + 9.0) / 2) and g["values"][1][0] == 2.0


# --------------------------------------------------------------------------- the browser


def _driver(tmp_path: Path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver  # in the dev extra: imported, never skipped
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    d = _driver(tmp_path_factory.mktemp("chrome"))
    yield d
    d.quit()


def test_report_renders_in_chromium_without_errors_with_every_plot(browser, full_run, tmp_path):
    _, _, html_path = write_report(full_run)
    browser.get(html_path.as_uri())
    assert browser.title.startswith("distill report")
    assert _severe(browser) == []
    from selenium.webdriver.common.by import By

    for plot in EXPECTED_PLOTS:
        el = browser.find_element(By.ID, plot)
        size = el.size
        assert el.tag_name == "svg" and size["width"] > 0 and size["height"] > 0, (plot, size)
        # The plot draws something: bars, lines or cells with a real extent.
        marks = el.find_elements(By.CSS_SELECTOR, "rect, polyline, circle")
        assert any(m.size["width"] > 0 and m.size["height"] > 0 for m in marks), plot
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#eval-table th")]
    assert {"teacher", "student before", "student after"} <= set(heads)
    cells = browser.find_elements(By.CSS_SELECTOR, "#eval-table tr")[1].find_elements(By.TAG_NAME, "td")
    assert len(cells) == len(heads) and cells[heads.index("student before")].text.endswith("(= teacher)")
    assert "run:" in browser.find_element(By.ID, "config-text").text
    # Nothing is fetched from outside the file: no scripts, stylesheets, images or fonts by URL.
    assert browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)") == []
    shot = tmp_path / "report.png"
    browser.set_window_size(1200, 4000)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_the_console_check_catches_an_injected_error(browser, tmp_path):
    run = make_run_dir(tmp_path / "run", eval_results=False)
    _, _, html_path = write_report(run)
    broken = html_path.with_name("broken.html")
    broken.write_text(html_path.read_text().replace(
        "</body>", "<script>throw new Error('deliberate failure for the test')</script></body>"))
    browser.get(broken.as_uri())
    errors = _severe(browser)
    assert errors and "deliberate failure" in errors[0]["message"]
