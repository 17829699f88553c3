"""`python -m kubeforge_operator`: run the operator (kopf) with metrics and a liveness endpoint."""

from __future__ import annotations

import argparse
import logging
import os

import kopf
from prometheus_client import start_http_server

import kubeforge_operator.handlers  # noqa: F401  (registers the handlers)
from kubeforge_operator.resources import Scraper


class _DropPodEventSuccess(logging.Filter):
    """kopf logs every handled pod event at INFO; one line per pod change drowns the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Handler 'pod_changed' succeeded" not in record.getMessage()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kubeforge_operator", description="Turn RLJobs into pods.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint")
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
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        parser.error("give --namespace NS (repeatable) or --all-namespaces")
    try:
        scraper = Scraper.parse(args.scraper_namespace_labels, args.scraper_pod_labels)
    except ValueError as e:
        parser.error(str(e))
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropPodEventSuccess())
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(
        standalone=True,  # one replica (Recreate): no peering objects needed
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(
            progress_listen=args.progress_listen,
            progress_url_base=args.progress_url_base,
            scraper=scraper,
            namespaces=[] if args.all_namespaces else args.namespace,  # where the gate reads admissions back
        ),
    )


if __name__ == "__main__":
    main()
