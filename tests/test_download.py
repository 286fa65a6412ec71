"""dataset/download_em_mito_sample.py: the real sample rebuilt from a local copy or over HTTP (a server on
127.0.0.1 started here, serving the repository's layout), with checksums, a corrupt file and a resume."""

import hashlib
import http.server
import importlib.util
import shutil
import threading

import pytest

from conftest import REPO, SHARED_SAMPLE

spec = importlib.util.spec_from_file_location("download_em_mito_sample", REPO / "dataset" / "download_em_mito_sample.py")
download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download)

needs_sample = pytest.mark.skipif(not (SHARED_SAMPLE / "train").is_dir(),
                                  reason=f"real EM sample not found at {SHARED_SAMPLE} (it lives in ../shared)")


def test_the_manifest_lists_the_whole_sample_in_our_layout():
    rows = download.read_manifest()
    assert len(rows) == 12 * 2 + 4 * 2 + 4 * 2 + 5
    assert {local.split("/")[0] for _, local, _ in rows} == {"train", "valid", "test", "unlabeled"}
    assert all(len(digest) == 64 for digest, _, _ in rows)


@needs_sample
def test_from_a_local_copy_every_file_is_copied_and_verified(tmp_path, capsys):
    output = tmp_path / "em_mito_sample"
    assert download.main(["--from", str(SHARED_SAMPLE), "--output", str(output)]) == 0
    for digest, local, _ in download.read_manifest():
        assert hashlib.sha256((output / local).read_bytes()).hexdigest() == digest
    assert (output / "LICENSE.cdeep3m").read_bytes() == (SHARED_SAMPLE / "LICENSE.cdeep3m").read_bytes()
    assert not list(output.rglob(".*.partial"))
    assert download.main(["--from", str(SHARED_SAMPLE), "--output", str(output)]) == 0  # a rerun fetches nothing
    assert "0 files fetched, 46 already there" in capsys.readouterr().out


def upstream_layout(root):
    """The files as CRBS/cdeep3m serves them: mito_testsample/training/images/images.NNN.png, ..."""
    for _, local, upstream in download.read_manifest():
        target = root / "mito_testsample" / upstream
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_SAMPLE / local, target)
    shutil.copyfile(SHARED_SAMPLE / "LICENSE.cdeep3m", root / "LICENSE")
    return root


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, honouring 'Range: bytes=N-' as GitHub does; records the ranges asked for."""

    ranges = []

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        requested = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not requested or not requested.startswith("bytes="):
            return super().send_head()
        RangeHandler.ranges.append((self.path, requested))
        start = int(requested[6:].rstrip("-"))
        data = open(path, "rb").read()
        if start >= len(data):
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        import io

        return io.BytesIO(data[start:])


@pytest.fixture
def server(tmp_path):
    root = upstream_layout(tmp_path / "served")
    handler = lambda *args, **kwargs: RangeHandler(*args, directory=str(root), **kwargs)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.ranges = []
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


@needs_sample
def test_over_http_a_corrupt_file_is_refused_and_an_interrupted_one_resumes(server, tmp_path, capsys):
    root, url = server
    output = tmp_path / "em_mito_sample"
    corrupt = root / "mito_testsample" / "training" / "labels" / "mitos_3D.023.png"
    good = corrupt.read_bytes()
    corrupt.write_bytes(good[:-10] + b"0123456789")
    assert download.main(["--base-url", url, "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "mitos_3D.023.png: SHA-256" in error and "is not the expected" in error
    assert not (output / "valid" / "labels" / "023.png").exists()  # nothing unverified left in place
    assert not list(output.rglob(".*.partial"))

    # The server is mended; a half-downloaded file waits as the kill left it.
    corrupt.write_bytes(good)
    target = output / "valid" / "labels" / "025.png"  # after the corrupt file: not fetched yet
    whole = (root / "mito_testsample" / "training" / "labels" / "mitos_3D.025.png").read_bytes()
    download.partial_path(target).parent.mkdir(parents=True, exist_ok=True)
    download.partial_path(target).write_bytes(whole[: len(whole) // 2])
    assert download.main(["--base-url", url, "--output", str(output)]) == 0
    assert target.read_bytes() == whole
    assert ("/mito_testsample/training/labels/mitos_3D.025.png", f"bytes={len(whole) // 2}-") in RangeHandler.ranges
    for digest, local, _ in download.read_manifest():
        assert hashlib.sha256((output / local).read_bytes()).hexdigest() == digest
    assert (output / "LICENSE.cdeep3m").exists()


def test_an_unreachable_server_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = download.main(["--base-url", "http://127.0.0.1:9", "--output", str(tmp_path / "out")])
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert code == 2 and len(error) == 1 and "127.0.0.1:9" in error[0] and "rerun" in error[0]
