"""Reading a volume by URL from a local HTTP server vs reading the same local zarr, for a whole run.

Run: ``python benchmarks/bench_url.py [--quick] [--em]``. Prints the run times and their ratio;
asserts nothing. Target: the run by URL takes at most 1.3x the run on the local zarr.

The volume is a zarr v3 array (zstd chunks of 16x128x128) written to a temporary folder (``--em``:
the ISBI 2012 EM stack from the shared data, 30x512x512 uint8), served by ``http.server`` in a
thread; the model is a small MONAI BasicUNet with BatchNorm (a cheap forward makes the
reading a larger share of the run: the stricter test). Runs alternate local / URL, best of
``--repeat``, each into a fresh OUT.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

TILE = (16, 128, 128)
ISBI_RAW = Path(__file__).resolve().parents[2] / "shared/data/em/isbi2012_train_raw.tif"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def make_model():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch", dropout=0.0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(1, 1, *TILE) * 2 + 1)
    return model.eval()


def make_zarr(path: Path, values: np.ndarray) -> None:
    import zarr

    array = zarr.create_array(
        str(path),
        shape=values.shape,
        chunks=(16, 128, 128),
        dtype=values.dtype,
        compressors=zarr.codecs.ZstdCodec(),
    )
    array[:] = values


def timed_run(source: str, out: Path, model) -> float:
    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.run.engine import run_check

    config = RunConfig(tile=TILE, overlap=0.25, activation="sigmoid", normalize="minmax:0,255")
    t0 = time.perf_counter()
    list(run_check(open_volume(source), model, config, out))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller volume, one repeat")
    parser.add_argument("--em", action="store_true", help="the shared ISBI EM stack")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.em:
        import tifffile

        values = tifffile.imread(ISBI_RAW)[:16]
    else:
        shape = (16, 256, 256) if args.quick else (32, 384, 384)
        values = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    repeat = 1 if args.quick else args.repeat
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = make_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_zarr(folder / "v.zarr", values)
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/v.zarr"
        timed_run(str(folder / "v.zarr"), folder / "warm.zarr", model)  # imports, first forwards
        local, remote = [], []
        for i in range(repeat):
            local.append(timed_run(str(folder / "v.zarr"), folder / f"l{i}.zarr", model))
            remote.append(timed_run(url, folder / f"u{i}.zarr", model))
        server.shutdown()
        server.server_close()
    print(f"volume {values.shape} {values.dtype}, tile {TILE}, best of {repeat}")
    print(f"local zarr: {min(local):.2f} s   by URL (local http.server): {min(remote):.2f} s")
    print(f"ratio URL / local: {min(remote) / min(local):.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
