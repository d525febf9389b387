"""A dataset location: a local folder or a remote prefix (s3://, gs://, oci://, ... through mosaicml-streaming's
storage clients, which read S3_ENDPOINT_URL for S3-compatible endpoints). Files are named relative to it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lm2.model.errors import DataError


def is_remote(url: str) -> bool:
    return "://" in url


class Location:
    def __init__(self, url: str | Path) -> None:
        self.url = str(url).rstrip("/")
        self.remote = is_remote(self.url)
        self._scratch: tempfile.TemporaryDirectory | None = None

    def join(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def list(self, folder: str) -> list[str]:
        """Names of the files directly in `folder`."""
        if not self.remote:
            path = Path(self.url, folder)
            return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        prefix = f"{folder.strip('/')}/" if folder else ""
        keys = self._uploader(self.url).list_objects(prefix) or []
        return sorted({key.rsplit("/", 1)[-1] for key in keys if "/" not in key[len(self._key(prefix)) :]})

    def holds_anything(self, folder: str = "") -> bool:
        if not self.remote:
            path = Path(self.url, folder)
            return path.exists() and (path.is_file() or any(path.iterdir()))
        prefix = f"{folder.strip('/')}/" if folder else ""
        return bool(self._uploader(self.url).list_objects(prefix))

    def read_json(self, name: str) -> dict | None:
        """The JSON file `name`, or None if it does not exist."""
        if not self.remote:
            path = Path(self.url, name)
            return json.loads(path.read_text()) if path.is_file() else None
        from streaming.base.storage import CloudDownloader

        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, "file.json")
            try:
                CloudDownloader.direct_download(self.join(name), local, 60)
            except Exception as error:  # every storage backend raises its own types
                if isinstance(error, FileNotFoundError) or _error_code(error) in ("404", "NoSuchKey"):
                    return None
                raise DataError(f"cannot fetch {self.join(name)} ({error}); check the URL and credentials") from None
            return json.loads(Path(local).read_text())

    def fetch(self, name: str, folder: Path) -> Path:
        """The file `name` as a local path: itself for a local location, else downloaded into `folder`."""
        if not self.remote:
            return Path(self.url, name)
        from streaming.base.storage import CloudDownloader

        local = folder / name.replace("/", "_")
        try:
            CloudDownloader.direct_download(self.join(name), str(local), 60)
        except Exception as error:  # every storage backend raises its own types
            raise DataError(f"cannot fetch {self.join(name)} ({error}); check the URL and credentials") from None
        return local

    def upload(self, local_file: Path, name: str) -> None:
        """Copies `local_file` to `name` (remote locations only)."""
        folder, _, basename = self.join(name).rpartition("/")
        if basename != local_file.name:
            raise ValueError(f"upload keeps the file name: {local_file.name} != {basename}")
        self._uploader(folder, str(local_file.parent)).upload_file(basename)

    def _key(self, suffix: str) -> str:
        from urllib.parse import urlparse

        return os.path.join(urlparse(self.url).path.lstrip("/"), suffix)

    def _uploader(self, remote: str, local: str | None = None):
        from streaming.base.storage.upload import CloudUploader

        if local is None:  # listing only: streaming's uploaders want a local folder anyway
            self._scratch = self._scratch or tempfile.TemporaryDirectory()
            local = self._scratch.name
        try:
            return CloudUploader.get((local, remote), exist_ok=True, keep_local=True)
        except Exception as error:  # every storage backend raises its own types
            raise DataError(
                f"cannot reach {remote} ({error}); check the URL, the bucket and the credentials "
                "(S3_ENDPOINT_URL for S3-compatible stores)"
            ) from None


def _error_code(error: Exception) -> str | None:
    """The S3 error code of a botocore ClientError (streaming's S3 download re-raises it for a missing object)."""
    return getattr(error, "response", {}).get("Error", {}).get("Code")
