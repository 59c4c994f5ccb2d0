"""python -m hpc.status JOB_ID | HOST:PORT: nodes, resources and jobs of a job's Ray cluster.

    python -m hpc.status 4242                      # the Ray cluster of Slurm job 4242 (its job folder)
    python -m hpc.status 10.0.0.5:8265 --token-file ~/.hpc-ray/jobs/4242/token
    python -m hpc.status 4242 --json               # the raw answers, for scripts

Reads the Ray dashboard's REST API (/api/version, /api/v0/nodes, /api/cluster_status, /api/jobs/)
with the job's token. From a laptop, tunnel first (the job's log prints the command):
    ssh -N -L 8265:<head ip>:<dashboard port> <login node>;  python -m hpc.status localhost:8265 --token-file ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hpc.errors import UserError, run_cli
from hpc.dashboard import Dashboard, DashboardError
from hpc.ray_cluster import CLUSTER_FILE, NODE_LABEL
from hpc.slurm import jobs_root


def resolve_target(target: str, token_file: str | None) -> tuple[str, str | None, dict]:
    """(dashboard URL, token, cluster.json or {}) for a job id or a dashboard address."""
    info: dict = {}
    if target.removeprefix("local-").isdigit():  # a Slurm job id, or hpc.submit --executor local's
        path = jobs_root() / target / CLUSTER_FILE
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no Ray cluster recorded for job {target} ({path} missing): is it a job started "
                            "with python -m hpc.ray_cluster (slurm/*.sh, hpc.submit), and is HPC_JOBS_DIR the "
                            "same as the job's?") from None
        if info.get("state") in ("ended", "interrupted"):
            raise UserError(f"the Ray cluster of job {target} has {info['state']}; its logs are in {path.parent}")
        url, token_file = info["dashboard_url"], token_file or info.get("token_file")
    else:
        url = target
    token = None
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read the token file {token_file}: {exc.strerror}") from None
    elif os.environ.get("RAY_AUTH_TOKEN"):
        token = os.environ["RAY_AUTH_TOKEN"]
    return url, token, info


def collect(dash: Dashboard) -> dict:
    usage = dash.cluster_status()["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
    return {"version": dash.version(), "nodes": dash.nodes(), "usage": usage, "jobs": dash.jobs()}


def render(state: dict, url: str, info: dict, console: Console) -> None:
    v = state["version"]
    alive = [n for n in state["nodes"] if n.get("state") == "ALIVE"]
    title = f"Ray {v.get('ray_version')} at {url}"
    if info:
        title += f"  (Slurm job {info['job_id']}, head {info['head_node']})"
    console.print(title)
    used = {k: state["usage"].get(k, [0, 0]) for k in ("CPU", "GPU")}
    console.print("resources in use: " + ", ".join(f"{k} {u:g}/{t:g}" for k, (u, t) in used.items() if t)
                  + f"; {len(alive)} of {len(state['nodes'])} node(s) alive")
    nodes = Table(title="nodes", title_justify="left")
    for col in ("slurm node", "ip", "head", "state", "CPU", "GPU", "memory GiB", "node id"):
        nodes.add_column(col)
    for n in state["nodes"]:
        res = n.get("resources_total") or {}
        nodes.add_row((n.get("labels") or {}).get(NODE_LABEL, "-"), n.get("node_ip", "-"),
                      "yes" if n.get("is_head_node") else "", n.get("state", "-"), f"{res.get('CPU', 0):g}",
                      f"{res.get('GPU', 0):g}", f"{res.get('memory', 0) / 2**30:.1f}", n.get("node_id", "")[:12])
    console.print(nodes)
    jobs = Table(title="jobs", title_justify="left")
    for col in ("job", "type", "status", "running for", "entrypoint"):
        jobs.add_column(col)
    now = time.time() * 1000
    for j in sorted(state["jobs"], key=lambda j: j.get("start_time") or 0):
        start, end = j.get("start_time") or 0, j.get("end_time") or 0
        secs = ((end or now) - start) / 1000 if start else 0
        jobs.add_row(j.get("submission_id") or j.get("job_id") or "-", j.get("type", "-"), j.get("status", "-"),
                     f"{int(secs // 60)}m{int(secs % 60):02d}s", (j.get("entrypoint") or "")[:80])
    console.print(jobs if state["jobs"] else "jobs: none")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="JOB_ID|HOST:PORT", help="a Slurm job id, or the dashboard's address")
    p.add_argument("--token-file", help="the cluster's token (default: the job's, or $RAY_AUTH_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the API's answers as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    url, token, info = resolve_target(args.target, args.token_file)
    dash = Dashboard(url, token)
    try:
        state = collect(dash)
    except DashboardError as exc:
        raise UserError(f"cannot read the Ray dashboard: {exc}") from None
    if args.json:
        print(json.dumps({"dashboard_url": dash.url, "cluster": info, **state}, indent=2))
    else:
        render(state, dash.url, info, Console(width=max(120, Console().width)))
    return 0


if __name__ == "__main__":
    run_cli(main)
