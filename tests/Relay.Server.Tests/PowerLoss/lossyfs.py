#!/usr/bin/python3
"""lossyfs: a pass-through FUSE file system that can lose power.

    lossyfs.py BACKING_DIR MOUNT_POINT        (as root; Debian: python3-fusepy fuse3)

Every operation goes through to BACKING_DIR at once, as a disk's cache would take it, but the file
system remembers what each file held at its last fsync or fdatasync. `mkdir MOUNT_POINT/.power-off`
is the power cut: every file is put back to what it held at its last sync (bytes written since are
undone, its size is set back), the line `lossyfs: power off: ...` goes to stderr, and every later
operation fails with EIO until the file system is unmounted (`umount MOUNT_POINT`, which ends this
process). Mounted again over the same BACKING_DIR, it shows the disk as it came back.

Only data is lost: creating, renaming and deleting files take effect at once, as on a file system
whose metadata journal commits before the power goes. A file created since the last sync of it
comes back empty. Tests use it to show that a program answers a request only after what it
promised is on disk (tests/Relay.Server.Tests/DurabilityE2ETests.PowerLoss.cs).
"""
import errno
import os
import stat
import sys
import threading

from fusepy import FUSE, FuseOSError, Operations

POWER_OFF = "/.power-off"


class LossyFS(Operations):
    def __init__(self, root):
        self.root = os.path.realpath(root)
        self._mutex = threading.Lock()
        # inode -> [size at the last sync, [(offset, bytes it held at the last sync), ...]]
        self.unsynced = {}
        self.off = False

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _check(self):
        if self.off:
            raise FuseOSError(errno.EIO)

    def _entry(self, st):
        entry = self.unsynced.get(st.st_ino)
        if entry is None:
            entry = self.unsynced[st.st_ino] = [st.st_size, []]
        return entry

    def _forget(self, full):
        """Before a name goes away: a file with no other name loses its record (its inode may be reused)."""
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            self.unsynced.pop(st.st_ino, None)

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
        self.off = True
        print(f"lossyfs: power off: {files} files put back to their last sync, {undone} bytes lost", file=sys.stderr, flush=True)

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
            return [".", ".."] + os.listdir(self._path(path))

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
            os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        with self._mutex:
            self._check()
            os.rmdir(self._path(path))

    def unlink(self, path):
        with self._mutex:
            self._check()
            full = self._path(path)
            self._forget(full)
            os.unlink(full)

    def rename(self, old, new):
        with self._mutex:
            self._check()
            full = self._path(new)
            self._forget(full)
            os.rename(self._path(old), full)

    def link(self, target, source):
        with self._mutex:
            self._check()
            os.link(self._path(source), self._path(target))

    def symlink(self, target, source):
        with self._mutex:
            self._check()
            os.symlink(source, self._path(target))

    # Data: remembered until the file is synced.

    def create(self, path, mode, fi=None):
        with self._mutex:
            self._check()
            fd = os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)
            st = os.fstat(fd)
            # Whatever a new file holds is lost with the power until it is synced.
            self.unsynced[st.st_ino] = [0, []]
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
            self.unsynced.pop(os.fstat(fh).st_ino, None)

    def fsyncdir(self, path, datasync, fh):
        with self._mutex:
            self._check()

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
