"""What the bench reads about the daemons, through psutil.

Process trees, CPU seconds, RSS and thread counts come from psutil; the only
thing read from /proc directly is VmHWM (the kernel's peak RSS), which psutil
does not expose on Linux.  Needs ``pip install -e '.[bench]'``.
"""

import threading
import time

import psutil


def tree(pid):
    """psutil.Process objects of PID and its live descendants."""
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


def cpu_seconds(pid):
    """user+system CPU seconds of PID's process tree (all threads)."""
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def rss_kib(pid):
    """Resident set size of PID's process tree, in KiB."""
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total // 1024


def hwm_kib(pid):
    """VmHWM (peak RSS, kB) summed over PID's process tree."""
    total = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/status" % p.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total


def listening_on(pid, port):
    """True when PID's process tree has a TCP socket listening on PORT."""
    for p in tree(pid):
        try:
            conns = (p.net_connections if hasattr(p, "net_connections")
                     else p.connections)(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port
               for c in conns):
            return True
    return False


def kill_tree(pid):
    """SIGKILL PID's descendants, deepest first, then PID itself."""
    for p in reversed(tree(pid)):
        try:
            p.kill()
        except psutil.Error:
            pass


class Sampler(threading.Thread):
    """Peak RSS (KiB) and peak thread count of some processes, every INTERVAL s.

    PIDS maps a name to a pid.  With whole_tree each sample sums over the
    process tree (psutil walks every process on the machine for that); without
    it only the process itself is read, which stays cheap with thousands of
    threads.
    """

    def __init__(self, pids, interval=0.02, whole_tree=True, limit=600.0):
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.whole_tree = whole_tree
        self.limit = limit
        self.peak_rss = {k: 0 for k in pids}
        self.peak_threads = {k: 0 for k in pids}
        self.samples = 0
        self.stop_ev = threading.Event()
        self._own = {}

    def _procs(self, pid):
        if self.whole_tree:
            return tree(pid)
        if pid not in self._own:
            try:
                self._own[pid] = psutil.Process(pid)
            except psutil.Error:
                return []
        return [self._own[pid]]

    def run(self):
        end = time.monotonic() + self.limit
        while not self.stop_ev.is_set() and time.monotonic() < end:
            for k, pid in self.pids.items():
                rss = threads = 0
                for p in self._procs(pid):
                    try:
                        with p.oneshot():
                            rss += p.memory_info().rss
                            threads += p.num_threads()
                    except psutil.Error:
                        pass
                self.peak_rss[k] = max(self.peak_rss[k], rss // 1024)
                self.peak_threads[k] = max(self.peak_threads[k], threads)
            self.samples += 1
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        if self.is_alive():
            self.join(5)
