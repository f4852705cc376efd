"""System users and groups, and what other users may reach on disk.

The OS edge of running processes as users other than root: ``useradd`` /
``userdel`` / ``groupadd``, and the chmods that let such a user reach code it
must run. Used by the embedded PostgreSQL (its ``pgserver`` user) and by the
bot users (``controller.botusers``). Nothing here decides *who* gets a user.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import operator
import os
import pwd
import re
import shutil
import signal
import stat
import struct
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 30.0


class SystemUserError(Exception):
    """A system user or group cannot be created or removed (no tool, tool failed)."""


# Run by /bin/sh with the tool as "$@" and a pipe of ours as stdin: moves the pipe to
# fd 3, runs the tool (stdin /dev/null, no fd 3) as its child, waits for it, and
# writes its exit status (128+N: killed by signal N) down the pipe.
_REPORTER = 'exec 3<&0 </dev/null; "$@" 3>&-; echo "$?" >&3'


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``tool args``, its output and its exit status, which survive a reaper of every
    child of this process: in circusd's process (the keeper) circusd reaps with
    ``waitpid(-1)`` on each SIGCHLD, and ``subprocess`` then reports 0 for whatever it
    ran. So the tool runs as a grandchild: a shell runs it, waits for it, and writes
    its status down a pipe of ours (circus may reap the shell, never the tool)."""
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise SystemUserError(f"running as root, {tool} is needed and missing")
    status_read, status_write = os.pipe()
    try:
        reporter = subprocess.Popen(
            ["/bin/sh", "-c", _REPORTER, "sh", path, *args],
            stdin=status_write,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the tool too: one killpg ends both
        )
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
    with os.fdopen(status_read, "rb") as status_pipe:
        try:
            out, err = reporter.communicate(timeout=TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            # useradd waits for /etc/passwd's lock; a stuck holder is an operator's problem.
            with contextlib.suppress(ProcessLookupError):  # both gone meanwhile
                os.killpg(reporter.pid, signal.SIGKILL)
            reporter.communicate()
            raise SystemUserError(f"{tool} {' '.join(args)} took over {TOOL_TIMEOUT_S}s") from exc
        status = status_pipe.read().decode("ascii", "replace").strip()
    if not re.fullmatch(r"[0-9]{1,3}", status):
        raise SystemUserError(f"{tool} {' '.join(args)}: no exit status came back ({err.strip()})")
    return subprocess.CompletedProcess([path, *args], int(status), out, err)


def ensure_group(name: str) -> grp.struct_group:
    """The system group ``name``, created when missing."""
    try:
        return grp.getgrnam(name)
    except KeyError:
        pass
    result = _run("groupadd", "--system", name)
    # 9: created meanwhile by another process (two fleets starting at once)
    if result.returncode not in (0, 9):
        raise SystemUserError(f"groupadd {name} failed: {result.stderr.strip()}")
    try:
        return grp.getgrnam(name)
    except KeyError:  # see _exists
        raise SystemUserError(f"groupadd {name} failed: {result.stderr.strip()}") from None


def ensure_system_user(
    name: str, *, comment: str = "", groups: Iterable[str] = ()
) -> tuple[pwd.struct_passwd, bool]:
    """The system user ``name`` (no home, no login shell, a group of its own) and
    whether it was created now. Supplementary ``groups`` must exist."""
    try:
        return pwd.getpwnam(name), False
    except KeyError:
        pass
    extra = ",".join(groups)
    result = _run(
        "useradd",
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        *(("--comment", comment) if comment else ()),
        *(("--groups", extra) if extra else ()),
        name,
    )
    if result.returncode != 0:
        raise SystemUserError(f"useradd {name} failed: {result.stderr.strip()}")
    try:
        created = pwd.getpwnam(name)
    except KeyError:  # see _exists
        raise SystemUserError(f"useradd {name} failed: {result.stderr.strip()}") from None
    log.info("created system user %s", name)
    return created, True


def delete_system_user(name: str) -> bool:
    """Remove the user ``name`` and its own group; False when there was none."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    result = _run("userdel", name)
    if result.returncode != 0 or _exists(pwd.getpwnam, name):
        raise SystemUserError(f"userdel {name} failed: {result.stderr.strip()}")
    log.info("removed system user %s", name)
    return True


def delete_group(name: str) -> bool:
    """Remove the group ``name``; False when there was none."""
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    result = _run("groupdel", name)
    if result.returncode != 0 or _exists(grp.getgrnam, name):
        raise SystemUserError(f"groupdel {name} failed: {result.stderr.strip()}")
    return True


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    """Whether ``name`` is (still) there: checked besides the tool's exit status (which
    ``_run`` gets past circusd's reaper), what the tool was to do is done."""
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _add_mode(path: Path, bits: int) -> bool:
    mode = path.stat().st_mode
    if mode & bits == bits:
        return False
    path.chmod(stat.S_IMODE(mode) | bits)
    log.debug("chmod %s: added %o so that other users can reach it", path, bits)
    return True


def open_path_prefix(path: Path) -> list[Path]:
    """Give others search (o+x, not read) on every ancestor of ``path``.

    Returns the dirs whose mode changed.
    """
    return [parent for parent in path.parents if _add_mode(parent, stat.S_IXOTH)]


def open_tree(root: Path) -> list[Path]:
    """Let other users read the tree at ``root`` and run its programs (never write).

    Adds o+x to its ancestors, o+rx to its dirs, o+r to its files (o+x too where the
    owner may execute). Returns what changed. A file ``root`` opens only that file.
    """
    changed = open_path_prefix(root)
    if not root.is_dir():
        executable = root.stat().st_mode & stat.S_IXUSR
        if _add_mode(root, stat.S_IROTH | (stat.S_IXOTH if executable else 0)):
            changed.append(root)
        return changed
    for top, dirs, files in os.walk(root):
        top_path = Path(top)
        if _add_mode(top_path, stat.S_IROTH | stat.S_IXOTH):
            changed.append(top_path)
        for file in files:
            file_path = top_path / file
            if file_path.is_symlink():
                continue
            executable = file_path.stat().st_mode & stat.S_IXUSR
            bits = stat.S_IROTH | (stat.S_IXOTH if executable else 0)
            if _add_mode(file_path, bits):
                changed.append(file_path)
        dirs.sort()
    return changed


# Root walks dirs other users own (a bot's dir, the service user's pg/, sandbox/,
# bus-keys/) one name at a time from an fd it holds, and chowns and chmods the fd it
# opened: an owner who swaps a dir for a symlink meanwhile leads root nowhere. Opening
# with O_NOFOLLOW follows no link at the last name; the names before it are reached
# through fds, never through a path another user can change.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC  # opens nothing: no FIFO blocks
_GIVE_DEPTH = 64  # deeper dirs are left alone (one fd is held per level)


def _link_refused(path: Path) -> SystemUserError:
    return SystemUserError(
        f"{path} is a symlink or no dir: as root, tgfleet follows no link there (another "
        "user may change it); remove it"
    )


def open_dir_below(path: Path, top: Path, *, create: int | None = None) -> int:
    """An fd (read-only) of the dir ``path``, reached from ``top`` one name at a time
    following no symlink. ``top`` is opened by its path: a dir no other user may change
    (the home, ``bots/``). With ``create``, missing dirs on the way are made with that
    mode. Raises SystemUserError when a name on the way is a symlink or no dir."""
    names = path.relative_to(top).parts
    if ".." in names:
        raise ValueError(f"{path} is not below {top}")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    reached = top
    try:
        for name in names:
            reached = reached / name
            if create is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, create, dir_fd=fd)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _link_refused(reached) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_dir(path: Path, top: Path, mode: int = 0o700) -> None:
    """Make the dir ``path`` (and what is missing between ``top`` and it) and set its
    ``mode``, following no symlink below ``top`` (see open_dir_below)."""
    fd = open_dir_below(path, top, create=mode)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def give_tree(root: Path, uid: int, gid: int) -> list[Path]:
    """Give ``root`` and everything below it to ``uid``:``gid``, following no symlink;
    returns what was left alone.

    ``root``'s parent must be a dir no other user may change (the home, ``bots/``):
    ``root`` is opened in it with O_NOFOLLOW, each dir below through its parent's fd,
    and what is chowned is the inode of the fd root holds, so a dir swapped for a link
    to /etc while the walk runs leads nowhere. Left alone: a symlink (``root`` too),
    and a file with a second name: it lives elsewhere too, and a user who hard-linked
    /etc/shadow into its own dir (where fs.protected_hardlinks is 0) would be given it.
    A missing ``root`` gives nothing."""
    skipped: list[Path] = []
    parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _give_entry(parent, root.name, root, (uid, gid), skipped, 0)
    finally:
        os.close(parent)
    return skipped


