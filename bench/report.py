"""Turn bench results into docs/benchmarks.md and docs/img/bench_*.png."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LABELS = {
    "classify-image": "/classify (image)",
    "classify-text": "/classify (text)",
    "generate-16": "/generate n=16",
    "denoise": "/denoise",
}
EXTRA_LABELS = {
    "v2-digits": "/v2/models/digits/infer (1 row, binary)",
    "classify-image-previous": "/classify (image), previous digits version",
}


def _get(results, kind, ep, c, key="rps"):
    return results["servers"].get(kind, {}).get(ep, {}).get(str(c), {}).get(key)


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets at concurrency 32, each with the measured figures and met / not."""
    rows = []
    for ep in LABELS:
        ds = _get(results, "deepserve", ep, 32)
        peers = {k: _get(results, k, ep, 32) for k in ("fastapi", "litserve")}
        peers = {k: v for k, v in peers.items() if v}
        if ds is None or not peers:
            continue
        best = max(peers, key=peers.get)
        rows.append(
            (
                f"{LABELS[ep]}: deepserve ≥ best peer at c=32",
                f"{ds:.0f} vs {best} {peers[best]:.0f} req/s ({ds / peers[best]:.2f}×)",
                ds >= peers[best],
            )
        )
        errors = _get(results, "deepserve", ep, 32, "errors")
        rows.append((f"{LABELS[ep]}: 0 errors at c=32", f"{errors} errors", errors == 0))
    for ep in ("classify-image", "classify-text"):
        p99 = _get(results, "deepserve", ep, 32, "p99_ms")
        if p99 is not None:
            rows.append((f"{LABELS[ep]}: p99 ≤ 100 ms at c=32", f"{p99:.0f} ms", p99 <= 100))
    ds, noop = _get(results, "deepserve", "classify-image", 32), _get(results, "noop", "classify-image", 32)
    if ds and noop:
        rows.append(
            (
                "/classify (image) ≥ 50% of the no-op upload server",
                f"{ds / noop:.0%} ({ds:.0f} vs {noop:.0f})",
                ds >= 0.5 * noop,
            )
        )
    for ep in ("generate-16", "denoise"):
        on, off = _get(results, "deepserve", ep, 32), _get(results, "deepserve-nobatch", ep, 32)
        if on and off:
            rows.append(
                (
                    f"{LABELS[ep]}: batching ≥ 2× batching off at c=32",
                    f"{on / off:.2f}× ({on:.0f} vs {off:.0f})",
                    on >= 2 * off,
                )
            )
    for name, num, den, kind_num, kind_den, bar in (
        (
            "/v2 digits (binary tensors) vs /classify (image)",
            "v2-digits",
            "classify-image",
            "deepserve",
            "deepserve",
            None,
        ),
        (
            "trust (ood_score + calibration) costs ≤ 10% of /classify (image)",
            "classify-image",
            "classify-image-previous",
            "deepserve",
            "deepserve",
            0.9,
        ),
        (
            "Server-Timing + stage histogram cost ≤ 2% (/classify image)",
            "classify-image",
            "classify-image",
            "deepserve",
            "deepserve-notiming",
            0.98,
        ),
        (
            "Server-Timing + stage histogram cost ≤ 2% (/classify text)",
            "classify-text",
            "classify-text",
            "deepserve",
            "deepserve-notiming",
            0.98,
        ),
    ):
        a, b = _get(results, kind_num, num, 32), _get(results, kind_den, den, 32)
        how = "one run each"
        ab = next((v for k, v in results.get("ab", {}).items() if k in name.lower()), None)
        if ab and f"{kind_num}:{num}" in ab and f"{kind_den}:{den}" in ab:
            # small effects: the medians of alternating runs, not two points minutes apart
            a, b, how = ab[f"{kind_num}:{num}"], ab[f"{kind_den}:{den}"], "interleaved A/B medians"
        if a and b:
            rows.append(
                (name, f"{a:.0f} vs {b:.0f} req/s ({a / b:.2f}×, {how})", True if bar is None else a / b >= bar)
            )
    return rows


