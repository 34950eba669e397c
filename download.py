"""The default corpus: where a data dir's text is, and tinyshakespeare fetched (and checked against its SHA-256)
when the default data dir lacks it."""
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request

from files import atomic_write_bytes
from settings import DEFAULT_DATA_DIR

INPUT_FILE = "input.txt"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_URL_ENV = "CHAR_RNN_DATA_URL"  # mirror of the default corpus (URL or local path), for air-gapped machines
DOWNLOAD_TIMEOUT_S = 30


def ensure_input(data_dir, data_url=None):
    """Return the path of data_dir/input.txt, downloading the default corpus if it is missing.

    Only the default data dir is downloaded (from `data_url`, $CHAR_RNN_DATA_URL or the public address);
    any other data dir without input.txt is a FileNotFoundError.
    """
    path = os.path.join(data_dir, INPUT_FILE)
    if os.path.isfile(path):
        return path
    if os.path.normpath(data_dir) != os.path.normpath(DEFAULT_DATA_DIR):
        raise FileNotFoundError(f"{path} not found: put your text in {INPUT_FILE} inside --data_dir")
    source = data_url or os.environ.get(DATA_URL_ENV) or TINYSHAKESPEARE_URL
    download(source, path, TINYSHAKESPEARE_SHA256)
    return path


def download(source, path, sha256):
    """Fetch `source` (a URL or a local path) to `path`, check its SHA-256, and write it atomically."""
    print(f"downloading {source} -> {path}", file=sys.stderr)
    try:
        if "://" in source:
            with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response:
                data = response.read()
        else:
            with open(source, "rb") as f:
                data = f.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not download the default corpus from {source} ({getattr(e, 'reason', e)}); "
            f"put tinyshakespeare's input.txt at {path}, or give a mirror with --data_url or ${DATA_URL_ENV}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"the file from {source} has SHA-256 {digest}, expected {sha256}: "
                         f"it is not tinyshakespeare; nothing was written to {path}")
    atomic_write_bytes(path, data)
