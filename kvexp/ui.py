"""The MLflow UI on kvexp's store: `python -m kvexp.ui [--host 127.0.0.1] [--port 5000] [--tracking-uri URI]`.

Runs `mlflow server` on loopback by default and prints the URL of the experiment's runs once the server answers.
The UI has no authentication and lets anyone who reaches it edit and delete runs, so a host other than loopback
needs --allow-remote. Ctrl-C (or SIGTERM) stops the server and everything it started.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Optional

from kvexp.errors import ConfigError, KvexpError
from kvexp.tracking import Tracker

START_TIMEOUT_S = 120  # a cold start imports mlflow, sqlalchemy and the UI's app: ~10 s on a 2-core CPU


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # a wildcard bind answers on loopback too
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                              "pass another --port") from e


def server_command(tracker: Tracker, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracker.uri, "--host", host,
           "--port", str(port), "--workers", "1"]  # one reader is plenty for one person's browser
    if tracker.local:  # artifacts logged through this server land beside the sweeps' own
        cmd += ["--artifacts-destination", str(tracker.store_dir / "artifacts")]
    return cmd


def wait_ready(proc: subprocess.Popen, url: str) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:  # not listening yet
            time.sleep(0.3)
    return False


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (`mlflow server` runs uvicorn as a child of its own), even when
    `mlflow server` itself has already exited."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL only if it ignores SIGTERM for 15 s
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            pass


def serve(tracker: Tracker, host: str, port: int) -> int:
    url = base_url(host, port)
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # GenAI job workers: 7 idle processes
    # Its own session: Ctrl-C reaches only this process, which then stops the server's whole group. Its log goes
    # to stderr, so that stdout carries only the URL line.
    proc = subprocess.Popen(server_command(tracker, host, port), env=env, start_new_session=True, stdout=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM unwinds through the finally below
    try:
        if not wait_ready(proc, url):
            print(f"kvexp.ui: error: mlflow server did not start (exit code {proc.poll()}; its output is above)",
                  file=sys.stderr)
            return 1
        exp = tracker.prepare()
        print(f"kvexp.ui: MLflow UI at {url}/#/experiments/{exp}/runs (store {tracker.shown_uri}); Ctrl-C stops it",
              flush=True)
        proc.wait()
        return proc.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvexp.ui", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, loopback)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--tracking-uri", help="MLflow store; default sqlite:///<cwd>/mlruns/mlflow.db")
    p.add_argument("--experiment", default="kvexp", help="the experiment whose runs the URL opens (default: kvexp)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: anyone who reaches it can read, edit and delete runs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not is_loopback(args.host) and not args.allow_remote:
            raise ConfigError(f"--host {args.host}: not a loopback address, and the MLflow UI has no login; "
                              "pass --allow-remote to serve it to the network anyway")
        tracker = Tracker.open_existing(args.tracking_uri, args.experiment)
        check_port(args.host, args.port)
    except KvexpError as e:
        print(f"kvexp.ui: error: {e}", file=sys.stderr)
        return 2
    return serve(tracker, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
