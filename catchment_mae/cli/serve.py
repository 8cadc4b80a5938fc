"""``cmae serve``: the web UI (train, export, embed) on http://127.0.0.1:5000/."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import click

from catchment_mae.cli import options
from catchment_mae.interrupt import sigterm_as_interrupt

log = logging.getLogger("catchment_mae")

# How long a stop waits for running jobs to end at their next batch.
STOP_TIMEOUT = 30
# Connections held open at once. waitress reads a request in its event loop and
# hands a thread only a whole one, so a connection that trickles its request
# costs a socket, not a thread; at waitress's default of 100, 110 such clients
# kept every other request from being answered.
CONNECTION_LIMIT = 1000


@click.command(short_help="Web UI and JSON API: train, export, embed (Flask).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=".",
    show_default=True,
    help="Every dataset and image path must lie under this folder.",
)
@click.option(
    "--model-root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=".",
    show_default=True,
    help="Models are written and read only under this folder.",
)
@click.option(
    "--token",
    envvar="CMAE_TOKEN",
    help="Access token (default: none on loopback, a random one otherwise).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Host names the server answers to beyond loopback (repeatable).",
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Largest TIFF upload.",
)
@options.device_opt("auto", help="Where training and embedding run.")
@click.option("--threads", type=click.IntRange(min=1), default=8, show_default=True)
def serve(
    host: str,
    port: int,
    data_root: Path,
    model_root: Path,
    token: str | None,
    allowed_hosts: tuple[str, ...],
    max_upload_mb: int,
    device: str,
    threads: int,
) -> None:
    """Serve the web UI: start and watch training, export models to ONNX,
    embed one TIFF (the original tool's POST /embed answers as before) or a whole
    directory into Parquet.

    Binds 127.0.0.1 by default. Binding another address prints a warning and
    requires an access token on every request (printed in the URL).

    \b
    Example:
      cmae serve --data-root ~/dems --model-root ~/models
    """
    try:
        import waitress

        from catchment_mae.web.app import create_app
        from catchment_mae.web.security import LOOPBACK_NAMES, is_loopback
    except ImportError as e:
        raise click.ClickException(
            f"cmae serve needs {e.name}: pip install 'catchment-mae[web]'"
        ) from e
    loopback = is_loopback(host)
    if not loopback:
        log.warning(
            "serving on %s: reachable from other machines; an access token is "
            "required on every request",
            host,
        )
        token = token or secrets.token_urlsafe(24)
    hosts = {*LOOPBACK_NAMES, *allowed_hosts}
    if not loopback and host not in ("0.0.0.0", "::"):
        hosts.add(host)
    app = create_app(
        data_root,
        model_root,
        token=token,
        # Loopback: only loopback names (DNS rebinding). Beyond: the token guards,
        # and --allowed-host narrows the names when given.
        allowed_hosts=hosts if loopback or allowed_hosts else None,
        max_upload_mb=max_upload_mb,
        device=device,
    )
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    click.echo(f"cmae serve: {url} (Ctrl-C to stop)", err=True)
    logging.getLogger("waitress").setLevel(logging.ERROR)
    try:
        # SIGTERM (systemd, docker stop) stops like Ctrl-C, so the upload
        # folder's exit hook runs; a running training keeps its checkpoint.
        # (waitress returns at KeyboardInterrupt.)
        with sigterm_as_interrupt():
            waitress.serve(
                app, host=host, port=port, threads=threads, ident="cmae",
                connection_limit=_open_files_for(CONNECTION_LIMIT),
            )  # fmt: skip
    except OSError as e:  # the port is taken, the address is not this machine's
        raise click.ClickException(
            f"cannot listen on {shown}:{port}: {e.strerror or e} (another server "
            "there? choose another --port)"
        ) from e
    _stop_jobs(app.extensions["cmae"].jobs)
    click.echo("cmae serve: stopped", err=True)


def _stop_jobs(jobs: Any) -> None:
    """Cancels the server's running jobs, waiting STOP_TIMEOUT seconds."""
    if any(j.status == "running" for j in jobs.all()):
        click.echo("cmae serve: cancelling running jobs...", err=True)
    left = jobs.stop(timeout=STOP_TIMEOUT)
    if left:
        log.warning(
            "jobs still running after %d s, stopped with the server: %s",
            STOP_TIMEOUT,
            ", ".join(left),
        )


def _open_files_for(connections: int) -> int:
    """Raises this process's open-file limit to hold ``connections`` sockets and
    the files jobs open beside them, as far as the hard limit allows; the
    connections that fit."""
    import resource

    spare = 256  # models, rasters, tables, the pools' pipes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(1, min(connections, soft - spare))