def _give_entry(
    dir_fd: int, name: str, path: Path, owner: tuple[int, int], skipped: list[Path], depth: int
) -> None:
    """Give the entry ``name`` of the dir open as ``dir_fd`` (``path``), and below it."""
    is_dir_fd = True
    try:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            is_dir_fd = False
            fd = os.open(name, _NODE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:  # removed meanwhile (PostgreSQL, a bot at work)
        return
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode) != is_dir_fd or stat.S_ISLNK(info.st_mode):
            log.debug("not giving %s to uid %d: a symlink, or swapped meanwhile", path, owner[0])
            skipped.append(path)
            return
        if not is_dir_fd and info.st_nlink > 1:
            log.warning("not giving %s to uid %d: it has %d links", path, owner[0], info.st_nlink)
            skipped.append(path)
            return
        if (info.st_uid, info.st_gid) != owner:
            if is_dir_fd:
                os.fchown(fd, *owner)
            else:  # an O_PATH fd has no fchown; its /proc name is that very inode
                os.chown(f"/proc/self/fd/{fd}", *owner)
        if not is_dir_fd:
            return
        if depth >= _GIVE_DEPTH:
            log.warning("not giving what is below %s: deeper than %d dirs", path, _GIVE_DEPTH)
            skipped.append(path)
            return
        with os.scandir(fd) as entries:
            for entry in entries:
                _give_entry(fd, entry.name, path / entry.name, owner, skipped, depth + 1)
    finally:
        os.close(fd)


