"""The plot docs/capacity.md shows: each figure of a scale run against the number of montages, with its limit.

Three panels of seconds (the UI's pages, the sensors' ticks, the catalog's queries; log-log, the 1 s limit
dashed) and one of bytes (Dagster's and the catalog's databases per montage). The points measured after the
retention job are drawn hollow at the montage count they were filled to.
"""

from __future__ import annotations

from pathlib import Path

PANELS = (("page.", "UI pages (slowest query)"), ("tick.", "sensor ticks"), ("query.", "catalog queries"))


def plot(run: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [p for p in run["points"] if p["state"] == "filled"]
    after = [p for p in run["points"] if p["state"] != "filled"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), constrained_layout=True)
    for ax, (prefix, title) in zip(axes, PANELS, strict=False):
        names = sorted({k for p in filled for k in p["seconds"] if k.startswith(prefix)})
        for i, name in enumerate(names):
            colour = f"C{i % 10}"
            xs = [p["montages"] for p in filled if name in p["seconds"]]
            ax.plot(xs, [p["seconds"][name] for p in filled if name in p["seconds"]], "o-", color=colour,
                    label=name.removeprefix(prefix))  # fmt: skip
            for p in after:
                if name in p["seconds"]:
                    ax.plot(p["montages"], p["seconds"][name], "o", mfc="none", color=colour)
        ax.axhline(1.0, ls="--", color="grey", lw=1)
        ax.set(xscale="log", yscale="log", title=title, xlabel="montages", ylabel="seconds")
        ax.legend(fontsize=7)
    ax = axes[3]
    for label, prefix in (
        ("Dagster", "dagster."),
        ("catalog and journal (tile records up to --tile-rows)", "catalog."),
    ):
        xs = [p["montages"] for p in filled]
        ys = [
            sum(v for k, v in p["bytes"].items() if k.startswith(prefix)) / p["montages"] / 2**20
            for p in filled
        ]
        ax.plot(xs, ys, "o-", label=label)
    ax.set(xscale="log", title="database bytes per montage", xlabel="montages", ylabel="MiB per montage")
    ax.legend(fontsize=7)
    fig.suptitle(
        f"bench_scale {run['measured']} on {run['cpu']} (hollow: after the retention job)", fontsize=9
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
