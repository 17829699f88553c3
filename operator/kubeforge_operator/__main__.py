"""`python -m kubeforge_operator`: run the operator (kopf) with metrics, a liveness endpoint, the progress
receiver, and leader election.

Every replica serves /metrics, /healthz and the progress receiver from the start (a replica that waits is
healthy, and the progress Service may send a controller's reports to any replica: the receiver only writes
the report into status.progress). Only the leader (kubeforge_operator.leader) runs kopf: the reconcile
daemons, the capacity gate and the inventory. A leader that cannot renew its Leases exits at once; one that
is stopped (SIGTERM) finishes its passes, then gives its Leases up so that a waiting replica takes over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

import kopf
from aiohttp import web
from kubernetes import client
from prometheus_client import start_http_server

from kubeforge_operator import handlers, leader, progress, signing
from kubeforge_operator.resources import Scraper

log = logging.getLogger("kubeforge_operator")


class _DropPodEventSuccess(logging.Filter):
    """kopf logs every handled pod event at INFO; one line per pod change drowns the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Handler 'pod_changed' succeeded" not in record.getMessage()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeforge_operator", description="Turn RLJobs into pods.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' off)")
    parser.add_argument(
        "--progress-listen", default="0.0.0.0:8081", help="HOST:PORT where job controllers POST progress ('' off)"
    )
    parser.add_argument(
        "--progress-url-base",
        default=f"http://forge-operator.{os.environ.get('POD_NAMESPACE', 'kubeforge-system')}.svc:8081",
        help="how job pods reach --progress-listen (the operator Service's URL)",
    )
    # Each job's NetworkPolicy admits the job's own pods, and these pods on the role port only (/metrics).
    parser.add_argument(
        "--scraper-namespace-labels",
        default=os.environ.get("KUBEFORGE_SCRAPER_NAMESPACE_LABELS", ""),
        metavar="K=V,...",
        help="labels of the namespaces whose scraper pods may reach job pods' /metrics ('': any namespace)",
    )
    parser.add_argument(
        "--scraper-pod-labels",
        default=os.environ.get("KUBEFORGE_SCRAPER_POD_LABELS", ""),
        metavar="K=V,...",
        help="labels of the Prometheus pods that may scrape job pods' /metrics ('': any pod in those namespaces; "
        "both empty: no scraper is admitted)",
    )
    parser.add_argument(
        "--token-key-file",
        type=Path,
        default=Path(os.environ.get("KUBEFORGE_TOKEN_KEY_FILE") or signing.default_key_file()),
        help="the key every job's tokens are derived from (kubeforge_operator.signing); every replica needs the "
        "same one. Made there if absent (default: $KUBEFORGE_TOKEN_KEY_FILE, else %(default)s)",
    )
    election = parser.add_argument_group("leader election (kubeforge_operator.leader)")
    election.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reconcile only while holding the Lease 'kubeforge-operator' of every watched namespace",
    )
    election.add_argument(
        "--leader-election-id",
        # A pod's hostname is its name; the pid tells apart operators run side by side on one machine.
        default=f"{socket.gethostname()}_{os.getpid()}",
        help="this operator's name in the Leases (default: HOSTNAME_PID)",
    )
    election.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="with --all-namespaces: where the Lease is (default: $POD_NAMESPACE)",
    )
    default = leader.Timing()
    election.add_argument("--lease-duration", type=float, default=default.lease_duration, metavar="SECONDS")
    election.add_argument("--lease-renew-deadline", type=float, default=default.renew_deadline, metavar="SECONDS")
    election.add_argument("--lease-retry-period", type=float, default=default.retry_period, metavar="SECONDS")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        parser.error("give --namespace NS (repeatable) or --all-namespaces")
    try:
        scraper = Scraper.parse(args.scraper_namespace_labels, args.scraper_pod_labels)
        timing = leader.Timing(args.lease_duration, args.lease_renew_deadline, args.lease_retry_period)
        signer = signing.Signer.from_file(args.token_key_file)
    except (ValueError, signing.SigningKeyError) as e:
        parser.error(str(e))
    leases: list[tuple[str, str]] = []
    if args.leader_election:
        if args.all_namespaces and not args.leader_election_namespace:
            parser.error("--all-namespaces needs --leader-election-namespace (or POD_NAMESPACE) for its Lease")
        scopes = [args.leader_election_namespace] if args.all_namespaces else args.namespace
        leases = [(ns, leader.LEASE_NAME) for ns in scopes]
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropPodEventSuccess())
    if args.metrics_port:
        start_http_server(args.metrics_port)
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(_operate(args, scraper, signer, leases, timing))


async def _serve_health(url: str) -> web.AppRunner:
    """/healthz for the liveness probe, from the start: a replica that waits for the lead is alive too."""
    parts = urlsplit(url)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get(parts.path or "/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, parts.hostname or "0.0.0.0", parts.port or 8080).start()
    return runner


def _lost_the_lead() -> None:
    # Another replica may take over once the Lease expires: no pass of this one may run on after that.
    # Exiting is the one way to stop the passes in flight; the container is restarted and waits its turn.
    log.critical("lost the lead; exiting so that no reconcile pass runs beside the new leader's")
    logging.shutdown()
    os._exit(1)


def _renewals_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled():  # cancelled: this process stops, and lets the Leases go itself
        log.error("leader election stopped: %r", task.exception())
        _lost_the_lead()


async def _operate(
    args: argparse.Namespace,
    scraper: Scraper,
    signer: signing.Signer,
    leases: list[tuple[str, str]],
    timing: leader.Timing,
) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)  # while waiting; kopf installs its own once it runs
    api = handlers.api_client()
    memo = kopf.Memo(
        api=api,
        progress_url_base=args.progress_url_base,
        scraper=scraper,
        signer=signer,
        namespaces=[] if args.all_namespaces else args.namespace,
    )
    servers = []
    if args.liveness:
        servers.append(await _serve_health(args.liveness))
    host, _, port = args.progress_listen.rpartition(":")
    if port:
        memo.progress_receiver = progress.ProgressReceiver(client.CustomObjectsApi(api), signer)
        servers.append(await progress.serve(memo.progress_receiver, host, int(port)))
    elector = None
    keeping = None
    try:
        if leases:
            elector = leader.Elector(client.CoordinationV1Api(api), leases, args.leader_election_id, timing)
            keeping = asyncio.create_task(elector.run(on_lost=_lost_the_lead))
            # Renewals that stop for a bug would let another replica lead beside this one.
            keeping.add_done_callback(_renewals_ended)
            waits = [asyncio.create_task(elector.elected.wait()), asyncio.create_task(stopping.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
        if not stopping.is_set():
            await kopf.operator(
                standalone=True,  # leader election is ours (kubeforge_operator.leader), not kopf's peering
                clusterwide=args.all_namespaces,
                namespaces=args.namespace,
                liveness_endpoint=None,  # served above, by every replica
                memo=memo,
            )
    finally:
        # The lead is given up only once no pass runs any more: kopf has stopped the daemons; passes already
        # in their thread finish (each API call has a deadline).
        executor = memo.get("executor")
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        if keeping is not None:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping
        if elector is not None:
            await elector.release()
        for runner in servers:
            await runner.cleanup()


if __name__ == "__main__":
    main()
