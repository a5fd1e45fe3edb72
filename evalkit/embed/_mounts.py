"""Is a directory on a network or FUSE filesystem? The store refuses those: SQLite's WAL mode
keeps its lock state in a memory-mapped `-shm` file, which is only coherent between processes of
one host on a local filesystem (https://sqlite.org/wal.html, "WAL does not work over a network
filesystem"); byte-range locks over NFS/SMB/FUSE are unreliable too.

1. read the mount table: `/proc/self/mountinfo` (Linux), or the text a caller passes (tests);
2. resolve the directory (or its nearest existing parent) to its real path and pick the mount
   whose mount point is the longest path prefix of it;
3. classify that mount's filesystem type: network types and FUSE (other than a small list of
   local FUSE filesystems) are refused; anything else, or no mount table at all, is accepted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from evalkit.errors import StoreError

MOUNTINFO = "/proc/self/mountinfo"
NETWORK_TYPES = {
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph",
    "glusterfs", "lustre", "gpfs", "beegfs", "davfs", "coda", "ocfs2", "gfs2", "orangefs",
}  # fmt: skip
LOCAL_FUSE = {"fuseblk", "fuse.fuse-overlayfs", "fuse.lxcfs", "fuse.portal"}
ALLOW_ENV = "EVALKIT_STORE_ALLOW_NETWORK_FS"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, str, str]]:
    """Lines of /proc/self/mountinfo -> [(mount point, filesystem type, source)]."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3 or len(fields) < 5:
            continue
        mounts.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return mounts


def _real(path: Path) -> Path:
    """The real location of `path`: its nearest existing parent resolved (symlinks), plus the
    parts that do not exist yet."""
    path = path.expanduser().absolute()
    rest: list[str] = []
    while not path.exists() and path != path.parent:
        rest.insert(0, path.name)
        path = path.parent
    return path.resolve().joinpath(*rest)


def mount_of(path: str | os.PathLike, mountinfo: str | None = None) -> tuple[str, str, str] | None:
    """(mount point, filesystem type, source) of the mount holding `path`; None when unknown."""
    if mountinfo is None:
        try:
            mountinfo = Path(MOUNTINFO).read_text()
        except OSError:
            return None
    real = str(_real(Path(path)))
    best = None
    for point, fstype, source in parse_mountinfo(mountinfo):
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype, source)  # later lines over-mount earlier ones
    return best


def is_network(fstype: str) -> bool:
    base = fstype.split(".")[0]
    if fstype in LOCAL_FUSE:
        return False
    return base in NETWORK_TYPES or base == "fuse" or fstype.startswith("fuse.")


def network_mount(path: str | os.PathLike, mountinfo: str | None = None) -> str | None:
    """A description of the network/FUSE mount holding `path` ("nfs4 server:/x at /mnt"), or
    None when it is on a local filesystem (or the mount table is unavailable)."""
    found = mount_of(path, mountinfo)
    if found is None or not is_network(found[1]):
        return None
    point, fstype, source = found
    return f"{fstype} ({source} mounted at {point})"


def refuse_network_fs(directory: Path, allow: bool | None) -> None:
    """StoreError with advice when `directory` is on a network/FUSE filesystem, unless `allow`
    (None: $EVALKIT_STORE_ALLOW_NETWORK_FS set to anything but 0)."""
    if allow is None:
        allow = os.environ.get(ALLOW_ENV, "") not in ("", "0")
    where = None if allow else network_mount(directory)
    if where is not None:
        raise StoreError(
            f"embedding store {directory} is on a network/FUSE filesystem, {where}: SQLite's WAL "
            f"is not safe there. Keep one store per host on a local disk and share precompute "
            f"outputs (`evalkit encode --out`), not stores; set {ALLOW_ENV}=1 to override"
        )
