"""Segment-tab clicks decoded in the browser, next to the server-path click, in one run.

The real app (Gateway + Gradio UI, SAM with the full-size vit_b decoder and random weights) on a
local Ray; Debian's headless Chromium driven by Playwright opens the UI, uploads a 1024x683 photo
and clicks on it:

a) browser path (the default): the page decodes with onnxruntime-web (WASM) and draws at once,
   then records the step with one request; click-to-overlay is measured from the click event to
   the drawn mask;
b) hover preview: the pointer moves over the image; previews decoded per second;
c) server path, same page and session: the page's decoder switched off, so the click goes through
   Gradio to the SamDecoder replica and back as a rendered overlay; measured from the click event
   to the new overlay image's load.

For each path: click-to-overlay p50/p95, the page's requests to the server per 100 clicks, the
server's CPU seconds per 100 clicks (Ray's processes; Chromium and Playwright left out) and the
SamDecoder's decode count (its Prometheus metric). Also the embedding's download size and time.
Writes ``benchmarks/results/browser_clicks.json``. Not a test.

Run: ``.venv/bin/python -m benchmarks.browser_clicks`` (about 5 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from atelier3d.models.segment.sam import SamCheckpoint
from benchmarks.common import (
    DEFAULT_CACHE,
    LOOPBACK,
    RESULTS_DIR,
    free_port,
    load_average,
    machine_info,
    percentiles,
    png_bytes,
)
from benchmarks.sam_clicks import bench_image, check_served_sam, prepare_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 300_000
CLICKS_PER_OBJECT = 6  # then a reset: prompts stay as long as a person's
NOT_SERVER = re.compile(r"chrom|node|playwright", re.IGNORECASE)

# Records the click event's time before any handler (window capture runs first), and the load
# time of each new server-rendered overlay image. Only a person's clicks count: the page's own
# synthetic click that asks Gradio for the recorded step's view must not move the start.
PAGE_PROBES = """() => {
    window.addEventListener('click', (e) => {
        if (e.isTrusted) window.__t0 = performance.now();
    }, true);
    window.__lastSrc = null;
    new MutationObserver(() => {
        const img = document.querySelector('#overlay img');
        if (!img || img.src === window.__lastSrc) return;
        window.__lastSrc = img.src;
        const done = () => { window.__t1 = performance.now(); };
        if (img.complete && img.naturalWidth) done();
        else img.addEventListener('load', done, {once: true});
    }).observe(document.body, {subtree: true, childList: true, attributes: true,
                               attributeFilter: ['src']});
}"""

# What a click that was not taken found: the page's decoder state, the element under the
# pointer, the status line.
PAGE_STATE = """([x, y]) => {
    const a = window.atelierSegment;
    const hit = document.elementFromPoint(x, y);
    return {mode: a.mode, reason: a.reason, clicks: a.stats.clicks,
            under_pointer: hit ? `${hit.tagName}#${hit.id}.${hit.className}` : null,
            overlay_img: !!document.querySelector('#overlay img'),
            state: document.querySelector('#segment-state textarea').value,
            status: document.querySelector('#status').innerText};
}"""

STEP_RECORDED = """() => {
    const s = JSON.parse(document.querySelector('#segment-state textarea').value || '{}');
    const r = window.atelierSegment.lastRecorded;
    return r && s.step === r.step && (s.points || []).length === r.points.length;
}"""


# ---- the server's CPU and its decoder ------------------------------------------------------


def server_cpu_seconds() -> float:
    """CPU seconds used so far by this process's descendants that serve (Ray's raylet, GCS,
    Serve proxy, Gateway and replicas), without Chromium and the Playwright driver."""
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / ticks)
    total, frontier = 0.0, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, name, cpu) in table.items():
            if ppid == parent and not NOT_SERVER.search(name):
                total += cpu
                frontier.append(pid)
    return total


def decode_count(metrics_url: str) -> float:
    """The SamDecoder's decodes so far, from ``ray_atelier_stage_latency_ms_count``."""
    text = httpx.get(metrics_url, timeout=30, trust_env=False).text
    pattern = re.compile(r'^ray_atelier_stage_latency_ms_count\{[^}]*stage="decode"[^}]*\} (\S+)',
                         re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


@contextlib.contextmanager
def served_app(checkpoint: SamCheckpoint, cache_dir: Path, metrics_port: int) -> Iterator[str]:
    """The real app with its UI, as ``atelier3d serve`` starts it (SAM runs ``checkpoint``;
    models whose weights are not on this offline machine fall back to tiny)."""
    from atelier3d.serve import runner

    os.environ.setdefault("ATELIER3D_RAY_LOGS", "0")
    port = free_port()
    config = runner.load_serve_config(models="auto", port=port, args_override={
        "cache_dir": str(cache_dir), "sam": {"checkpoint": str(checkpoint.path)}, "ui": True,
        "fair_use": {"exempt": [LOOPBACK]},
    })
    try:
        runner.start(config, timeout_s=600, metrics_port=metrics_port)
        base_url = f"http://{LOOPBACK}:{port}"
        check_served_sam(base_url, checkpoint)
        yield base_url
    finally:
        runner.stop()


# ---- the page ----------------------------------------------------------------------------------


def screen_point(page: Page, x: float, y: float) -> tuple[float, float]:
    """Viewport coordinates of image pixel (x, y) on the overlay (scaled to fit, centred).
    Waits for the overlay's image to be loaded: just after a reset it is being replaced, and an
    image with no natural size yet would map the point off the page. An image the page has
    scrolled partly out of view is scrolled back first."""
    page.wait_for_function("""() => {
        const i = document.querySelector('#overlay img');
        return i !== null && i.complete && i.naturalWidth > 0;
    }""")
    return tuple(page.locator("#overlay img").evaluate(
        """(i, [x, y]) => {
            let r = i.getBoundingClientRect();
            if (r.top < 0 || r.bottom > window.innerHeight) {  // the page scrolled it off
                i.scrollIntoView({block: 'center'});
                r = i.getBoundingClientRect();
            }
            const s = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight, 1);
            return [r.left + (r.width - i.naturalWidth * s) / 2 + x * s,
                    r.top + (r.height - i.naturalHeight * s) / 2 + y * s];
        }""", [x, y]))


def reset_object(page: Page) -> None:
    if page.locator("#reset").is_enabled():
        page.locator("#reset").click()
        page.wait_for_function(
            "() => /click on the image/.test(document.querySelector('#status').innerText)")


class Meter:
    """The page's requests to the server, the server's CPU and its decodes over one phase."""

    def __init__(self, page: Page, base_url: str, metrics_url: str) -> None:
        self.base_url, self.metrics_url = base_url, metrics_url
        self.requests: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url)
                if r.url.startswith(base_url) else None)

    @contextlib.contextmanager
    def phase(self, out: dict, clicks: int) -> Iterator[None]:
        # Ray exports metrics every few seconds: let the last phase's arrive. The page is idle
        # meanwhile, so the server's CPU then is its background (Ray's GCS, raylet, metrics,
        # Gradio's queue), which runs through the phase too and is not the clicks' cost.
        idle_cpu0, idle0 = server_cpu_seconds(), time.monotonic()
        time.sleep(12)
        idle_rate = (server_cpu_seconds() - idle_cpu0) / (time.monotonic() - idle0)
        decodes0, cpu0, seen0, wall0 = (decode_count(self.metrics_url), server_cpu_seconds(),
                                        len(self.requests), time.monotonic())
        load = load_average()
        yield
        wall, cpu = time.monotonic() - wall0, server_cpu_seconds() - cpu0
        requests = self.requests[seen0:]
        time.sleep(12)
        decodes = decode_count(self.metrics_url) - decodes0
        per_100 = 100 / max(clicks, 1)
        out.update({
            "clicks": clicks, "wall_s": round(wall, 2), "load_average_before": load,
            "server_requests_per_100_clicks": round(len(requests) * per_100, 1),
            "server_requests_by_path": _by_path(requests, self.base_url),
            "server_cpu_s_per_100_clicks": round(cpu * per_100, 2),
            "server_idle_cpu_cores": round(idle_rate, 3),
            "server_cpu_s_per_100_clicks_net": round((cpu - idle_rate * wall) * per_100, 2),
            "server_decodes_per_100_clicks": round(decodes * per_100, 1),
        })


