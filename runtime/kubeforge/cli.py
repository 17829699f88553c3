"""The `kubeforge` command: validate a job file, print the CRD, run a job on this machine, report on a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kubeforge import __version__

if TYPE_CHECKING:
    from kubeforge.spec import RLJob

DESCRIPTION = """\
kubeforge runs reinforcement-learning jobs for language models: a trainer (torchtitan),
generators (vLLM), reward services and a controller that runs the RL loop.

An RLJob file describes a job. The same file runs on this machine with `kubeforge run`
(every role as a local process) and on Kubernetes with `kubectl apply -f` (the operator
turns it into pods).
"""

EPILOG = """\
examples:
  kubeforge validate apps/grpo/tiny.yaml     check a job file, print what it would run
  kubeforge run apps/grpo/tiny.yaml          run it here; Ctrl-C stops every role
  kubeforge crd > crds/rljob.yaml            regenerate the CustomResourceDefinition
  kubeforge report runs/grpo-tiny            draw the run's metrics into runs/grpo-tiny/report.png
"""


def _load(path: str) -> RLJob | None:
    """The job in `path`, or None after printing why it is invalid."""
    from kubeforge.validation import SpecError, load_file

    try:
        return load_file(path)
    except SpecError as e:
        print(e, file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    from kubeforge import contract
    from kubeforge.validation import SpecError, check_for_kubernetes

    job = _load(args.file)
    if job is None:
        return 1
    if not args.local:
        try:
            check_for_kubernetes(job.spec, source=args.file)
        except SpecError as e:
            print(f"{e}\n(`kubeforge run` keeps its run directory on this machine's disk and is not affected; "
                  "`kubeforge validate --local` checks only what it needs)", file=sys.stderr)  # fmt: skip
            return 1
    counts: dict[str, int] = {}
    for inst in contract.instances(job.spec):
        counts[inst.role] = counts.get(inst.role, 0) + 1
    gpus = sum(contract.gpus_for(job.spec, i.role) for i in contract.instances(job.spec))
    roles = ", ".join(f"{role} x{n}" for role, n in counts.items())
    print(f"{args.file}: valid RLJob {job.name!r}: {roles}; {gpus} GPUs; {job.spec.steps} steps, {job.spec.mode} mode")
    return 0


def _crd(args: argparse.Namespace) -> int:
    from kubeforge.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def _run(args: argparse.Namespace) -> int:
    from kubeforge import launcher

    job = _load(args.file)
    if job is None:
        return 1
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / job.name
    options = launcher.Options(
        run_dir=run_dir,
        ready_timeout=args.ready_timeout,
        port_base=args.port_base,
        color=sys.stdout.isatty() and not args.no_color,
    )
    return launcher.run(job, options)


def _report(args: argparse.Namespace) -> int:
    from kubeforge.report import ReportError, report

    try:
        out = report(args.run_dir, args.output)
    except ReportError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"report: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubeforge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kubeforge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    validate = commands.add_parser("validate", help="check an RLJob file; exit 0 if valid, 1 with the reasons if not")
    validate.add_argument("file", help="RLJob YAML file")
    validate.add_argument(
        "--local",
        action="store_true",
        help="check only what `kubeforge run` needs, not where checkpoints live on Kubernetes",
    )
    validate.set_defaults(handler=_validate)

    crd = commands.add_parser("crd", help="print the RLJob CustomResourceDefinition (generated from the schema)")
    crd.set_defaults(handler=_crd)

    run = commands.add_parser(
        "run",
        help="run an RLJob on this machine, every role as a local process",
        description="Start every role of the job as a local process, wait until all are ready, show the "
        "controller's progress, and stop them all when the job ends, when a role fails, or on Ctrl-C. "
        "Exit code: 0 succeeded, 1 failed, 130 interrupted.",
    )
    run.add_argument("file", help="RLJob YAML file")
    run.add_argument("--run-dir", help="where logs, status.json and outputs go (default: runs/<job name>)")
    run.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long each role may take to become ready (default: 600)",
    )
    run.add_argument(
        "--port-base",
        type=int,
        metavar="PORT",
        help="use consecutive ports from PORT (default: free ones between 20000 and the system's ephemeral range)",
    )
    run.add_argument("--no-color", action="store_true", help="plain log prefixes")
    run.set_defaults(handler=_run)

    report = commands.add_parser(
        "report",
        help="draw a run's metrics.jsonl into one PNG page",
        description="Draw RUN_DIR/metrics.jsonl (reward and held-out reward, step time by stage, staleness, "
        "weight-sync seconds) into one PNG page. Works on a finished run and on one still going.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (runs/<job name> by default)")
    report.add_argument("-o", "--output", metavar="PNG", help="where to write the page (default: RUN_DIR/report.png)")
    report.set_defaults(handler=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


def run_app(argv: list[str] | None, *, description: str, example: str) -> int:
    """An app's torchforge-style command, `python -m apps.X.main --config FILE [kubeforge run options]`:
    `kubeforge run FILE` (validation, then the local launcher); the app's `main(job)` then runs
    inside the controller role."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"the RLJob YAML, e.g. {example}")
    args, rest = parser.parse_known_args(argv)
    return main(["run", args.config, *rest])


if __name__ == "__main__":
    sys.exit(main())
