#!/usr/bin/env python3
"""Draw the striped-sessions curve from `bench_tunnel.py --striped --json FILE`:
one TCP flow's download (and four flows') against the number of SSM sessions,
per link, with the ideal line N x one session. Needs matplotlib
(Debian: python3-matplotlib).

  scripts/plot_striping.py FILE.json docs/striping.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    # The direct path's rows (pings only) are not on the curve.
    rows = [r for r in json.load(open(sys.argv[1])) if r.get("path", "tunnel") == "tunnel"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    links = sorted({r["link"] for r in rows}, key=lambda l: l != "clean")
    for i, link in enumerate(links):
        rs = sorted((r for r in rows if r["link"] == link), key=lambda r: r["sessions"])
        n = [r["sessions"] for r in rs]
        color = f"C{i}"
        mb = lambda v: None if v is None else v / 8  # Mbit/s -> MB/s
        ax.plot(n, [mb(r["down1"]) for r in rs], "o-", color=color, label=f"one flow, {link} link")
        ax.plot(n, [mb(r["down4"]) for r in rs], "s--", color=color, alpha=0.6, label=f"four flows, {link} link")
        one = next((r["down1"] for r in rs if r["sessions"] == 1 and r["down1"]), None)
        if one:
            ax.plot(n, [mb(one) * k for k in n], ":", color=color, alpha=0.5, label=f"N x one session, {link}")
    ax.set_xlabel("SSM sessions (ssm-proxy start --sessions N)")
    ax.set_ylabel("download, MB/s")
    ax.set_xticks(sorted({r["sessions"] for r in rows}))
    ax.set_title("Striped sessions through the stock SSM agent's pacing (emulator, stock profile)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2])


if __name__ == "__main__":
    main()
