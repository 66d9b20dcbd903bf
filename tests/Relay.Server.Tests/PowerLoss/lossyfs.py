#!/usr/bin/python3
"""lossyfs: a pass-through FUSE file system that can lose power.

    lossyfs.py BACKING_DIR MOUNT_POINT        (as root; Debian: python3-fusepy fuse3)

Every operation goes through to BACKING_DIR at once, as a disk's cache would take it, but the file
system remembers what each file held at its last fsync or fdatasync. `mkdir MOUNT_POINT/.power-off`
is the power cut: every file is put back to what it held at its last sync (bytes written since are
undone, its size is set back), the line `lossyfs: power off: ...` goes to stderr, and every later
operation fails with EIO until the file system is unmounted (`umount MOUNT_POINT`, which ends this
process). Mounted again over the same BACKING_DIR, it shows the disk as it came back.

What a power cut loses, as POSIX allows it to:
- data: every byte written to a file since its last fsync or fdatasync (a new file comes back
  empty), and size changes since then;
- names: every file created, linked, renamed or deleted, and every directory made or removed,
  since the last fsync of the directory that holds the name (of both directories for a rename).
  An fsync of the file itself does not keep its name. Renaming a directory takes effect at once.
`mkdir MOUNT_POINT/.fail-next-fsync-EXT` (which answers EEXIST) makes the next fsync of a file
whose name ends in `.EXT` (`log`: RocksDB's write-ahead log, `sst`: a table file) fail with EIO;
what that file held unsynced then, and whatever is written to it after, is lost at the power cut,
even if later fsyncs of it succeed (as on Linux, which reports a failed writeback once).
Tests use it to show that a program answers a request only after what it promised is on disk
(tests/Relay.Server.Tests/DurabilityE2ETests.PowerLoss.cs).
"""
import errno
import itertools
import os
import shutil
import stat
import sys
import threading

from fusepy import FUSE, FuseOSError, Operations

POWER_OFF = "/.power-off"
FAIL_FSYNC = "/.fail-next-fsync-"
# Where deleted and replaced names wait until their directory is synced (hidden from the mount).
TRASH = ".lossyfs-trash"


class NameChange:
    """A change of names not yet durable: undone at a power cut unless every directory in dirs was synced since."""

    def __init__(self, what, dirs, undo, commit=None):
        self.what = what
        self.dirs = set(dirs)
        self.undo = undo
        self.commit = commit