def plots(results: dict, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = sorted({int(c) for s in results["servers"].values() for e in s.values() for c in e})
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    fig2, axes2 = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, ax2, ep in zip(axes, axes2, LABELS):
        for kind in results["servers"]:
            rps = [_get(results, kind, ep, c) for c in conc]
            p99 = [_get(results, kind, ep, c, "p99_ms") for c in conc]
            ax.plot(conc, rps, marker="o", label=kind)
            ax2.plot(rps, p99, marker="o", label=kind)
        ax.set(title=LABELS[ep], xscale="log", yscale="log", xlabel="concurrent connections", ylabel="requests/s (log)")
        ax.set_xticks(conc, [str(c) for c in conc])
        ax2.set(title=LABELS[ep], xlabel="requests/s", ylabel="p99 latency (ms)", yscale="log")
    axes[0].legend(fontsize=8)
    axes2[0].legend(fontsize=8)
    fig.suptitle("throughput vs concurrency (wrk, same payloads, same machine)")
    fig2.suptitle("p99 latency vs throughput (each point one concurrency: 1, 8, 32, 128)")
    for f, name in ((fig, "bench_throughput.png"), (fig2, "bench_latency.png")):
        f.tight_layout()
        f.savefig(img / name, dpi=100)
        plt.close(f)


def write_report(results: dict, args) -> None:
    img = REPO / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    plots(results, img)
    m = results["machine"]
    conc = sorted({int(c) for s in results["servers"].values() for e in s.values() for c in e})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python -m bench --seconds {args.seconds:g}`) on {results['started']}. "
        "Every figure below comes from that one run: same machine, same payloads, same load "
        "generator. Absolute numbers drift on shared machines; compare ratios.",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU",
        f"- software: Python {m['python']}, BentoML {m['bentoml']}, ONNX Runtime {m['onnxruntime']}, {m['wrk']}",
        f"- load: wrk, 1 thread, keep-alive, {args.seconds:g} s per point after a 2 s warm-up; {m['pinning']}",
        "- payloads: a real MNIST test PNG as multipart (`image`), an SST-2 dev sentence as JSON, "
        '`{"n": 16, "digit": 7, "seed": 1}` (PNG grid back), a noisy MNIST digit PNG',
        "",
        "Servers: "
        + "; ".join(
            f"**{k}**: {v}"
            for k, v in __import__("bench.__main__", fromlist=["SERVERS"]).SERVERS.items()
            if k in results["servers"]
        )
        + ".",
        "",
        "![throughput](img/bench_throughput.png)",
        "",
        "![latency](img/bench_latency.png)",
        "",
    ]
    t = targets(results)
    if t:
        lines += ["## Targets (concurrency 32)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {measured} | {'yes' if ok else '**no**'} |" for name, measured, ok in t]
        lines.append("")
    for ep, label in {**LABELS, **EXTRA_LABELS}.items():
        if not any(ep in results["servers"][k] for k in results["servers"]):
            continue
        lines += [
            f"## {label}",
            "",
            "| server | " + " | ".join(f"c={c} req/s" for c in conc) + " | c=32 p50 / p95 / p99 ms | c=32 errors |",
            "|---" * (len(conc) + 3) + "|",
        ]
        for kind in [k for k in results["servers"] if ep in results["servers"][k]]:
            rps = " | ".join(f"{_get(results, kind, ep, c) or 0:,.0f}" for c in conc)
            lat = "/".join(f"{_get(results, kind, ep, 32, k) or 0:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms"))
            lines.append(f"| {kind} | {rps} | {lat} | {_get(results, kind, ep, 32, 'errors')} |")
        ip = results.get("in_process", {}).get(ep)
        if ip:
            lines.append(
                f"| in-process ONNX Runtime (no HTTP, batch {ip['batch']}, all cores) | {ip['rps']:,.0f} req/s "
                f"({ip['rows_per_s']:,.0f} rows/s) |" + " |" * (len(conc) + 1)
            )
        ds = _get(results, "deepserve", ep, 32)
        ratios = [
            f"{k} {ds / v:.2f}×" for k in results["servers"] if k != "deepserve" and (v := _get(results, k, ep, 32))
        ]
        if ds and ip:
            ratios.append(f"in-process {ds / ip['rps']:.0%}")
        lines += ["", "deepserve at c=32 relative to: " + ", ".join(ratios), ""]
    notes = REPO / "bench" / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    path = REPO / "docs" / "benchmarks.md"
    old = path.read_text() if path.is_file() else ""
    start = old.find("## Overload: goodput")  # make stress's section survives a new make bench
    if start >= 0:
        end = old.find("\n## ", start + 1)
        lines += ["", old[start : end if end >= 0 else len(old)].rstrip("\n")]
    path.write_text("\n".join(lines) + "\n")
    print("wrote docs/benchmarks.md and docs/img/bench_*.png")


if __name__ == "__main__":  # redraw from saved results: python -m bench.report docs/benchmarks.json 8
    import json
    import sys
    import types

    write_report(json.loads(Path(sys.argv[1]).read_text()), types.SimpleNamespace(seconds=float(sys.argv[2])))
