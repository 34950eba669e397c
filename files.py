"""Files written crash-safely: a crash leaves the old file or the whole new one, never a part, and a new file gets
the permissions an ordinary one gets."""
import os
import tempfile

NEW_FILE_MODE = 0o666  # before the umask, as open() creates files


def atomic_write_bytes(path, data):
    """Write `data` to `path` so that a crash leaves either the old file or the whole new one.

    The file gets the permissions an ordinary new file gets (0666 less the umask), as TensorFlow's checkpoints do,
    so that a server running as another user can read a save dir.
    """
    atomic_write_chunks(path, [data])


def atomic_write_chunks(path, chunks):
    """atomic_write_bytes for data that comes in pieces (an iterable of bytes), never all in memory at once."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = new_temp_file(directory)
    except OSError as error:  # name the file the user knows, not a temporary one
        raise OSError(error.errno, error.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, path) from None
        raise


def new_temp_file(directory, suffix=""):
    """(fd, path) of a new hidden temporary file in `directory`, with an ordinary new file's permissions."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.fchmod(fd, NEW_FILE_MODE & ~current_umask())
    return fd, path


def current_umask():
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