class LossyFS(Operations):
    def __init__(self, root):
        self.root = os.path.realpath(root)
        self._mutex = threading.Lock()
        # inode -> [size at the last sync, [(offset, bytes it held at the last sync), ...]]
        self.unsynced = {}
        # NameChange, oldest first
        self.names = []
        self.trash = os.path.join(self.root, TRASH)
        shutil.rmtree(self.trash, ignore_errors=True)
        os.mkdir(self.trash)
        self.trash_ids = itertools.count()
        self.off = False
        # A failed fsync: the next fsync of a file whose name ends in this (".log") fails with EIO,
        # and that file's writes since its last good sync are lost at the power cut whatever later
        # fsyncs say (Linux reports a failed writeback once and then marks the pages clean).
        self.fail_next_fsync = None
        self.failed = set()

    def _path(self, path):
        if path.lstrip("/").split("/")[0] == TRASH:
            raise FuseOSError(errno.ENOENT)
        return os.path.join(self.root, path.lstrip("/"))

    def _to_trash(self, full):
        """Moves a name out of sight, to come back if the power goes before its directory is synced."""
        hidden = os.path.join(self.trash, str(next(self.trash_ids)))
        os.rename(full, hidden)
        return hidden

    @staticmethod
    def _remove(full):
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)

    @staticmethod
    def _parent(full):
        return os.path.dirname(full)

    def _check(self):
        if self.off:
            raise FuseOSError(errno.EIO)

    def _entry(self, st):
        entry = self.unsynced.get(st.st_ino)
        if entry is None:
            entry = self.unsynced[st.st_ino] = [st.st_size, []]
        return entry

    def _forget_and_remove(self, hidden):
        """A deleted or replaced name is gone for good: a file with no other name loses its record (its inode may be reused)."""
        st = os.lstat(hidden)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            self.unsynced.pop(st.st_ino, None)
        self._remove(hidden)

    def _power_off(self):
        paths = {}
        for directory, _, files in os.walk(self.root):
            for name in files:
                full = os.path.join(directory, name)
                paths[os.lstat(full).st_ino] = full
        files = undone = 0
        for ino, (size, undo) in self.unsynced.items():
            full = paths.get(ino)
            if full is None:
                continue
            fd = os.open(full, os.O_WRONLY)
            try:
                before = os.fstat(fd).st_size
                for offset, old in reversed(undo):
                    os.pwrite(fd, old, offset)
                os.ftruncate(fd, size)
                files += 1
                undone += sum(len(old) for _, old in undo) + max(0, before - size)
            finally:
                os.close(fd)
        self.unsynced.clear()
        names = len(self.names)
        for change in reversed(self.names):
            print(f"lossyfs: undone: {change.what}", file=sys.stderr, flush=True)
            try:
                change.undo()
            except FileNotFoundError:
                pass  # moved on by a later change that was kept
        self.names.clear()
        self.off = True
        print(f"lossyfs: power off: {files} files put back to their last sync, {undone} bytes lost, "
              f"{names} name changes undone", file=sys.stderr, flush=True)

    # Names and attributes: at once.

    def getattr(self, path, fh=None):
        with self._mutex:
            self._check()
            st = os.lstat(self._path(path))
            return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                                "st_atime", "st_mtime", "st_ctime", "st_ino")}

    def readdir(self, path, fh):
        with self._mutex:
            self._check()
            return [".", ".."] + [n for n in os.listdir(self._path(path)) if path != "/" or n != TRASH]

    def readlink(self, path):
        with self._mutex:
            self._check()
            return os.readlink(self._path(path))

    def access(self, path, amode):
        with self._mutex:
            self._check()
            if not os.access(self._path(path), amode):
                raise FuseOSError(errno.EACCES)

    def statfs(self, path):
        with self._mutex:
            self._check()
            sv = os.statvfs(self._path(path))
            return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path, mode):
        with self._mutex:
            self._check()
            os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        with self._mutex:
            self._check()
            os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        with self._mutex:
            self._check()
            os.utime(self._path(path), times)

    def mkdir(self, path, mode):
        with self._mutex:
            self._check()
            if path == POWER_OFF:
                self._power_off()
                return
            if path.startswith(FAIL_FSYNC):
                self.fail_next_fsync = "." + path[len(FAIL_FSYNC):]
                print(f"lossyfs: the next fsync of a {self.fail_next_fsync} file fails", file=sys.stderr, flush=True)
                raise FuseOSError(errno.EEXIST)
            full = self._path(path)
            os.mkdir(full, mode)
            self.names.append(NameChange(f"mkdir {path}", [self._parent(full)], lambda: shutil.rmtree(full)))

    def rmdir(self, path):
        with self._mutex:
            self._check()
            full = self._path(path)
            if os.listdir(full):
                raise FuseOSError(errno.ENOTEMPTY)
            hidden = self._to_trash(full)
            self.names.append(NameChange(f"rmdir {path}", [self._parent(full)], lambda: os.rename(hidden, full), lambda: os.rmdir(hidden)))

    def unlink(self, path):
        with self._mutex:
            self._check()
            full = self._path(path)
            hidden = self._to_trash(full)
            self.names.append(NameChange(f"unlink {path}", [self._parent(full)], lambda: os.rename(hidden, full),
                                         lambda: self._forget_and_remove(hidden)))

    def rename(self, old, new):
        with self._mutex:
            self._check()
            source, target = self._path(old), self._path(new)
            if os.path.isdir(source) and not os.path.islink(source):
                os.rename(source, target)  # directories: at once
                return
            replaced = self._to_trash(target) if os.path.lexists(target) else None

            def undo():
                os.rename(target, source)
                if replaced is not None:
                    os.rename(replaced, target)

            commit = (lambda: self._forget_and_remove(replaced)) if replaced is not None else None
            os.rename(source, target)
            self.names.append(NameChange(f"rename {old} {new}", [self._parent(source), self._parent(target)], undo, commit))

    def link(self, target, source):
        with self._mutex:
            self._check()
            full = self._path(target)
            os.link(self._path(source), full)
            self.names.append(NameChange(f"link {target}", [self._parent(full)], lambda: os.unlink(full)))

    def symlink(self, target, source):
        with self._mutex:
            self._check()
            full = self._path(target)
            os.symlink(source, full)
            self.names.append(NameChange(f"symlink {target}", [self._parent(full)], lambda: os.unlink(full)))

    # Data: remembered until the file is synced.

    def create(self, path, mode, fi=None):
        with self._mutex:
            self._check()
            full = self._path(path)
            fd = os.open(full, os.O_RDWR | os.O_CREAT, mode)
            st = os.fstat(fd)
            # Whatever a new file holds is lost with the power until it is synced, and its name
            # until its directory is.
            self.unsynced[st.st_ino] = [0, []]
            self.names.append(NameChange(f"create {path}", [self._parent(full)], lambda: os.unlink(full)))
            return fd

    def open(self, path, flags):
        with self._mutex:
            self._check()
            full = self._path(path)
            if flags & os.O_TRUNC:
                self._truncate(full, 0)
            # Read and write whatever the caller asked: a write keeps what it overwrites.
            return os.open(full, os.O_RDWR)

    def read(self, path, size, offset, fh):
        with self._mutex:
            self._check()
            return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        with self._mutex:
            self._check()
            entry = self._entry(os.fstat(fh))
            synced = entry[0]
            if offset < synced:
                end = min(offset + len(data), synced)
                entry[1].append((offset, os.pread(fh, end - offset, offset)))
            return os.pwrite(fh, data, offset)

    def _truncate(self, full, length):
        st = os.stat(full)
        entry = self._entry(st)
        synced = entry[0]
        if length < st.st_size and length < synced:
            with open(full, "rb") as f:
                f.seek(length)
                entry[1].append((length, f.read(min(st.st_size, synced) - length)))
        os.truncate(full, length)

    def truncate(self, path, length, fh=None):
        with self._mutex:
            self._check()
            self._truncate(self._path(path), length)

    def fsync(self, path, datasync, fh):
        with self._mutex:
            self._check()
            ino = os.fstat(fh).st_ino
            if self.fail_next_fsync and path is not None and path.endswith(self.fail_next_fsync):
                self.fail_next_fsync = None
                self.failed.add(ino)
                print(f"lossyfs: fsync of {path} failed (EIO)", file=sys.stderr, flush=True)
                raise FuseOSError(errno.EIO)
            if ino not in self.failed:
                self.unsynced.pop(ino, None)

    def fsyncdir(self, path, datasync, fh):
        with self._mutex:
            self._check()
            synced = self._path(path).rstrip("/") or "/"
            kept = []
            for change in self.names:
                change.dirs.discard(synced)
                if change.dirs:
                    kept.append(change)
                elif change.commit is not None:
                    change.commit()
            self.names = kept

    def flush(self, path, fh):
        with self._mutex:
            self._check()

    def release(self, path, fh):
        os.close(fh)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    FUSE(LossyFS(sys.argv[1]), sys.argv[2], foreground=True, nothreads=False, big_writes=True)


if __name__ == "__main__":
    main()
