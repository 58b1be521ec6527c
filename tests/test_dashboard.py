"""The segment dashboard: its data layer, then the real app in headless Chromium.

The browser test starts ``streamlit run dashboards/app.py`` on 127.0.0.1, opens it with Debian's
chromium through chromedriver (selenium), waits for the page to render, checks the key elements
and that no exception is shown, and saves a screenshot to ``$BEHAVIORLM_TEST_ARTIFACTS``
(default ``data/test-artifacts/``). It skips, saying why, where chromium is not installed
(``make system-deps`` installs it; CI runs that).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.explain.attribution import occlusion
from behaviorlm.inference.batch import ScoringOptions, score_partition
from behaviorlm.recommender import BehaviorLM
from dashboards import data
from pipelines.segment import SegmentConfig, segment_day
from tests.conftest import make_funnel_events

ROOT = Path(__file__).resolve().parents[1]
DATE = "2023-11-19"
END = datetime(2023, 11, 20, tzinfo=UTC)
ARTIFACTS = Path(os.environ.get("BEHAVIORLM_TEST_ARTIFACTS", ROOT / "data" / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A batch run's outputs for one date: scores and segments (as pipelines.batch_score writes)."""
    root = tmp_path_factory.mktemp("outputs")
    ev = validate_events(make_funnel_events(n_users=90))
    model = BehaviorLM(max_len=32, dim=32, n_layers=1, n_heads=2, epochs=2, seed=0, progress=False).fit(ev)
    score_partition(model.engine, ev, root / "scores" / f"date={DATE}", END, ScoringOptions(k=5), progress=False)
    items = pl.DataFrame({"item_id": [f"i{i}" for i in range(30)], "category": [f"cat{i % 4}" for i in range(30)]})
    prov = {"model_uri": "models:/behaviorlm@champion", "run_id": None, "registry_version": "3"}
    segment_day(model, ev, items, root / "segments" / f"date={DATE}", END, SegmentConfig(n_windows=2), prov)
    scores = pl.read_parquet(sorted((root / "scores" / f"date={DATE}").glob("*.parquet")))
    first = scores.filter(pl.col("user_id").is_in(scores["user_id"].unique().sort().head(5).implode()))
    attributions = occlusion(model, first.select("user_id", "item_id"), ev).events  # as the explain step writes
    (root / "attributions").mkdir()
    attributions.write_parquet(root / "attributions" / f"date={DATE}.parquet")
    return root


def test_partitions_and_clear_messages(tmp_path, outputs):
    with pytest.raises(data.DashboardDataError, match="Run the batch job first"):
        data.list_partitions(tmp_path)
    day = tmp_path / "segments" / "date=2023-01-01"
    day.mkdir(parents=True)
    (day / "users.parquet").write_bytes(b"not parquet")
    with pytest.raises(data.DashboardDataError, match="no complete date=YYYY-MM-DD folder"):
        data.list_partitions(tmp_path)  # complete means _SUCCESS, for the dashboard as for the API
    (day / "_SUCCESS").write_text("{}")
    assert data.list_partitions(tmp_path) == ["2023-01-01"]
    with pytest.raises(data.DashboardDataError, match="cannot be read"):
        data.load_partition(tmp_path, "2023-01-01")
    assert data.list_partitions(outputs) == [DATE]


def test_the_partition_says_its_own_date_and_the_registered_model(outputs):
    """Issue 31 item 16: the _SUCCESS of date=D says D (its end is the midnight after it), and the
    model card names the registered model and alias, not "local"."""
    import json

    meta = json.loads((outputs / "segments" / f"date={DATE}" / "_SUCCESS").read_text())
    assert meta["date"] == DATE and meta["plan"]["end"].startswith("2023-11-20")
    assert data.model_label(data.load_partition(outputs, DATE).provenance) == "behaviorlm v3 @champion"
    assert data.model_label({"model_uri": "/m", "registry_version": None}) == "local folder"
    prov = {"model_name": "shop", "registry_version": "7", "aliases": ["champion"], "model_uri": "/o/model"}
    assert data.model_label(prov) == "shop v7 @champion"


def test_one_colour_per_segment_in_every_chart():
    """The histogram colours by tier, the size bars and the map by the chosen segment: one scale."""
    assert data.segment_colours("tier", ["High"]) == data.segment_colours("tier", ["Low", "Medium", "High"])
    domain, colours = data.segment_colours("cluster", [2, 0, 1])
    assert domain == ["0", "1", "2"] and len(set(colours)) == 3
    source = (ROOT / "dashboards" / "app.py").read_text()
    assert source.count("color=_colour(") == 3 and "alt.Color(" in source.split("def _colour")[1].split("def ")[0]