# POSIX ACLs, as the kernel stores them in the system.posix_acl_* extended attributes
# (no setfacl needed): a version, then (tag, permissions, id) entries sorted by tag and id.
ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_ACL_ENTRY = struct.Struct("<HHI")


def _acl_entries(path: Path, attribute: str, base_mode: int) -> dict[tuple[int, int], int]:
    """The ACL ``attribute`` of ``path`` as {(tag, id): permissions}; one made from
    ``base_mode`` when it has none."""
    try:
        raw = os.getxattr(path, attribute, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return {
            (_USER_OBJ, _NO_ID): (base_mode >> 6) & 7,
            (_GROUP_OBJ, _NO_ID): (base_mode >> 3) & 7,
            (_OTHER, _NO_ID): base_mode & 7,
        }
    entries = {}
    for offset in range(4, len(raw), _ACL_ENTRY.size):
        tag, perms, ident = _ACL_ENTRY.unpack_from(raw, offset)
        entries[(tag, ident)] = perms
    return entries


def grant_user(path: Path, uid: int, perms: int, *, default: int | None = None) -> None:
    """Give user ``uid`` ``perms`` (rwx bits, 0-7) on ``path`` by an ACL entry, and with
    ``default`` the same on what is created in that dir from now on; other entries stay."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise SystemUserError(f"{path} is a symlink: no ACL set through it")
    wanted = [(ACL_ACCESS, perms, stat.S_IMODE(info.st_mode))]
    if default is not None:  # new files: their owner's rw, this user's, nobody else
        wanted.append((ACL_DEFAULT, default, 0o600))
    for attribute, bits, base in wanted:
        entries = _acl_entries(path, attribute, base)
        entries[(_USER, uid)] = bits
        entries.pop((_MASK, _NO_ID), None)
        entries[(_MASK, _NO_ID)] = functools.reduce(
            operator.or_,
            (p for (tag, _), p in entries.items() if tag in (_USER, _GROUP_OBJ, _GROUP)),
            0,
        )
        packed = struct.pack("<I", _ACL_VERSION) + b"".join(
            _ACL_ENTRY.pack(tag, entries[(tag, ident)], ident) for tag, ident in sorted(entries)
        )
        os.setxattr(path, attribute, packed, follow_symlinks=False)
