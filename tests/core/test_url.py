"""Volumes by URL: a real HTTP server in a thread serving zarr arrays and OME-Zarr images."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import InputReadError, NormcheckError
from napari_normcheck.core.io import remote
from napari_normcheck.core.io.remote import parse_storage_options
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import TileDone
from tests.conftest import synthetic_volume
from tests.core.test_resume import read_outputs
from tests.core.test_volume import _axes, _write_ome

pytest.importorskip("aiohttp", reason="fsspec reads http(s) URLs with aiohttp")

CONFIG = RunConfig(tile=(16, 32, 32), overlap=0.25, activation="sigmoid", cache_mb=0)


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; ``server.fail_every`` answers every n-th chunk request with a 503 once."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        with server.lock:
            server.n_requests += 1
            is_chunk = not self.path.endswith(("zarr.json", ".zarray", ".zattrs", ".zgroup"))
            fail = is_chunk and server.fail_every and server.n_requests % server.fail_every == 0
            if fail:
                server.n_failed += 1
        if fail:
            self.send_error(503, "busy")
            return
        super().do_GET()


class Server:
    """A ``ThreadingHTTPServer`` on localhost in a thread, which can be stopped and started again."""

    def __init__(self, folder: Path, fail_every: int = 0) -> None:
        self.folder, self.fail_every, self.port = folder, fail_every, 0
        self.httpd = None
        self.n_requests = self.n_failed = 0

    def start(self) -> Server:
        handler = functools.partial(Handler, directory=str(self.folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.httpd.allow_reuse_address = True
        self.httpd.daemon_threads = True
        self.httpd.lock = threading.Lock()
        self.httpd.n_requests, self.httpd.n_failed = 0, 0
        self.httpd.fail_every = self.fail_every
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.n_requests += self.httpd.n_requests
        self.n_failed += self.httpd.n_failed
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def served(tmp_path):
    values = synthetic_volume((24, 48, 52))
    for fmt in (2, 3):
        array = zarr.create_array(
            str(tmp_path / f"v{fmt}.zarr"),
            shape=values.shape,
            chunks=(8, 16, 16),
            dtype="float32",
            zarr_format=fmt,
        )
        array[:] = values
    levels = [values[None], values[None, :, ::2, ::2]]
    transforms = [
        ([1.0, 2.0, 0.5, 0.5], [0.0, 1.0, 0, 0]),
        ([1.0, 2.0, 1.0, 1.0], [0.0, 1.0, 0, 0]),
    ]
    for ngff in ("0.4", "0.5"):
        _write_ome(tmp_path / f"ome{ngff}.zarr", levels, _axes("czyx"), transforms, None, ngff)
    server = Server(tmp_path).start()
    yield tmp_path, server
    server.stop()


@pytest.mark.parametrize(
    ("name", "level"), [("v2.zarr", 0), ("v3.zarr", 0), ("ome0.4.zarr", 1), ("ome0.5.zarr", 1)]
)
def test_run_by_url_equals_run_on_the_local_path(served, batchnorm_unet, name, level):
    folder, server = served
    local = open_volume(folder / name, level=level)
    by_url = open_volume(server.url(name), level=level)
    assert by_url.source.startswith(server.url(name))
    assert (by_url.scale, by_url.translation) == (local.scale, local.translation)
    list(run_check(local, batchnorm_unet, CONFIG, folder / "local.zarr"))
    list(run_check(by_url, batchnorm_unet, CONFIG, folder / "url.zarr"))
    expected, got = read_outputs(folder / "local.zarr"), read_outputs(folder / "url.zarr")
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    stored = zarr.open_group(str(folder / "url.zarr"), mode="r").attrs["normcheck"]["source"]
    assert stored.startswith(server.url(name))  # the report records the URL


def test_server_errors_are_retried(tmp_path, batchnorm_unet):
    array = zarr.create_array(
        str(tmp_path / "v.zarr"), shape=(24, 48, 52), chunks=(8, 16, 16), dtype="float32"
    )
    array[:] = synthetic_volume((24, 48, 52))
    server = Server(tmp_path, fail_every=3).start()
    try:
        list(run_check(open_volume(server.url("v.zarr")), batchnorm_unet, CONFIG, tmp_path / "u"))
    finally:
        server.stop()
    assert server.n_failed > 0  # 503 answers were served, and retried
    list(run_check(open_volume(tmp_path / "v.zarr"), batchnorm_unet, CONFIG, tmp_path / "l"))
    expected, got = read_outputs(tmp_path / "l"), read_outputs(tmp_path / "u")
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_server_gone_mid_run_is_one_line_then_resume(served, batchnorm_unet, monkeypatch):
    monkeypatch.setattr(remote, "DEFAULT_RETRIES", 1)  # give up after one retry, not 16 s
    folder, server = served
    url = server.url("v3.zarr")
    out = folder / "o.zarr"
    config = CONFIG.replace(prefetch=1)
    with pytest.raises(InputReadError) as info:
        for event in run_check(open_volume(url), batchnorm_unet, config, out):
            if isinstance(event, TileDone) and event.n_done == 1:
                server.stop()
    line = str(info.value)
    assert line.startswith(f"cannot read the input {url}") and "--resume" in line, line
    server.start()  # the same port again
    list(run_check(open_volume(url), batchnorm_unet, config, out, resume=True))
    list(run_check(open_volume(folder / "v3.zarr"), batchnorm_unet, config, folder / "l.zarr"))
    expected, got = read_outputs(folder / "l.zarr"), read_outputs(out)
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_unreachable_url_and_bad_options_are_one_line(served):
    _, server = served
    with pytest.raises(NormcheckError, match="cannot read a zarr array or group at http"):
        open_volume(server.url("missing.zarr"))
    with pytest.raises(NormcheckError, match="not valid JSON"):
        parse_storage_options("{anon: true}")
    with pytest.raises(NormcheckError, match="JSON object"):
        parse_storage_options("[1]")
    assert parse_storage_options('{"anon": true}') == {"anon": True}


def test_run_from_s3_equals_run_on_the_local_path(served, batchnorm_unet):
    """S3 through a real S3-compatible server (moto's server mode), with ``--storage-options``."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    folder, _ = served
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = parse_storage_options(
            '{"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": '
            f'"http://{host}:{port}", "region_name": "us-east-1"}}}}'
        )
        boto3 = pytest.importorskip("boto3")
        boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket="bucket")
        fs = s3fs.S3FileSystem(**options)
        fs.put(str(folder / "v3.zarr"), "bucket/v3.zarr", recursive=True)
        by_s3 = open_volume("s3://bucket/v3.zarr", storage_options=options)
        assert by_s3.source.startswith("s3://bucket/v3.zarr")
        list(run_check(by_s3, batchnorm_unet, CONFIG, folder / "s3.zarr"))
    finally:
        server.stop()
    list(run_check(open_volume(folder / "v3.zarr"), batchnorm_unet, CONFIG, folder / "l.zarr"))
    expected, got = read_outputs(folder / "l.zarr"), read_outputs(folder / "s3.zarr")
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_command_line_and_cluster_workers_read_the_url_with_its_options(served, tmp_path):
    """``--storage-options`` reach fsspec (a header the server sees) and the cluster's workers."""
    distributed = pytest.importorskip("distributed")
    import json

    import torch

    from napari_normcheck.cli import main
    from napari_normcheck.core.models.models import load_model
    from napari_normcheck.core.models.modelspec import ModelSpec
    from napari_normcheck.core.run.distributed import run_check_distributed
    from tests.conftest import TINY_UNET_ARCH, calibrate, tiny_unet, tiny_unet_kwargs

    folder, server = served
    seen: list[str] = []
    original = Handler.do_GET

    def recording(self):
        seen.append(self.headers.get("X-Normcheck-Test", ""))
        original(self)

    Handler.do_GET = recording
    try:
        torch.save(calibrate(tiny_unet("batch"), (1, 16, 32, 32)).state_dict(), tmp_path / "m.pt")
        options = '{"headers": {"X-Normcheck-Test": "yes"}}'
        url = server.url("v3.zarr")
        argv = ["run", url, "--model", str(tmp_path / "m.pt"), "--arch", TINY_UNET_ARCH]
        argv += ["--arch-kwargs", json.dumps(tiny_unet_kwargs()), "--tile", "16,32,32"]
        argv += ["--activation", "sigmoid", "--cache-mb", "0", "--storage-options", options]
        argv += ["--out", str(tmp_path / "cli.zarr"), "--report", str(tmp_path / "r.json")]
        assert main(argv) == 0
        assert seen and set(seen) == {"yes"}
        assert json.loads((tmp_path / "r.json").read_text())["source"].startswith(url)

        loaded = load_model(tmp_path / "m.pt", arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs())
        source = {"source": url, "level": 0, "storage_options": parse_storage_options(options)}
        cluster = distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        )
        with cluster, distributed.Client(cluster) as client:
            list(
                run_check_distributed(
                    open_volume(url, storage_options=source["storage_options"]),
                    loaded.module,
                    CONFIG,
                    tmp_path / "cluster.zarr",
                    model_spec=ModelSpec.from_loaded(loaded),
                    volume_source=source,
                    client=client,
                    block_chunks=(2, 2, 2),
                )
            )
    finally:
        Handler.do_GET = original
    assert set(seen) == {"yes"}
    expected, got = read_outputs(tmp_path / "cli.zarr"), read_outputs(tmp_path / "cluster.zarr")
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], atol=1 if "pred" in key else 0)