def _by_path(urls: list[str], base_url: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for url in urls:
        path = url[len(base_url):].split("?")[0]
        path = re.sub(r"/(sess|obj)_?[0-9A-Za-z_-]{6,}", "/{id}", path)
        counts[path] = counts.get(path, 0) + 1
    return dict(sorted(counts.items()))


def click_until(page: Page, x: float, y: float, done: str, attempts: int = 5) -> None:
    """Clicks until ``done`` holds: a click that lands while Gradio's progress overlay still
    covers the image (just after a reset) reaches neither path and is made again."""
    for _ in range(attempts - 1):
        page.mouse.click(x, y)
        try:
            page.wait_for_function(done, timeout=20_000)
            return
        except PlaywrightTimeout:
            continue
    page.mouse.click(x, y)
    try:
        page.wait_for_function(done, timeout=60_000)
    except PlaywrightTimeout:
        state = page.evaluate(PAGE_STATE, [x, y])
        raise RuntimeError(f"the click at ({x:.0f}, {y:.0f}) was not taken: {state}") from None


def click_phase(page: Page, points: list[tuple[int, int]], in_browser: bool) -> list[float]:
    """Clicks each point (a reset every few), returns click-to-overlay times in ms."""
    page.evaluate(f"window.atelierSegment.mode = '{'browser' if in_browser else 'server'}'")
    times = []
    for i, (x, y) in enumerate(points):
        if i % CLICKS_PER_OBJECT == 0:
            reset_object(page)
        sx, sy = screen_point(page, x, y)
        if in_browser:
            before = page.evaluate("window.atelierSegment.stats.clicks")
            click_until(page, sx, sy, f"() => window.atelierSegment.stats.clicks > {before}")
            times.append(page.evaluate("window.atelierSegment.stats.overlayAt - window.__t0"))
            page.wait_for_function(STEP_RECORDED)  # recorded and redrawn before the next click
        else:
            page.evaluate("window.__t1 = null")
            click_until(page, sx, sy, "() => window.__t1 !== null && window.__t1 > window.__t0")
            times.append(page.evaluate("window.__t1 - window.__t0"))
        page.mouse.move(0, 0)  # off the image: no hover previews during the click phases
    return times


def hover_phase(page: Page, seconds: float, size: tuple[int, int]) -> dict:
    height, width = size
    stats0 = page.evaluate("window.atelierSegment.stats.hovers")
    start = time.monotonic()
    moves = 0
    while time.monotonic() - start < seconds:
        t = (time.monotonic() - start) / seconds
        x = width * (0.15 + 0.7 * t)
        y = height * (0.5 + 0.3 * np.sin(6.28 * 3 * t))
        page.mouse.move(*screen_point(page, x, y))
        moves += 1
        page.wait_for_timeout(16)  # about one pointer event per frame
    elapsed = time.monotonic() - start
    page.mouse.move(0, 0)
    hovers = page.evaluate("window.atelierSegment.stats.hovers") - stats0
    hover_ms = page.evaluate("window.atelierSegment.stats.hoverMs")[-hovers:] if hovers else []
    return {"seconds": round(elapsed, 2), "pointer_moves": moves,
            "previews": hovers, "previews_per_s": round(hovers / elapsed, 1),
            "preview_decode_ms": percentiles(hover_ms)}


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="random vit_b checkpoint + ONNX cache (git-ignored)")
    parser.add_argument("--checkpoint", default=None, help="a SAM checkpoint (default: "
                        "full-size vit_b with random weights)")
    parser.add_argument("--clicks", type=int, default=30, help="clicks per path")
    parser.add_argument("--hover-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "browser_clicks.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoint = prepare_checkpoint(args.cache_dir, args.checkpoint)
    image = bench_image("coffee", 1024)
    height, width = image.shape[:2]
    png = args.cache_dir / "browser_clicks.png"
    png.write_bytes(png_bytes(image))
    rng = np.random.default_rng(0)
    points = [(int(rng.uniform(0.1, 0.9) * width), int(rng.uniform(0.1, 0.9) * height))
              for _ in range(args.clicks)]
    results: dict = {
        "machine": {**machine_info(), "description": "CPU VM, 2 cores, x86-64, shared"},
        "weights": "SAM vit_b full size, random weights (decoder cost as with real weights; "
                   "masks meaningless)",
        "image": [width, height],
    }
    metrics_port = free_port()
    with served_app(checkpoint, args.cache_dir, metrics_port) as base_url, \
            sync_playwright() as playwright:
        metrics_url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(base_url, timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.atelierSegment?.ready === true")
        results["browser_runtime"] = page.evaluate(
            "({mode: window.atelierSegment.mode, backend: window.atelierSegment.backend,"
            " reason: window.atelierSegment.reason})")
        if results["browser_runtime"]["mode"] != "browser":
            raise RuntimeError(f"the page cannot decode: {results['browser_runtime']}")
        page.evaluate(PAGE_PROBES)
        meter = Meter(page, base_url, metrics_url)
        page.locator("#upload input[type=file]").set_input_files(str(png))
        page.wait_for_function(
            f"() => /{width}×{height} ready/.test(document.querySelector('#status').innerText)")
        page.wait_for_function("() => window.atelierSegment.stats.embeddingBytes > 0")
        results["embedding"] = page.evaluate(
            "({bytes: window.atelierSegment.stats.embeddingBytes,"
            " ms: window.atelierSegment.stats.embeddingMs.at(-1)})")
        click_phase(page, points[:3], in_browser=True)  # warm-up: the first runs compile

        browser_path: dict = {}
        with meter.phase(browser_path, len(points)):
            browser_path["click_to_overlay_ms"] = percentiles(
                click_phase(page, points, in_browser=True))
        results["browser_path"] = browser_path
        reset_object(page)
        results["hover"] = hover_phase(page, args.hover_seconds, (height, width))

        click_phase(page, points[:3], in_browser=False)  # warm-up
        server_path: dict = {}
        with meter.phase(server_path, len(points)):
            server_path["click_to_overlay_ms"] = percentiles(
                click_phase(page, points, in_browser=False))
        results["server_path"] = server_path
        browser.close()

    b, s = results["browser_path"], results["server_path"]
    results["goal"] = {
        "browser_p50_le_server_p50": b["click_to_overlay_ms"]["p50"]
        <= s["click_to_overlay_ms"]["p50"],
        "zero_server_decodes_per_click": b["server_decodes_per_100_clicks"] == 0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("embedding", "browser_path", "hover",
                                                "server_path", "goal")}, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