def test_partition_tables(outputs):
    p = data.load_partition(outputs, DATE)
    table = data.user_table(p)
    assert table.height == 90 and {"top_category", "n_purchases", "tier", "cluster"} <= set(table.columns)
    assert p.provenance["registry_version"] == "3" and len(p.tier_edges) == 4
    k = data.kpis(table)
    assert k["users"] == 90 and 0 < k["observed_conversion"] < 1 and 0 < k["mean_propensity"] < 1
    high = data.filter_users(table, "tier", ["High"], None)
    assert set(high["tier"]) == {"High"} and 0 < high.height < 90
    cat = data.categories(table)[0]
    assert set(data.filter_users(table, "tier", None, [cat])["top_category"]) == {cat}
    cmp = data.segment_vs_rest(table, "tier", "High")
    prop = cmp.filter(pl.col("metric") == "propensity").row(0, named=True)
    assert prop["segment"] > prop["rest"] and prop["ratio"] > 1
    detail = data.user_detail(p, table["user_id"][0])
    assert detail["recommendations"].height == 5 and detail["events"].height > 0
    assert set(detail["rationales"]["item_id"]) == set(detail["recommendations"]["item_id"].cast(pl.String))


def test_the_drill_down_marks_the_events_that_made_each_recommendation(outputs):
    p = data.load_partition(outputs, DATE)
    user = p.attributions["user_id"].min()
    events = data.user_detail(p, user)["events"]
    marked = events.filter(pl.col("explains").is_not_null())
    material = p.attributions.filter((pl.col("user_id") == user) & (pl.col("contribution") >= 0.05))
    assert marked.height and marked["contribution"].min() >= 0.05
    for row in marked.iter_rows(named=True):  # each marked event explains exactly the items it raised
        mine = material.filter(
            (pl.col("event_item").cast(pl.String) == str(row["item_id"])) & (pl.col("event_time") == row["timestamp"])
        )
        assert set(row["explains"].split(", ")) == set(mine["item_id"].cast(pl.String))
    assert events.height == p.recent.filter(pl.col("user_id") == user).height  # nothing dropped or repeated
    later = p.users.filter(~pl.col("user_id").is_in(p.attributions["user_id"].unique().implode()))["user_id"][0]
    assert data.user_detail(p, later)["events"]["explains"].is_null().all()  # not covered: nothing marked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamlitApp:
    def __init__(self, outputs: Path):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboards" / "app.py")]
        cmd += ["--server.address", "127.0.0.1", "--server.port", str(self.port), "--server.headless", "true"]
        cmd += ["--browser.gatherUsageStats", "false"]
        env = dict(os.environ, BEHAVIORLM_OUTPUTS=str(outputs))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def __enter__(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read().decode())
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=1).text == "ok":
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("streamlit did not start within 60 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "chromium/chromedriver not installed: run `make system-deps` (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,4200"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _render(driver, url: str, marker: str, timeout_s: float = 90) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout_s).until(lambda d: marker in d.find_element(By.TAG_NAME, "body").text)
    # Streamlit streams elements in; wait until the script run is over (no "running" widget)
    WebDriverWait(driver, timeout_s).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
    )
    return driver.find_element(By.TAG_NAME, "body").text


def _assert_no_exception(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert "Traceback" not in text and "Error:" not in text


def test_dashboard_renders_in_chromium(outputs, browser):
    from selenium.webdriver.common.by import By

    with StreamlitApp(outputs) as url:
        text = _render(browser, url, "Download filtered users (CSV)")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    _assert_no_exception(browser, text)
    for expected in (
        "Segment dashboard",
        "Users",
        "90",
        "Observed conversion",
        "Mean propensity",
        "behaviorlm v3 @champion",
        "Segment size and share",
        "Propensity distribution",
        "Tier thresholds",
        "Segment profiles",
        "Segment vs rest",
        "User embeddings (PCA)",
        "User drill-down",
        "Recent events",
        "Recommendations",
        "Rationales",
    ):
        assert expected in text, expected
    assert len(browser.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]')) >= 4
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_without_outputs_says_what_to_run(tmp_path, browser):
    with StreamlitApp(tmp_path / "nothing") as url:
        text = _render(browser, url, "Run the batch job first")
        browser.save_screenshot(str(ARTIFACTS / "dashboard_empty.png"))
    _assert_no_exception(browser, text)
