"""Operator benchmark: time from `apply` to every pod created, for one job and for 100 at once.

Runs on the test control plane (testbed/: real kube-apiserver, scheduler, KCM, KWOK nodes)
with the operator as a real process, and reports latency percentiles and the operator's peak
RSS. Goals (issue 4): p99 <= 1 s for one job, 100 jobs <= 10 s, RSS <= 150 MB.

    .venv/bin/python bench/operator_bench.py [--repeat 20] [--jobs 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e"))
from cluster import GROUP, PLURAL, VERSION, Operator, install_crd, start_cluster, stop_cluster  # noqa: E402

# Five roles: trainer, generator, reward, reference and the controller.
SPEC = {
    "model": {"path": "/models/tiny"},
    "roles": {"reference": {"enabled": True}},
}
PODS_PER_JOB = 5


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class PodCreationClock:
    """Watches pods in a namespace; records when the Nth pod of each job appeared."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.seen: dict[str, set[str]] = {}
        self.complete: dict[str, float] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A watch can end (server timeout, dropped stream): start a new one until closed.
        while not self._stop:
            try:
                self._watch()
            except Exception:  # the stream ends when the cluster stops under it
                time.sleep(0.1)

    def close(self) -> None:
        self._stop = True

    def _watch(self) -> None:
        for event in watch.Watch().stream(client.CoreV1Api().list_namespaced_pod, self.namespace, timeout_seconds=600):
            if self._stop:
                return
            pod = event["object"]
            job = (pod.metadata.labels or {}).get("kubeforge.dev/job")
            if event["type"] in ("ADDED", "MODIFIED") and job:
                names = self.seen.setdefault(job, set())
                names.add(pod.metadata.name)
                if len(names) == PODS_PER_JOB and job not in self.complete:
                    self.complete[job] = time.monotonic()

    def wait(self, jobs: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(j in self.complete for j in jobs):
            time.sleep(0.01)
        missing = [j for j in jobs if j not in self.complete]
        if missing:
            pods = client.CoreV1Api().list_namespaced_pod(self.namespace).items
            counts = {
                j: sum(1 for p in pods if (p.metadata.labels or {}).get("kubeforge.dev/job") == j) for j in missing
            }
            raise TimeoutError(f"{len(missing)} jobs never got all their pods; pods they have now: {counts}")


def create_job(namespace: str, name: str) -> float:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLJob", "metadata": {"name": name}, "spec": SPEC}
    started = time.monotonic()
    client.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="single-job measurements")
    parser.add_argument("--jobs", type=int, default=100, help="jobs applied at once")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kubeforge-bench-"))
    kubeconfig = start_cluster(workdir / "cluster", 3, KUBEFORGE_NODE_PODS="300")
    operator = None
    try:
        config.load_kube_config(str(kubeconfig))
        install_crd()
        namespace = "bench"
        client.CoreV1Api().create_namespace({"metadata": {"name": namespace}})
        operator = Operator(kubeconfig, namespace, workdir / "operator.log")
        operator.start()
        clock = PodCreationClock(namespace)
        time.sleep(3)  # the operator logs in and starts watching

        single = []
        for i in range(args.repeat):
            name = f"single-{i}"
            t0 = create_job(namespace, name)
            clock.wait([name], timeout=30)
            single.append(clock.complete[name] - t0)

        names = [f"burst-{i}" for i in range(args.jobs)]
        starts: dict[str, float] = {}
        cpu_t0 = cpu_seconds(operator.process.pid)
        burst_t0 = time.monotonic()
        threads = [threading.Thread(target=lambda n=n: starts.__setitem__(n, create_job(namespace, n))) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        clock.wait(names, timeout=300)
        burst_total = max(clock.complete[n] for n in names) - burst_t0
        burst_cpu = cpu_seconds(operator.process.pid) - cpu_t0
        burst = [clock.complete[n] - starts[n] for n in names]
        rss = peak_rss_mb(operator.process.pid)
        clock.close()

        print(f"\noperator benchmark ({os.cpu_count()} cores; testbed K8s, 3 KWOK nodes)")
        print(f"{'measurement':<44}{'p50':>9}{'p99':>9}{'goal':>12}")
        print(
            f"{'one 5-role job: apply -> all pods (s)':<44}{statistics.median(single):>9.3f}"
            f"{percentile(single, 0.99):>9.3f}{'p99 <= 1':>12}"
        )
        print(
            f"{f'{args.jobs} jobs at once: per job (s)':<44}{statistics.median(burst):>9.3f}"
            f"{percentile(burst, 0.99):>9.3f}"
        )
        print(f"{f'{args.jobs} jobs at once: all pods created (s)':<44}{burst_total:>18.3f}{'<= 10':>12}")
        print(f"{'operator CPU during those (s)':<44}{burst_cpu:>18.3f}")
        print(f"{'operator peak RSS (MB)':<44}{rss:>18.1f}{'<= 150':>12}")
        print(f"machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        if operator:
            operator.stop()
        stop_cluster(workdir / "cluster")


if __name__ == "__main__":
    main()
