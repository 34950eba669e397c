"""The sampling server's API keys (no TensorFlow, no CherryPy): read from --api_key_file and the CHAR_RNN_API_KEYS
environment variable at start, and an Authorization header checked against them in constant time.

A key file holds one key a line; blank lines and lines starting with # are ignored. CHAR_RNN_API_KEYS holds keys
separated by commas or whitespace. With keys, every endpoint but /health (and the web page itself) needs
`Authorization: Bearer KEY`, the header the openai client sends; without keys, the server answers anyone who
reaches it, which is why it warns when it listens beyond the loopback interface.
"""
import hmac
import ipaddress
import re

KEYS_VARIABLE = "CHAR_RNN_API_KEYS"
BEARER = "bearer"  # the scheme of the Authorization header (compared without regard to case, as RFC 9110 says)
# A key is printable ASCII without spaces: it travels in an HTTP header, and the page keeps it in session storage.
_KEY = re.compile(r"[!-~]+")
_SEPARATORS = re.compile(r"[,\s]+")
LOOPBACK_NAMES = ("localhost",)


def read_key_file(path):
    """The keys of a key file, in order; raises ValueError (or OSError) with a one-line reason when the file
    cannot be read, holds no key, or a line is not a key."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--api_key_file {path}: not UTF-8 text; write one key a line") from None
    except OSError as error:
        raise ValueError(f"--api_key_file {path}: cannot be read ({error.strerror or error})") from None
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not _KEY.fullmatch(key):
            raise ValueError(f"--api_key_file {path}, line {number}: a key is printable ASCII without spaces")
        keys.append(key)
    if not keys:
        raise ValueError(f"--api_key_file {path} holds no key (one key a line; # starts a comment)")
    return keys


def keys_from_environment(environ):
    """The keys of CHAR_RNN_API_KEYS (None when it is not set); raises ValueError when it is set but holds no
    key, rather than serving without keys by mistake."""
    value = environ.get(KEYS_VARIABLE)
    if value is None:
        return None
    keys = [key for key in _SEPARATORS.split(value) if key]
    if not keys:
        raise ValueError(f"{KEYS_VARIABLE} is set but holds no key; unset it to serve without keys")
    for key in keys:
        if not _KEY.fullmatch(key):
            raise ValueError(f"{KEYS_VARIABLE}: a key is printable ASCII (keys are separated by commas or spaces)")
    return keys


def load_keys(path, environ):
    """Every key the server takes: those of the key file (path None: none) and of the environment, as bytes
    (a tuple, empty when neither is given)."""
    keys = [] if path is None else read_key_file(path)
    keys += keys_from_environment(environ) or []
    return tuple(dict.fromkeys(key.encode("ascii") for key in keys))


def authorized(header, keys):
    """Whether an Authorization header (None when absent) names one of the keys: `Bearer KEY`. Each key is
    compared with hmac.compare_digest, and every key is compared, so that the time taken says nothing about how
    much of a key was right."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != BEARER:
        return False
    given = given.strip().encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(given, key) for key in keys]
    return any(matches)


def is_loopback(host):
    """Whether the server's --host is reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def open_warning(host, keys):
    """The start-up warning of a server that answers anyone on the network (None when it has keys or listens on
    the loopback interface only)."""
    if keys or is_loopback(host):
        return None
    return (f"listening on {host} without API keys: anyone who can reach this port can use it "
            f"(give --api_key_file or {KEYS_VARIABLE})")
