"""Training-progress meters in the reference's `util/misc.py` style (docs/moa.md §5.6): SmoothedValue and MetricLogger.

Pure Python: values must already be Python numbers (call `.item()` on every rank first, docs/jittor_notes.md A4), and
only the printing is restricted to the main process by the caller passing `enabled`.
"""
import datetime
import time
from collections import deque


class SmoothedValue:
    """Recent values in a window plus a running total: median/avg over the window, global_avg over everything."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self):
        if not self.deque:
            return 0.0
        values = sorted(self.deque)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])

    @property
    def avg(self):
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / self.count if self.count else 0.0

    @property
    def max(self):
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """A dict of SmoothedValues; `log_every` yields items and prints an ETA line every `print_freq` items."""

    def __init__(self, delimiter="  ", enabled=True, print_fn=print):
        self.meters = {}
        self.delimiter = delimiter
        self.enabled = enabled
        self.print_fn = print_fn

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if value is None:
                continue
            if not isinstance(value, (int, float)):
                raise TypeError("MetricLogger.update(%s=...) needs a Python number, got %s" % (name, type(value)))
            self.meters.setdefault(name, SmoothedValue()).update(float(value))

    def __getattr__(self, name):
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError("%r object has no attribute %r" % (type(self).__name__, name))

    def __str__(self):
        return self.delimiter.join("%s: %s" % (name, meter) for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq, header="", total=None):
        """Yield from `iterable`; every `print_freq` items (and at the last) print eta, meters and timings."""
        total = len(iterable) if total is None else total
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if self.enabled and print_freq > 0 and (i % print_freq == 0 or i == total - 1):
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * max(total - i - 1, 0)))
                self.print_fn("%s [%*d/%d]  eta: %s  %s  time: %s  data: %s" % (
                    header, width, i, total, eta, self, iter_time, data_time))
            i += 1
            end = time.time()
        if self.enabled and i:
            spent = time.time() - start
            self.print_fn("%s Total time: %s (%.4f s / it)" % (header, datetime.timedelta(seconds=int(spent)),
                                                               spent / i))


class TrainReporter:
    """Rank-0 side effects of a run: `log.txt` JSON lines, tensorboardX scalars and a tqdm bar.

    Every method is a no-op on other ranks. Scalars use x = optimizer step: `c_train_loss`, `lr`, `val_loss`.
    Lines carry a "kind" (train / val / epoch / event). Checkpoints record how many lines were written, so a
    resumed run drops what the killed run logged after its checkpoint and ends with the same log.
    """

    def __init__(self, output_dir, enabled, total_steps, start_step=0, keep_lines=None, progress=True):
        """`keep_lines`: on resume, the number of log.txt lines the checkpoint had seen (the rest is dropped)."""
        import json
        import os
        self._json = json
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.lines = 0
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.log_path = os.path.join(output_dir, "log.txt")
        self._truncate_log(keep_lines or 0)
        try:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(log_dir=output_dir, purge_step=start_step + 1 if start_step else None)
        except ImportError:
            self.writer = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def _truncate_log(self, n):
        """Keep the first n lines (what was logged up to the checkpoint being resumed; 0 for a fresh run)."""
        import os
        kept = []
        if n and os.path.isfile(self.log_path):
            with open(self.log_path) as f:
                kept = f.readlines()[:n]
        tmp = self.log_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.log_path)
        self.lines = len(kept)

    def print(self, *args):
        if not self.enabled:
            return
        msg = " ".join(str(a) for a in args)
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, kind, **fields):
        if not self.enabled:
            return
        with open(self.log_path, "a") as f:
            f.write(self._json.dumps(dict(kind=kind, **fields)) + "\n")
            f.flush()
        self.lines += 1

    def scalar(self, name, value, step):
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def advance(self, n=1, **postfix):
        if self.enabled and self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
