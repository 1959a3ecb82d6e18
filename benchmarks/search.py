"""A hyperparameter search measured against the shipped config: what the search found, what
it is worth on fresh seeds, and what the pruner saved.

Usage:
    uv run python benchmarks/search.py [--config ppo_lunar] [--trials 30] [--sessions 2]
        [--max-frames 300000] [--log-frequency 20000] [--validate-top 2] [--out DIR]
        [--report]

Runs, one after the other, on every core of the machine:

1. ``slm-lab search --config configs/<config>.yaml --space configs/search/<config>.yaml
   --trials N --sessions K --validate-top T`` at ``--max-frames`` frames a session (seeds
   0..K-1; the validation trials use seeds K..K+3);
2. ``slm-lab trial --config configs/<config>.yaml --seeds K..K+3`` at the same budget: the
   shipped values on the validation seeds.

Then it prints one Markdown table: the shipped config's trial beside each validated
configuration (final return MA mean ± std, IQM [95% CI], solved), the best trial's figure
in the search (on the search's seeds), and the trials the pruner stopped with the frames it
saved (their sessions' budget minus the frames they ran). ``--report`` prints the table from
the folders in ``--out`` without running anything.
"""

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=False)


def figures(trial_json: Path) -> dict:
    report = json.loads(trial_json.read_text())
    t = report["trial"]
    return {
        "mean": t["final_return_ma_mean"],
        "std": t["final_return_ma_std"],
        "iqm": t["final_return_ma_iqm"],
        "low": t["iqm_ci_low"],
        "high": t["iqm_ci_high"],
        "solved": f"{t['solved']}/{t['sessions']}",
        "overrides": report["overrides"],
    }


def row(name: str, f: dict) -> str:
    return (
        f"| {name} | {f['mean']:.1f} ± {f['std']:.1f} | {f['iqm']:.1f} "
        f"[{f['low']:.1f}, {f['high']:.1f}] | {f['solved']} |"
    )


def report(out: Path, sessions: int, max_frames: int) -> None:
    search = out / "search"
    rows = list(csv.DictReader((search / "study.csv").open()))
    counted = [r for r in rows if r["state"] != "FAIL" or not any(
        x["retry_of"] == r["number"] for x in rows)]  # fmt: skip
    states = {s: sum(r["state"] == s for r in counted) for s in ("COMPLETE", "PRUNED", "FAIL")}
    pruned = [r for r in counted if r["state"] == "PRUNED"]
    budget = sessions * max_frames
    saved = sum(budget - int(r["frames"] or 0) for r in pruned)
    ran = sum(int(r["frames"] or 0) for r in counted)
    complete = [r for r in counted if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: float(r["objective"]))
    print(
        f"\nsearch: {len(counted)} trials, {states['COMPLETE']} complete, {states['PRUNED']} "
        f"pruned, {states['FAIL']} failed; {ran} frames run of {len(counted) * budget} "
        f"({saved} saved by pruning {len(pruned)} trials, "
        f"{saved / max(1, len(pruned) * budget):.0%} of their budget)"
    )
    print(
        f"best in the search: trial {best['number']}, return_ma {float(best['objective']):.1f} "
        f"on seeds 0..{sessions - 1}\n"
    )
    print("| configuration | final return MA mean ± std | IQM [95% CI] | solved |")
    print("|---|---|---|---|")
    shipped = out / "shipped" / "trial.json"
    if shipped.is_file():
        print(row("shipped config", figures(shipped)))
    for folder in sorted(search.glob("validate-*"), key=lambda p: int(p.name.split("-")[1])):
        number = folder.name.split("-")[1]
        match = next(r for r in rows if r["number"] == number)
        name = f"search trial {number} (search: {float(match['objective']):.1f})"
        print(row(name, figures(folder / "trial.json")))
    print()
    keys = [k for k in rows[0] if k.startswith("model.") or k.startswith("metrics.")]
    for folder in sorted(search.glob("validate-*")):
        match = next(r for r in rows if r["number"] == folder.name.split("-")[1])
        print(f"trial {match['number']}: " + ", ".join(f"{k.rsplit('.', 1)[-1]}={match[k]}"
                                                       for k in keys))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="ppo_lunar")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=300_000)
    parser.add_argument("--log-frequency", type=int, default=20_000)
    parser.add_argument("--validate-top", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-search")
    parser.add_argument("--report", action="store_true", help="only print the table")
    args = parser.parse_args()
    budget = [
        f"--model.init_args.max_frames={args.max_frames}",
        f"--metrics.log_frequency={args.log_frequency}",
    ]
    seeds = [str(args.sessions + i) for i in range(4)]  # what --validate-top uses
    if not args.report:
        slm_lab = [sys.executable, "-m", "slm_lightning.cli"]
        run([*slm_lab, "search", "--config", f"configs/{args.config}.yaml",
             "--space", f"configs/search/{args.config}.yaml", "--trials", str(args.trials),
             "--sessions", str(args.sessions), "--validate-top", str(args.validate_top),
             "--validate-sessions", "4", "--progress-every", "120",
             "--dir", str(args.out / "search"), *budget])  # fmt: skip
        run([*slm_lab, "trial", "--config", f"configs/{args.config}.yaml", "--seeds", *seeds,
             "--progress-every", "120", "--dir", str(args.out / "shipped"), *budget])  # fmt: skip
    report(args.out, args.sessions, args.max_frames)


if __name__ == "__main__":
    main()
