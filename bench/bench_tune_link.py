"""Does the tuner choose gradient compression where it pays, and only there?

    python bench/bench_tune_link.py                   # 100mbit and loopback (~6 min here)
    python bench/bench_tune_link.py --links loopback  # no root needed

For each link, ``autoscale tune examples/gpt.py --nproc 2`` (the Python API behind it,
optimize_script) runs with its trial ranks on that link: "loopback" is the default (both
ranks on ``lo``); a shaped link is two network namespaces joined by a veth pair with tbf
on both ends (bench/_netns.py, as bench/bench_compress.py uses), each rank's worker started
under ``ip netns exec`` bound to its end (autoscale.search._workers.RankNetwork). The
tuner times an all-reduce of the gradients on that link first and searches compression
only where it can pay (Note: [when compression can pay]); a compressed finalist must beat
its uncompressed twin by 5% and pass the convergence guardrail. The table prints, per
link: the link check, whether compression was searched, the chosen plan and its
compression, its throughput against plain DDP measured in the same run, and the tuner's
notes. Goal (issues 14 and 17): compression chosen at 100 Mbit/s, not on loopback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _netns  # noqa: E402


def tune(link: str, args: argparse.Namespace) -> dict:
    from autoscale._api import optimize_script
    from autoscale.search._workers import RankNetwork

    options = dict(world_size=2, trials=args.trials, memory_budget=args.budget,
                   seed=args.seed)
    script = ROOT / "examples" / "gpt.py"
    if link == "loopback":
        result = optimize_script(script, **options)
    else:
        with _netns.shaped_link(link) as net:
            network = RankNetwork(prefixes=(tuple(net.exec_prefix(0)),
                                            tuple(net.exec_prefix(1))),
                                  ifnames=net.ifnames, master_addr=net.addrs[0])
            result = optimize_script(script, network=network, **options)
    report, plan = result.report, result.plan
    return {"plan": plan, "speedup": report.speedup, "notes": report.notes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", default="100mbit,loopback")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--budget", default="64MiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from autoscale.cli import _plan_summary

    links = [link for link in args.links.split(",") if link]
    if any(link != "loopback" for link in links) and (why := _netns.unavailable()):
        print(f"network namespaces unavailable ({why}): loopback only")
        links = ["loopback"]
    _netns.cleanup_stale()
    chosen: dict[str, str] = {}
    for link in links:
        start = time.perf_counter()
        out = tune(link, args)
        method = out["plan"].compress.method
        chosen[link] = method
        print(f"\n== {link}: tuned in {time.perf_counter() - start:.0f} s")
        print(f"   chosen plan: {_plan_summary(out['plan'])}")
        print(f"   compression: {method}; throughput vs plain DDP (same run): "
              f"{out['speedup']:.2f}x")
        for note in out["notes"]:
            print(f"   {note}")
    print()
    print(f"{'link':10s} {'compression chosen':>20s}")
    for link, method in chosen.items():
        print(f"{link:10s} {method:>20s}")
    slow = [m for link, m in chosen.items() if link != "loopback"]
    ok = ("loopback" not in chosen or chosen["loopback"] == "none") and all(
        m != "none" for m in slow)
    print(f"goal (compression at the shaped links, none on loopback): "
          f"{'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
